"""Index files: HF and MindSpore formats round-trip; entries naming a file outside the folder are
refused, symlinked files are followed (tests/storage/test_symlinks.py)."""
import json
import os

import numpy as np
import pytest

from mindformers_st.errors import CheckpointError
from mindformers_st.storage import (HF_INDEX, MS_INDEX, atomic_write_text, read_index, save_tensors,
                                    shard_file_name, write_index)


def _shards(folder):
    save_tensors(folder / shard_file_name(1, 2), {"a": np.zeros(4, np.float32)})
    save_tensors(folder / shard_file_name(2, 2), {"b": np.zeros(2, np.float32)})
    return {"a": shard_file_name(1, 2), "b": shard_file_name(2, 2)}


def test_shard_names_follow_hugging_face():
    assert shard_file_name(1, 4) == "model-00001-of-00004.safetensors"
    assert shard_file_name(12, 123) == "model-00012-of-00123.safetensors"
    with pytest.raises(ValueError):
        shard_file_name(0, 3)
    with pytest.raises(ValueError):
        shard_file_name(4, 3)


@pytest.mark.parametrize("kind,name", [("hf", HF_INDEX), ("ms", MS_INDEX)])
def test_an_index_round_trips_in_both_formats(tmp_path, kind, name):
    wm = _shards(tmp_path)
    path = write_index(tmp_path, kind, wm, 24)
    assert os.path.basename(path) == name
    on_disk = json.loads(open(path).read())
    assert on_disk == {"metadata": {"total_size": 24}, "weight_map": wm}
    idx = read_index(tmp_path)
    assert (idx.kind, idx.weight_map, idx.total_size, idx.folder) == (kind, wm, 24, str(tmp_path))
    assert idx.files() == [shard_file_name(1, 2), shard_file_name(2, 2)]


def test_a_folder_without_an_index_gives_none(tmp_path):
    assert read_index(tmp_path) is None


def test_a_missing_total_size_is_computed_from_the_shards(tmp_path):
    wm = _shards(tmp_path)
    (tmp_path / HF_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert read_index(tmp_path).total_size == 24


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.safetensors", "sub/../../x.safetensors", "..\\x.safetensors"])
def test_entries_leaving_the_folder_are_refused(tmp_path, bad):
    (tmp_path / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {"w": bad}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_index(tmp_path)
    with pytest.raises(CheckpointError, match="'w'"):
        write_index(tmp_path, "ms", {"w": bad}, 0)


def test_a_symlinked_file_is_followed_wherever_it_points(tmp_path):
    # as Hugging Face's hub cache links shards to ../../blobs/<sha>; only NAMES must stay inside
    outside = tmp_path / "outside"
    outside.mkdir()
    save_tensors(outside / "x.safetensors", {"w": np.zeros(1, np.uint8)})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(outside / "x.safetensors", ckpt / "x.safetensors")
    (ckpt / MS_INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": {"w": "x.safetensors"}}))
    assert read_index(ckpt).path_of("w") == str(ckpt / "x.safetensors")


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    (tmp_path / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        read_index(tmp_path)


def test_two_indexes_that_disagree_are_refused(tmp_path):
    wm = _shards(tmp_path)
    write_index(tmp_path, "hf", wm, 24)
    write_index(tmp_path, "ms", {"a": wm["b"], "b": wm["a"]}, 24)
    with pytest.raises(CheckpointError, match="disagree"):
        read_index(tmp_path)
    assert read_index(tmp_path, kind="ms").weight_map["a"] == wm["b"]


def test_a_malformed_index_is_a_checkpoint_error(tmp_path):
    (tmp_path / HF_INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_index(tmp_path)
    (tmp_path / HF_INDEX).write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        read_index(tmp_path)


def test_atomic_write_text_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new content")
    assert path.read_text() == "new content"
    assert os.listdir(tmp_path) == ["meta.json"]


def test_index_text_is_what_json_dumps_writes():
    """The index is written entry by entry (the indenting encoder is slow); the text must stay
    exactly what transformers writes: json.dumps(indent=2, sort_keys=True) of the map."""
    from mindformers_st.storage.index import index_text
    names = ["model.layers.0.w", "é\u00e9", 'q"uote', "back\\slash", "tab\tnew\nline", "\x01",
             "emoji \U0001f600", "b", "a"]
    for wm in ({}, {n: f"model-0000{i % 3 + 1}-of-00003.safetensors" for i, n in enumerate(names)},
               {"x": 'odd "file".safetensors'}):
        want = json.dumps({"weight_map": wm, "metadata": {"total_size": 123}},
                          indent=2, sort_keys=True) + "\n"
        assert index_text(wm, 123) == want
