"""The load hook and resume honour the checksums: a corrupt file fails every load mode by name
and changes nothing; resume falls back to the newest committed save that verifies."""
import os

import numpy as np
import pytest

from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
from mindformers_st.checkpoint.resume import resume_checkpoint
from mindformers_st.errors import ChecksumError, CheckpointError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.records.commit import CommittedSave, add_committed
from tests.commands.test_integrity import flip_bit

from .test_loader import (assert_weights, global_values, make_ctx, make_model, make_optimizer,
                          tiny_cfg, write_distributed)

TENSOR = "model.layers.0.attention.wq.weight"


def _training_folder(tmp_path, cfg, pc, steps=(3, 6)):
    """A committed folder holding a save per step, each with its own values."""
    folder = tmp_path / "ckpt"
    values = {}
    for i, step in enumerate(steps):
        values[step] = global_values(cfg, seed=10 + i)
        part = write_distributed(tmp_path / f"part{step}", cfg, values[step], pc,
                                 suffix=f"1_{step}")
        files = {}
        for r in range(pc.world_size):
            name = f"llama_rank_{r}-1_{step}.safetensors"
            os.makedirs(folder / f"rank_{r}", exist_ok=True)
            os.rename(part / f"rank_{r}" / name, folder / f"rank_{r}" / name)
            files[r] = f"rank_{r}/{name}"
        # the tiny files all hold global_step 6 (write_complete's hyper values)
        add_committed(str(folder), pc.world_size, CommittedSave(1, step, 6, files))
    return folder, values


def _opts(folder, tmp_path, **kw):
    return LoadOptions(str(folder), "safetensors", use_parallel=True,
                       output_dir=str(tmp_path / "out"), **kw)


def _params(model):
    return {n: np.array(v, copy=True) for n, v in model.get_local_params().items()}


# merge_and_cut: the default (cut from the rank files, the merge written in the background);
# merge_first: derived_write first (the collective merge before the cut)
@pytest.mark.parametrize("mode", ["same_layout", "merge_and_cut", "merge_first", "direct_reshard"])
def test_corrupt_rank_file_fails_every_load_mode_and_changes_nothing(tmp_path, mode):
    cfg = tiny_cfg()
    pc = ParallelConfig(model_parallel=2)
    folder, _ = _training_folder(tmp_path, cfg, pc)
    bad = folder / "rank_0" / "llama_rank_0-1_6.safetensors"   # a file rank 0 reads in every mode
    recorded = flip_bit(str(bad), TENSOR)
    # re-cut for one card: this process is every rank of the target (the online merge needs all)
    target = pc if mode == "same_layout" else ParallelConfig()
    ctx = make_ctx(target, 0)
    model = make_model(cfg, ctx)
    before = _params(model)
    extra = {} if mode == "same_layout" else {"auto_trans_ckpt": True,
                                              "direct_reshard": mode == "direct_reshard"}
    if mode == "merge_first":
        extra["derived_write"] = "first"
    opts = _opts(folder, tmp_path, verify_checksums="full" if mode == "direct_reshard" else True,
                 **extra)
    with pytest.raises(ChecksumError, match=recorded) as err:
        load_checkpoint(opts, model, None, ctx)
    assert str(bad) in str(err.value) and TENSOR in str(err.value)
    after = _params(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    out = tmp_path / "out"
    assert not (out / "unified_checkpoint").exists()
    assert not out.exists() or not [n for n in os.listdir(out) if "building" in n]
    # opting out loads the bytes as they are
    load_checkpoint(_opts(folder, tmp_path, verify_checksums=False, **extra), model, None, ctx)


def test_resume_falls_back_to_the_newest_intact_committed_save(tmp_path, caplog):
    cfg = tiny_cfg()
    pc = ParallelConfig(model_parallel=2)
    folder, values = _training_folder(tmp_path, cfg, pc, steps=(2, 4, 6))
    flip_bit(str(folder / "rank_1" / "llama_rank_1-1_6.safetensors"), TENSOR)
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    report = resume_checkpoint(_opts(folder, tmp_path), True, model, make_optimizer(model), ctx)
    assert report.source.file_suffix == "1_4"
    assert_weights(model, values[4], cfg, pc, 1)
    assert "1_6 of" in caplog.text and "damaged" in caplog.text


def test_resume_with_every_committed_save_damaged_is_an_error(tmp_path):
    cfg = tiny_cfg()
    pc = ParallelConfig(model_parallel=2)
    folder, _ = _training_folder(tmp_path, cfg, pc, steps=(3, 6))
    for step in (3, 6):
        flip_bit(str(folder / "rank_0" / f"llama_rank_0-1_{step}.safetensors"), TENSOR)
    ctx = make_ctx(pc, 0)
    model = make_model(cfg, ctx)
    with pytest.raises(CheckpointError, match="no committed save passes its checksums"):
        resume_checkpoint(_opts(folder, tmp_path), True, model, make_optimizer(model), ctx)


def test_a_named_damaged_save_does_not_fall_back(tmp_path):
    cfg = tiny_cfg()
    pc = ParallelConfig(model_parallel=2)
    folder, _ = _training_folder(tmp_path, cfg, pc, steps=(3, 6))
    flip_bit(str(folder / "rank_0" / "llama_rank_0-1_6.safetensors"), TENSOR)
    ctx = make_ctx(pc, 0)
    model = make_model(cfg, ctx)
    with pytest.raises(CheckpointError, match="checksums"):
        resume_checkpoint(_opts(folder, tmp_path), "llama_rank_0-1_6.safetensors", model,
                          make_optimizer(model), ctx)
