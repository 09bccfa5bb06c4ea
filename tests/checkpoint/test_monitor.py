"""CheckpointMonitor in one process with a real tiny Llama: what a save writes, pruning, async,
ckpt format, extra files, failures, and the config wiring."""
import json
import os
import shutil

import numpy as np
import pytest

from mindformers_st.records import commit as cm
from mindformers_st.checkpoint.monitor import CheckpointMonitor
from mindformers_st.errors import CheckpointError
from mindformers_st.storage.checksum import verify_checksums
from mindformers_st.storage.reader import open_safetensors
from mindformers_st.trainer.callbacks import run_context_of

from .monitor_worker import build_run, train

pytestmark = pytest.mark.slow      # one real MindSpore training run (~15 s of CPU)

STEPS, PER_EPOCH, BATCH = 4, 3, 4     # step 4 is epoch 2, step 1 -> files "-2_1"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 4-step training with four monitors; returns (out_dir, monitors, truth arrays)."""
    out = str(tmp_path_factory.mktemp("run"))
    model, opt, step, ctx = build_run()
    mons = {
        "sync": CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=1,
                                  keep_checkpoint_max=2, output_dir=out),
        "ckpt": CheckpointMonitor(checkpoint_format="ckpt", directory=os.path.join(out, "ck"),
                                  save_checkpoint_steps=2, async_save=True,
                                  save_network_params=True, output_dir=out),
        "async": CheckpointMonitor(checkpoint_format="safetensors", directory=os.path.join(out, "as"),
                                   save_checkpoint_steps=2, async_save=True, remove_redundancy=True,
                                   save_trainable_params=True, prefix="llama", output_dir=out),
    }
    train(model, opt, step, ctx, list(mons.values()), STEPS, out, PER_EPOCH, BATCH)
    truth = dict(model.get_local_params())
    truth.update(opt.get_state_arrays())
    return out, mons, truth, (model, opt, step, ctx)


def test_sync_save_writes_the_contract_file_and_prunes_to_keep_max(run):
    out, mons, truth, _ = run
    d = os.path.join(out, "checkpoint")
    assert sorted(os.listdir(os.path.join(d, "rank_0"))) == [
        "CKP_rank_0-1_3.safetensors", "CKP_rank_0-2_1.safetensors", "meta.json"]
    saves = cm.committed_saves(d)
    assert [(s.epoch, s.step, s.global_step) for s in saves] == [(1, 3, 3), (2, 1, 4)]
    run_id = mons["sync"].run_id
    assert [(s.run_id, s.save_id) for s in saves] == [(run_id, f"1_3@{run_id}"), (run_id, f"2_1@{run_id}")]
    meta = cm.read_rank_meta(os.path.join(d, "rank_0"))
    assert meta.to_json() == {"last_epoch": 2, "last_step": 1, "last_ckpt_file": "CKP_rank_0-2_1.safetensors",
                    "committed": ["CKP_rank_0-1_3.safetensors", "CKP_rank_0-2_1.safetensors"],
                    "run_id": run_id, "save_id": f"2_1@{run_id}"}
    assert [s.global_step for s in mons["sync"].stats] == [1, 2, 3, 4]

    with open_safetensors(saves[-1].path(0)) as f:
        assert verify_checksums(f) == []
        for name, value in truth.items():
            np.testing.assert_array_equal(f.read(name), value, err_msg=name)
        hyper = {n: f.read(n).item() for n in ("epoch_num", "step_num", "global_batch_size",
                                                "data_position", "seed", "loss_scale")}
        assert hyper == {"epoch_num": 2, "step_num": 4, "global_batch_size": BATCH,
                         "data_position": 4 * BATCH, "seed": 0, "loss_scale": 1.0}
        assert f.read("learning_rate").item() == pytest.approx(1e-3)
        assert f.read("global_step").tolist() == [4]
        assert f.metadata["format"] == "ms" and f.metadata["remove_redundancy"] == "False"
        ours = json.loads(f.metadata["mindformers_st"])
        assert (ours["rank"], ours["world_size"], ours["epoch"], ours["step"]) == (0, 1, 2, 1)
        assert (ours["run_id"], ours["save_id"]) == (run_id, f"2_1@{run_id}")
        assert ours["parallel_config"]["data_parallel"] == 1
        emb = ours["slices"]["model.tok_embeddings.embedding_weight"]
        assert emb == {"global_shape": [128, 64], "offsets": [0, 0], "sizes": [128, 64]}
        assert "adam_m.lm_head.weight" in ours["slices"] and "global_step" not in ours["slices"]


def test_verify_accepts_the_folder(run):
    from mindformers_st.commands.verify import verify_path
    out = run[0]
    for sub in ("checkpoint", "as"):
        problems, _ = verify_path(os.path.join(out, sub))
        assert problems == [], problems


def test_async_save_commits_and_logs_blocked_time(run):
    out, mons, truth, _ = run
    d = os.path.join(out, "as")
    saves = cm.committed_saves(d)
    assert [s.global_step for s in saves] == [2, 4]
    assert saves[-1].files[0] == "rank_0/llama_rank_0-2_1.safetensors"
    stats = mons["async"].stats
    assert [s.async_save for s in stats] == [True, True] and all(s.write_time > 0 for s in stats)
    with open_safetensors(saves[-1].path(0)) as f:   # the copy taken at step 4, not later values
        assert f.metadata["remove_redundancy"] == "True"
        for name, value in truth.items():
            np.testing.assert_array_equal(f.read(name), value, err_msg=name)
    extra = os.path.join(out, "checkpoint_trainable", "rank_0", "llama_rank_0-trainable_params-2_1.safetensors")
    with open_safetensors(extra) as f:
        assert not any(n.startswith("adam_") for n in f.tensors) and "lm_head.weight" in f.tensors
        assert "global_step" not in f.tensors


def test_ckpt_format_is_mindspore_loadable(run):
    import mindspore as ms
    out, mons, truth, _ = run
    saves = cm.committed_saves(os.path.join(out, "ck"))
    assert [s.files[0] for s in saves] == ["rank_0/CKP_rank_0-1_2.ckpt", "rank_0/CKP_rank_0-2_1.ckpt"]
    loaded = ms.load_checkpoint(saves[-1].path(0))
    for name, value in truth.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value, err_msg=name)
    assert int(loaded["step_num"].asnumpy()) == 4
    net = ms.load_checkpoint(os.path.join(out, "checkpoint_network", "rank_0", "CKP_rank_0-network-2_1.ckpt"))
    # besides the parameters, only our slice description (a string entry MindSpore skips)
    assert set(net) - {"mindformers_st"} == {n for n in truth
                                              if not n.startswith("adam_") and n != "global_step"}


def test_second_run_in_same_directory_keeps_counting_old_saves(run, tmp_path):
    """Saves committed by an earlier run count toward keep_checkpoint_max and are pruned first,
    even when the new run restarts at smaller step numbers."""
    out, _, _, (model, opt, step, ctx) = run
    d = str(tmp_path / "again")
    shutil.copytree(os.path.join(out, "checkpoint"), d)
    mon = CheckpointMonitor(checkpoint_format="safetensors", directory=d, keep_checkpoint_max=2,
                            save_checkpoint_steps=1, output_dir=out)
    train(model, opt, step, ctx, [mon], 1, out, PER_EPOCH, BATCH)   # global step 1 again: epoch 1 step 1
    # the new save (1, 1) is the newest by commit order, though its numbers are smaller
    assert [s.key for s in cm.committed_saves(d)] == [(2, 1), (1, 1)]
    assert not os.path.exists(os.path.join(d, "rank_0", "CKP_rank_0-1_3.safetensors"))


def test_failed_write_is_not_committed(run, tmp_path):
    out, _, _, (model, opt, step, ctx) = run
    d = str(tmp_path / "fail")
    mon = CheckpointMonitor(checkpoint_format="safetensors", directory=d, output_dir=out)
    mon.on_train_begin(run_context_of(_state(model, opt, step, ctx, out)))
    shutil.rmtree(os.path.join(d, "rank_0"))            # the folder vanished under the writer
    st = _state(model, opt, step, ctx, out)
    st.global_step, st.step_in_epoch = 1, 1
    with pytest.raises(CheckpointError, match="not committed"):
        mon.on_train_step_end(run_context_of(st))
    # the record the run's start wrote (claiming the fresh folder) still lists no save
    assert cm.committed_saves(d) == [] and cm.load_committed_entries(d) == []


def _state(model, opt, step, ctx, out):
    from mindformers_st.trainer.callbacks import TrainState
    from .monitor_worker import _Cfg
    return TrainState(config=_Cfg(out), model=model, optimizer=opt, ctx=ctx, train_step=step,
                      steps_per_epoch=PER_EPOCH, total_steps=1, global_batch_size=BATCH)
