"""Planning is pure: these tests build SourceCheckpoints by hand (file names that need not exist)."""
import json

import pytest

from mindformers_st.errors import CheckpointError, PlanError
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.transform.planner import (contiguous_runs, cover, plan_distributed,
                                              target_tensor,
                                              plan_merge, plan_rank_slices, split_plan)
from mindformers_st.transform.sources import SourceCheckpoint, SourceChunk, subtract, uncovered

from .helpers import tiny_table


def split_source(name, shape, parts, dim, dtype="F32", replicas=1):
    """A tensor split in `parts` along `dim`, each part in rank files (with `replicas` copies)."""
    src = SourceCheckpoint({}, {}, {}, kind="distributed", root="/src")
    step = shape[dim] // parts
    for p in range(parts):
        offs = [0] * len(shape)
        sizes = list(shape)
        offs[dim], sizes[dim] = p * step, step
        for k in range(replicas):
            r = k * parts + p
            src.add(SourceChunk(f"/src/rank_{r}/c.safetensors", name, dtype, name,
                                TensorSlice(tuple(shape), tuple(offs), tuple(sizes))))
    return src


def source_from_layouts(table, pc, keep=None):
    """The SourceCheckpoint training under `pc` would leave (keep: rank filter per slice)."""
    src = SourceCheckpoint({}, {}, {}, kind="distributed", root="/src")
    for name, lay in plan_layouts(table, pc).items():
        for r in lay.ranks():
            sl = lay.slice_for(r)
            if keep is None or keep(name, sl, r):
                src.add(SourceChunk(f"/src/rank_{r}/c.safetensors", name, "F32", name, sl))
    return src


def test_subtract_and_uncovered_partition_a_box():
    box = TensorSlice.whole((4, 6))
    cut = TensorSlice((4, 6), (1, 2), (2, 2))
    parts = subtract(box, cut)
    assert sum(p.numel for p in parts) == 24 - 4
    assert all(p.intersect(cut) is None for p in parts)
    assert uncovered(box, parts + [cut]) == []
    assert uncovered(box, parts)[0] == cut


def test_cover_fills_a_column_block_from_two_column_shards():
    src = split_source("w", (4, 8), parts=4, dim=1)
    target = TensorSlice((4, 8), (0, 2), (4, 4))        # spans half of shard 0..2
    pieces = cover(target, src.chunks["w"])
    assert sum(b.numel for _, b in pieces) == target.numel
    assert [c.slice.offsets[1] for c, _ in pieces] == [2, 4]


def test_cover_reads_one_replica_and_prefers_the_given_file():
    src = split_source("w", (4, 8), parts=2, dim=0, replicas=2)
    pieces = cover(TensorSlice.whole((4, 8)), src.chunks["w"], prefer={"/src/rank_3/c.safetensors"})
    assert len(pieces) == 2
    assert pieces[1][0].file == "/src/rank_3/c.safetensors"


def test_cover_names_the_hole_when_a_slice_is_in_no_file():
    src = split_source("w", (4, 8), parts=2, dim=0)
    src.chunks["w"].pop()
    with pytest.raises(PlanError, match=r"'w'.*no source file"):
        cover(TensorSlice.whole((4, 8)), src.chunks["w"])


def test_cover_is_exact_for_any_mix_of_overlapping_slices():
    """Whatever slices the files hold (overlapping, partly outside the target, tiling it, one
    holding all of it), the pieces fill the target exactly once or the hole is named —
    compared element by element with a brute-force count."""
    import random
    import numpy as np
    rng = random.Random(3)
    shape = (4, 6)
    boxes = [TensorSlice(shape, (o0, o1), (s0, s1)) for o0, s0 in
             [(0, 4), (0, 2), (2, 2), (1, 2), (0, 1), (1, 3)] for o1, s1 in
             [(0, 6), (0, 3), (3, 3), (2, 2), (1, 4)]]
    targets = [TensorSlice.whole(shape), TensorSlice(shape, (0, 0), (2, 6)),
               TensorSlice(shape, (1, 1), (2, 4))]
    for trial in range(300):
        slices = rng.sample(boxes, rng.randint(1, 5))
        chunks = [SourceChunk(f"/src/rank_{i}/c.safetensors", "w", "F32", "w", sl)
                  for i, sl in enumerate(slices)]
        target = targets[trial % len(targets)]
        held = np.zeros(shape, bool)
        for sl in slices:
            held[sl.index()] = True
        try:
            pieces = cover(target, chunks)
        except PlanError:
            assert not held[target.index()].all(), slices
            continue
        count = np.zeros(shape, int)
        for chunk, piece in pieces:
            assert piece.intersect(chunk.slice) == piece   # read from a file that holds it
            count[piece.index()] += 1
        want = np.zeros(shape, int)
        want[target.index()] = 1
        np.testing.assert_array_equal(count, want, err_msg=str(slices))


def test_tensors_cut_alike_are_read_from_their_own_files():
    """How slices fill a block is worked out once per distinct cut (remembered by value): every
    tensor of that cut must still read its own files, its own replica choice and its own
    stored name."""
    a = split_source("a", (4, 8), parts=2, dim=0, replicas=2)
    b = split_source("b", (4, 8), parts=2, dim=0, replicas=2)
    for c in b.chunks["b"]:
        object.__setattr__(c, "file", c.file.replace("/src/", "/other/"))
    block = TensorSlice((4, 8), (1, 0), (2, 8))
    for hint in (0, 1):
        for src, name, root in ((a, "a", "/src/"), (b, "b", "/other/")):
            t = target_tensor(src, name, block, hint=hint)
            assert [op.src_name for op in t.ops] == [name, name]
            assert all(op.src_file.startswith(root) for op in t.ops)
            assert [op.src_file.split("/")[2] for op in t.ops] == (
                ["rank_0", "rank_1"] if hint == 0 else ["rank_2", "rank_3"])
            assert [(op.src_offsets, op.dst_offsets, op.sizes) for op in t.ops] == [
                ((1, 0), (0, 0), (1, 8)), ((0, 0), (1, 0), (1, 8))]
    a.chunks["a"][:] = [c for c in a.chunks["a"] if c.slice.offsets[0] == 0]   # rows 2-3 gone:
    # the hole is found though an equal cut was complete a moment ago
    with pytest.raises(PlanError, match=r"'a'.*\[2, 0\]"):
        target_tensor(a, "a", TensorSlice.whole((4, 8)))


def test_check_complete_reports_missing_rank_pieces():
    src = split_source("w", (4, 8), parts=2, dim=0)
    src.chunks["w"].pop()
    with pytest.raises(CheckpointError, match="in no file"):
        src.check_complete()


def test_check_complete_remembers_a_cover_for_its_shape_only():
    """Pieces found to cover one tensor are remembered so an equal cut is not worked out again;
    a tensor left with no pieces (a caller removed them) must still be reported though an
    empty tensor with no pieces was complete a moment before."""
    src = SourceCheckpoint({}, {}, {}, root="/src")
    src.add(SourceChunk("/src/a", "empty", "F32", "empty", TensorSlice.whole((0, 4))))
    src.add(SourceChunk("/src/a", "w", "F32", "w", TensorSlice.whole((4, 4))))
    src.check_complete()
    src.chunks["empty"].clear()
    src.chunks["w"].clear()
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*in no file"):
        src.check_complete()


def test_source_refuses_disagreeing_shapes_and_dtypes():
    src = split_source("w", (4, 8), parts=2, dim=0)
    with pytest.raises(CheckpointError, match="global shape"):
        src.add(SourceChunk("/x", "w", "F32", "w", TensorSlice.whole((4, 9))))
    with pytest.raises(CheckpointError, match="dtype"):
        src.add(SourceChunk("/x", "w", "BF16", "w", TensorSlice.whole((4, 8))))


def test_merge_packs_shards_under_the_size_limit_and_writes_the_index():
    src = SourceCheckpoint({}, {}, {}, root="/src")
    for i in range(5):
        src.add(SourceChunk("/src/a.safetensors", f"t{i}", "F32", f"t{i}", TensorSlice.whole((10, 10))))
    src.hyper["global_step"] = SourceChunk("/src/a.safetensors", "global_step", "I32",
                                           "global_step", TensorSlice.whole((1,)))
    plan = plan_merge(src, max_shard_size=850)            # two 400-byte tensors per shard
    shards = [f for f in plan.files if f.path.startswith("model-")]
    assert [f.path for f in shards] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert [len(f.tensors) for f in shards] == [2, 2, 1]
    assert plan.files[-1].path == "hyper_param.safetensors"
    index = json.loads(dict(plan.side_files)["param_name_map.json"])
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    assert "global_step" not in index["weight_map"]


def test_merge_of_column_shards_copies_each_shard_into_its_columns():
    src = split_source("w", (4, 8), parts=2, dim=1)
    (t,) = plan_merge(src).files[0].tensors
    assert [(op.src_offsets, op.dst_offsets, op.sizes) for op in t.ops] == [
        ((0, 0), (0, 0), (4, 4)), ((0, 0), (0, 4), (4, 4))]


def test_reshard_mp4_to_mp2_reads_two_source_shards_per_target():
    table = tiny_table()
    src = source_from_layouts(table, ParallelConfig(model_parallel=4, vocab_emb_dp=False))
    dst = plan_layouts(table, ParallelConfig(model_parallel=2, vocab_emb_dp=False))
    plan = plan_distributed(src, dst, ParallelConfig(model_parallel=2, vocab_emb_dp=False))
    assert plan.kind == "reshard" and [f.path for f in plan.files] == [
        "rank_0/checkpoint_rank_0.safetensors", "rank_1/checkpoint_rank_1.safetensors"]
    wo = {t.name: t for t in plan.files[1].tensors}["model.layers.0.attention.wo.weight"]
    assert wo.shape == (8, 4) and wo.global_slice.offsets == (0, 4)
    assert sorted(op.src_file for op in wo.ops) == ["/src/rank_2/c.safetensors",
                                                    "/src/rank_3/c.safetensors"]
    meta = json.loads(dict(plan.files[1].metadata)["mindformers_st"])
    assert meta["rank"] == 1 and meta["slices"]["model.layers.0.attention.wo.weight"]["offsets"] == [0, 4]


def test_remove_redundancy_places_each_distinct_slice_in_exactly_one_rank_file():
    table = tiny_table()
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    src = source_from_layouts(table, ParallelConfig(model_parallel=4))
    plan = plan_distributed(src, plan_layouts(table, pc), pc, remove_redundancy=True)
    held = {}
    for f in plan.files:
        for t in f.tensors:
            held.setdefault(t.name, []).append(t.global_slice)
    for name, lay in plan_layouts(table, pc).items():
        assert sorted(held[name]) == sorted(lay.distinct_slices()), name


def test_dedup_source_is_found_from_whichever_rank_holds_each_slice():
    table = tiny_table()
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    # keep each slice only on its highest holder: rank 0 has almost nothing
    src = source_from_layouts(table, pc, keep=lambda n, sl, r: r == max(
        plan_layouts(table, pc)[n].replica_group(r)))
    plan = plan_merge(src)
    assert all("rank_0" not in op.src_file for f in plan.files for t in f.tensors for op in t.ops)


def test_target_tensor_missing_from_source_is_a_plan_error():
    table = tiny_table()
    src = source_from_layouts(table, ParallelConfig(model_parallel=2))
    del src.chunks["lm_head.weight"]
    with pytest.raises(PlanError, match="lm_head.weight"):
        plan_distributed(src, plan_layouts(table, ParallelConfig()), ParallelConfig())


def test_shape_mismatch_between_source_and_target_is_a_plan_error():
    src = source_from_layouts(tiny_table(hidden=8), ParallelConfig())
    with pytest.raises(PlanError, match="global shape"):
        plan_distributed(src, plan_layouts(tiny_table(hidden=16), ParallelConfig()), ParallelConfig())


def test_rank_slices_prefer_the_ranks_own_files():
    table = tiny_table()
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    src = source_from_layouts(table, pc)
    plan = plan_rank_slices(src, plan_layouts(table, pc), rank=3)
    files = {op.src_file for t in plan.files[0].tensors for op in t.ops}
    assert files == {"/src/rank_3/c.safetensors"}


def test_pipeline_target_puts_each_stage_tensors_in_its_ranks():
    table = tiny_table(layers=2)
    src = source_from_layouts(table, ParallelConfig())
    pc = ParallelConfig(pipeline_stage=2)
    plan = plan_distributed(src, plan_layouts(table, pc), pc)
    names0 = {t.name for t in plan.files[0].tensors}
    names1 = {t.name for t in plan.files[1].tensors}
    assert "model.layers.0.attention.wq.weight" in names0 - names1
    assert "lm_head.weight" in names1 - names0


def test_split_plan_gives_every_file_to_exactly_one_worker_balanced_by_bytes():
    table = tiny_table()
    src = source_from_layouts(table, ParallelConfig())
    plan = plan_distributed(src, plan_layouts(table, ParallelConfig(model_parallel=4, vocab_emb_dp=False)),
                            ParallelConfig(model_parallel=4, vocab_emb_dp=False))
    parts = split_plan(plan, 3)
    paths = [f.path for p in parts for f in p.files]
    assert sorted(paths) == sorted(f.path for f in plan.files)
    loads = [sum(f.nbytes for f in p.files) for p in parts]
    assert max(loads) - min(loads) <= max(f.nbytes for f in plan.files)
    with pytest.raises(PlanError):
        split_plan(plan, 0)


def test_contiguous_runs_counts_rows_of_a_column_block():
    assert contiguous_runs((4, 8), (0, 0), (4, 8)) == 1
    assert contiguous_runs((4, 8), (1, 0), (2, 8)) == 1
    assert contiguous_runs((4, 8), (0, 2), (4, 4)) == 4
    assert contiguous_runs((2, 3, 4), (0, 1, 0), (2, 2, 4)) == 2
