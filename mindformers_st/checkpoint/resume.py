"""Resume training: pick the step to resume, load weights and optimizer state for it, and hand
the loop its counters back.

Which step (`select_resume_point`): the one folder scanner's answer (`records.scan.select_save`)
with fallback — the newest committed save whose files are present and valid; for a MindSpore
Transformers folder without `committed.json`, its `meta.json` step, else the newest step every
rank has a file for; `resume_training: "<file name>"` names a step (committed, with a record).
Before loading, the chosen save's checksums are verified (the files split over the ranks, the
verdict agreed by all): a damaged newest save is skipped with a warning naming the file, and the
previous committed save that verifies is resumed instead (`first_intact_save`).
A folder of complete weights (merged offline, with `hyper_param.safetensors`) loads as is.
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

from ..errors import ChecksumError, CheckpointError
from ..records.commit import committed_saves
from ..records.names import parse_rank_dir, rank_folders, step_suffix
from ..records.scan import SaveSelection, select_save
from .loader import load_checkpoint

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


def select_resume_point(directory: str, resume_training: Union[bool, str],
                        fmt: str = "safetensors") -> Optional[ResumePoint]:
    """The step to resume from `directory` (a folder of `rank_x/`, or one rank file in it), or
    None when `directory` holds complete weights (nothing to choose). CheckpointError when no
    step qualifies or the named one is not complete (not committed, with a record)."""
    selection = select_resume_save(directory, resume_training, fmt)
    if selection is None:
        return None
    epoch, step = selection.key if selection.key is not None else (0, 0)
    return ResumePoint(epoch, step, selection.how, selection.global_step)


def select_resume_save(directory: str, resume_training: Union[bool, str],
                       fmt: str = "safetensors", by_timestamp: bool = False) -> Optional[SaveSelection]:
    """`select_resume_point` as the scanner's SaveSelection (files per rank, notes)."""
    directory = os.path.abspath(directory)
    if os.path.isfile(directory):
        parent = os.path.dirname(directory)
        if step_suffix(directory) is None or parse_rank_dir(parent) is None:
            return None
        resume_training, directory = os.path.basename(directory), os.path.dirname(parent)
    if not rank_folders(directory):
        return None
    step = None
    if isinstance(resume_training, str):
        name = resume_training if resume_training.endswith((".safetensors", ".ckpt")) \
            else resume_training + ".safetensors"
        step = step_suffix(name)
        if step is None:
            raise CheckpointError(
                f"resume_training {resume_training!r}: the name has no '-{{epoch}}_{{step}}' "
                f"suffix; give a checkpoint file name such as llama_rank_0-1_4.safetensors, or "
                f"True for the newest committed step")
    selection = select_save(directory, step, fmt, fallback=True, by_timestamp=by_timestamp)
    if selection.record is None:
        _refuse_uncommitted_saves_of_ours(selection)
    return selection


def _refuse_uncommitted_saves_of_ours(selection: SaveSelection) -> None:
    """Only committed saves are resumed from a folder this project writes. Our
    CheckpointMonitor writes committed.json at train begin (or with its first commit in a folder
    that already held files), so training saves of ours
    (their rank files describe their epoch and step) in a folder without one were never
    committed: a run that stopped before its first commit, or a record deleted. Folders of
    MindSpore Transformers or MindSpore (no description) keep their rule."""
    from ..records.rank_meta import RankFileMeta
    from ..storage.reader import read_header
    path = selection.files[min(selection.files)]
    if not path.endswith(".safetensors"):
        return
    meta = RankFileMeta.from_metadata(read_header(path)[1], path)
    if meta is not None and meta.step is not None:
        raise CheckpointError(
            f"{selection.folder}: no save was committed (no committed.json) although its rank "
            f"files were written by mindformers-st's CheckpointMonitor: the run stopped before "
            f"its first commit, so {os.path.basename(path)} may be incomplete across ranks. "
            f"Start without resume_training, or load a committed checkpoint")


def _scalar(hyper, name):
    if name not in hyper:
        return None
    value = np.asarray(hyper[name]).reshape(-1)
    return value[0].item() if value.size else None


def _step_check(opts, suffix: Optional[str], record_step: Optional[int]):
    def check(arrays) -> None:
        """The commit record and the files must name the same global step (two runs mixed in
        one folder otherwise); checked before any parameter is set."""
        held = arrays.get("global_step")
        if record_step is None or held is None:
            return
        value = int(np.asarray(held).reshape(-1)[0])
        if value != record_step:
            raise CheckpointError(
                f"{opts.load_checkpoint}: committed.json says step {suffix} is global step "
                f"{record_step} but the files hold global_step {value}; the checkpoint folder "
                f"mixes two runs — point load_checkpoint at one run's folder")
    return check


def _load(opts, model, optimizer, ctx, suffix: Optional[str], record_step: Optional[int] = None):
    return load_checkpoint(opts, model, optimizer, ctx, resume=True, file_suffix=suffix,
                           check=_step_check(opts, suffix, record_step))


def _load_first_intact(opts, model, optimizer, ctx, selection: SaveSelection, first=None):
    """Load `selection` (through `first()` when given: a load of it started earlier); when its
    bytes fail their checksums (on any rank: the ranks agree in the load), warn naming the file
    and try the previous committed save, newest first, until one loads. Only a save the
    scanner chose itself falls back (a named one is an error).
    Returns (report, the save loaded)."""
    candidates = [selection]
    if selection.record is not None and selection.how == "committed":
        older = [s for s in committed_saves(selection.folder) if s.key != selection.key]
        candidates += [select_save(selection.folder, s.key, opts.load_ckpt_format)
                       for s in reversed(older)]
    failures = []
    for cand in candidates:
        logger.info("resuming step %s (%s) from %s", cand.suffix, cand.how, selection.folder)
        try:
            if first is not None and cand is candidates[0]:
                return first(), cand
            return _load(opts, model, optimizer, ctx, cand.suffix, cand.global_step), cand
        except ChecksumError as exc:
            failures.append(f"save {cand.suffix}: {exc}")
            if cand is candidates[-1]:
                break
            logger.warning("resume: committed save %s of %s is damaged (%s); resuming from the "
                           "previous committed save instead", cand.suffix, selection.folder, exc)
            if ctx is None or ctx.is_main:
                print(f"[resume] WARNING: save {cand.suffix} is damaged ({exc}); trying the "
                      f"previous committed save", flush=True)
    raise CheckpointError(f"{selection.folder}: no committed save passes its checksums: "
                          f"{'; '.join(failures[:3])}. Restore the files from a good copy, or "
                          f"start without resume_training")


def _step_count(model, optimizer) -> int:
    """The restored optimizer's update count (ours: step_count; any network: its global_step)."""
    if optimizer is not None and hasattr(optimizer, "step_count"):
        return int(optimizer.step_count)
    if hasattr(model, "step_count"):
        count = model.step_count()
        if count is not None:
            return int(count)
    raise CheckpointError("resume: the optimizer has no global_step to restore the step from")


def resume_checkpoint(opts, resume_training, model, optimizer, ctx):
    """Select the step (`select_resume_save`), load weights and optimizer state for it on this
    rank (`loader.load_checkpoint(resume=True)`), falling back to the previous committed save
    when the newest fails its checksums, and return the LoadReport with `.resume` (a
    ResumeInfo) set. Every rank must call this."""
    return PendingResume(opts, resume_training, ctx).finish(model, optimizer)


class PendingResume:
    """`resume_checkpoint` in two halves (`load_ckpt_async`). Created on the main thread, it
    selects the save and, given `planned` (`network.ModelState.planned`: the tensors the model
    and optimizer will have), starts loading it (`loader.PendingLoad`: collective preparation
    now, the read on a background thread); `finish(model, optimizer)` on the main thread sets
    them, falling back to older committed saves (synchronously) when the first fails its
    checksums, exactly as `resume_checkpoint`. Without `planned` everything happens in
    `finish`."""

    def __init__(self, opts, resume_training, ctx, planned=None):
        self.opts, self.ctx = opts, ctx
        self.selection = select_resume_save(opts.load_checkpoint, resume_training,
                                            opts.load_ckpt_format,
                                            bool(getattr(opts, "resume_by_last_timestamp_ckpt",
                                                         False)))
        if self.selection is not None and os.path.isfile(opts.load_checkpoint):
            # a rank file: resume its folder at that step
            opts.load_checkpoint = os.path.dirname(os.path.dirname(
                os.path.abspath(opts.load_checkpoint)))
        self._pending, self._early = None, None
        if planned is not None:
            from .loader import PendingLoad
            sel = self.selection
            suffix = None if sel is None else sel.suffix
            record = None if sel is None else sel.global_step
            try:
                self._pending = PendingLoad(opts, planned, ctx, resume=True, file_suffix=suffix,
                                            check=_step_check(opts, suffix, record),
                                            background=True)
            except ChecksumError as exc:   # the online merge found it damaged: fall back later
                self._early = exc

    def finish(self, model, optimizer):
        """Set the chosen save into `model` and `optimizer`; the LoadReport with `.resume`."""
        opts, ctx, selection = self.opts, self.ctx, self.selection
        first = None
        if self._pending is not None or self._early is not None:
            from .network import ModelState

            def first():
                if self._early is not None:
                    raise self._early
                return self._pending.finish(ModelState(model, optimizer, ctx))
        if selection is None:
            report = first() if first else _load(opts, model, optimizer, ctx, None)
        else:
            report, selection = _load_first_intact(opts, model, optimizer, ctx, selection, first)
        hyper = report.hyper
        info = ResumeInfo(
            global_step=_step_count(model, optimizer),
            epoch_num=_scalar(hyper, "epoch_num"), step_num=_scalar(hyper, "step_num"),
            data_position=_scalar(hyper, "data_position"), seed=_scalar(hyper, "seed"),
            global_batch_size=_scalar(hyper, "global_batch_size"),
            loss_scale=_scalar(hyper, "loss_scale"))
        report.resume = info
        if ctx is None or ctx.is_main:
            print(f"[resume] global step {info.global_step} (epoch_num {info.epoch_num}, "
                  f"step_num {info.step_num}, data position {info.data_position})", flush=True)
        return report


def rescaled_step(global_step: int, old_gbs: Optional[int], new_gbs: Optional[int]) -> int:
    """The global step to continue from when the global batch changed, as MindSpore
    Transformers computes it: `global_step * old_gbs / new_gbs` (floor), so the samples consumed
    (and the learning-rate schedule's position in samples) carry over. Unchanged when either
    batch is unknown or they are equal."""
    if not old_gbs or not new_gbs or int(old_gbs) == int(new_gbs):
        return int(global_step)
    return int(int(global_step) * int(old_gbs) // int(new_gbs))


def apply_resume(state, info: ResumeInfo) -> None:
    """Put the resumed counters into the loop's TrainState: global_step (rescaled when the
    global batch changed, the optimizer's counter and so the learning-rate position with it),
    and epoch / step in epoch derived from it (the data order is a pure function of seed, epoch
    and step, so this is the data position too). Warns when the run's seed differs."""
    gbs = state.global_batch_size
    step = rescaled_step(info.global_step, info.global_batch_size, gbs)
    if step != info.global_step:
        if state.optimizer is not None and hasattr(state.optimizer, "set_state_arrays"):
            state.optimizer.set_state_arrays({"global_step": np.array([step], np.int32)},
                                             strict=False)
        msg = (f"[resume] global batch {info.global_batch_size} -> {gbs}: global step "
               f"{info.global_step} -> {step} (samples consumed kept, as MindSpore Transformers)")
        logger.info(msg)
        if state.ctx is None or state.ctx.is_main:
            print(msg, flush=True)
        info.global_step = step
        if info.data_position is not None:
            info.data_position = step * int(gbs)
    state.global_step = info.global_step
    if state.steps_per_epoch:
        state.epoch, state.step_in_epoch = divmod(info.global_step, state.steps_per_epoch)
    seed = getattr(state.config, "seed", None)
    if info.seed is not None and seed is not None and int(info.seed) != int(seed):
        logger.warning("resume: the checkpoint was trained with seed %s, this run uses %s; the "
                       "data order will differ from the interrupted run", info.seed, seed)
    if info.data_position is not None and gbs and int(info.data_position) != info.global_step * gbs:
        logger.warning("resume: the checkpoint recorded data position %s, global_step x global "
                       "batch gives %s", info.data_position, info.global_step * gbs)
