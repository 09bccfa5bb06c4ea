"""Resume training: pick the step to resume, load weights and optimizer state for it, and hand
the loop its counters back.

Which step (`select_resume_point`):
- `resume_training: True`: the newest save every rank committed (`commit.committed_saves`:
  entries of `committed.json` whose files all exist and validate, so a crashed save is never
  picked); for a MindSpore Transformers folder without `committed.json`, the minimum
  (epoch, step) over every rank's `meta.json`, else the newest step every rank has a file for;
- `resume_training: "<file name>"`: that step (`-{epoch}_{step}` of the name) on every rank;
  it must be committed (or present for every rank when there is no commit record);
- a folder of complete weights (merged offline, with `hyper_param.safetensors`): loaded as is.
What is restored: weights and AdamW moments (through `loader.load_checkpoint`), `global_step`
(the optimizer's counter, which is also the learning-rate position), epoch and step in epoch,
and the data position (the loop's data order is a function of seed, epoch and step).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..errors import CheckpointError
from ..transform.sources import rank_folders
from .commit import committed_saves, parse_ckpt_name, read_committed, read_rank_meta
from .detect import step_suffix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """The step to resume: `file_suffix` = "{epoch}_{step}" selects every rank's file;
    `how` says how it was chosen ("committed", "meta", "files", "named")."""

    epoch: int
    step: int
    how: str
    global_step: Optional[int] = None

    @property
    def file_suffix(self) -> str:
        return f"{self.epoch}_{self.step}"


@dataclass
class ResumeInfo:
    """What the train loop needs after a resume load: the optimizer steps done (which is also
    the learning-rate position and, with steps per epoch, the data position), and the values
    the checkpoint recorded (None when it did not record them)."""

    global_step: int
    epoch_num: Optional[int] = None
    step_num: Optional[int] = None
    data_position: Optional[int] = None
    seed: Optional[int] = None
    global_batch_size: Optional[int] = None
    loss_scale: Optional[float] = None


def _rank_files(rank_dir: str, fmt_ext: str):
    return [f for f in os.listdir(rank_dir) if f.endswith(fmt_ext)]


def _steps_of(rank_dir: str):
    """{(epoch, step)} of the checkpoint files in one rank folder."""
    out = set()
    for f in os.listdir(rank_dir):
        parsed = parse_ckpt_name(f)
        if parsed is not None:
            out.add(parsed[1:])
    return out


def select_resume_point(directory: str, resume_training: Union[bool, str]) -> Optional[ResumePoint]:
    """The step to resume from `directory` (a folder of `rank_x/`), or None when `directory`
    holds complete weights (nothing to choose). CheckpointError when no step qualifies or the
    named one is not complete."""
    directory = os.path.abspath(directory)
    if os.path.isfile(directory):
        name = os.path.basename(directory)
        suffix = step_suffix(name)
        if suffix is None or not rank_folders(os.path.dirname(os.path.dirname(directory))):
            return None
        resume_training, directory = name, os.path.dirname(os.path.dirname(directory))
    ranks = rank_folders(directory) if os.path.isdir(directory) else {}
    if not ranks:
        return None
    saves = committed_saves(directory)
    has_record = read_committed(directory) is not None
    if isinstance(resume_training, str):
        name = resume_training if resume_training.endswith((".safetensors", ".ckpt")) \
            else resume_training + ".safetensors"
        suffix = step_suffix(name)
        if suffix is None:
            raise CheckpointError(
                f"resume_training {resume_training!r}: the name has no '-{{epoch}}_{{step}}' "
                f"suffix; give a checkpoint file name such as llama_rank_0-1_4.safetensors, or "
                f"True for the newest committed step")
        epoch, step = (int(x) for x in suffix.split("_"))
        if has_record:
            hit = [s for s in saves if s.key == (epoch, step)]
            if not hit:
                raise CheckpointError(
                    f"resume_training {resume_training!r}: step {epoch}_{step} is not a save "
                    f"every rank committed in {directory} (committed: "
                    f"{[f'{s.epoch}_{s.step}' for s in saves]}); a crashed or pruned save "
                    f"cannot be resumed, pick one of those")
            return ResumePoint(epoch, step, "named", hit[0].global_step)
        lacking = [r for r, d in ranks.items() if (epoch, step) not in _steps_of(d)]
        if lacking:
            raise CheckpointError(f"resume_training {resume_training!r}: ranks {lacking} have "
                                  f"no file of step {epoch}_{step} in {directory}")
        return ResumePoint(epoch, step, "named")
    if saves:
        newest = saves[-1]
        return ResumePoint(newest.epoch, newest.step, "committed", newest.global_step)
    if has_record:
        # A commit record exists: files outside it may be crashed saves, never fall back.
        raise CheckpointError(
            f"{directory}: committed.json lists no save whose files are all present and valid "
            f"(see the warnings above); restore the missing rank files, or start without "
            f"resume_training")
    return _fallback_point(directory, ranks)


def _fallback_point(directory: str, ranks) -> ResumePoint:
    """Without committed.json (a MindSpore Transformers folder): the minimum (epoch, step) over
    every rank's meta.json, else the newest step every rank has a file for."""
    metas = {r: read_rank_meta(d) for r, d in ranks.items()}
    if all(m is not None for m in metas.values()):
        key = min((int(m["last_epoch"]), int(m["last_step"])) for m in metas.values())
        common = set.intersection(*(_steps_of(d) for d in ranks.values()))
        if key in common:
            logger.warning("%s: no committed.json; resuming step %s from the ranks' meta.json",
                           directory, key)
            return ResumePoint(key[0], key[1], "meta")
    common = set.intersection(*(_steps_of(d) for d in ranks.values()))
    if not common:
        raise CheckpointError(
            f"{directory}: no step has a checkpoint file on every rank (ranks {sorted(ranks)}); "
            f"there is nothing complete to resume — start without resume_training or point "
            f"load_checkpoint at another checkpoint folder")
    key = max(common)
    logger.warning("%s: no committed.json and no usable meta.json; resuming the newest step every "
                   "rank has a file for: %s", directory, key)
    return ResumePoint(key[0], key[1], "files")


def _scalar(hyper, name):
    if name not in hyper:
        return None
    value = np.asarray(hyper[name]).reshape(-1)
    return value[0].item() if value.size else None


def resume_checkpoint(opts, resume_training, model, optimizer, ctx):
    """Select the step (`select_resume_point`), load weights and optimizer state for it on this
    rank (`loader.load_checkpoint(resume=True)`), and return the LoadReport with `.resume` (a
    ResumeInfo) set. Every rank must call this."""
    from .loader import load_checkpoint
    point = select_resume_point(opts.load_checkpoint, resume_training)
    if point is not None:
        logger.info("resuming step %s (%s) from %s", point.file_suffix, point.how,
                    opts.load_checkpoint)
        path = opts.load_checkpoint
        if os.path.isfile(path):   # a rank file: resume its folder at that step
            opts.load_checkpoint = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    report = load_checkpoint(opts, model, optimizer, ctx, resume=True,
                             file_suffix=point.file_suffix if point else None)
    hyper = report.hyper
    info = ResumeInfo(
        global_step=int(optimizer.step_count),
        epoch_num=_scalar(hyper, "epoch_num"), step_num=_scalar(hyper, "step_num"),
        data_position=_scalar(hyper, "data_position"), seed=_scalar(hyper, "seed"),
        global_batch_size=_scalar(hyper, "global_batch_size"),
        loss_scale=_scalar(hyper, "loss_scale"))
    if point is not None and point.global_step is not None and point.global_step != info.global_step:
        raise CheckpointError(
            f"{opts.load_checkpoint}: committed.json says step {point.file_suffix} is global "
            f"step {point.global_step} but the files hold global_step {info.global_step}; the "
            f"checkpoint folder mixes two runs — point load_checkpoint at one run's folder")
    report.resume = info
    if ctx is None or ctx.is_main:
        print(f"[resume] global step {info.global_step} (epoch_num {info.epoch_num}, step_num "
              f"{info.step_num}, data position {info.data_position})", flush=True)
    return report


def apply_resume(state, info: ResumeInfo) -> None:
    """Put the resumed counters into the loop's TrainState: global_step, and epoch / step in
    epoch derived from it (the data order is a pure function of seed, epoch and step, so this
    is the data position too). Warns when the run's seed or global batch differ from the
    checkpoint's, since the data order would then differ from the interrupted run."""
    state.global_step = info.global_step
    if state.steps_per_epoch:
        state.epoch, state.step_in_epoch = divmod(info.global_step, state.steps_per_epoch)
    seed = getattr(state.config, "seed", None)
    if info.seed is not None and seed is not None and int(info.seed) != int(seed):
        logger.warning("resume: the checkpoint was trained with seed %s, this run uses %s; the "
                       "data order will differ from the interrupted run", info.seed, seed)
    gbs = state.global_batch_size
    if info.global_batch_size and gbs and int(info.global_batch_size) != int(gbs):
        logger.warning("resume: the checkpoint used global batch %s, this run %s; global_step "
                       "is kept, so the data position in samples differs", info.global_batch_size, gbs)
    if info.data_position is not None and gbs and int(info.data_position) != info.global_step * gbs:
        logger.warning("resume: the checkpoint recorded data position %s, global_step x global "
                       "batch gives %s", info.data_position, info.global_step * gbs)
