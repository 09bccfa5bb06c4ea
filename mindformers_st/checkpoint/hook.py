"""The runtime's load entry point: `load_weights(model, ctx, config, optimizer)` decides between
a plain load (`loader.load_checkpoint`) and a resume (`resume.resume_checkpoint`), so neither of
those modules imports the other's caller."""
from __future__ import annotations

from typing import Optional

from ..errors import CheckpointError, ConfigError
from .loader import LoadOptions, LoadReport, load_checkpoint
from .resume import resume_checkpoint


def load_weights(model, ctx, config, optimizer=None) -> Optional[LoadReport]:
    """The runtime's entry point: load what the RunConfig asks for into `model` (and, when
    resuming a train/finetune run, `optimizer`), or return None when `load_checkpoint` is
    empty. With `resume_training` (True or a file name) the step is chosen by
    `checkpoint.resume` and the report's `.resume` (a ResumeInfo) holds the counters to put
    back into the loop (`resume.apply_resume`)."""
    if not getattr(config, "load_checkpoint", ""):
        if getattr(config, "resume_training", False) or getattr(config, "auto_trans_ckpt", False):
            raise ConfigError("resume_training / auto_trans_ckpt is set but load_checkpoint is "
                              "empty; set load_checkpoint to the checkpoint folder")
        return None
    opts = LoadOptions.from_config(config)
    resume = getattr(config, "resume_training", False)
    if resume and getattr(config, "run_mode", "train") in ("train", "finetune"):
        if optimizer is None:
            raise CheckpointError("resume_training needs the optimizer: build it before "
                                  "calling load_weights(model, ctx, config, optimizer)")
        return resume_checkpoint(opts, resume, model, optimizer, ctx)
    return load_checkpoint(opts, model, optimizer, ctx)
