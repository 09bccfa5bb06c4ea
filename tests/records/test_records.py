"""The on-disk records: one typed definition each, read back identically by every reader."""
import json
import os

import numpy as np
import pytest

from mindformers_st.commands.inspect import load_file
from mindformers_st.errors import CheckpointError
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.records import names
from mindformers_st.records.commit import (CommittedSave, RankMeta, add_committed, read_rank_meta,
                                           write_rank_meta)
from mindformers_st.records.hyper import HYPER_NAMES, SAVE_HYPER_DTYPES
from mindformers_st.records.rank_meta import VERSION, RankFileMeta
from mindformers_st.records.scan import select_save
from mindformers_st.storage.reader import read_header
from mindformers_st.storage.writer import save_tensors
from mindformers_st.transform.planner import plan_distributed, plan_merge
from mindformers_st.transform.sources import describe_complete, describe_distributed
from mindformers_st.transform.execute import execute
from tests.transform.helpers import make_globals, save_distributed, tiny_table


def test_rank_file_meta_round_trips_through_a_file(tmp_path):
    sl = TensorSlice((8, 4), (4, 0), (4, 4))
    meta = RankFileMeta(1, 2, {"w": sl}, {"data_parallel": 1, "model_parallel": 2}, True, 1, 20)
    path = save_tensors(tmp_path / "f.safetensors", {"w": np.zeros((4, 4), np.float32)},
                        meta.to_metadata())
    _, metadata, _ = read_header(path)
    assert RankFileMeta.from_metadata(metadata, path) == meta
    assert metadata["format"] == "ms" and metadata["remove_redundancy"] == "True"
    assert load_file(path).ours == meta and load_file(path).slices == {"w": sl}
    assert meta.subset([]).slices == {}


def test_a_newer_or_malformed_rank_file_meta_is_refused_by_name():
    newer = {"version": VERSION + 1, "rank": 0, "world_size": 1, "slices": {}}
    with pytest.raises(CheckpointError, match="newer than this reader"):
        RankFileMeta.from_metadata({"mindformers_st": json.dumps(newer)}, "x.safetensors")
    for bad, why in (("{", "not JSON"), ("[" * 100_000, "nested too deeply"),
                     (json.dumps([1]), "JSON object"),
                     (json.dumps({"rank": 2, "world_size": 2}), "not inside world_size"),
                     (json.dumps({"rank": 0, "world_size": 1, "slice": {}}),
                      r"unknown keys \['slice'\]"),
                     (json.dumps({"rank": 0, "world_size": 1, "slices": {"w": {"offsets": []}}}),
                      "slice of tensor 'w'")):
        with pytest.raises(CheckpointError, match=why):
            RankFileMeta.from_metadata({"mindformers_st": bad}, "x.safetensors")
    assert RankFileMeta.from_metadata({"format": "ms"}, "x") is None
    full = RankFileMeta(0, 2, {"w": TensorSlice((4,), (0,), (2,))}, {"data_parallel": 2}, True,
                        1, 2, run_id="r", save_id="1_2@r")   # every key the writer has
    assert RankFileMeta.from_metadata(full.to_metadata(), "x") == full


def test_every_writer_of_rank_files_is_read_back_identically_by_every_reader(tmp_path):
    """The test helper (training's layout), and `split` (transform/planner.py) both write rank
    files; describe_distributed, inspect and the scanner read the same description back."""
    table = tiny_table()
    values = make_globals(table)
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    save_distributed(str(tmp_path / "a"), values, table, pc, suffix="1_4")
    full = str(tmp_path / "full")
    execute(plan_merge(describe_distributed(str(tmp_path / "a"))), full, progress=False)
    layouts = plan_layouts(table, pc)
    execute(plan_distributed(describe_complete(full), layouts, pc), str(tmp_path / "b"),
            progress=False)
    for folder in ("a", "b"):
        src = describe_distributed(str(tmp_path / folder))
        sel = select_save(str(tmp_path / folder))
        for r, path in sel.files.items():
            meta = RankFileMeta.from_metadata(read_header(path)[1], path)
            assert meta.rank == r and meta.world_size == 4
            assert meta.parallel_config == pc.to_json()
            assert load_file(path).ours == meta
            for name, sl in meta.slices.items():
                assert sl == layouts[name].slice_for(r)
                assert any(c.file == path and c.slice == sl for c in src.chunks[name])


def test_names_are_parsed_by_one_pattern():
    assert names.ckpt_file_name("llama", 3, 1, 20) == "llama_rank_3-1_20.safetensors"
    assert names.parse_ckpt_name("llama_rank_3-1_20.safetensors") == (3, 1, 20)
    assert names.parse_ckpt_name("llama_rank_0-network-2_5.ckpt") == (0, 2, 5)
    assert names.parse_step("net-1_6.safetensors") == (1, 6)    # MindSpore's ModelCheckpoint
    assert names.step_suffix("x_rank_0-11_1.safetensors") == "11_1"
    assert names.parse_step_arg("2_30") == (2, 30)
    assert names.parse_step_arg("llama_rank_0-2_30.safetensors") == (2, 30)
    with pytest.raises(CheckpointError, match="EPOCH_STEP"):
        names.parse_step_arg("latest")
    assert names.parse_rank_dir("/a/rank_12/") == 12 and names.parse_rank_dir("rank_x") is None


def test_hyper_names_cover_what_a_save_writes():
    assert set(SAVE_HYPER_DTYPES) <= HYPER_NAMES and "global_step" in HYPER_NAMES


def test_meta_json_record_is_typed(tmp_path):
    write_rank_meta(str(tmp_path), RankMeta(1, 4, "a_rank_0-1_4.safetensors", ("a_rank_0-1_4.safetensors",)))
    assert read_rank_meta(str(tmp_path)).key == (1, 4)
    (tmp_path / "meta.json").write_text(json.dumps({"last_epoch": "x"}))
    with pytest.raises(CheckpointError, match="malformed meta.json"):
        read_rank_meta(str(tmp_path))


# ---- the scanner ----------------------------------------------------------------------------

def _save(folder, step, world=2, value=0.0):
    files = {}
    for r in range(world):
        d = os.path.join(folder, f"rank_{r}")
        os.makedirs(d, exist_ok=True)
        name = names.ckpt_file_name("llama", r, 1, step)
        save_tensors(os.path.join(d, name), {"global_step": np.array([step], np.int32),
                                             "w": np.full((2,), value, np.float32)})
        files[r] = f"rank_{r}/{name}"
    return files


def _commit(folder, step, files, world=2):
    add_committed(str(folder), world, CommittedSave(1, step, step, files))


def test_commit_record_decides_and_uncommitted_saves_are_named(tmp_path):
    _commit(tmp_path, 1, _save(tmp_path, 1))
    _save(tmp_path, 2)                       # an older run's or a crashed save: not in the record
    sel = select_save(str(tmp_path))
    assert (sel.key, sel.how) == ((1, 1), "committed")
    assert "1_2" in sel.ignored[0] and "uncommitted" in sel.ignored[0]
    with pytest.raises(CheckpointError, match="not a committed save"):
        select_save(str(tmp_path), "1_2")


def test_commit_order_not_step_order_is_newest(tmp_path):
    _commit(tmp_path, 4, _save(tmp_path, 4))
    _commit(tmp_path, 2, _save(tmp_path, 2))   # a restarted run saved step 2 after step 4
    assert select_save(str(tmp_path)).key == (1, 2)
    assert select_save(str(tmp_path), "1_4").how == "named"


def test_damaged_newest_committed_save_is_an_error_unless_falling_back(tmp_path):
    _commit(tmp_path, 2, _save(tmp_path, 2))
    _commit(tmp_path, 4, _save(tmp_path, 4))
    os.remove(tmp_path / "rank_1" / "llama_rank_1-1_4.safetensors")
    with pytest.raises(CheckpointError, match=r"rank_1-1_4.safetensors: missing.*--step"):
        select_save(str(tmp_path))
    sel = select_save(str(tmp_path), fallback=True)
    assert sel.key == (1, 2) and "cannot be read" in sel.ignored[0]
    with open(tmp_path / "rank_0" / "llama_rank_0-1_2.safetensors", "r+b") as fh:
        fh.truncate(40)                       # truncated: the header no longer fits the file
    with pytest.raises(CheckpointError, match="no committed save can be read"):
        select_save(str(tmp_path), fallback=True)


def test_without_a_record_the_steps_every_rank_holds_decide(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4, world=1)              # rank 1 never wrote step 4
    sel = select_save(str(tmp_path))
    assert (sel.key, sel.how) == ((1, 2), "files") and "1_4" in sel.ignored[0]
    write_rank_meta(str(tmp_path / "rank_0"), RankMeta(1, 2, "x"))
    write_rank_meta(str(tmp_path / "rank_1"), RankMeta(1, 2, "x"))
    assert select_save(str(tmp_path)).how == "meta"


def test_one_file_per_rank_of_different_steps_is_a_mix_and_refused(tmp_path):
    os.makedirs(tmp_path / "rank_0")
    os.makedirs(tmp_path / "rank_1")
    for r, step in ((0, 2), (1, 4)):
        save_tensors(tmp_path / f"rank_{r}" / names.ckpt_file_name("m", r, 1, step),
                     {"w": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="mixes saves"):
        select_save(str(tmp_path))


def test_newest_by_timestamp_for_folders_without_a_record(tmp_path):
    """resume_by_last_timestamp_ckpt: every rank's newest file by mtime, which must agree."""
    _save(tmp_path, 4)
    _save(tmp_path, 2)                       # written last: the newest by time
    for r in range(2):
        os.utime(tmp_path / f"rank_{r}" / names.ckpt_file_name("llama", r, 1, 4), (1, 1))
    sel = select_save(str(tmp_path), by_timestamp=True)
    assert (sel.key, sel.how) == ((1, 2), "timestamp")
    assert select_save(str(tmp_path)).key == (1, 4)          # the default: the newest step
    os.utime(tmp_path / "rank_1" / names.ckpt_file_name("llama", 1, 1, 4), (10**10, 10**10))
    with pytest.raises(CheckpointError, match="different steps"):
        select_save(str(tmp_path), by_timestamp=True)
    _commit(tmp_path, 4, {r: f"rank_{r}/{names.ckpt_file_name('llama', r, 1, 4)}" for r in range(2)})
    assert select_save(str(tmp_path), by_timestamp=True).key == (1, 4)   # the record decides


def test_another_prefix_in_the_folder_is_named_by_every_reader(tmp_path, caplog):
    _commit(tmp_path, 4, _save(tmp_path, 4))
    for r in range(2):                       # another run's file (prefix qwen) in the same folder
        save_tensors(tmp_path / f"rank_{r}" / names.ckpt_file_name("qwen", r, 1, 6),
                     {"w": np.zeros(2, np.float32)})
    assert names.prefix_of("rank_0/qwen_rank_0-1_6.safetensors") == "qwen"
    sel = select_save(str(tmp_path))
    assert sel.key == (1, 4)
    note = [n for n in sel.ignored if "another prefix" in n]
    assert note and "'qwen' (saves ['1_6'])" in note[0] and "['llama']" in note[0]
    assert "another prefix" in caplog.text
