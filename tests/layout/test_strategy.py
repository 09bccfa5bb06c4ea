"""MindSpore strategy files written and read back (protobuf, JSON, per-rank, pipeline-merged)."""
import json
import os

import pytest

from mindformers_st.errors import LayoutError
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.strategy import (read_strategy, write_merged_strategy_file,
                                            write_rank_strategy_files, write_strategy_file)
from mindformers_st.layout.tensor_layout import TensorLayout

TABLE = ParamTable((
    ParamSpec("emb", (8, 4), split_dim=0, vocab_parallel=True, layer=-1),
    ParamSpec("l0.w", (8, 4), split_dim=0, layer=0),
    ParamSpec("l1.w", (4, 8), split_dim=1, layer=1),
    ParamSpec("norm", (4,), layer=2),
), 2)


def shapes(layouts):
    return {n: l.global_shape for n, l in layouts.items()}


@pytest.mark.parametrize("suffix", [".ckpt", ".json"])
def test_single_stage_round_trip(tmp_path, suffix):
    lay = plan_layouts(TABLE, ParallelConfig(2, 2, optimizer_shard=True, vocab_emb_dp=False))
    path = str(tmp_path / f"strategy{suffix}")
    write_strategy_file(path, lay)
    assert read_strategy(path, global_shapes=shapes(lay)) == lay
    if suffix == ".json":
        obj = json.load(open(path))
        assert obj["parallel_layout_item"]["l1.w"]["tensor_map"] == [-1, 0]


def test_reading_without_shapes_then_from_local_shapes(tmp_path):
    lay = plan_layouts(TABLE, ParallelConfig(2, 2, optimizer_shard=True))
    write_strategy_file(tmp_path / "s.ckpt", lay)
    bare = read_strategy(tmp_path / "s.ckpt")
    assert all(l.global_shape is None for l in bare.values())
    local = {n: l.local_shape for n, l in lay.items()}
    assert read_strategy(tmp_path / "s.ckpt", local_shapes=local) == lay


def test_per_rank_files_for_pipeline_give_every_stage(tmp_path):
    pc = ParallelConfig(1, 2, 2, optimizer_shard=False)
    lay = plan_layouts(TABLE, pc)
    paths = write_rank_strategy_files(tmp_path, lay, pc)
    assert [os.path.basename(p) for p in paths] == [f"ckpt_strategy_rank_{r}.ckpt" for r in range(4)]
    assert set(read_strategy(paths[0])) == {"emb", "l0.w"}
    assert set(read_strategy(paths[3])) == {"l1.w", "norm"}
    assert read_strategy(tmp_path, global_shapes=shapes(lay)) == lay


def test_merged_pipeline_file_prefixes_stage(tmp_path):
    pc = ParallelConfig(2, 1, 2)
    lay = plan_layouts(TABLE, pc)
    for suffix in (".ckpt", ".json"):
        path = str(tmp_path / f"merged{suffix}")
        write_merged_strategy_file(path, lay)
        back = read_strategy(path, global_shapes=shapes(lay))
        assert back == lay and back["norm"].stage == 1


def test_multi_axis_map_round_trips_in_protobuf_only(tmp_path):
    lay = {"w": TensorLayout((8, 4), (2, 2), ((1, 0), -1))}
    write_strategy_file(tmp_path / "s.ckpt", lay)
    assert read_strategy(tmp_path / "s.ckpt", global_shapes={"w": (8, 4)}) == lay
    with pytest.raises(LayoutError, match="JSON strategy cannot express"):
        write_strategy_file(tmp_path / "s.json", lay)


def test_conflicting_files_and_garbage_are_rejected(tmp_path):
    write_strategy_file(tmp_path / "a.ckpt", {"w": TensorLayout((4,), (2,), (0,))})
    write_strategy_file(tmp_path / "b.ckpt", {"w": TensorLayout((4,), (2,), (-1,))})
    with pytest.raises(LayoutError, match="parameter w has layout"):
        read_strategy(tmp_path)
    (tmp_path / "bad.ckpt").write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(LayoutError, match="bad.ckpt is not a MindSpore"):
        read_strategy(tmp_path / "bad.ckpt")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LayoutError, match="bad.json is not a MindSpore JSON"):
        read_strategy(tmp_path / "bad.json")
    with pytest.raises(LayoutError, match="does not exist"):
        read_strategy(tmp_path / "missing.ckpt")
    with pytest.raises(LayoutError, match="no layout belongs to pipeline stage 3"):
        write_strategy_file(tmp_path / "c.ckpt", {"w": TensorLayout((4,), (2,), (0,))}, stage=3)


def test_a_smaller_run_replaces_the_whole_set(tmp_path):
    big = ParallelConfig(8, 1, optimizer_shard=False)
    write_rank_strategy_files(tmp_path, plan_layouts(TABLE, big), big)
    small = ParallelConfig(2, 1, optimizer_shard=False)
    lay = plan_layouts(TABLE, small)
    write_rank_strategy_files(tmp_path, lay, small)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_strategy_rank_0.ckpt", "ckpt_strategy_rank_1.ckpt"]
    assert read_strategy(tmp_path, global_shapes=shapes(lay)) == lay


def test_a_folder_mixing_two_runs_is_one_error_naming_both(tmp_path):
    big = ParallelConfig(8, 1, optimizer_shard=False)
    for r in range(8):   # an older 8-rank set whose ranks 0 and 1 a 2-rank run overwrote
        write_strategy_file(tmp_path / f"ckpt_strategy_rank_{r}.ckpt", plan_layouts(TABLE, big))
    small = ParallelConfig(2, 1, optimizer_shard=False)
    for r in range(2):
        write_strategy_file(tmp_path / f"ckpt_strategy_rank_{r}.ckpt", plan_layouts(TABLE, small))
    with pytest.raises(LayoutError, match=r"mixes the files of runs of different sizes "
                       r"\(ckpt_strategy_rank_0.ckpt .. ckpt_strategy_rank_1.ckpt describe 2 "
                       r"rank\(s\); ckpt_strategy_rank_2.ckpt .. ckpt_strategy_rank_7.ckpt "
                       r"describe 8 rank\(s\)\)"):
        read_strategy(tmp_path)


def test_strategy_world_against_a_checkpoint(tmp_path):
    from mindformers_st.layout.strategy import check_strategy_world, strategy_world_size
    pc = ParallelConfig(1, 2, 2, optimizer_shard=False)
    lay = plan_layouts(TABLE, pc)
    assert strategy_world_size(lay) == 4
    check_strategy_world(lay, "s", 4, "ckpt")
    with pytest.raises(LayoutError, match="the strategy s is for 4 rank.s. but the checkpoint "
                                          "ckpt was saved by 2 rank"):
        check_strategy_world(lay, "s", 2, "ckpt")
