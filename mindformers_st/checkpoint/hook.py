"""The runtime's load entry point: `load_weights(model, ctx, config, optimizer)` decides between
a plain load (`loader.load_checkpoint`) and a resume (`resume.resume_checkpoint`), so neither of
those modules imports the other's caller. With `load_ckpt_async: True` the runtime calls
`start_load_weights` before building the network: the load is prepared and its reading started
on a background thread, and `load_weights(..., pending=)` finishes it once the network and
optimizer exist."""
from __future__ import annotations

from typing import Optional

from ..errors import CheckpointError, ConfigError
from .loader import LoadOptions, LoadReport, PendingLoad, load_checkpoint
from .network import ModelState
from .resume import PendingResume, resume_checkpoint


def _resuming(config) -> bool:
    return bool(getattr(config, "resume_training", False)) and \
        getattr(config, "run_mode", "train") in ("train", "finetune")


def start_load_weights(ctx, config, table, with_optimizer: bool):
    """For `load_ckpt_async: True`: start the load `load_weights` would do, before the model
    exists — `table` is the parameter table the model will have (`with_optimizer`: and our
    AdamW's moments). What needs every rank (detection, conversions, the online merge,
    choosing the resume save) happens now on this main thread; reading and checking this
    rank's bytes runs on a background thread. Returns the pending load to pass to
    `load_weights(..., pending=)`, or None when there is nothing to load. Errors of the
    background read are raised by `load_weights`, before anything is set."""
    if not getattr(config, "load_checkpoint", ""):
        return None
    opts = LoadOptions.from_config(config)
    resume = _resuming(config)
    if resume and not with_optimizer:
        raise CheckpointError("resume_training needs the optimizer: plan the load with "
                              "with_optimizer=True")
    planned = ModelState.planned(table, ctx, with_optimizer=resume)
    if resume:
        return PendingResume(opts, config.resume_training, ctx, planned)
    return PendingLoad(opts, planned, ctx, background=True)


def load_weights(model, ctx, config, optimizer=None, pending=None) -> Optional[LoadReport]:
    """The runtime's entry point: load what the RunConfig asks for into `model` (and, when
    resuming a train/finetune run, `optimizer`), or return None when `load_checkpoint` is
    empty. With `resume_training` (True or a file name) the step is chosen by
    `checkpoint.resume` and the report's `.resume` (a ResumeInfo) holds the counters to put
    back into the loop (`resume.apply_resume`). `pending` (from `start_load_weights`) finishes
    a load started earlier instead."""
    if pending is not None:
        if isinstance(pending, PendingResume):
            return pending.finish(model, optimizer)
        return pending.finish(ModelState(model, optimizer, ctx, with_optimizer=False))
    if not getattr(config, "load_checkpoint", ""):
        if getattr(config, "resume_training", False) or getattr(config, "auto_trans_ckpt", False):
            raise ConfigError("resume_training / auto_trans_ckpt is set but load_checkpoint is "
                              "empty; set load_checkpoint to the checkpoint folder")
        return None
    opts = LoadOptions.from_config(config)
    if _resuming(config):
        if optimizer is None:
            raise CheckpointError("resume_training needs the optimizer: build it before "
                                  "calling load_weights(model, ctx, config, optimizer)")
        return resume_checkpoint(opts, config.resume_training, model, optimizer, ctx)
    return load_checkpoint(opts, model, optimizer, ctx)
