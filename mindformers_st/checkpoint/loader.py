"""The load hook: put the weights `load_checkpoint` points at into this rank's model (and, when
resuming, its optimizer), whatever their form and however they are cut.

The flow on every rank (see docs/checkpoint-loading.md):
1. detect what the path is (`checkpoint.detect`); `.ckpt` files are first copied to safetensors
   (`{output_dir}/ckpt_safetensors`). Hugging Face folders are read straight through the
   conversion plan (MindSpore names, q/k/v fused when the model is), while
   `{output_dir}/ms_safetensors` is written in the background (`derived_write: first`: written
   before the load, as before). These are shared folders, split over the ranks, committed
   atomically, and reused while their source fingerprint (file names, sizes, mtimes, options)
   is unchanged. `transform_process_num` (N) says how many ranks build them: ranks 0, W/N,
   2W/N, ... as MindSpore Transformers (N must divide the world size W);
2. decide by `use_parallel` and `auto_trans_ckpt` how the slices must be produced:
   - complete weights: one card loads them whole; under use_parallel they are cut online
     (auto_trans_ckpt must be True), each rank reading only its slices;
   - distributed weights, auto_trans_ckpt False: the files must already be cut as this run's
     layout (checked; a mismatch names both layouts);
   - distributed weights, auto_trans_ckpt True: each rank cuts its slices straight from the
     rank files while `{output_dir}/unified_checkpoint` (the merge, split over the
     transform_process_num builder ranks) is written in the background; a current
     unified_checkpoint is read instead; `derived_write: first` merges before cutting;
     `direct_reshard: True` writes no unified_checkpoint at all;
3. plan this rank's slices (`plan_rank_slices`, or through the conversion plan), check the
   source checksums (`PreparedRead.verify`), agree with the other ranks that every check passed,
   then copy each slice once, straight from the mapped files into the parameter's own memory
   (`PreparedRead.fill` into `NetworkState.destinations`); whole-valued counters are read into
   small arrays and set as before (under balanced_load the rank's reads are arrays shared with
   the ranks that need them, then set). Missing and unexpected names are always reported; a
   missing weight is a CheckpointError, missing optimizer state is one only when resuming.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from math import ceil
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..dtypes import ITEMSIZE
from ..errors import (CheckpointError, ConfigError, MindformersSTError, PlanError,
                      UndescribedRankFilesError)
from ..parallel.agree import on_one_host
from ..records.rank_meta import METADATA_KEY
from ..records.scan import select_save
from ..transform.compose import plan_planned_slices, planned_source
from ..transform.execute import PreparedRead, prepare_read
from ..transform.planner import DEFAULT_MAX_SHARD_SIZE, plan_merge, plan_rank_slices
from ..transform.sources import (SourceCheckpoint, describe_complete, describe_distributed,
                                 describe_iteration)
from ..transform.verify import verify_mode
from .derived import (LOAD_WORKERS, agree_or_raise, build_derived_folder,
                      build_shared_folder, fingerprint, is_current, rank_world,
                      start_background_build, transform_ranks)
from .detect import CheckpointSource, detect_checkpoint
from .network import ModelState, NetworkState, is_optimizer_state

logger = logging.getLogger(__name__)


class LoadMode(str, enum.Enum):
    """How a load produces this rank's slices (LoadReport.mode holds the value)."""

    WHOLE = "whole"                     # one card, complete weights
    CUT = "cut"                         # complete weights cut online for this rank
    SAME_LAYOUT = "same_layout"         # distributed weights already cut as this run
    MERGE_AND_CUT = "merge_and_cut"     # merged into unified_checkpoint, then cut
    DIRECT_RESHARD = "direct_reshard"   # cut straight from the rank files


MS_SAFETENSORS = "ms_safetensors"
UNIFIED = "unified_checkpoint"
CKPT_SAFETENSORS = "ckpt_safetensors"


# --------------------------------------------------------------------------- options, report
@dataclass
class LoadOptions:
    """The config keys the load hook reads (MindSpore Transformers' names).

    direct_reshard: with auto_trans_ckpt on distributed weights, cut each rank's slices straight
        from the rank files instead of writing `{output_dir}/unified_checkpoint` first.
    verify_checksums: True / "read" (check every tensor read whole), "full" (every tensor
        touched), False / "off" (transform/verify.py).
    transform_process_num: how many ranks build the shared derived folders (online merge,
        Hugging Face and .ckpt conversion): ranks 0, W/N, ... as MindSpore Transformers; it
        must divide the world size (`derived.transform_ranks`).
    derived_write: "background" (the load reads the sources; ms_safetensors /
        unified_checkpoint are written on builder threads meanwhile) or "first" (written, then
        read, before the first step).
    balanced_load: every block several ranks need is read from storage by one of them and
        shared over collectives (`transform.read_plan`, `checkpoint.exchange`); None (the
        default) means on under use_parallel when the ranks span several machines
        (`balanced_load()`).
    """

    load_checkpoint: str
    load_ckpt_format: str = "ckpt"
    auto_trans_ckpt: bool = False
    use_parallel: bool = False
    src_strategy_path_or_dir: str = ""
    output_dir: str = "./output"
    remove_redundancy: bool = False
    direct_reshard: bool = False
    verify_checksums: Any = True
    resume_by_last_timestamp_ckpt: bool = False
    transform_process_num: int = 1
    derived_write: str = "background"
    balanced_load: Optional[bool] = None

    @staticmethod
    def from_config(config) -> "LoadOptions":
        """Options from a RunConfig (or any object with those attributes)."""
        return LoadOptions(
            load_checkpoint=config.load_checkpoint,
            load_ckpt_format=getattr(config, "load_ckpt_format", "ckpt"),
            auto_trans_ckpt=bool(getattr(config, "auto_trans_ckpt", False)),
            use_parallel=bool(getattr(config, "use_parallel", False)),
            src_strategy_path_or_dir=getattr(config, "src_strategy_path_or_dir", "") or "",
            output_dir=getattr(config, "output_dir", "./output"),
            remove_redundancy=bool(getattr(config, "remove_redundancy", False)),
            direct_reshard=bool(getattr(config, "direct_reshard", False)),
            verify_checksums=verify_mode(getattr(config, "verify_checksums", True)),
            resume_by_last_timestamp_ckpt=bool(getattr(config, "resume_by_last_timestamp_ckpt",
                                                       False)),
            transform_process_num=getattr(config, "transform_process_num", 1),
            derived_write=getattr(config, "derived_write", "background"),
            balanced_load=getattr(config, "balanced_load", None))

    @property
    def verify(self) -> str:
        """The engine's checksum mode ("read", "full" or "off") for `verify_checksums`."""
        return verify_mode(self.verify_checksums)


@dataclass
class LoadReport:
    """What a load did.

    mode: "whole" (one card, complete weights), "cut" (complete weights cut online),
        "same_layout" (distributed, this run's layout), "merge_and_cut" (merged online into
        unified_checkpoint, then cut) or "direct_reshard".
    path: the folder or file finally read (after any conversion or merge).
    loaded / missing / unexpected: parameter names; optimizer_ignored: optimizer states present
        in the checkpoint but not loaded (not resuming).
    hyper: non-sliced values of the checkpoint (global_step, epoch_num, step_num, ...), as numpy.
    """

    source: CheckpointSource
    mode: str
    path: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    optimizer_loaded: bool = False
    optimizer_ignored: List[str] = field(default_factory=list)
    hyper: Dict[str, np.ndarray] = field(default_factory=dict)
    epoch: Optional[int] = None
    step: Optional[int] = None
    background: Optional[str] = None   # the derived folder being written in the background
    resume: Any = None   # resume.ResumeInfo when this load resumed training
    # balanced_load: what this rank read from storage and received from the others
    read_bytes: int = 0
    exchange: Optional[Dict[str, Any]] = None
    resume_point: Any = None   # api.ModelTrainResume: how Model.train continues (library call)

    def summary(self) -> str:
        """One line for the log."""
        # The path read may be a derived copy (unified_checkpoint, ms_safetensors, ...): name
        # the source as the user gave it, then the copy, so neither is called the other's kind.
        via = ("" if os.path.abspath(self.path) == os.path.abspath(self.source.path)
               else f" via {self.path}")
        return (f"loaded {len(self.loaded)} tensors from {self.source.kind} "
                f"{self.source.format} {self.source.path}{via} (mode {self.mode}); missing "
                f"{len(self.missing)}{_names(self.missing)}, unexpected "
                f"{len(self.unexpected)}{_names(self.unexpected)}"
                + (", optimizer state restored" if self.optimizer_loaded else "")
                + (f", {len(self.optimizer_ignored)} optimizer states not loaded (not resuming)"
                   if self.optimizer_ignored else "")
                + (f"; writing {self.background} in the background" if self.background else "")
                + (f"; balanced_load: read {self.read_bytes / 2 ** 20:.1f} MiB here, received "
                   f"{self.exchange['received_bytes'] / 2 ** 20:.1f} MiB in "
                   f"{self.exchange['collectives']} collective(s)" if self.exchange else ""))


def _names(names: Sequence[str], k: int = 5) -> str:
    if not names:
        return ""
    return f" {list(names[:k])}{' ...' if len(names) > k else ''}"



# --------------------------------------------------------------------------- conversions
def _ckpt_to_safetensors(source: CheckpointSource, opts: LoadOptions, ctx) -> CheckpointSource:
    """`.ckpt` weights -> the same layout in safetensors under `{output_dir}/ckpt_safetensors`
    (MindSpore reads them; files split over ranks), then detected again."""
    from .ckpt_format import convert_file, find_ckpt_files
    root = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
    rels = ([os.path.basename(source.path)] if os.path.isfile(source.path)
            else find_ckpt_files(root))
    out_dir = os.path.join(os.path.abspath(opts.output_dir), CKPT_SAFETENSORS)
    fp = fingerprint([os.path.join(root, r) for r in rels], root, {"kind": "ckpt"})

    def build_share(staging: str, index: int, count: int) -> None:
        for i, rel in enumerate(rels):
            if i % count == index:
                dst = os.path.join(staging, os.path.splitext(rel)[0] + ".safetensors")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                convert_file(os.path.join(root, rel), dst)

    build_derived_folder(out_dir, fp, ctx, ".ckpt weights", build_share,
                         process_num=opts.transform_process_num)
    path = out_dir
    if os.path.isfile(source.path):
        path = os.path.join(out_dir, os.path.splitext(rels[0])[0] + ".safetensors")
    found = detect_checkpoint(path, "safetensors")
    if source.file_suffix:
        found = CheckpointSource(found.kind, found.format, found.path, source.file_suffix,
                                 found.files)
    logger.info(".ckpt weights %s read as safetensors from %s", source.path, path)
    return found


def _hf_conversion(source: CheckpointSource, opts: LoadOptions, qkv_concat: bool):
    """(plan, out_dir, fingerprint, family) of converting Hugging Face `source` into
    `{output_dir}/ms_safetensors`."""
    from ..convert.folders import plan_hf_folder
    result = plan_hf_folder(source.path, qkv_concat=qkv_concat)
    root = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
    if os.path.isdir(source.path):
        inputs = [os.path.join(root, f) for f in os.listdir(root)
                  if f.endswith((".safetensors", ".json"))]
    else:
        inputs = [source.path]
    out_dir = os.path.join(os.path.abspath(opts.output_dir), MS_SAFETENSORS)
    fp = fingerprint(inputs, root, {"kind": "hf", "family": result.family,
                                    "qkv_concat": bool(qkv_concat)})
    return result.plan, out_dir, fp, result.family


def _converted_source(plan, out_dir: str) -> CheckpointSource:
    return CheckpointSource("complete", "safetensors", out_dir, None,
                            tuple(sorted(os.path.join(out_dir, f.path) for f in plan.files)))


def convert_hf_online(source: CheckpointSource, opts: LoadOptions, ctx,
                      qkv_concat: bool = False) -> CheckpointSource:
    """Hugging Face folder -> `{output_dir}/ms_safetensors` (MindSpore names, same shard names,
    `param_name_map.json`; q/k/v and w1/w3 fused when the model uses `qkv_concat`) through the
    convert plans, written before returning, reused while the HF folder and the options are
    unchanged. Every rank must call this."""
    plan, out_dir, fp, family = _hf_conversion(source, opts, qkv_concat)
    build_shared_folder(out_dir, fp, plan, ctx, f"Hugging Face {family} weights",
                        opts.verify, opts.transform_process_num)
    return _converted_source(plan, out_dir)


def read_hf_directly(source: CheckpointSource, opts: LoadOptions, ctx, qkv_concat: bool = False,
                     after=None):
    """How the load reads Hugging Face `source`: (the `ms_safetensors` source, None) when that
    folder is current (reused) or `derived_write` is "first" (written now); else (`source`, the
    conversion plan), `ms_safetensors` then being written in the background — once the event
    `after` is set (the load has read the HF files), at once without it — while the load
    reads the HF files through the plan. Every rank must call this."""
    if opts.derived_write == "first":
        return convert_hf_online(source, opts, ctx, qkv_concat), None
    plan, out_dir, fp, family = _hf_conversion(source, opts, qkv_concat)
    if is_current(out_dir, fp, ctx):
        logger.info("Hugging Face %s weights: reusing %s (source unchanged)", family, out_dir)
        return _converted_source(plan, out_dir), None
    start_background_build(out_dir, fp, plan, ctx, f"Hugging Face {family} weights", opts.verify,
                           opts.transform_process_num, after)
    return source, plan


# --------------------------------------------------------------------------- layouts
def _pc_text(pc) -> str:
    if pc is None:
        return "unknown layout"
    if isinstance(pc, Mapping):
        get = pc.get
    else:
        def get(k, d=None):
            return getattr(pc, k, d)
    return (f"data_parallel={get('data_parallel')} model_parallel={get('model_parallel')} "
            f"pipeline_stage={get('pipeline_stage')} optimizer_shard={get('optimizer_shard')} "
            f"vocab_emb_dp={get('vocab_emb_dp')}")


def _source_layout_text(src: SourceCheckpoint) -> str:
    from ..storage.reader import read_header
    files = sorted({c.file for cs in src.chunks.values() for c in cs})
    n_ranks = len({os.path.dirname(f) for f in files})
    if files:
        raw = read_header(files[0])[1].get("mindformers_st")
        if raw:
            try:
                meta = json.loads(raw)
                return (f"{_pc_text(meta.get('parallel_config'))} over "
                        f"{meta.get('world_size')} rank(s)")
            except ValueError:
                pass
    return f"a strategy of {n_ranks} rank(s) (no parallel_config recorded)"


def check_same_layout(src: SourceCheckpoint, layouts: Mapping, names: Sequence[str], ctx,
                      path: str) -> None:
    """CheckpointError unless every tensor in `names` is cut in `src` exactly as `layouts` cut
    it (the same set of distinct slices), naming both layouts and the fix."""
    for n in names:
        want = set(layouts[n].with_global_shape(src.global_shapes[n]).distinct_slices()
                   if layouts[n].global_shape is None else layouts[n].distinct_slices())
        have = {c.slice for c in src.chunks[n]}
        if want != have:
            example = sorted(have, key=lambda s: s.offsets)[0]
            target = layouts[n].slice_for(ctx.rank if ctx else 0)
            raise CheckpointError(
                f"load_checkpoint {path}: the distributed weights are cut differently from this "
                f"run: they were saved with {_source_layout_text(src)}, this run uses "
                f"{_pc_text(ctx.config if ctx else None)} over {ctx.world_size if ctx else 1} "
                f"rank(s) (e.g. {n!r}: the files hold blocks like {example.to_json()}, this rank "
                f"needs {target.to_json()}). Set auto_trans_ckpt: True (with "
                f"src_strategy_path_or_dir when the files do not describe themselves) to re-cut "
                f"them online, or launch with the strategy they were saved with.")


# --------------------------------------------------------------------------- the hook
def _check_mode(source: CheckpointSource, opts: LoadOptions) -> None:
    """The combinations MindSpore Transformers users know, as ConfigErrors with the fix."""
    if source.kind in ("complete", "hf"):
        if opts.use_parallel and not opts.auto_trans_ckpt:
            raise ConfigError(
                f"load_checkpoint {source.path} holds complete weights and use_parallel is True: "
                f"set auto_trans_ckpt: True so they are cut online to this run's parallel_config "
                f"(or use_parallel: False to load them on one card)")
        if not opts.use_parallel and opts.auto_trans_ckpt:
            raise ConfigError(
                f"load_checkpoint {source.path} holds complete weights and use_parallel is False "
                f"(one card): set auto_trans_ckpt: False, there is nothing to cut")


def load_checkpoint(opts: LoadOptions, model, optimizer=None, ctx=None, resume: bool = False,
                    file_suffix: Optional[str] = None, check=None) -> LoadReport:
    """Load `opts.load_checkpoint` into this rank's `model` (and `optimizer` when `resume`).

    `model` is one of our models (with `optimizer` our AdamW) or a checkpoint.network
    NetworkState (any MindSpore network: see `mindformers_st.load_checkpoint`).
    `file_suffix` ("{epoch}_{step}") picks one step of distributed weights (resume uses it).
    `check(arrays)` runs on the read arrays before anything is set (and may raise).
    Every rank must call this (conversions and merges are collective). Raises ConfigError for
    a wrong combination of keys, CheckpointError for missing weights (or, when resuming,
    missing optimizer state) or weights cut differently from this run without auto_trans_ckpt.
    """
    state = model if isinstance(model, NetworkState) else ModelState(
        model, optimizer, ctx, with_optimizer=resume and optimizer is not None)
    return PendingLoad(opts, state, ctx, resume, file_suffix, check).finish(state)


class PendingLoad:
    """One load in two halves, so the reading can overlap building the network
    (`load_ckpt_async`).

    Created on the main thread with the tensors this rank will have (`state`: a NetworkState,
    or a `ModelState.planned` one before the model exists), it does at once what needs the
    other ranks — detection, the `.ckpt` / Hugging Face conversions, the online merge (all
    collective) — and then plans this rank's slices, checks the checksums of the bytes it will
    read and reads the small counters (`prepare_read`: local work only) on a background thread
    when `background` (asking the kernel to read ahead the rest), else at once. `finish(state)`
    on the main thread waits for that, agrees with the other ranks that every check succeeded,
    runs `check` on the counters, and copies the slices once into the parameters of `state`
    (the real network and optimizer), then agrees again that every copy succeeded. An error
    of the checks is raised by `finish`, as the same exception a synchronous load raises,
    before anything is set."""

    def __init__(self, opts: LoadOptions, state: NetworkState, ctx=None, resume: bool = False,
                 file_suffix: Optional[str] = None, check=None, background: bool = False):
        self.opts, self.state, self.ctx, self.resume, self.check = opts, state, ctx, resume, check
        # set once this rank's sources are read (or the load failed): a derived folder is
        # written in the background only then, not competing with the load for the disk
        self._sources_read = threading.Event()
        try:
            self._prepare(file_suffix)
        except BaseException:
            self._sources_read.set()
            raise
        try:
            self._start_read(background)
        except BaseException:
            # also when the read thread could not start (or an interrupt came before it
            # did): the build held for this read must be released, or it waits forever and
            # the process with it (its thread is not a daemon)
            self._settle_background()
            raise

    def _start_read(self, background: bool) -> None:
        """Read this rank's slices now, or on the `load_ckpt_async` thread (`background`)."""
        self._report: Optional[LoadReport] = None
        self._arrays: Dict[str, np.ndarray] = {}
        self._prepared: Optional[PreparedRead] = None
        self._background = background
        self._failure: Optional[BaseException] = None   # a read error: agreed on, then raised
        self._job = None   # the job-wide read plan under balanced_load, else None
        self._error: Optional[BaseException] = None     # any other error: raised as it is
        self._thread = None
        self._read_seconds = 0.0
        if background:
            self._thread = threading.Thread(target=self._read_guarded, daemon=True,
                                            name="load_ckpt_async")
            self._thread.start()
        else:
            self._read()

    def _settle_background(self) -> None:
        """A failed load returns only once the derived folder it started writing is settled
        (committed, or failed and removed): no `.building` folder outlives the error. An
        interrupted load (Ctrl-C, SystemExit) does not start a whole build it was holding: it
        is cancelled, so the interrupt is not kept waiting for it."""
        if self.background and isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit)):
            from .derived import cancel_held_builds
            cancel_held_builds(self.background)
        self._sources_read.set()
        if self.background:
            from .derived import wait_for_build
            wait_for_build(self.background)

    def _prepare(self, file_suffix: Optional[str]) -> None:
        """The collective half: which files, in which form, read how (LoadMode)."""
        opts, state, ctx, resume = self.opts, self.state, self.ctx, self.resume
        source = detect_checkpoint(opts.load_checkpoint, opts.load_ckpt_format)
        iteration = source.layout == "iteration"   # Checkpoint 2.0: its metadata.json says
        if file_suffix and source.kind == "distributed" and not iteration:
            source = replace(source, file_suffix=file_suffix)
        if source.kind == "distributed" and not source.file_suffix and not iteration:
            # The one scanner decides which save (the commit record, when there is one), before
            # any conversion, so a .ckpt folder converted to safetensors loads the same save.
            chosen = select_save(source.path, None, source.format)
            source = replace(source, file_suffix=chosen.suffix)
        self.original = source
        _check_mode(source, opts)
        if source.format == "ckpt":
            source = _ckpt_to_safetensors(source, opts, ctx)
        if resume and not state.optimizer_states:
            raise CheckpointError("resume_training needs the optimizer to restore its state")
        self.planned = None        # a conversion plan read before its output is written
        self.background = None     # the derived folder written in the background
        if source.kind == "hf":
            fused = any(".w_qkv." in n or ".w_gate_hidden." in n for n in state.weights)
            source, self.planned = read_hf_directly(source, opts, ctx, qkv_concat=fused,
                                                    after=self._sources_read)
            if self.planned is not None:
                self.background = os.path.join(os.path.abspath(opts.output_dir), MS_SAFETENSORS)
        weights, layouts = state.weights, state.layouts
        self.opt_names = opt_names = state.optimizer_states if resume else []
        strategy = opts.src_strategy_path_or_dir or None

        if self.planned is not None:
            mode = LoadMode.CUT if opts.use_parallel else LoadMode.WHOLE
            src, path = planned_source(self.planned, self.background), source.path
        elif source.kind == "complete":
            mode = LoadMode.CUT if opts.use_parallel else LoadMode.WHOLE
            src = (describe_iteration(source.path) if iteration
                   else describe_complete(source.path))
            path = source.path
        elif not opts.auto_trans_ckpt:
            mode = LoadMode.SAME_LAYOUT
            src = _describe_rank_files(source, strategy, layouts)
            path = source.path
            check_same_layout(src, layouts, [n for n in weights + opt_names
                                             if n in src.chunks and n in layouts], ctx,
                              source.path)
        else:
            src = _describe_rank_files(source, strategy, None)
            if opts.direct_reshard:
                mode, path = LoadMode.DIRECT_RESHARD, source.path
            else:
                out_dir, fp, plan = _merge_plan(src, opts, ctx, strategy)
                if opts.derived_write == "first" or is_current(out_dir, fp, ctx):
                    mode = LoadMode.MERGE_AND_CUT
                    path = merge_online(src, opts, ctx, strategy)
                    src = describe_complete(path)
                else:   # cut from the rank files now, the merged copy is written meanwhile
                    mode, path = LoadMode.DIRECT_RESHARD, source.path
                    start_background_build(out_dir, fp, plan, ctx, _MERGE_WHAT, opts.verify,
                                           opts.transform_process_num, self._sources_read)
                    self.background = out_dir
        self.counters = dict(src.counters)   # taken before an online merge replaces src
        self.balanced = balanced_load(opts, ctx)   # may agree with the others: main thread
        self.source, self.mode, self.src, self.path = source, mode, src, path

    def _read_guarded(self) -> None:
        try:
            self._read()
        except BaseException as exc:   # noqa: B902 - raised again by finish() on the main thread
            self._error = exc

    def _read(self) -> None:
        """The local half: plan this rank's slices, check their checksums, read the counters."""
        t0 = time.perf_counter()
        try:
            self._report, self._prepared, self._arrays, self._failure, self._job = _read_slices(
                self.src, self.source, self.mode, self.path, self.state, self.opt_names,
                self.ctx, self.resume, self.opts.verify, self.planned, self.balanced,
                prefetch=self._background)
        finally:
            self._sources_read.set()
        self._read_seconds = time.perf_counter() - t0

    def finish(self, state: Optional[NetworkState] = None) -> LoadReport:
        """Wait for the read, agree with every rank that it succeeded, run `check`, and set
        the tensors into `state` (default: the state the load was planned with), which must
        hold the tensors the load was planned for. Returns the LoadReport."""
        try:
            return self._finish(state)
        except BaseException:
            self._settle_background()
            raise

    def _finish(self, state: Optional[NetworkState]) -> LoadReport:
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            waited = time.perf_counter() - t0
            if self._error is None and (self.ctx is None or self.ctx.is_main):
                read = self._read_seconds
                print(f"[load_checkpoint] load_ckpt_async: read and checked in {read:.2f} s on "
                      f"a background thread, {max(0.0, read - waited):.2f} s of it while the "
                      f"network was built (waited {waited:.2f} s)", flush=True)
        if self._error is not None:
            raise self._error
        state = self.state if state is None else state
        if state is not self.state and (state.weights != self.state.weights or
                                        state.optimizer_states != self.state.optimizer_states or
                                        state.layouts != self.state.layouts):
            self._close()
            raise CheckpointError(f"load_checkpoint {self.path}: the network built has other "
                                  f"tensors or layouts than the load was planned for; set "
                                  f"load_ckpt_async: False")
        report = self._report
        try:
            agree_or_raise(self.ctx, self._failure, f"load_checkpoint {self.path}")
            small, self._arrays = self._arrays, {}
            if self._job is not None:   # only after every reader's checksums passed
                from .exchange import share_reads
                small, report.exchange = share_reads(self.ctx, self._job, small)
            if self.check is not None:
                self.check(small)   # every rank reads the same hyper values: they decide alike
            filled = self._fill(state) if self._job is None else set()
        finally:
            self._close()
        weights, opt_names = state.weights, self.opt_names
        report.loaded = [n for n in weights if n in filled]
        rest = {n: small[n] for n in weights if n in small}
        if rest:
            report.loaded += state.set_weights(rest, strict=False)
        if [n for n in weights if n not in report.loaded]:
            raise CheckpointError(f"load_checkpoint {self.path}: weights not set: "
                                  f"{[n for n in weights if n not in report.loaded][:8]}")
        report.hyper = {n: small[n] for n in self.src.hyper if n in small}
        if self.resume:
            report.loaded += [n for n in opt_names if n in filled]
            rest = {n: small[n] for n in opt_names if n in small}
            if rest:
                report.loaded += state.set_optimizer_states(rest, strict=False)
            report.optimizer_loaded = True
        for name, value in self.counters.items():   # common.json: only what no file holds
            report.hyper.setdefault(name, np.asarray([value]))
        if report.epoch is None and "epoch_num" in self.counters:
            report.epoch = int(self.counters["epoch_num"])
            report.step = self.counters.get("step_num")
        report.source = self.original
        report.background = self.background
        if report.epoch is None and self.source.file_suffix:
            report.epoch, report.step = (int(x) for x in self.source.file_suffix.split("_"))
        ctx = self.ctx
        logger.info("rank %d: %s", ctx.rank if ctx else 0, report.summary())
        if ctx is None or ctx.is_main:
            print(f"[load_checkpoint] {report.summary()}", flush=True)
        return report


    def _fill(self, state: NetworkState) -> set:
        """Copy this rank's slices into the parameters of `state` (copy-once), then agree with
        every rank that the copies succeeded. Returns the names filled."""
        prepared, failure, filled = self._prepared, None, set()
        if prepared is not None:
            wanted = set(state.weights) | set(self.opt_names)
            names = [t.name for t in prepared.tensors
                     if t.name in wanted and t.name in state.layouts]
            try:
                dest = state.destinations({n: prepared.by_name[n].shape for n in names},
                                          mapped=prepared.mapped)
                prepared.fill(dest.arrays, LOAD_WORKERS)
                filled = set(dest.commit())
            except (MindformersSTError, OSError) as exc:
                failure = exc
        agree_or_raise(self.ctx, failure, f"load_checkpoint {self.path}")
        return filled

    def _close(self) -> None:
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None


def _describe_rank_files(source: CheckpointSource, strategy, target_layouts) -> SourceCheckpoint:
    """Describe distributed weights from their own metadata, a given source strategy, or (when
    neither exists and the files must be this run's layout) the target layouts themselves.
    A Checkpoint 2.0 save is described by its own metadata.json."""
    if source.layout == "iteration":
        if strategy:
            logger.warning("load_checkpoint %s: metadata.json describes the slices; "
                           "src_strategy_path_or_dir is not used", source.path)
        return describe_iteration(source.path)
    try:
        return describe_distributed(source.path, strategy, source.file_suffix)
    except UndescribedRankFilesError as exc:
        if strategy is None:
            if target_layouts is not None:
                return _describe_with_target(source, target_layouts)
            raise CheckpointError(
                f"load_checkpoint {source.path}: the rank files do not describe their slices "
                f"(no '{METADATA_KEY}' metadata); set src_strategy_path_or_dir to the "
                f"strategy file or folder of the run that saved them") from exc
        raise


def _describe_with_target(source: CheckpointSource, layouts) -> SourceCheckpoint:
    try:
        return describe_distributed(source.path, layouts, source.file_suffix)
    except CheckpointError as exc:
        raise CheckpointError(
            f"load_checkpoint {source.path}: the rank files carry no slice metadata and do not "
            f"fit this run's layout ({exc}). Set auto_trans_ckpt: True and "
            f"src_strategy_path_or_dir to the strategy of the run that saved them") from exc


def merge_online(src: SourceCheckpoint, opts: LoadOptions, ctx, strategy=None) -> str:
    """Merge distributed `src` into `{output_dir}/unified_checkpoint` (complete weights,
    `param_name_map.json`, `hyper_param.safetensors`), the work split over the
    transform_process_num builder ranks; reused while the rank files (and strategy) are
    unchanged. Returns the folder."""
    out_dir, fp, plan = _merge_plan(src, opts, ctx, strategy)
    build_shared_folder(out_dir, fp, plan, ctx, _MERGE_WHAT, opts.verify,
                        opts.transform_process_num)
    return out_dir


_MERGE_WHAT = "online merge of distributed weights"


def _merge_plan(src: SourceCheckpoint, opts: LoadOptions, ctx, strategy=None):
    """(out_dir, fingerprint, plan) of merging `src` into `{output_dir}/unified_checkpoint`."""
    out_dir = os.path.join(os.path.abspath(opts.output_dir), UNIFIED)
    _, world = rank_world(ctx)
    builders = len(transform_ranks(opts.transform_process_num, world))
    total = sum(int(np.prod(src.global_shapes[n])) * ITEMSIZE[src.dtypes[n]] for n in src.chunks)
    # about one shard per builder, so the merge is split evenly (MindSpore's 5 GB cap kept)
    shard = min(DEFAULT_MAX_SHARD_SIZE, max(1 << 20, ceil(total / builders)))
    plan = plan_merge(src, max_shard_size=shard)
    inputs = list(src.files)
    if strategy and os.path.exists(strategy):
        inputs += ([os.path.join(strategy, f) for f in os.listdir(strategy)]
                   if os.path.isdir(strategy) else [strategy])
    fp = fingerprint(inputs, src.root, {"kind": "merge", "shard": shard,
                                        "epoch": src.epoch, "step": src.step})
    return out_dir, fp, plan


def balanced_load(opts: LoadOptions, ctx, one_host: Optional[bool] = None) -> bool:
    """Whether this load reads balanced (`balanced_load`). By default (None) when the job runs
    under use_parallel with communication on ranks of more than one machine: on one machine
    the ranks share one page cache, which already reads each byte from storage once (measured,
    docs/checkpoint-loading.md), and the exchange would only add time. `one_host` says whether
    all ranks share rank 0's machine (None: agreed now, `parallel.agree.on_one_host`, a
    collective on the main thread). True without several ranks has nothing to share and is
    warned about by name, as MindSpore Transformers does."""
    several = (ctx is not None and opts.use_parallel and ctx.world_size > 1
               and getattr(ctx, "world_group", None) is not None)
    if opts.balanced_load is None:
        if not several:
            return False
        return not (on_one_host(ctx) if one_host is None else one_host)
    if opts.balanced_load and not several:
        logger.warning("balanced_load: True has no effect without use_parallel on more than "
                       "one rank: each rank reads its own slices")
    return bool(opts.balanced_load) and several


def _read_slices(src: SourceCheckpoint, source: CheckpointSource, mode: LoadMode, path: str,
                 state: NetworkState, opt_names: List[str], ctx, resume: bool,
                 verify: str = "read", planned=None, balanced: bool = False,
                 prefetch: bool = False):
    """(report, PreparedRead of this rank's slices with their checksums checked or None,
    {name: array}, read failure or None, job read plan or None) — local work only, no
    collective. Alone, the arrays are the counters (the slices are copied into the parameters
    by `finish`); with `balanced` they are the blocks the job plan gives this rank to read,
    which `exchange.share_reads` completes once the ranks agreed the reads succeeded. `planned`:
    the conversion plan `src` describes the output of, read through it (`plan_planned_slices`).
    `prefetch` asks the kernel to read ahead every range (a background load). Missing weights
    (or, resuming, missing optimizer state) raise at once: every rank sees the same
    description, so they all raise."""
    report = LoadReport(source, mode.value, path, epoch=src.epoch, step=src.step)
    weights, layouts = state.weights, state.layouts
    wanted = set(weights) | set(opt_names)

    def held(n: str) -> bool:   # sliced tensors are chunks, whole-valued counters hyper values
        return n in src.chunks if n in layouts else n in src.hyper
    report.missing = [n for n in weights + opt_names if not held(n)]
    # tensors of the other pipeline stages are expected in a complete checkpoint: not reported
    wanted = wanted | set(state.elsewhere)
    report.unexpected = [n for n in src.chunks
                         if n not in wanted and not (is_optimizer_state(n) and not resume)]
    report.optimizer_ignored = [n for n in src.chunks if n not in wanted and is_optimizer_state(n)
                                and not resume]
    missing_weights = [n for n in report.missing if n in set(weights)]
    if missing_weights:
        raise CheckpointError(
            f"load_checkpoint {path}: {len(missing_weights)} weight(s) of the model are in no "
            f"file: {missing_weights[:8]}{' ...' if len(missing_weights) > 8 else ''} "
            f"(unexpected names in the checkpoint: {report.unexpected[:8]}); check that "
            f"model_config matches the checkpoint (num_layers, tie_word_embeddings, qkv_has_bias)")
    if resume and report.missing:
        raise CheckpointError(
            f"load_checkpoint {path}: resume_training needs the optimizer state but "
            f"{len(report.missing)} entries are missing (e.g. {report.missing[:4]}); the "
            f"checkpoint holds weights only — finetune from it (resume_training: False) or "
            f"point at a training checkpoint")
    if report.unexpected:
        logger.warning("load_checkpoint %s: %d tensor(s) in the checkpoint are not in the model "
                       "and are ignored: %s", path, len(report.unexpected), report.unexpected[:8])
    rank = ctx.rank if ctx is not None else 0
    names = [n for n in weights + opt_names if n in src.chunks and n in layouts]
    try:
        plan, job = _rank_reads(src, state, names, rank, ctx, resume, balanced, planned, path)
    except PlanError as exc:
        raise CheckpointError(f"load_checkpoint {path}: {exc}") from exc
    report.read_bytes = sum(f.nbytes for f in plan.files)
    failure, prepared, small = None, None, {}
    try:
        prepared = prepare_read(plan, verify)
        prepared.verify(LOAD_WORKERS)
        if job is not None:   # balanced: this rank's reads for the job, as arrays to share
            small = prepared.read([t.name for t in prepared.tensors])
            prepared.close()
            prepared = None
        else:
            # counters (no layout) are tiny: read into arrays, set as values; the slices are
            # copied into the parameters by finish()
            small = prepared.read([t.name for t in prepared.tensors if t.name not in layouts])
            if prefetch:
                prepared.prefetch()
    except (MindformersSTError, OSError) as exc:
        failure = exc
        if prepared is not None:
            prepared.close()
            prepared = None
    return report, prepared, small, failure, job


def _rank_reads(src: SourceCheckpoint, state: NetworkState, names: List[str], rank: int, ctx,
                resume: bool, balanced: bool, planned=None, path: str = ""):
    """(what this rank reads from storage as a Plan, the job read plan or None). Alone: the
    rank's own slices of `names` (through the conversion plan `planned` when given). Balanced:
    the job plan over every rank — each rank's tensors are its stage's weights (and, resuming,
    optimizer state), the same lists on every rank — and this rank's share of its reads."""
    def plan_of(lays, r: int):
        if planned is not None:
            return plan_planned_slices(planned, lays, r, path)
        return plan_rank_slices(src, lays, r, include_hyper=True)

    layouts = state.layouts
    own = {n: layouts[n] for n in names}
    if not balanced:
        return plan_of(own, rank), None
    from ..transform.read_plan import plan_job_reads
    world = range(ctx.world_size)
    if state.job_layouts is None and any(lay.ranks() != world for lay in own.values()):
        # a network that knows only its own stage's layouts cannot plan the other stages'
        # loads; every rank of such a job sees a partial layout, so all read alone together
        logger.info("balanced_load: the network's layouts do not span the job; each rank "
                    "reads its own slices")
        return plan_of(own, rank), None
    job_layouts = dict(own)
    everywhere = state.job_layouts or layouts
    for n in sorted(state.elsewhere):   # the other stages' tensors, chosen as their ranks do
        if n in src.chunks and n in everywhere and (resume or not is_optimizer_state(n)):
            job_layouts[n] = everywhere[n]
    job = plan_job_reads({r: plan_of(job_layouts, r) for r in world})
    mine = plan_of(own, rank)
    if sorted(job.names_of(rank)) != sorted(t.name for f in mine.files for t in f.tensors):
        raise PlanError(f"balanced_load: the job plan gives rank {rank} other tensors than its "
                        f"own plan; set balanced_load: False")
    return job.reads_of(rank), job
