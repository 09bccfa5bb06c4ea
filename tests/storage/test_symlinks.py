"""One rule for symlinks on every read path (storage.index.check_inside): names an index or a
commit record gives must be relative and stay in the folder; the files may be symlinks, followed
as Hugging Face does, to regular files only. A Hugging Face hub cache snapshot (shards linked to
`../../blobs/<sha>`) loads through convert-hf, verify, inspect and the load hook; an index
naming `../x` is refused by each; a link to a FIFO or a device is refused without blocking."""
import json
import os
import shutil

import numpy as np
import pytest

from mindformers_st.cli import main
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.storage.index import HF_INDEX
from tests.convert.helpers import as_hub_cache, hf_config, hf_tensors, read_folder, write_hf_folder
from tests.transform.helpers import make_globals, save_distributed, tiny_table


@pytest.fixture
def hub(tmp_path):
    """(plain HF folder, the same files as a hub cache snapshot)."""
    plain = write_hf_folder(str(tmp_path / "plain"), hf_tensors(), shards=2, config=hf_config())
    snap = as_hub_cache(plain, tmp_path / "hub")
    assert os.path.islink(os.path.join(snap, "model-00001-of-00002.safetensors"))
    return plain, snap


def test_a_hub_cache_snapshot_converts_verifies_and_inspects_like_the_plain_folder(hub, tmp_path, capsys):
    plain, snap = hub
    assert main(["convert-hf", plain, str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["convert-hf", snap, str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = read_folder(str(tmp_path / "a")), read_folder(str(tmp_path / "b"))
    assert sorted(a) == sorted(b) and a
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    capsys.readouterr()
    assert main(["verify", snap]) == 0
    assert "OK: complete checkpoint, 2 files" in capsys.readouterr().out
    assert main(["inspect", snap]) == 0
    assert "2 files" in capsys.readouterr().out


def test_a_hub_cache_snapshot_loads_through_the_load_hook(tmp_path):
    from mindformers_st.checkpoint.loader import load_checkpoint
    from tests.checkpoint.test_loader import (_hf_folder, assert_weights, global_values,
                                              make_ctx, make_model, opts, tiny_cfg)
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    snap = as_hub_cache(_hf_folder(tmp_path, cfg, values), tmp_path / "hub")
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(snap, tmp_path), model, None, ctx)
    assert report.source.kind == "hf" and not report.missing
    assert_weights(model, values, cfg, ParallelConfig(), 0)


@pytest.mark.parametrize("bad", ["../model-00001-of-00002.safetensors", "/etc/passwd"])
def test_an_index_naming_a_file_outside_the_folder_is_refused_by_every_reader(hub, tmp_path,
                                                                             capsys, bad):
    plain, _ = hub
    shutil.copy(os.path.join(plain, "model-00001-of-00002.safetensors"), tmp_path)
    index = json.load(open(os.path.join(plain, HF_INDEX)))
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    with open(os.path.join(plain, HF_INDEX), "w") as fh:
        json.dump(index, fh)
    for argv in (["verify", plain], ["inspect", plain],
                 ["convert-hf", plain, str(tmp_path / "out"), "--no-progress"]):
        assert main(argv) == 1, argv
        text = "".join(capsys.readouterr())
        assert "outside the checkpoint folder" in text and repr(bad) in text, argv
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_a_link_to_a_fifo_or_a_device_is_refused_without_blocking(tmp_path, capsys, target):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if target == "fifo":
        os.mkfifo(tmp_path / "pipe")
        target = str(tmp_path / "pipe")
    os.symlink(target, folder / "model.safetensors")
    assert main(["verify", str(folder)]) == 1
    assert "not a regular file" in capsys.readouterr().out
    assert main(["convert-hf", str(folder), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_symlinked_rank_files_of_a_committed_save_are_followed(tmp_path):
    table = tiny_table()
    values = make_globals(table)
    src = tmp_path / "ckpt"
    save_distributed(str(src), values, table, ParallelConfig(model_parallel=2))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for rank_dir in sorted(src.glob("rank_*")):
        for f in rank_dir.glob("*.safetensors"):
            moved = blobs / f"{rank_dir.name}-{f.name}"
            shutil.move(str(f), moved)
            os.symlink(os.path.relpath(moved, rank_dir), f)
    assert main(["verify", str(src)]) == 0
    assert main(["merge", str(src), str(tmp_path / "merged"), "--no-progress"]) == 0
    merged = read_folder(str(tmp_path / "merged"))
    for n, v in values.items():
        np.testing.assert_array_equal(merged[n], v, err_msg=n)
