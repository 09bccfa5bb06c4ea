"""The job-wide read plan (`balanced_load`) is pure: built from hand-made sources and the real
layouts of dp, dp x mp, pp and resume-with-optimizer jobs, it must have every block any rank
needs read by exactly one rank, balanced by bytes, and an exchange (simulated here by summing
the ranks' contributions, as the AllReduce does) must give every rank exactly the arrays its
own load would have read."""
import itertools

import ml_dtypes
import numpy as np
import pytest

from mindformers_st.dtypes import ITEMSIZE, ST_TO_NUMPY
from mindformers_st.errors import PlanError
from mindformers_st.layout.owners import least_loaded
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.transform.plan import Plan, TargetFile
from mindformers_st.transform.planner import plan_rank_slices
from mindformers_st.transform.read_plan import need_key, plan_job_reads
from mindformers_st.transform.sources import SourceCheckpoint, SourceChunk

from .helpers import tiny_table
from .test_planner import source_from_layouts


def plan_job_loads(src, layouts, ranks, include_hyper=True):
    """The job plan of a load of `src` into `layouts` on `ranks`: each rank's own plan, as the
    loader computes it for every rank, then `plan_job_reads`."""
    return plan_job_reads({r: plan_rank_slices(src, layouts, r, include_hyper=include_hyper)
                           for r in ranks})


def complete_source(table):
    """Complete weights in two shards, plus a hyper value, as a merged checkpoint holds them."""
    src = SourceCheckpoint({}, {}, {}, kind="complete", root="/src")
    for i, spec in enumerate(table):
        src.add(SourceChunk(f"/src/model-0000{1 + i % 2}-of-00002.safetensors", spec.name,
                            spec.dtype, spec.name, TensorSlice.whole(spec.shape)))
    src.hyper["global_step"] = SourceChunk("/src/hyper_param.safetensors", "global_step", "I32",
                                           "global_step", TensorSlice.whole((1,)))
    return src


def check_job(src, layouts, world):
    """The invariants every job plan keeps; returns (plan, bytes each rank reads alone)."""
    alone = {r: plan_rank_slices(src, layouts, r) for r in range(world)}
    job = plan_job_loads(src, layouts, range(world))
    wanted = {}
    for r, p in alone.items():
        for t in p.files[0].tensors:
            wanted.setdefault(need_key(t), set()).add(r)
    # every distinct block is one need, read by one of the ranks needing it, held by exactly them
    assert {need_key(n.target) for n in job.needs} == set(wanted)
    assert len(job.needs) == len(wanted)
    for n in job.needs:
        assert set(n.holders) == wanted[need_key(n.target)]
        assert n.reader in n.holders
    # every rank ends with exactly its own plan's targets
    for r in range(world):
        assert sorted(job.names_of(r)) == sorted(t.name for t in alone[r].files[0].tensors)
    # the bytes read over the job are each block's bytes once
    distinct = sum(n.nbytes for n in job.needs)
    assert sum(job.bytes_read().values()) == distinct
    assert sum(job.reads_of(r).files[0].nbytes for r in range(world)) == distinct
    # each shared need is in the one stream of its holders, end to end
    streamed = [(s.ranks, n) for s in job.streams for n in s.needs]
    assert sorted(id(n) for _, n in streamed) == sorted(id(n) for n in job.needs
                                                         if len(n.holders) > 1)
    assert all(ranks == n.holders for ranks, n in streamed)
    for s in job.streams:
        assert list(s.offsets) == list(itertools.accumulate([0] + [n.nbytes for n in s.needs]))[:-1]
        assert s.nbytes == sum(n.nbytes for n in s.needs)
    return job, {r: p.files[0].nbytes for r, p in alone.items()}


def values_for(src, seed=0):
    """Random global values for every tensor of `src` (bit patterns, NaNs and -0.0 included)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in list(src.global_shapes.items()) + [(n, c.slice.sizes) for n, c in
                                                          src.hyper.items()]:
        dtype = src.dtypes.get(name) or src.hyper[name].dtype
        raw = rng.integers(0, 256, int(np.prod(shape)) * ITEMSIZE[dtype], dtype=np.uint8)
        out[name] = raw.view(ST_TO_NUMPY[dtype]).reshape(shape)
    return out


def read_alone(plan, values):
    """What `execute_to_memory` would give for `plan` when the files hold `values`."""
    return {t.name: np.ascontiguousarray(values[t.name][t.global_slice.index()]
                                         if t.global_slice is not None else values[t.name])
            for f in plan.files for t in f.tensors}


def simulate_exchange(job, values, world, window, gather=False):
    """Each rank reads its share, then every window of every stream is the sum (as integers,
    exactly as the float AllReduce of the encoded bytes) of its ranks' contributions — or,
    `gather`, every rank gets every reader's own bytes padded to the widest (as AllGather)."""
    arrays = {r: read_alone(job.reads_of(r), values) for r in range(world)}
    for s in job.streams:
        for a, b in s.windows(window):
            if gather:
                width = max(s.share_sizes(a, b).values())
                shares = {}
                for r in s.ranks:
                    mine = s.share_of(a, b, r, arrays[r])
                    assert mine.size == s.share_sizes(a, b)[r]
                    shares[r] = np.concatenate([mine, np.full(width - mine.size, 7, np.uint8)])
                for r in s.ranks:
                    s.receive_shares(a, b, r, shares, arrays[r])
                continue
            parts = [s.contribution(a, b, r, arrays[r]).astype(np.int64) for r in s.ranks]
            total = np.sum(parts, axis=0)
            assert total.max(initial=0) <= 255   # one rank gives each byte, the others zeros
            for r in s.ranks:
                s.receive(a, b, r, total.astype(np.uint8), arrays[r])
    return arrays


def assert_exchange_exact(src, layouts, world, window=7):
    job, _ = check_job(src, layouts, world)
    values = values_for(src)
    for gather in (False, True):
        got = simulate_exchange(job, values, world, window, gather)
        for r in range(world):
            want = read_alone(plan_rank_slices(src, layouts, r), values)
            assert sorted(got[r]) == sorted(want)
            for n in want:
                assert got[r][n].dtype == want[n].dtype and got[r][n].shape == want[n].shape
                assert got[r][n].tobytes() == want[n].tobytes(), (r, n, gather)


def test_dp2_each_rank_reads_half_and_every_block_once():
    table = tiny_table()
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(data_parallel=2))
    job, alone = check_job(src, layouts, 2)
    read = job.bytes_read()
    total = sum(n.nbytes for n in job.needs)
    assert sum(alone.values()) == 2 * total          # alone: every byte read twice
    biggest = max(n.nbytes for n in job.needs)
    assert abs(read[0] - read[1]) <= biggest          # balanced within one tensor
    assert [s.ranks for s in job.streams] == [(0, 1)]  # one group: the dp group


def test_dp2_mp2_shares_over_dp_pairs_and_the_world():
    table = tiny_table()
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(data_parallel=2, model_parallel=2))
    job, alone = check_job(src, layouts, 4)
    # mp-split blocks are needed by a dp pair, replicated ones (norms, hyper) by all four
    assert sorted(s.ranks for s in job.streams) == [(0, 1, 2, 3), (0, 2), (1, 3)]
    read = job.bytes_read()
    biggest = max(n.nbytes for n in job.needs)
    assert max(read.values()) - min(read.values()) <= biggest
    assert sum(alone.values()) > 1.9 * sum(read.values())   # dp2: nearly everything twice
    # both ranks of a dp pair read part of their mp shard (none is left to one of them)
    for pair in ((0, 2), (1, 3)):
        s = next(s for s in job.streams if s.ranks == pair)
        assert {n.reader for n in s.needs} == set(pair)


def test_pipeline_stages_read_their_own_tensors_and_share_only_hyper_values():
    table = tiny_table(layers=2)
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(pipeline_stage=2))
    job, alone = check_job(src, layouts, 2)
    # each stage's tensors have one holder: read by it, not exchanged; global_step is shared
    assert [s.ranks for s in job.streams] == [(0, 1)]
    assert [n.target.name for n in job.streams[0].needs] == ["global_step"]
    step_reader = job.streams[0].needs[0].reader
    assert job.bytes_read() == {r: alone[r] - (0 if r == step_reader else 4) for r in (0, 1)}


def test_pp2_dp2_exchanges_within_each_stage():
    table = tiny_table(layers=2)
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(data_parallel=2, pipeline_stage=2))
    job, _ = check_job(src, layouts, 4)
    assert sorted(s.ranks for s in job.streams) == [(0, 1), (0, 1, 2, 3), (2, 3)]
    assert_exchange_exact(src, layouts, 4)


@pytest.mark.parametrize("shard", [False, True])
def test_resume_with_optimizer_state_from_rank_files(shard):
    """Weights and AdamW moments saved dp2 (moments optimizer-sharded or not), loaded dp2."""
    table = tiny_table().with_optimizer_states()
    pc = ParallelConfig(data_parallel=2, optimizer_shard=shard)
    src = source_from_layouts(table, pc)
    src.hyper["global_step"] = SourceChunk("/src/rank_0/c.safetensors", "global_step", "I32",
                                           "global_step", TensorSlice.whole((1,)))
    layouts = plan_layouts(table, pc)
    job, alone = check_job(src, layouts, 2)
    if shard:   # each rank's moment shard is its own: read locally, never exchanged
        moments = [n for n in job.needs if n.target.name.startswith("adam_")
                   and n.target.global_slice.sizes[0] < n.target.global_slice.global_shape[0]]
        assert moments and all(len(n.holders) == 1 for n in moments)
    # a reader reads its block from its own rank file (the same_layout preference)
    for n in job.needs:
        if n.target.global_slice is not None:
            assert all(f"rank_{n.reader}/" in op.src_file for op in n.target.ops)
    assert_exchange_exact(src, layouts, 2)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("pc", [ParallelConfig(data_parallel=2),
                                ParallelConfig(data_parallel=2, model_parallel=2)])
def test_exchange_gives_every_rank_its_own_bytes_exactly(dtype, pc):
    table = tiny_table(dtype=dtype)
    src = complete_source(table)
    assert_exchange_exact(src, plan_layouts(table, pc), pc.world_size, window=5)


def test_fp32_negative_zero_and_nan_payloads_survive_the_exchange():
    table = tiny_table()
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(data_parallel=2))
    job, _ = check_job(src, layouts, 2)
    values = values_for(src)
    w = values["lm_head.weight"]
    w.reshape(-1).view(np.uint32)[:3] = [0x80000000, 0x7FC01234, 0xFF800001]   # -0.0, NaNs
    for gather in (False, True):
        got = simulate_exchange(job, values, 2, 16, gather)
        for r in (0, 1):
            assert got[r]["lm_head.weight"].tobytes() == w.tobytes()


def test_the_plan_is_the_same_whatever_order_the_ranks_are_given_in():
    table = tiny_table()
    src = complete_source(table)
    layouts = plan_layouts(table, ParallelConfig(data_parallel=2, model_parallel=2))
    plans = {r: plan_rank_slices(src, layouts, r) for r in range(4)}
    a = plan_job_reads(plans)
    b = plan_job_reads({r: plans[r] for r in (3, 1, 0, 2)})
    assert a == b


def test_a_tensor_planned_twice_on_one_rank_is_refused():
    table = tiny_table()
    src = complete_source(table)
    p = plan_rank_slices(src, plan_layouts(table, ParallelConfig()), 0)
    t = p.files[0].tensors[0]
    with pytest.raises(PlanError, match="planned twice"):
        plan_job_reads({0: Plan("x", (TargetFile("a", (t, t)),))})


def test_least_loaded_starts_from_the_given_load_and_takes_largest_first():
    load = {0: 10}
    assert least_loaded([(4, "a", (0, 1)), (8, "b", (0, 1)), (3, "c", (0, 1))], load) == [1, 1, 0]
    assert load == {0: 13, 1: 12}


def test_bf16_values_are_compared_as_bits():   # guards the helper the tests above rely on
    a = np.array([1.5], ml_dtypes.bfloat16)
    assert a.reshape(-1).view(np.uint8).tobytes() == a.tobytes()
