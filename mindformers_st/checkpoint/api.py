"""The load hook as a library call, for any MindSpore network (e.g. a `Model.train` script).

    from mindformers_st import CheckpointMonitor, load_checkpoint
    report = load_checkpoint(net, "output/checkpoint", optimizer=opt, resume=True)
    model.train(epochs, dataset.skip(report.resume.skip_steps),
                callbacks=[CheckpointMonitor(...)], initial_epoch=report.resume.initial_epoch)

Every source the runtime loads is accepted: a Hugging Face folder (its names mapped when the
network uses MindSpore Transformers' Llama names), complete MindSpore weights, a `rank_x/`
folder with or without a strategy, `.ckpt` files; the network's current layout (one card,
DATA_PARALLEL, or MindSpore's `parameter_layout_dict`) decides what each rank reads.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from ..errors import CheckpointError
from .loader import LoadOptions, LoadReport, load_checkpoint as _load
from .network import CellState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelTrainResume:
    """Where `Model.train` continues after a resume: `initial_epoch` (epochs done) and
    `skip_steps` (batches of that epoch already trained: skip them, `dataset.skip(n)`), from the
    restored global step and the steps per epoch."""

    global_step: int
    initial_epoch: int
    skip_steps: int

    def hint(self) -> str:
        """What to pass to Model.train, in words."""
        return (f"continue with model.train(epochs, dataset{'.skip(%d)' % self.skip_steps if self.skip_steps else ''}, "
                f"initial_epoch={self.initial_epoch}) (global step {self.global_step})")


def load_checkpoint(network, path: str, optimizer=None, *, resume: bool = False,
                    steps_per_epoch: Optional[int] = None, load_ckpt_format: Optional[str] = None,
                    auto_trans_ckpt: Optional[bool] = None, src_strategy: str = "",
                    layouts: Optional[Union[str, Mapping]] = None, output_dir: str = "./output",
                    verify_checksums=True, direct_reshard: bool = False,
                    transform_process_num: int = 1,
                    balanced_load: Optional[bool] = None, map_pages: bool = False) -> LoadReport:
    """Load the weights at `path` into `network` (any `nn.Cell`; this rank's part under its
    layout), and with `resume` the optimizer's state too (moments, global_step, learning rate)
    from the newest committed save (or the save a rank file path names; a damaged newest save
    falls back to the previous one). Returns the LoadReport: loaded / missing / unexpected names
    (missing weights are a CheckpointError), and with `resume` and `steps_per_epoch`,
    `report.resume_point` (a ModelTrainResume) saying how to continue in Model.train.

    `load_ckpt_format` defaults from the path (safetensors unless it holds `.ckpt`);
    `auto_trans_ckpt` defaults to re-cutting whenever the files are not this job's layout;
    `layouts` (a strategy file/folder or {name: TensorLayout}) say how this job cuts the
    network when MindSpore's `parameter_layout_dict` does not; `transform_process_num` how many
    ranks build an online merge or conversion (must divide the world size, as MindSpore
    Transformers); `balanced_load` (default: on when the ranks span several machines) reads each block several
    ranks need once and shares it (docs/checkpoint-loading.md); `map_pages` gives parameters a
    tensor stored whole in their dtype as the file's copy-on-write pages instead of copying it
    — only for a network nothing has run yet: MindSpore's optimizers and @jit steps keep
    updating the memory a parameter had when they first ran. Every rank must call it."""
    from ..parallel.context import context_from_mindspore
    ctx = context_from_mindspore()
    if isinstance(layouts, str):
        from ..layout.strategy import read_strategy
        layouts = read_strategy(layouts)
    state = CellState(network, optimizer, ctx.world_size, layouts, map_pages=map_pages)
    if resume and optimizer is None:
        raise CheckpointError("load_checkpoint(resume=True) needs the optimizer whose state to restore")
    fmt = load_ckpt_format or _format_of(path)
    opts = LoadOptions(load_checkpoint=path, load_ckpt_format=fmt,
                       auto_trans_ckpt=bool(auto_trans_ckpt) if auto_trans_ckpt is not None
                       else _needs_recut(path, ctx), use_parallel=ctx.world_size > 1,
                       src_strategy_path_or_dir=src_strategy, output_dir=output_dir,
                       direct_reshard=direct_reshard, verify_checksums=verify_checksums,
                       transform_process_num=transform_process_num,
                       balanced_load=balanced_load)
    if resume:
        from .resume import resume_checkpoint
        report = resume_checkpoint(opts, True, state, None, ctx)
        if steps_per_epoch:
            g = int(report.resume.global_step)
            point = ModelTrainResume(g, g // steps_per_epoch, g % steps_per_epoch)
            report.resume_point = point
            if ctx.is_main:
                print(f"[resume] {point.hint()}", flush=True)
        return report
    return _load(opts, state, None, ctx)


def _format_of(path: str) -> str:
    """'ckpt' when `path` is or holds `.ckpt` files (and no safetensors), else 'safetensors'."""
    if path.endswith(".ckpt"):
        return "ckpt"
    for _, _, files in os.walk(path):
        if any(f.endswith(".safetensors") for f in files):
            return "safetensors"
        if any(f.endswith(".ckpt") for f in files):
            return "ckpt"
    return "safetensors"


def _needs_recut(path: str, ctx) -> bool:
    """Complete weights on several ranks, or rank files of another world size, are re-cut."""
    from ..records.names import parse_rank_dir, rank_folders
    root = path
    if os.path.isfile(path):   # a rank file names its folder's save; a lone file is complete
        parent = os.path.dirname(path)
        root = os.path.dirname(parent) if parse_rank_dir(parent) is not None else ""
    ranks = rank_folders(root) if root else {}
    if not ranks:
        world = _iteration_world(path)
        return ctx.world_size > 1 if world is None else world != ctx.world_size
    return len(ranks) != ctx.world_size


def _iteration_world(path: str) -> Optional[int]:
    """The world size a Checkpoint 2.0 save was written by (its shard names), else None (any
    problem with the folder is the loader's to report)."""
    from ..errors import MindformersSTError
    from ..records.iteration import find_iteration, parse_shard_file, shard_files
    try:
        it = find_iteration(path if os.path.isdir(path) else os.path.dirname(path))
        return None if it is None else parse_shard_file(shard_files(it.folder)[0]).world
    except (MindformersSTError, OSError):
        return None
