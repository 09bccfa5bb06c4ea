"""CheckpointMonitor with use_legacy_format: False writes MindSpore Transformers 2.x's
Checkpoint 2.0 layout (one real tiny training), and every reader of ours takes it back."""
import os

import numpy as np
import pytest

from mindformers_st.checkpoint.loader import LoadOptions
from mindformers_st.checkpoint.monitor import CheckpointMonitor
from mindformers_st.checkpoint.resume import resume_checkpoint
from mindformers_st.commands.verify import verify_path
from mindformers_st.errors import ConfigError
from mindformers_st.records.iteration import read_common, read_tracker
from mindformers_st.storage.checksum import verify_checksums
from mindformers_st.storage.reader import open_safetensors

from .monitor_worker import build_run, train

STEPS, PER_EPOCH, BATCH = 3, 2, 4


def monitor_iteration_run(out):
    """3 steps saving every step (keep 2) in the Checkpoint 2.0 layout; returns the truth."""
    model, opt, step, ctx = build_run()
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=1,
                            keep_checkpoint_max=2, output_dir=out, use_legacy_format=False)
    asy = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=2,
                            directory=os.path.join(out, "async"), async_save=True,
                            output_dir=out, use_legacy_format=False)
    train(model, opt, step, ctx, [mon, asy], STEPS, out, PER_EPOCH, BATCH)
    truth = dict(model.get_local_params())
    truth.update(opt.get_state_arrays())
    return truth


@pytest.mark.slow
def test_monitor_writes_checkpoint_2_that_resumes(tmp_path):
    out = str(tmp_path)
    truth = monitor_iteration_run(out)
    top = os.path.join(out, "checkpoint")
    assert sorted(os.listdir(top)) == ["iteration_00000002", "iteration_00000003",
                                       "latest_checkpointed_iteration.txt"]
    assert read_tracker(top) == 3
    it = os.path.join(top, "iteration_00000003")
    assert sorted(os.listdir(it)) == ["common.json", "model-0000000-0000001.safetensors",
                                      "opt-0000000-0000001.safetensors"]
    common = read_common(it)
    assert (common.epoch_num, common.step_num, common.global_step, common.global_batch_size,
            common.loss_scale) == (2, 3, 3, BATCH, 1.0)
    with open_safetensors(os.path.join(it, "opt-0000000-0000001.safetensors")) as f:
        assert verify_checksums(f) == []
        assert sorted(f.tensors) == sorted(n for n in truth if n.startswith("adam_")
                                           or n == "global_step")
    assert read_tracker(os.path.join(out, "async")) == 2
    assert verify_path(top)[0] == []
    # resume into a fresh model: weights, moments and counters
    model, opt, _, ctx = build_run(seed=1)
    report = resume_checkpoint(LoadOptions(top, "safetensors", output_dir=out), True, model,
                               opt, ctx)
    assert (report.resume.global_step, report.resume.epoch_num) == (3, 2)
    held = dict(model.get_local_params())
    held.update(opt.get_state_arrays())
    for n, v in truth.items():
        np.testing.assert_array_equal(held[n], v, err_msg=n)


def test_checkpoint_2_needs_safetensors_without_remove_redundancy():
    with pytest.raises(ConfigError, match="use_legacy_format: False"):
        CheckpointMonitor(checkpoint_format="ckpt", use_legacy_format=False)
    with pytest.raises(ConfigError, match="remove_redundancy: False"):
        CheckpointMonitor(checkpoint_format="safetensors", remove_redundancy=True,
                          use_legacy_format=False)
    with pytest.raises(ConfigError, match="drop save_network_params"):
        CheckpointMonitor(checkpoint_format="safetensors", save_network_params=True,
                          use_legacy_format=False)


def test_the_public_loader_recuts_a_checkpoint_2_save_only_for_another_world_size(tmp_path):
    from types import SimpleNamespace
    from mindformers_st.checkpoint.api import _needs_recut
    it = tmp_path / "iteration_00000004"
    it.mkdir()
    for r in (0, 1):
        (it / f"model-{r:07d}-0000002.safetensors").write_bytes(b"")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    for path in (tmp_path, it, it / "model-0000001-0000002.safetensors"):
        assert _needs_recut(str(path), SimpleNamespace(world_size=2)) is False
        assert _needs_recut(str(path), SimpleNamespace(world_size=4)) is True


def test_a_two_rank_commit_describes_every_rank_as_convert_layout_does(tmp_path):
    """The monitor's multi-rank path without msrun: each rank's model-/opt- files from its
    snapshot, then rank 0's commit (metadata.json from the layouts) — equal to the record
    convert-layout writes from the same blocks, and read back whole."""
    from mindformers_st.checkpoint.iteration_save import commit_iteration, iteration_files
    from mindformers_st.checkpoint.state import RankSnapshot, write_rank_file
    from mindformers_st.cli import main
    from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
    from mindformers_st.models.param_table import llama_param_table
    from mindformers_st.records.iteration import CommonInfo, read_metadata
    from mindformers_st.records.rank_meta import RankFileMeta
    from mindformers_st.transform.sources import describe_source
    from .test_loader import global_values, tiny_cfg, write_distributed

    cfg = tiny_cfg()
    values = global_values(cfg)
    pc = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
    layouts = plan_layouts(llama_param_table(cfg).with_optimizer_states(), pc)
    weights = tuple(n for n in values if not n.startswith("adam_"))
    top = tmp_path / "mon"
    snaps = []
    for r in (0, 1):
        slices = {n: layouts[n].slice_for(r) for n in values}
        arrays = {n: np.ascontiguousarray(values[n][slices[n].index()]) for n in values}
        arrays["global_step"] = np.array([6], np.int32)
        snap = RankSnapshot(arrays, slices, RankFileMeta(r, 2, slices, pc.to_json(), False, 1, 6),
                            network_names=weights)
        for path, part in iteration_files(str(top), snap, r, 2, 6):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_rank_file(path, part)
        snaps.append(snap)
    commit_iteration(str(top), 6, CommonInfo(1, 6, 6, 1.0, 4), snaps[0], layouts, 2)
    src = describe_source(str(top))
    assert (src.kind, src.counters["global_step"]) == ("distributed", 6)
    assert main(["merge", str(top), str(tmp_path / "merged"), "--no-progress"]) == 0
    from mindformers_st.storage.writer import load_tensors
    merged = {}
    for f in os.listdir(tmp_path / "merged"):
        if f.endswith(".safetensors"):
            merged.update(load_tensors(str(tmp_path / "merged" / f)))
    for n, v in values.items():
        np.testing.assert_array_equal(merged[n], v, err_msg=n)
    legacy = write_distributed(tmp_path / "legacy", cfg, values, pc)
    assert main(["convert-layout", str(legacy), str(tmp_path / "conv"), "--no-progress"]) == 0
    ours = read_metadata(str(top / "iteration_00000006")).tensors
    theirs = read_metadata(str(tmp_path / "conv" / "iteration_00000006")).tensors
    assert set(theirs) - set(ours) == {"global_step"}
    assert all(ours[n] == theirs[n] for n in ours)


def test_the_yaml_key_reaches_the_monitor():
    from mindformers_st.config.load import build_config
    config = build_config({"use_legacy_format": False, "callbacks": [
        {"type": "CheckpointMonitor", "checkpoint_format": "safetensors"}]})
    assert config.use_legacy_format is False
    cb_cfg = [c for c in config.callbacks if getattr(c, "type", "") == "CheckpointMonitor"][0]
    assert CheckpointMonitor.from_config(cb_cfg, config).use_legacy_format is False
    with pytest.raises(ConfigError, match="use_legacy_format: False"):   # ckpt is the default
        CheckpointMonitor.from_config(type(cb_cfg)(), config)


@pytest.mark.slow
def test_a_flipped_byte_in_a_checkpoint_2_file_is_caught_by_verify_and_by_the_load(tmp_path):
    """What is written is checked when read, in this layout too: the checksums our monitor puts
    in the model- file are checked by verify and by a load of the newest iteration."""
    from mindformers_st.checkpoint.api import load_checkpoint
    from mindformers_st.errors import MindformersSTError
    from tests.commands.test_integrity import flip_bit
    out = str(tmp_path)
    monitor_iteration_run(out)
    top = os.path.join(out, "checkpoint")
    path = os.path.join(top, "iteration_00000003", "model-0000000-0000001.safetensors")
    flip_bit(path, "lm_head.weight")
    assert any("lm_head.weight" in p for p in verify_path(top)[0])
    model, opt, _, _ = build_run(seed=1)
    with pytest.raises(MindformersSTError, match="lm_head.weight"):
        load_checkpoint(model, os.path.join(top, "iteration_00000003"))
