"""The commit records: names, meta.json, committed.json and which saves `committed_saves` accepts."""
import json
import os

import numpy as np
import pytest

from mindformers_st.records import commit as cm
from mindformers_st.records import names
from mindformers_st.errors import CheckpointError
from mindformers_st.storage.writer import save_tensors


def _save(directory, rank, epoch, step, world=2, header_step=None):
    """A real rank file with our metadata, as the monitor writes it."""
    rel = os.path.join(f"rank_{rank}", names.ckpt_file_name("CKP", rank, epoch, step))
    os.makedirs(os.path.join(directory, f"rank_{rank}"), exist_ok=True)
    ours = {"version": 1, "rank": rank, "world_size": world, "epoch": epoch,
            "step": step if header_step is None else header_step, "slices": {}}
    save_tensors(os.path.join(directory, rel), {"w": np.full((4,), rank, np.float32)},
                 metadata={"format": "ms", "mindformers_st": json.dumps(ours)})
    return rel


def _commit(directory, epoch, step, world=2, keep=None):
    files = {r: _save(directory, r, epoch, step, world) for r in range(world)}
    entry = cm.CommittedSave(epoch, step, step, files, directory, {"world_size": world})
    return cm.add_committed(directory, world, entry, keep)


def test_file_names_follow_mindspore_transformers():
    assert names.ckpt_file_name("CKP", 3, 1, 20) == "CKP_rank_3-1_20.safetensors"
    assert names.ckpt_file_name("llama", 0, 2, 5, "ckpt", "network") == "llama_rank_0-network-2_5.ckpt"
    assert names.parse_ckpt_name("/x/rank_1/CKP_rank_1-3_7.safetensors") == (1, 3, 7)
    assert names.parse_ckpt_name("CKP_1_rank_2-1_4.ckpt") == (2, 1, 4)   # MindSpore's renamed prefix
    assert names.parse_ckpt_name("model.safetensors") is None
    with pytest.raises(CheckpointError):
        names.ckpt_file_name("CKP", 0, 1, 1, "h5")


def test_meta_json_round_trip(tmp_path):
    cm.write_rank_meta(str(tmp_path), cm.RankMeta(2, 5, "CKP_rank_0-2_5.safetensors", ("a", "CKP_rank_0-2_5.safetensors")))
    meta = cm.read_rank_meta(str(tmp_path))
    assert meta.to_json() == {"last_epoch": 2, "last_step": 5,
                              "last_ckpt_file": "CKP_rank_0-2_5.safetensors",
                              "committed": ["a", "CKP_rank_0-2_5.safetensors"]}
    assert cm.read_rank_meta(str(tmp_path / "none")) is None
    (tmp_path / "meta.json").write_text("{torn")
    with pytest.raises(CheckpointError, match="meta.json"):
        cm.read_rank_meta(str(tmp_path))


def test_committed_saves_newest_last_and_keep_drops_oldest(tmp_path):
    d = str(tmp_path)
    assert cm.committed_saves(d) == []            # no record: the caller falls back to meta.json
    assert _commit(d, 1, 2, keep=2) == []
    assert _commit(d, 1, 4, keep=2) == []
    dropped = _commit(d, 2, 1, keep=2)
    assert [e.key for e in dropped] == [(1, 2)]
    saves = cm.committed_saves(d)
    assert [s.key for s in saves] == [(1, 4), (2, 1)]
    assert saves[-1].path(1) == os.path.join(d, "rank_1", "CKP_rank_1-2_1.safetensors")
    # re-committing the same step replaces the entry instead of duplicating it
    _commit(d, 2, 1, keep=2)
    assert [s.key for s in cm.committed_saves(d)] == [(1, 4), (2, 1)]


def test_committed_saves_skips_entries_that_would_not_load(tmp_path):
    d = str(tmp_path)
    for step in (1, 2, 3, 4):
        _commit(d, 1, step)
    os.remove(os.path.join(d, "rank_1", "CKP_rank_1-1_1.safetensors"))          # a rank file missing
    with open(os.path.join(d, "rank_0", "CKP_rank_0-1_2.safetensors"), "r+b") as fh:
        fh.truncate(20)                                                       # a damaged header
    _save(d, 1, 1, 3, header_step=9)                                          # a file of another step
    assert [s.key for s in cm.committed_saves(d)] == [(1, 4)]
    assert len(cm.load_committed_entries(d)) == 4                             # the record itself is kept


def test_entry_outside_the_directory_is_refused(tmp_path):
    d = str(tmp_path)
    _commit(d, 1, 1, world=1)
    obj = json.loads((tmp_path / "committed.json").read_text())
    obj["saves"][0]["files"]["0"] = "../elsewhere.safetensors"
    (tmp_path / "committed.json").write_text(json.dumps(obj))
    assert cm.committed_saves(d) == []


def test_world_size_is_per_entry(tmp_path):
    """A resumed run with another world size keeps older saves valid under their own size."""
    d = str(tmp_path)
    _commit(d, 1, 1, world=2)
    files = {0: _save(d, 0, 1, 2, world=1)}
    cm.add_committed(d, 1, cm.CommittedSave(1, 2, 2, files, d, {"world_size": 1}))
    assert [s.key for s in cm.committed_saves(d)] == [(1, 1), (1, 2)]


def test_damaged_record_is_an_error_not_an_empty_list(tmp_path):
    (tmp_path / "committed.json").write_text('{"format": 1, "saves": [')
    with pytest.raises(CheckpointError, match="committed.json"):
        cm.committed_saves(str(tmp_path))
    (tmp_path / "committed.json").write_text('{"format": 7, "saves": []}')
    with pytest.raises(CheckpointError, match="format-1"):
        cm.committed_saves(str(tmp_path))
    (tmp_path / "committed.json").write_text('{"format": 1, "world_size": 1, "saves": [{"epoch": 1}]}')
    with pytest.raises(CheckpointError, match="malformed"):
        cm.committed_saves(str(tmp_path))
