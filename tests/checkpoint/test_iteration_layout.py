"""MindSpore Transformers 2.x Checkpoint 2.0 saves, written by its own code (subprocess, see
tests/reference/mindformers_ref.py), read everywhere we read checkpoints: the load hook (top
folder, iteration folder, one shard file), resume (moments, global_step and common.json
counters), merge and describe; and the saves we write (convert-layout, one card and 2 ranks
with metadata.json) read with identical tensors by its own load_checkpoint (one card) or, for
the sharded save its loader cannot merge in one CPU process, by its metadata and common-info
readers. Skipped with the reason when the reference is not installed."""
import json
import os

import numpy as np
import pytest

from mindformers_st.checkpoint.detect import detect_checkpoint
from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
from mindformers_st.checkpoint.resume import resume_checkpoint
from mindformers_st.errors import CheckpointError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.storage.writer import load_tensors
from mindformers_st.transform.sources import describe_source
from tests.reference import mindformers_ref
from tests.reference.mindformers_ref import requires_mindformers

from .test_loader import (assert_weights, global_values, make_ctx, make_model, make_optimizer,
                          tiny_cfg, write_complete, write_distributed)

COMMON = {"epoch_num": 1, "step_num": 2, "global_step": 6, "loss_scale": 1024.0,
          "global_batch_size": 4}
# how the sharded fixture cuts the tensors over 2 ranks (others replicated)
SPLIT = {"model.tok_embeddings.embedding_weight": 0, "lm_head.weight": 0,
         "model.layers.0.attention.wq.weight": 0, "model.layers.1.feed_forward.w2.weight": 1}


def _values(cfg):
    values = global_values(cfg)   # weights and AdamW moments
    values["global_step"] = np.array([6], np.int32)
    return values


@pytest.fixture(scope="module")
def mf_saves(tmp_path_factory):
    """A one-card save and a 2-rank sharded save of the tiny Llama by mindformers 2.0.0."""
    if not mindformers_ref.available():
        pytest.skip("MindSpore Transformers 2.0.0 reference not installed "
                    f"({mindformers_ref.REF_DIR}; scripts/setup.sh installs it)")
    tmp = tmp_path_factory.mktemp("mf")
    cfg = tiny_cfg()
    values = _values(cfg)
    npz = tmp / "values.npz"
    np.savez(npz, **values)
    # ours, written before the reference runs (one process does both directions)
    hyper = {"global_step": values["global_step"], "epoch_num": np.array([1], np.int64),
             "step_num": np.array([2], np.int64), "loss_scale": np.array([1024.0], np.float32),
             "global_batch_size": np.array([4], np.int64)}
    weights = {n: v for n, v in values.items() if n != "global_step"}
    legacy = write_complete(tmp / "legacy", weights, hyper)
    ranks = write_distributed(tmp / "legacy_mp2", cfg, weights,
                              ParallelConfig(model_parallel=2, vocab_emb_dp=False))
    from mindformers_st.cli import main
    assert main(["convert-layout", str(legacy), str(tmp / "ours_one"), "--no-progress"]) == 0
    assert main(["convert-layout", str(ranks), str(tmp / "ours_two"), "--no-progress"]) == 0
    from .test_monitor_iteration import monitor_iteration_run   # CheckpointMonitor's own saves
    truth = monitor_iteration_run(str(tmp / "mon"))
    np.savez(tmp / "mon_truth.npz", **truth)
    answers = mindformers_ref.run(
        tmp, ("save", dict(values=str(npz), iteration=6, common=COMMON, out=str(tmp / "one"))),
        ("save_sharded", dict(values=str(npz), iteration=6, common=COMMON, out=str(tmp / "two"),
                              world=2, split=SPLIT)),
        ("load", dict(values=str(npz), path=str(tmp / "ours_one"), optimizer=True,
                      out=str(tmp / "mf_read_one.npz"))),
        ("assemble", dict(path=str(tmp / "ours_two"), out=str(tmp / "mf_read_two.npz"))),
        ("load", dict(values=str(tmp / "mon_truth.npz"), path=str(tmp / "mon" / "checkpoint"),
                      optimizer=True, out=str(tmp / "mf_read_mon.npz"))))
    assert answers[0]["files"] == ["iteration_00000006", "latest_checkpointed_iteration.txt"]
    assert "metadata.json" in answers[1]["files"]
    return cfg, values, tmp, answers[2:]


@requires_mindformers
@pytest.mark.slow
def test_mindformers_load_checkpoint_reads_what_checkpoint_monitor_saves(mf_saves):
    _, _, tmp, answers = mf_saves
    answer = answers[2]
    assert answer["folder"].endswith("mon/checkpoint/iteration_00000003")
    assert answer["common"] == {"epoch_num": 2, "step_num": 3, "global_step": 3,
                                "loss_scale": 1.0, "global_batch_size": 4, "ckpt_status": None}
    truth = dict(np.load(tmp / "mon_truth.npz"))
    held = dict(np.load(tmp / "mf_read_mon.npz"))
    assert sorted(held) == sorted(truth)
    for n, v in truth.items():
        np.testing.assert_array_equal(held[n], v, err_msg=n)


@requires_mindformers
@pytest.mark.slow
def test_mindformers_one_card_save_loads_identical_from_top_folder_or_iteration(mf_saves, tmp_path):
    cfg, values, tmp, _ = mf_saves
    top = tmp / "one"
    for path in (top, top / "iteration_00000006",
                 top / "iteration_00000006" / "model-0000000-0000001.safetensors"):
        found = detect_checkpoint(str(path), "safetensors")
        assert (found.kind, found.layout) == ("complete", "iteration")
        ctx = make_ctx()
        model = make_model(cfg, ctx)
        report = load_checkpoint(LoadOptions(str(path), "safetensors",
                                             output_dir=str(tmp_path / "o")), model, None, ctx)
        assert report.mode == "whole" and not report.missing and not report.unexpected
        assert_weights(model, values, cfg, ParallelConfig(), 0)
        assert (report.epoch, report.step) == (1, 2)
        assert float(report.hyper["loss_scale"][0]) == 1024.0


@requires_mindformers
@pytest.mark.slow
def test_resume_from_mindformers_save_restores_moments_and_common_counters(mf_saves, tmp_path):
    cfg, values, tmp, _ = mf_saves
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    opts = LoadOptions(str(tmp / "one"), "safetensors", output_dir=str(tmp_path / "o"))
    report = resume_checkpoint(opts, True, model, optimizer, ctx)
    info = report.resume
    assert (info.global_step, info.epoch_num, info.step_num) == (6, 1, 2)
    assert (info.loss_scale, info.global_batch_size) == (1024.0, 4)
    held = optimizer.get_state_arrays()
    for n in held:
        if n.startswith("adam_"):
            np.testing.assert_array_equal(held[n], values[n], err_msg=n)


@requires_mindformers
@pytest.mark.slow
def test_mindformers_sharded_save_is_described_by_its_metadata_and_merges(mf_saves, tmp_path):
    cfg, values, tmp, _ = mf_saves
    src = describe_source(str(tmp / "two"))
    assert (src.kind, src.layout) == ("distributed", "iteration")
    emb = src.chunks["model.tok_embeddings.embedding_weight"]
    assert sorted(c.slice.offsets for c in emb) == [(0, 0), (cfg.vocab_size // 2, 0)]
    assert src.counters["global_step"] == 6
    # one card, auto_trans_ckpt: merged online then loaded whole
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    report = load_checkpoint(LoadOptions(str(tmp / "two"), "safetensors", auto_trans_ckpt=True,
                                         output_dir=str(tmp_path / "o"), derived_write="first"),
                             model, None, ctx)
    assert report.mode == "merge_and_cut"
    assert_weights(model, values, cfg, ParallelConfig(), 0)
    # the offline merge
    from mindformers_st.cli import main
    assert main(["merge", str(tmp / "two"), str(tmp_path / "merged")]) == 0
    merged = {}
    for f in os.listdir(tmp_path / "merged"):
        if f.startswith("model-"):
            merged.update(load_tensors(str(tmp_path / "merged" / f)))
    for n in ("model.tok_embeddings.embedding_weight", "model.layers.1.feed_forward.w2.weight",
              "adam_m.lm_head.weight"):
        np.testing.assert_array_equal(merged[n], values[n], err_msg=n)


@requires_mindformers
@pytest.mark.slow
def test_a_sharded_save_missing_a_rank_file_is_refused(mf_saves, tmp_path):
    import shutil
    _, _, tmp, _ = mf_saves
    broken = tmp_path / "two"
    shutil.copytree(tmp / "two", broken)
    os.remove(broken / "iteration_00000006" / "model-0000001-0000002.safetensors")
    with pytest.raises(CheckpointError, match="model-0000001-0000002.safetensors: metadata.json "
                                              "says this file holds"):
        describe_source(str(broken))
    meta = json.loads((tmp / "two" / "iteration_00000006" / "metadata.json").read_text())
    assert "('lm_head.weight', (0, 0))" in meta["storage_data"]


@requires_mindformers
@pytest.mark.slow
def test_mindformers_load_checkpoint_reads_what_we_write(mf_saves):
    _, values, tmp, answers = mf_saves
    # the rank files' hyper values are test_loader.HYPER's (global_step 6, epoch 1, step 6)
    common_two = {"epoch_num": 1, "step_num": 6, "global_step": 6, "loss_scale": None,
                  "global_batch_size": None, "ckpt_status": None}
    for which, answer, common in zip(("one", "two"), answers[:2],
                                     ({**COMMON, "ckpt_status": None}, common_two)):
        assert answer["folder"].endswith(f"ours_{which}/iteration_00000006")
        assert answer["common"] == common
        held = dict(np.load(tmp / f"mf_read_{which}.npz"))
        assert sorted(held) == sorted(values)
        for n, v in values.items():
            np.testing.assert_array_equal(held[n], v, err_msg=f"{which}: {n}")
