"""The train / finetune loop: model, optimizer, lr and TrainStep from the config, data sharded
over data-parallel ranks, callbacks after every step.

Global batch = runner_config.batch_size x data_parallel x gradient_accumulation_steps; each dp
rank reads its own rows (see data/mindrecord.py for the order) and runs them as
gradient_accumulation_steps micro-batches of batch_size before one optimizer update. The run lasts `runner_config.epochs` epochs, or exactly
`runner_config.train_steps` optimizer steps when that is set (> 0). Finetune differs from
train only in the data columns: a `labels` column (prompt masked with -100) is used when the
dataset has one.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..errors import ConfigError, write_failed
from .callbacks import TrainState, build_callbacks, run_context_of
from .stop import GracefulExit, exception_save, inject_fault
from .resolve import plural

logger = logging.getLogger(__name__)


def total_steps_of(config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: train_steps when set, else epochs x steps per epoch."""
    rc = config.runner_config
    return rc.train_steps if rc.train_steps > 0 else rc.epochs * steps_per_epoch


def data_start(config, global_step: int, steps_per_epoch: int):
    """(epoch, step in epoch) the data starts at, as MindSpore Transformers skips data: from the
    beginning with `ignore_data_skip: True`; after exactly `data_skip_steps` steps when set;
    else at the resumed global step (0 for a fresh run). Printed on rank 0 by the caller."""
    if getattr(config, "ignore_data_skip", False):
        skip = 0
    elif getattr(config, "data_skip_steps", None) is not None:
        skip = int(config.data_skip_steps)
    else:
        skip = int(global_step)
    if skip < 0:
        raise ConfigError(f"config key 'data_skip_steps' must be >= 0, got {skip}")
    return divmod(skip, max(1, steps_per_epoch))


def build_model(config, resolved, ctx):
    """The registered model class of `resolved.arch` built for `ctx` (weights initialised)."""
    from ..models.registry import get_model

    model_cls, _ = get_model(resolved.arch)
    return model_cls(resolved.config, ctx)


def start_async_load(config, resolved, ctx, with_optimizer: bool):
    """With `load_ckpt_async: True` and a checkpoint to load: the load started before the
    network is built (`checkpoint.hook.start_load_weights`: this rank's bytes read and checked
    on a background thread), to finish with `load_weights(..., pending=)` before the first
    step; else None (the load runs after the network is built, as before)."""
    if not (getattr(config, "load_ckpt_async", False) and config.load_checkpoint):
        return None
    from ..checkpoint.hook import start_load_weights
    from .resolve import param_table_of

    pending = start_load_weights(ctx, config, param_table_of(resolved, False), with_optimizer)
    if pending is not None and ctx.is_main:
        print("[load_checkpoint] load_ckpt_async: reading the weights on a background thread "
              "while the network is built", flush=True)
    return pending


def write_strategy_files(config, model, ctx) -> Optional[str]:
    """Rank 0 writes `{output_dir}/strategy/ckpt_strategy_rank_{r}.ckpt` for every rank (the
    layouts of parameters and AdamW moments); returns the folder on rank 0."""
    if not ctx.is_main:
        return None
    from ..layout.parallel_config import plan_layouts
    from ..layout.strategy import write_rank_strategy_files

    folder = os.path.join(config.output_dir, "strategy")
    layouts = plan_layouts(model.param_table().with_optimizer_states(), ctx.config)
    try:
        os.makedirs(folder, exist_ok=True)
        write_rank_strategy_files(folder, layouts, ctx.config)
    except OSError as exc:
        raise write_failed("strategy files (output_dir/strategy)", folder, exc) from exc
    return folder


def _columns(config, data_dir: str):
    """input_ids, plus labels when the dataset stores them (finetune data)."""
    import mindspore.dataset as ds

    from ..data.mindrecord import mindrecord_files

    wanted = list(config.train_dataset.input_columns or ["input_ids"])
    schema = ds.MindDataset(mindrecord_files(data_dir), shuffle=False).get_col_names()
    missing = [c for c in wanted if c not in schema]
    if missing:
        raise ConfigError(f"train_dataset.input_columns {missing} are not in {data_dir} "
                          f"(it has {schema})")
    if "labels" in schema and "labels" not in wanted:
        wanted.append("labels")
    return wanted


def pipeline_rows(rc, pc) -> int:
    """Rows each dp rank reads per step under pipeline parallelism: batch_size x
    micro_batch_num, as MindSpore Transformers (global batch = batch_size x dp x
    micro_batch_num). gradient_accumulation_steps does not apply there: a warning names it."""
    if rc.gradient_accumulation_steps > 1:
        logger.warning("runner_config.gradient_accumulation_steps %d is not used with "
                       "pipeline_stage %d (micro_batch_num %d accumulates instead), as in "
                       "MindSpore Transformers", rc.gradient_accumulation_steps,
                       pc.pipeline_stage, pc.micro_batch_num)
    return rc.batch_size * pc.micro_batch_num


def run_train(config, resolved, ctx) -> TrainState:
    """Train or finetune as `config` says; returns the final TrainState (losses in `.losses`)."""
    from ..data.mindrecord import TrainData
    from .lr import build_lr_schedule
    from .optim import build_optimizer
    from .step import TrainStep

    rc, td = config.runner_config, config.train_dataset
    pending = start_async_load(config, resolved, ctx, with_optimizer=True)
    data_dir = td.data_loader.dataset_dir
    seq_len = resolved.config.seq_length
    # Each rank reads batch_size x gradient_accumulation_steps rows per step and TrainStep runs
    # them as that many micro-batches before one update: global batch = batch_size x dp x k.
    accumulate = rc.gradient_accumulation_steps
    rows = rc.batch_size * accumulate
    if ctx.config.pipeline_stage > 1:
        rows = pipeline_rows(rc, ctx.config)
        accumulate = 1
    data = TrainData(data_dir, _columns(config, data_dir), rows,
                     ctx.config.data_parallel, ctx.dp_rank, config.seed,
                     shuffle=td.data_loader.shuffle, num_samples=td.data_loader.num_samples,
                     drop_remainder=td.drop_remainder,
                     num_parallel_workers=min(td.num_parallel_workers, 2))
    total = total_steps_of(config, data.steps_per_epoch)

    model = build_model(config, resolved, ctx)
    lr = build_lr_schedule(config.lr_schedule, total)
    optimizer = build_optimizer(model, config.optimizer, lr)
    loaded = None
    if config.load_checkpoint or config.resume_training:   # after the optimizer: resume restores its moments and step
        from ..checkpoint.hook import load_weights
        loaded = load_weights(model, ctx, config, optimizer, pending=pending)
    wrapper = config.runner_wrapper
    step = TrainStep(model, optimizer, ctx,
                     clip_norm=wrapper.max_grad_norm if wrapper.use_clip_grad else None,
                     accumulation_steps=accumulate)
    folder = write_strategy_files(config, model, ctx)
    if folder:
        logger.info("strategy files written to %s", folder)

    state = TrainState(config=config, model=model, optimizer=optimizer, ctx=ctx, train_step=step,
                       steps_per_epoch=data.steps_per_epoch, total_steps=total,
                       global_batch_size=data.plan.global_batch)
    if loaded is not None and loaded.resume is not None:
        from ..checkpoint.resume import apply_resume
        apply_resume(state, loaded.resume)
    if state.global_step >= total:
        if ctx.is_main:
            print(f"[train] already at train_steps {total} (global step {state.global_step}): "
                  f"nothing to train; raise runner_config.train_steps (or epochs) to continue",
                  flush=True)
        return state
    callbacks = build_callbacks(config)
    graceful = GracefulExit.of_config(config, ctx)
    if graceful.enabled and graceful.save and not any(getattr(cb, "save_unsaved_step", None)
                                                      for cb in callbacks):
        raise ConfigError("use_graceful_exit: True saves through the CheckpointMonitor callback, "
                          "and callbacks: has none; add {type: CheckpointMonitor} (or set "
                          "OnRequestExit save_ckpt: False to stop without saving)")
    for cb in callbacks:
        cb.on_train_begin(run_context_of(state))
    epoch, step_in_epoch = data_start(config, state.global_step, data.steps_per_epoch)
    skipping = config.ignore_data_skip or config.data_skip_steps is not None
    if ctx.is_main and ((epoch, step_in_epoch) != (0, 0) or skipping):
        why = ("ignore_data_skip" if config.ignore_data_skip else
               f"data_skip_steps {config.data_skip_steps}" if config.data_skip_steps is not None
               else "the resumed step")
        print(f"[data] starting at epoch {epoch} step {step_in_epoch} ({why}; global step "
              f"{state.global_step})", flush=True)
    if ctx.is_main:
        print(f"training {total} steps ({data.steps_per_epoch} per epoch, global batch "
              f"{data.plan.global_batch} x {seq_len + 1} tokens, "
              f"{plural(ctx.world_size, 'rank')})", flush=True)
    with graceful:
        try:
            _loop(state, data, step, callbacks, graceful, epoch, step_in_epoch, total, seq_len)
        except BaseException as exc:
            exception_save(callbacks, run_context_of(state), state, exc)
            raise
    for cb in callbacks:
        cb.on_train_end(run_context_of(state))
    return state


def _loop(state, data, step, callbacks, graceful, epoch, step_in_epoch, total, seq_len) -> None:
    """Steps until `total` (or a graceful exit after a step): one step per batch, callbacks
    after each."""
    while state.global_step < total:
        for batch in data.batches(epoch, step_in_epoch):
            if state.global_step >= total:
                break
            t0 = time.time()
            ids = batch["input_ids"]
            if ids.shape[1] != seq_len + 1:
                raise ConfigError(f"dataset rows have {ids.shape[1]} tokens but model_config."
                                  f"seq_length is {seq_len} (rows must be seq_length + 1)")
            inject_fault(state.global_step + 1)
            loss = step(ids, batch.get("labels"))
            step_in_epoch += 1
            state.global_step += 1
            state.epoch, state.step_in_epoch = epoch, step_in_epoch
            state.loss, state.lr, state.grad_norm = loss, step.last_lr, step.last_grad_norm
            state.step_time = time.time() - t0
            state.tokens_per_step = data.plan.global_batch * seq_len
            state.losses.append(loss)
            step_context = run_context_of(state)
            for cb in callbacks:
                cb.on_train_step_end(step_context)
            if graceful.stop_now():
                _stop_gracefully(state, callbacks, step_context, graceful.save)
                return
        epoch, step_in_epoch = epoch + 1, 0


def _stop_gracefully(state, callbacks, run_context, save: bool) -> None:
    """Save and commit the step just finished (unless it was just saved, or `save` is False)
    and say so."""
    if save:
        for cb in callbacks:
            if getattr(cb, "save_unsaved_step", None):
                cb.save_unsaved_step(run_context)
    if state.ctx.is_main:
        print(f"[train] graceful exit (use_graceful_exit): stopped after global step "
              f"{state.global_step}" + (", which is saved and committed; resume with "
                                        "--resume_training True --load_checkpoint <the checkpoint "
                                        "folder>" if save else " without saving (save_ckpt: False)"),
              flush=True)
