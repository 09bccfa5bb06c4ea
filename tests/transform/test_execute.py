"""The engine on real tiny files: every output is compared bit for bit with a numpy reference."""
import json
import os

import numpy as np
import pytest

from mindformers_st.errors import CheckpointError, LayoutError, PlanError
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.strategy import write_rank_strategy_files, write_strategy_file
from mindformers_st.storage.checksum import verify_checksums
from mindformers_st.storage.reader import open_safetensors
from mindformers_st.transform import (describe_complete, describe_distributed, describe_source,
                                      execute, execute_to_memory, plan_distributed, plan_merge,
                                      plan_rank_slices, plan_stats)

from .helpers import (HYPER, assert_bit_exact, assert_rank_files_match, load_folder_tensors,
                      load_rank, make_globals, save_distributed, tiny_table)

DTYPES = ["F32", "BF16"]


def merged(tmp_path, src_dir, name="merged", **kw):
    out = str(tmp_path / name)
    execute(plan_merge(describe_source(src_dir), **kw), out, progress=False)
    return out


def check_complete(folder, values):
    got = load_folder_tensors(folder)
    assert set(got) == set(values) | set(HYPER)
    for n, v in values.items():
        assert_bit_exact(got[n], v, n)
    for n, v in HYPER.items():
        assert_bit_exact(got[n], v, n)
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with open_safetensors(os.path.join(folder, f)) as fh:
                assert verify_checksums(fh) == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pc", [ParallelConfig(model_parallel=4, vocab_emb_dp=False),
                                ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True),
                                ParallelConfig(model_parallel=2, pipeline_stage=2)],
                         ids=["mp4", "dp2mp2-optshard", "pp2mp2"])
def test_merge_distributed_to_complete_is_bit_exact(tmp_path, dtype, pc):
    table = tiny_table(dtype)
    values = make_globals(table)
    save_distributed(str(tmp_path / "src"), values, table, pc)
    out = merged(tmp_path, str(tmp_path / "src"))
    check_complete(out, values)
    assert json.load(open(os.path.join(out, "param_name_map.json")))["metadata"]["total_size"] == \
        table.total_bytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_deduplicated_source_finds_slices_outside_rank0(tmp_path, dtype):
    table = tiny_table(dtype)
    values = make_globals(table, seed=1)
    pc = ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=False)
    save_distributed(str(tmp_path / "src"), values, table, pc, remove_redundancy=True)
    tensors0, _ = load_rank(str(tmp_path / "src"), 0)
    assert len(tensors0) < len(values)          # rank 0 does not have everything
    check_complete(merged(tmp_path, str(tmp_path / "src")), values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src_pc,dst_pc,rr", [
    (ParallelConfig(model_parallel=4, vocab_emb_dp=False), ParallelConfig(model_parallel=2, vocab_emb_dp=False), False),
    (ParallelConfig(model_parallel=2), ParallelConfig(data_parallel=2, model_parallel=2), False),
    (ParallelConfig(data_parallel=2, model_parallel=2), ParallelConfig(model_parallel=2), False),
    (ParallelConfig(pipeline_stage=2), ParallelConfig(), False),
    (ParallelConfig(), ParallelConfig(pipeline_stage=2, model_parallel=2), False),
    (ParallelConfig(model_parallel=2), ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True), True),
    (ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True), ParallelConfig(model_parallel=4), False),
], ids=["mp4-mp2", "mp2-dp2mp2", "dp2mp2-mp2", "pp2-pp1", "pp1-pp2mp2", "mp2-optshard-rr", "optshard-mp4"])
def test_reshard_distributed_to_distributed_is_bit_exact(tmp_path, dtype, src_pc, dst_pc, rr):
    table = tiny_table(dtype)
    values = make_globals(table, seed=2)
    save_distributed(str(tmp_path / "src"), values, table, src_pc, remove_redundancy=(src_pc.data_parallel > 1))
    src = describe_distributed(str(tmp_path / "src"))
    dst_layouts = plan_layouts(table, dst_pc)
    out = str(tmp_path / "dst")
    execute(plan_distributed(src, dst_layouts, dst_pc, remove_redundancy=rr), out, progress=False)
    assert_rank_files_match(out, values, dst_layouts, dst_pc.world_size, remove_redundancy=rr)
    _, meta = load_rank(out, 0)
    assert meta["parallel_config"]["model_parallel"] == dst_pc.model_parallel
    assert (meta["epoch"], meta["step"]) == (2, 30)
    # and the result merges back to the reference
    check_complete(merged(tmp_path, out), values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_complete_into_ranks_and_load_one_rank_in_memory(tmp_path, dtype):
    table = tiny_table(dtype)
    values = make_globals(table, seed=3)
    save_distributed(str(tmp_path / "src"), values, table, ParallelConfig(model_parallel=2))
    full = merged(tmp_path, str(tmp_path / "src"))
    src = describe_complete(full)
    assert src.kind == "complete" and set(src.hyper) == set(HYPER)
    pc = ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True)
    layouts = plan_layouts(table, pc)
    execute(plan_distributed(src, layouts, pc), str(tmp_path / "split"), progress=False)
    assert_rank_files_match(str(tmp_path / "split"), values, layouts, 4)
    mem = execute_to_memory(plan_rank_slices(src, layouts, rank=3))
    for name, lay in layouts.items():
        assert_bit_exact(mem[name], values[name][lay.slice_for(3).index()], name)
    assert_bit_exact(mem["global_step"], HYPER["global_step"])


def test_mindspore_strategy_files_describe_rank_folders_without_our_metadata(tmp_path):
    table = tiny_table()
    values = make_globals(table, seed=4)
    pc = ParallelConfig(model_parallel=2, pipeline_stage=2)
    layouts = save_distributed(str(tmp_path / "src"), values, table, pc, metadata=False)
    with pytest.raises(CheckpointError, match="--src-strategy"):
        describe_distributed(str(tmp_path / "src"))
    write_rank_strategy_files(str(tmp_path / "strategy"), layouts, pc)
    src = describe_distributed(str(tmp_path / "src"), strategy=str(tmp_path / "strategy"))
    assert set(src.hyper) == set(HYPER)
    check_complete(merged(tmp_path, str(tmp_path / "src")) if False else _merge_src(tmp_path, src), values)


def _merge_src(tmp_path, src):
    out = str(tmp_path / "m")
    execute(plan_merge(src), out, progress=False)
    return out


def test_a_strategy_that_does_not_match_the_files_is_refused(tmp_path):
    table = tiny_table()
    values = make_globals(table)
    save_distributed(str(tmp_path / "src"), values, table, ParallelConfig(model_parallel=2), metadata=False)
    write_strategy_file(str(tmp_path / "s.ckpt"), plan_layouts(table, ParallelConfig(data_parallel=2)))
    with pytest.raises(CheckpointError, match="does not match"):
        describe_distributed(str(tmp_path / "src"), strategy=str(tmp_path / "s.ckpt"))


def test_missing_rank_folder_is_named(tmp_path):
    table = tiny_table()
    save_distributed(str(tmp_path / "src"), make_globals(table), table, ParallelConfig(model_parallel=4))
    os.rename(tmp_path / "src" / "rank_2", tmp_path / "rank_2_elsewhere")
    with pytest.raises(CheckpointError, match="rank_2/ is missing"):
        describe_distributed(str(tmp_path / "src"))


def test_file_suffix_picks_the_step_and_the_newest_is_the_default(tmp_path):
    table = tiny_table()
    old, new = make_globals(table, 5), make_globals(table, 6)
    pc = ParallelConfig(model_parallel=2)
    save_distributed(str(tmp_path / "src"), old, table, pc, suffix="1_10")
    save_distributed(str(tmp_path / "src"), new, table, pc, suffix="2_20")
    check_complete(merged(tmp_path, str(tmp_path / "src"), "newest"), new)
    src = describe_distributed(str(tmp_path / "src"), step="1_10")
    assert (src.epoch, src.step) == (1, 10)
    out = str(tmp_path / "old")
    execute(plan_merge(src), out, progress=False)
    check_complete(out, old)


def test_a_save_only_some_ranks_finished_is_never_mixed_into_a_merge(tmp_path):
    """A crash after rank 0 wrote step 30 but before rank 1 did: the newest step EVERY rank holds
    (20) is merged, never rank 0's step 30 with rank 1's step 20."""
    table = tiny_table()
    old, new = make_globals(table, 5), make_globals(table, 6)
    pc = ParallelConfig(model_parallel=2)
    save_distributed(str(tmp_path / "src"), old, table, pc, suffix="1_20")
    save_distributed(str(tmp_path / "part"), new, table, pc, suffix="1_30")
    os.rename(tmp_path / "part" / "rank_0" / "checkpoint_rank_0-1_30.safetensors",
              tmp_path / "src" / "rank_0" / "checkpoint_rank_0-1_30.safetensors")
    check_complete(merged(tmp_path, str(tmp_path / "src"), "common"), old)
    os.remove(tmp_path / "src" / "rank_1" / "checkpoint_rank_1-1_20.safetensors")
    save_distributed(str(tmp_path / "other"), new, table, pc, suffix="1_40")
    os.rename(tmp_path / "other" / "rank_1" / "checkpoint_rank_1-1_40.safetensors",
              tmp_path / "src" / "rank_1" / "checkpoint_rank_1-1_40.safetensors")
    with pytest.raises(CheckpointError, match="share no"):
        describe_distributed(str(tmp_path / "src"))


def test_uneven_split_fails_before_any_byte_is_written(tmp_path):
    table = tiny_table(hidden=8, inter=12)
    with pytest.raises(LayoutError, match="not divisible"):
        plan_layouts(table, ParallelConfig(model_parallel=8))


def test_output_folder_is_refused_when_not_empty_and_replaced_with_overwrite(tmp_path):
    table = tiny_table()
    values = make_globals(table)
    save_distributed(str(tmp_path / "src"), values, table, ParallelConfig(model_parallel=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    plan = plan_merge(describe_source(str(tmp_path / "src")))
    with pytest.raises(CheckpointError, match="--overwrite"):
        execute(plan, str(out), progress=False)
    assert (out / "keep.txt").exists()
    execute(plan, str(out), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists()
    check_complete(str(out), values)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_a_failure_leaves_no_output_folder_and_no_staging_folder(tmp_path):
    table = tiny_table()
    save_distributed(str(tmp_path / "src"), make_globals(table), table, ParallelConfig(model_parallel=2))
    plan = plan_merge(describe_source(str(tmp_path / "src")))

    def boom(folder):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        execute(plan, str(tmp_path / "out"), progress=False, finalize=boom)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_plan_that_reads_outside_a_source_is_refused_before_writing(tmp_path):
    from dataclasses import replace
    table = tiny_table()
    save_distributed(str(tmp_path / "src"), make_globals(table), table, ParallelConfig(model_parallel=2))
    plan = plan_merge(describe_source(str(tmp_path / "src")))
    f0 = plan.files[0]
    t0 = f0.tensors[0]
    bad_op = replace(t0.ops[0], src_offsets=(5,) + t0.ops[0].src_offsets[1:])
    bad = replace(plan, files=(replace(f0, tensors=(replace(t0, ops=(bad_op,) + t0.ops[1:]),) + f0.tensors[1:]),))
    with pytest.raises(PlanError, match="leaves the source"):
        execute(bad, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_shards_split_at_the_size_limit_and_stats_match_the_bytes(tmp_path):
    table = tiny_table()
    values = make_globals(table)
    save_distributed(str(tmp_path / "src"), values, table, ParallelConfig(model_parallel=4, vocab_emb_dp=False))
    plan = plan_merge(describe_source(str(tmp_path / "src")), max_shard_size=1000)
    stats = plan_stats(plan)
    assert stats["total_bytes_read"] == stats["total_bytes_written"] == table.total_bytes + 12
    assert stats["source_files"] == 4
    wo = [p for p in stats["files"] if p["read_runs"] > p["tensors"]]
    assert wo, "column-split tensors read in several runs"
    out = str(tmp_path / "out")
    paths = execute(plan, out, progress=False, workers=3)
    shards = [p for p in paths if "model-" in p]
    assert len(shards) > 3 and all(os.path.getsize(p) < 1000 + 4096 for p in shards)
    check_complete(out, values)


@pytest.mark.parametrize("small_direct", [0, 1 << 40])
def test_rows_written_direct_or_staged_give_the_same_bytes(tmp_path, monkeypatch, small_direct):
    """Interleaved one-row copies (a fused w_gate_hidden) and whole-row ranges are exact whether
    the engine writes them straight from the mapping or stages them with their neighbours."""
    from mindformers_st.storage.writer import save_tensors
    import importlib
    execute_mod = importlib.import_module("mindformers_st.transform.execute")
    from mindformers_st.transform.plan import CopyOp, Plan, TargetFile, TargetTensor

    monkeypatch.setattr(execute_mod, "SMALL_DIRECT_BYTES", small_direct)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((40, 6)).astype(np.float32)
    w3 = rng.standard_normal((40, 6)).astype(np.float32)
    src = str(tmp_path / "src.safetensors")
    save_tensors(src, {"w1": w1, "w3": w3})
    ops = []
    for r in range(20):           # rows 0..39 interleave w1/w3 row by row
        ops.append(CopyOp(src, "w1", (r, 0), (2 * r, 0), (1, 6)))
        ops.append(CopyOp(src, "w3", (r, 0), (2 * r + 1, 0), (1, 6)))
    ops.append(CopyOp(src, "w1", (20, 0), (40, 0), (20, 6)))   # then whole-row ranges
    ops.append(CopyOp(src, "w3", (20, 0), (60, 0), (20, 6)))
    plan = Plan("test", (TargetFile("out.safetensors",
                                    (TargetTensor("fused", "F32", (80, 6), tuple(ops)),)),))
    execute_mod.execute(plan, str(tmp_path / "out"), progress=False)
    want = np.empty((80, 6), np.float32)
    want[0:40:2], want[1:40:2], want[40:60], want[60:80] = w1[:20], w3[:20], w1[20:], w3[20:]
    with open_safetensors(str(tmp_path / "out" / "out.safetensors")) as f:
        assert f.read("fused").tobytes() == want.tobytes()


# --------------------------------------------------------------------------- into given arrays
def _two_tensor_file(tmp_path):
    from mindformers_st.storage.writer import save_tensors
    rng = np.random.default_rng(7)
    values = {"a": rng.standard_normal((64, 24)).astype(np.float32),
              "b": rng.standard_normal((6, 3, 4)).astype(np.float32)}
    path = save_tensors(str(tmp_path / "w.safetensors"), values)
    return path, values


def _whole_plan(path):
    from mindformers_st.layout.tensor_layout import TensorLayout
    src = describe_complete(path)
    layouts = {n: TensorLayout(tuple(src.global_shapes[n]), (2,), (0,) + (-1,) * (
        len(src.global_shapes[n]) - 1)) for n in src.chunks}
    return plan_rank_slices(src, layouts, rank=1)


def test_execute_into_fills_the_given_arrays_in_place(tmp_path):
    from mindformers_st.transform.execute import execute_into
    path, values = _two_tensor_file(tmp_path)
    dest = {"a": np.zeros((32, 24), np.float32), "b": np.zeros((3, 3, 4), np.float32)}
    ptrs = {n: a.ctypes.data for n, a in dest.items()}
    assert sorted(execute_into(_whole_plan(path), dest)) == ["a", "b"]
    assert_bit_exact(dest["a"], values["a"][32:])
    assert_bit_exact(dest["b"], values["b"][3:])
    assert {n: a.ctypes.data for n, a in dest.items()} == ptrs


def test_execute_into_casts_in_bounded_chunks_like_numpy(tmp_path, monkeypatch):
    import ml_dtypes
    import importlib
    ex = importlib.import_module("mindformers_st.transform.execute")
    monkeypatch.setattr(ex, "CHUNK_BYTES", 3 * 24 * 4)   # 3 rows per chunk: several chunks
    path, values = _two_tensor_file(tmp_path)
    dest = {"a": np.zeros((32, 24), ml_dtypes.bfloat16), "b": np.zeros((3, 3, 4), np.float16)}
    ex.execute_into(_whole_plan(path), dest)
    assert_bit_exact(dest["a"], values["a"][32:].astype(ml_dtypes.bfloat16))
    assert_bit_exact(dest["b"], values["b"][3:].astype(np.float16))


def test_execute_into_a_corrupt_source_leaves_every_destination_unchanged(tmp_path):
    from mindformers_st.errors import ChecksumError
    from mindformers_st.transform.execute import execute_into
    from tests.commands.test_integrity import flip_bit
    path, _ = _two_tensor_file(tmp_path)
    flip_bit(path, "b", byte=1)
    dest = {"a": np.full((32, 24), 3, np.float32), "b": np.full((3, 3, 4), 3, np.float32)}
    with pytest.raises(ChecksumError, match="'b' is corrupt"):   # checked before 'a' is filled
        execute_into(_whole_plan(path), dest, verify="full")
    assert all((a == 3).all() for a in dest.values())


def test_execute_into_refuses_a_destination_of_another_shape(tmp_path):
    from mindformers_st.transform.execute import execute_into
    path, _ = _two_tensor_file(tmp_path)
    with pytest.raises(PlanError, match="'a' is \\[32, 24\\] in the plan but its destination"):
        execute_into(_whole_plan(path), {"a": np.zeros((24, 32), np.float32)})
    with pytest.raises(PlanError, match="no target tensor 'c'"):
        execute_into(_whole_plan(path), {"c": np.zeros((1,), np.float32)})
