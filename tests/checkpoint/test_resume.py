"""Choosing the step to resume (committed.json, a crashed save, a named file, MindSpore
Transformers' meta.json, file names only) and restoring optimizer state and counters."""
import os

import numpy as np
import pytest

from mindformers_st.records.commit import CommittedSave, RankMeta, add_committed, write_rank_meta
from mindformers_st.checkpoint.loader import LoadOptions
from mindformers_st.checkpoint.resume import (ResumeInfo, apply_resume, resume_checkpoint,
                                              select_resume_point)
from mindformers_st.errors import CheckpointError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.storage.writer import save_tensors
from mindformers_st.trainer.callbacks import TrainState

from .test_loader import (assert_weights, global_values, make_ctx, make_model, make_optimizer,
                          tiny_cfg, write_distributed)


def _rank_file(directory, rank, epoch, step, prefix="llama"):
    d = os.path.join(directory, f"rank_{rank}")
    os.makedirs(d, exist_ok=True)
    name = f"{prefix}_rank_{rank}-{epoch}_{step}.safetensors"
    save_tensors(os.path.join(d, name), {"global_step": np.array([step], np.int32)})
    return f"rank_{rank}/{name}"


def _commit(directory, epoch, step, world=2):
    files = {r: _rank_file(directory, r, epoch, step) for r in range(world)}
    add_committed(str(directory), world, CommittedSave(epoch, step, step, files))


def test_newest_committed_step_is_chosen_and_a_crashed_save_ignored(tmp_path):
    _commit(tmp_path, 1, 2)
    _commit(tmp_path, 1, 4)
    _rank_file(tmp_path, 0, 1, 6)   # rank 0 wrote step 6, rank 1 crashed: never committed
    point = select_resume_point(str(tmp_path), True)
    assert (point.epoch, point.step, point.how, point.global_step) == (1, 4, "committed", 4)


def test_committed_save_with_a_lost_file_is_skipped(tmp_path):
    _commit(tmp_path, 1, 2)
    _commit(tmp_path, 1, 4)
    os.remove(tmp_path / "rank_1" / "llama_rank_1-1_4.safetensors")
    assert select_resume_point(str(tmp_path), True).file_suffix == "1_2"


def test_named_file_must_be_a_committed_step(tmp_path):
    _commit(tmp_path, 1, 2)
    _commit(tmp_path, 1, 4)
    _rank_file(tmp_path, 0, 1, 6)
    assert select_resume_point(str(tmp_path), "llama_rank_0-1_2.safetensors").file_suffix == "1_2"
    assert select_resume_point(str(tmp_path), "llama_rank_1-1_2").how == "named"
    with pytest.raises(CheckpointError, match="not a committed save"):
        select_resume_point(str(tmp_path), "llama_rank_0-1_6.safetensors")
    with pytest.raises(CheckpointError, match="suffix"):
        select_resume_point(str(tmp_path), "weights.safetensors")


def test_without_committed_json_meta_json_minimum_is_used(tmp_path):
    for step in (2, 4):
        for r in range(2):
            _rank_file(tmp_path, r, 1, step)
    write_rank_meta(str(tmp_path / "rank_0"), RankMeta(1, 4, "llama_rank_0-1_4.safetensors"))
    write_rank_meta(str(tmp_path / "rank_1"), RankMeta(1, 2, "llama_rank_1-1_2.safetensors"))
    point = select_resume_point(str(tmp_path), True)
    assert (point.file_suffix, point.how) == ("1_2", "meta")


def test_without_any_record_the_newest_common_step_is_used(tmp_path):
    for r in range(2):
        _rank_file(tmp_path, r, 1, 2)
    _rank_file(tmp_path, 0, 1, 4)
    point = select_resume_point(str(tmp_path), True)
    assert (point.file_suffix, point.how) == ("1_2", "files")
    os.remove(tmp_path / "rank_1" / "llama_rank_1-1_2.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors file in this rank folder"):
        select_resume_point(str(tmp_path), True)


def test_complete_folder_needs_no_selection(tmp_path):
    save_tensors(str(tmp_path / "model.safetensors"), {"lm_head.weight": np.zeros(2, np.float32)})
    assert select_resume_point(str(tmp_path), True) is None


def test_resume_restores_weights_moments_and_counters(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    pc = ParallelConfig(model_parallel=2)
    folder = write_distributed(tmp_path / "ckpt", cfg, values, pc, remove_redundancy=True,
                               suffix="1_6")
    # an older committed step with other values, and the newest one
    older = write_distributed(tmp_path / "old", cfg, global_values(cfg, seed=5), pc, suffix="1_3")
    files_old, files_new = {}, {}
    for r in range(2):
        name = f"llama_rank_{r}-1_3.safetensors"
        os.rename(older / f"rank_{r}" / name, folder / f"rank_{r}" / name)
        files_old[r] = f"rank_{r}/{name}"
        files_new[r] = f"rank_{r}/llama_rank_{r}-1_6.safetensors"
    add_committed(str(folder), 2, CommittedSave(1, 3, 6, files_old))
    add_committed(str(folder), 2, CommittedSave(1, 6, 6, files_new))
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    opts = LoadOptions(str(folder), "safetensors", use_parallel=True,
                       output_dir=str(tmp_path / "out"))
    report = resume_checkpoint(opts, True, model, optimizer, ctx)
    assert report.resume.global_step == 6 and report.resume.epoch_num == 1
    assert report.source.file_suffix == "1_6"
    assert_weights(model, values, cfg, pc, 1)
    assert optimizer.current_lr() == pytest.approx(float(optimizer.lr_schedule.lr_at(6)))

    state = TrainState(config=type("C", (), {"seed": 0})(), model=model, optimizer=optimizer,
                       ctx=ctx, steps_per_epoch=4, global_batch_size=2)
    apply_resume(state, report.resume)
    assert (state.global_step, state.epoch, state.step_in_epoch) == (6, 1, 2)


def test_resume_refuses_a_record_that_disagrees_with_the_files(tmp_path):
    cfg = tiny_cfg()
    pc = ParallelConfig(model_parallel=2)
    folder = write_distributed(tmp_path / "ckpt", cfg, global_values(cfg), pc, suffix="1_6")
    add_committed(str(folder), 2, CommittedSave(
        1, 6, 9, {r: f"rank_{r}/llama_rank_{r}-1_6.safetensors" for r in range(2)}))
    ctx = make_ctx(pc, 0)
    model = make_model(cfg, ctx)
    before = {n: np.array(v) for n, v in model.get_local_params().items()}
    opts = LoadOptions(str(folder), "safetensors", use_parallel=True,
                       output_dir=str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="mixes two runs"):
        resume_checkpoint(opts, True, model, make_optimizer(model), ctx)
    after = model.get_local_params()     # refused before anything was set
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_apply_resume_keeps_counters_consistent():
    state = TrainState(config=type("C", (), {"seed": 1})(), model=None, optimizer=None, ctx=None,
                       steps_per_epoch=3, global_batch_size=4)
    apply_resume(state, ResumeInfo(global_step=7, seed=1, data_position=28, global_batch_size=4))
    assert (state.global_step, state.epoch, state.step_in_epoch) == (7, 2, 1)


def test_a_changed_global_batch_rescales_the_step_and_the_learning_rate_position(capsys):
    """As MindSpore Transformers: step x old batch / new batch, so the samples consumed carry
    over; the optimizer's counter (the lr position) moves with it."""
    from mindformers_st.checkpoint.resume import rescaled_step
    assert rescaled_step(6, 8, 16) == 3 and rescaled_step(7, 8, 16) == 3
    assert rescaled_step(6, 8, 8) == 6 and rescaled_step(6, None, 16) == 6
    cfg = tiny_cfg()
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    optimizer.set_state_arrays({"global_step": np.array([6], np.int32)}, strict=False)
    state = TrainState(config=type("C", (), {"seed": 0})(), model=model, optimizer=optimizer,
                       ctx=ctx, steps_per_epoch=2, global_batch_size=16)
    info = ResumeInfo(global_step=6, seed=0, data_position=48, global_batch_size=8)
    apply_resume(state, info)
    assert (state.global_step, state.epoch, state.step_in_epoch) == (3, 1, 1)
    assert optimizer.step_count == 3 and info.data_position == 48
    assert "global batch 8 -> 16: global step 6 -> 3" in capsys.readouterr().out


def _run_config(**kw):
    base = dict(load_checkpoint="", load_ckpt_format="safetensors", auto_trans_ckpt=False,
                use_parallel=False, src_strategy_path_or_dir="", output_dir="", seed=0,
                remove_redundancy=False, direct_reshard=False, resume_training=False,
                run_mode="train")
    base.update(kw)
    return type("RunConfig", (), base)()


def test_load_weights_is_the_runtime_hook(tmp_path):
    from mindformers_st.checkpoint.hook import load_weights
    from mindformers_st.errors import ConfigError
    cfg = tiny_cfg()
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    assert load_weights(model, ctx, _run_config()) is None
    with pytest.raises(ConfigError, match="load_checkpoint is empty"):
        load_weights(model, ctx, _run_config(resume_training=True))
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "ckpt", cfg, values, ParallelConfig(), suffix="1_6")
    out = str(tmp_path / "out")
    optimizer = make_optimizer(model)
    # training saves of ours without a commit record were never committed: not resumed
    with pytest.raises(CheckpointError, match="no save was committed"):
        load_weights(model, ctx, _run_config(load_checkpoint=str(folder), output_dir=out,
                                             resume_training=True), optimizer)
    add_committed(str(folder), 1, CommittedSave(1, 6, 6, {0: "rank_0/llama_rank_0-1_6.safetensors"}))
    with pytest.raises(CheckpointError, match="needs the optimizer"):
        load_weights(model, ctx, _run_config(load_checkpoint=str(folder), output_dir=out,
                                             resume_training=True))
    # predict ignores resume_training; train restores the optimizer and reports the counters
    report = load_weights(model, ctx, _run_config(load_checkpoint=str(folder), output_dir=out,
                                                  resume_training=True, run_mode="predict"))
    assert report.resume is None and report.optimizer_ignored
    optimizer = make_optimizer(model)
    report = load_weights(model, ctx, _run_config(load_checkpoint=str(folder), output_dir=out,
                                                  resume_training=True), optimizer)
    assert report.resume.global_step == 6 and optimizer.step_count == 6
