"""`CheckpointMonitor`: the training callback that saves checkpoints (MindSpore Transformers keys).

Policy lives here (when to save, how many to keep); what a save holds is `state.py`; the commit
records are `commit.py`; bytes go through `storage/`. One save:

1. at a step where `global_step % save_checkpoint_steps == 0`, snapshot this rank's arrays
   (views for a synchronous save; for `async_save` a copy into buffers allocated once at train
   begin and reused by every save);
2. write `rank_{r}/{prefix}_rank_{r}-{epoch}_{step}.{safetensors|ckpt}` (and the
   checkpoint_network/ or checkpoint_trainable/ extra file) atomically — on this thread, or on
   the background writer (`background.py`) with `async_save`;
3. commit: all ranks agree that every rank succeeded (one all-reduce on the world group, on
   the main thread); rank 0 appends the save to `committed.json`, dropping the oldest beyond
   `keep_checkpoint_max`; once that record is written every rank deletes its own files of the
   dropped saves and only then writes its `meta.json`, which therefore only ever names
   committed files. Sync: on this thread, a barrier after the record. Async: the record,
   pruning and meta.json run on the background writer after the save's files, and the main
   thread only agrees (see "committing" below).

With `use_legacy_format: False` (MindSpore Transformers 2.x) the same snapshot is written in the
Checkpoint 2.0 layout instead (`iteration_save.py`: iteration folders, common.json,
metadata.json, the tracker as commit record).

Collectives happen on the main thread, in the same order on every rank: while an async save
is pending, each step end does one small all-reduce that moves its commit on once every rank is
ready; the next save, a graceful exit and train end first finish it, waiting if needed.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..errors import CheckpointError, ConfigError, MindformersSTError, os_error_text, write_failed
from ..parallel.agree import all_done, all_ranks, broadcast_json
from ..records import commit as cm
from ..records.names import ckpt_file_name, format_of, parse_ckpt_name, rank_dir_name, rank_folders
from ..records.rank_meta import RankFileMeta, new_run_id, save_id_of
from ..storage.reader import read_header
from .background import BackgroundWriter, Task
from .network import CellState, ModelState
from .state import owned_names, rank_slices_of, snapshot_buffers, snapshot_rank, write_rank_file
from . import monitor_options as options

try:   # the class is a mindspore.train.Callback; importing this module imports MindSpore
    from mindspore.train import Callback as MindSporeCallback
except ImportError as exc:   # pragma: no cover - MindSpore is a dependency of the package
    raise ImportError("CheckpointMonitor needs MindSpore (pip install mindspore)") from exc

logger = logging.getLogger(__name__)

FORMATS = ("ckpt", "safetensors")


_NOT_AGREED = object()   # _Save.tail before every rank agreed the files are written


@dataclass
class _Save:
    """A save between its snapshot and its commit."""

    epoch: int
    step: int
    global_step: int
    paths: List[str]                      # main file first, then extra files
    nbytes: int
    blocked: float = 0.0                  # seconds the training loop waited at the trigger
    write_time: float = 0.0
    error: Optional[BaseException] = None
    iteration: Optional[tuple] = None     # use_legacy_format False: (CommonInfo, snapshot)
    task: Optional[Task] = None           # async: the write on the background writer
    record: Optional[Task] = None         # async, rank 0: the commit record, then its tail
    tail: object = _NOT_AGREED            # async: this rank's pruning + meta.json, queued once
    #                                       rank 0's record is written (None: nothing to do)
    commit_time: float = 0.0              # main-thread time agreeing and committing
    wait_time: float = 0.0                # main-thread time waiting for the background writer
    copy_wait: float = 0.0                # time the next optimizer update waited for the copy
    pruned: list = field(default_factory=list)
    copied: threading.Event = field(default_factory=threading.Event)   # the snapshot is taken

    @property
    def written(self) -> bool:
        return self.task is None or self.task.done


@dataclass
class SaveStats:
    """What one save cost (the benchmark and the log read these)."""

    global_step: int
    nbytes: int
    blocked: float           # training-loop time at the trigger (snapshot, and the write when sync)
    write_time: float        # time spent writing files (on whichever thread)
    commit_time: float       # main-thread commit: agreement (+ records and pruning when sync)
    wait_time: float = 0.0   # async only: time the loop waited for an unfinished writer
    async_save: bool = False
    copy_wait: float = 0.0   # async under our trainer: the next update waited for the snapshot copy

    @property
    def total_blocked(self) -> float:
        return self.blocked + self.commit_time + self.wait_time + self.copy_wait


class CheckpointMonitor(MindSporeCallback):
    """Save this rank's parameters, optimizer state and resume values every N steps: a
    `mindspore.train.Callback` for `Model.train(..., callbacks=[...])` with any network and
    optimizer, and the callback our own trainer drives through the same protocol.

    Options keep MindSpore Transformers' names and defaults (see docs/checkpoint-saving.md).
    `layouts` (a MindSpore strategy file/folder, or {name: TensorLayout}) says how a network's
    tensors are cut over the ranks when MindSpore's `parameter_layout_dict` does not; by default
    every tensor is whole on every rank (one card, DATA_PARALLEL).
    `directory` None means `{output_dir}/checkpoint`. As MindSpore: `append_info` adds scalars to
    every save, `saved_network` (an nn.Cell) is saved instead of the train network, `enc_key` /
    `enc_mode` encrypt `.ckpt` saves; `use_checkpoint_health_monitor` appends each committed save
    to `{health_ckpts_record_dir or output_dir}/health_ckpts.json` (MindSpore Transformers).
    ConfigError for invalid combinations (remove_redundancy with ckpt, a prefix with '/',
    non-positive step counts, encryption of safetensors, a malformed append_info).
    """

    def __init__(self, prefix: str = "CKP", directory: Optional[str] = None,
                 save_checkpoint_steps: int = 1, keep_checkpoint_max: int = 5,
                 checkpoint_format: str = "ckpt", remove_redundancy: bool = False,
                 async_save: bool = False, save_network_params: bool = False,
                 save_trainable_params: bool = False, integrated_save: bool = True,
                 global_batch_size: Optional[int] = None, output_dir: str = "./output",
                 save_checkpoint_seconds: int = 0, keep_checkpoint_per_n_minutes: int = 0,
                 layouts=None, use_legacy_format: bool = True, exception_save: bool = False,
                 saved_network=None, append_info=None, enc_key: Optional[bytes] = None,
                 enc_mode: str = "AES-GCM", use_checkpoint_health_monitor: bool = False,
                 embedding_local_norm_threshold: float = 1.0,
                 health_ckpts_record_dir: Optional[str] = None):
        super().__init__()
        if not isinstance(prefix, str) or not prefix or "/" in prefix or "\\" in prefix:
            raise ConfigError(f"CheckpointMonitor prefix must be a non-empty name without '/', got {prefix!r}")
        if checkpoint_format not in FORMATS:
            raise ConfigError(f"CheckpointMonitor checkpoint_format must be one of {FORMATS}, "
                              f"got {checkpoint_format!r}")
        if remove_redundancy and checkpoint_format != "safetensors":
            raise ConfigError("CheckpointMonitor remove_redundancy: True needs checkpoint_format: "
                              f"safetensors (got {checkpoint_format!r}); set the format or drop "
                              "remove_redundancy")
        if not use_legacy_format and (checkpoint_format != "safetensors" or remove_redundancy):
            raise ConfigError("CheckpointMonitor use_legacy_format: False (the Checkpoint 2.0 "
                              "layout) needs checkpoint_format: safetensors and remove_redundancy: "
                              f"False (got {checkpoint_format!r}, {remove_redundancy!r})")
        if not use_legacy_format and (save_network_params or save_trainable_params):
            raise ConfigError("CheckpointMonitor use_legacy_format: False writes model-/opt- files "
                              "only; drop save_network_params / save_trainable_params (the model- "
                              "files already hold the network parameters alone)")
        for key, v in (("save_checkpoint_steps", save_checkpoint_steps),
                       ("keep_checkpoint_max", keep_checkpoint_max)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"CheckpointMonitor {key} must be an int >= 1, got {v!r}")
        if save_checkpoint_seconds or keep_checkpoint_per_n_minutes:
            # Time-based triggers would differ between ranks; saves are collective here.
            logger.warning("CheckpointMonitor: save_checkpoint_seconds / keep_checkpoint_per_n_minutes "
                           "are not supported; saving every %d steps, keeping %d",
                           save_checkpoint_steps, keep_checkpoint_max)
        if not integrated_save:
            logger.debug("integrated_save False: accepted (rank files are always per-rank slices)")
        self.prefix = prefix
        self.output_dir = output_dir
        self.directory = os.path.abspath(directory or os.path.join(output_dir, "checkpoint"))
        self.save_steps = save_checkpoint_steps
        self.keep_max = keep_checkpoint_max
        self.fmt = checkpoint_format
        self.remove_redundancy = bool(remove_redundancy)
        self.async_save = bool(async_save)
        self.save_network_params = bool(save_network_params)
        self.save_trainable_params = bool(save_trainable_params)
        self.global_batch_size = global_batch_size
        self.use_legacy_format = bool(use_legacy_format)
        self._iterations: List[int] = []   # Checkpoint 2.0 saves of this run, oldest first
        # read by our trainer (trainer/stop.py), which saves the last completed step on an exception
        self.exception_save = bool(exception_save)
        self.stats: List[SaveStats] = []
        self._pending: Optional[_Save] = None
        self._committed: List[cm.CommittedSave] = []
        self._owned = None
        self._ctx = None
        self._net = None
        self._last_step = 0
        self.run_id: Optional[str] = None   # this launch's identity, agreed at train begin
        self._buffers = {}   # async snapshot buffers: allocated at train begin, reused by every save
        self._writer: Optional[BackgroundWriter] = None   # async: files, records, pruning in order
        self._fenced = None   # async under our trainer: the TrainStep whose updates wait for the copy
        self._rank_slices = None   # {name: this rank's slice}, computed at train begin
        if isinstance(layouts, str):   # a MindSpore strategy file or folder of the run
            from ..layout.strategy import read_strategy
            layouts = read_strategy(layouts)
        self.layouts = dict(layouts) if layouts else None
        self.append_values = options.append_values(append_info)
        self.enc_key, self.enc_mode = options.encryption(enc_key, enc_mode, checkpoint_format)
        self.saved_network = options.saved_network(saved_network)
        self._saved = None
        self.health = options.health_settings(use_checkpoint_health_monitor,
                                              embedding_local_norm_threshold,
                                              health_ckpts_record_dir or output_dir)

    @classmethod
    def from_config(cls, cb_cfg, config) -> "CheckpointMonitor":
        """Build from a validated `CheckpointMonitorConfig` and the run config (for output_dir)."""
        return cls(prefix=cb_cfg.prefix, directory=cb_cfg.directory,
                   save_checkpoint_steps=cb_cfg.save_checkpoint_steps,
                   keep_checkpoint_max=cb_cfg.keep_checkpoint_max,
                   checkpoint_format=cb_cfg.checkpoint_format,
                   remove_redundancy=cb_cfg.remove_redundancy, async_save=cb_cfg.async_save,
                   save_network_params=cb_cfg.save_network_params,
                   save_trainable_params=cb_cfg.save_trainable_params,
                   integrated_save=cb_cfg.integrated_save,
                   global_batch_size=cb_cfg.global_batch_size,
                   output_dir=getattr(config, "output_dir", "./output"),
                   save_checkpoint_seconds=cb_cfg.save_checkpoint_seconds,
                   keep_checkpoint_per_n_minutes=cb_cfg.keep_checkpoint_per_n_minutes,
                   use_legacy_format=getattr(config, "use_legacy_format", True),
                   exception_save=cb_cfg.exception_save,
                   append_info=cb_cfg.append_info, enc_mode=cb_cfg.enc_mode,
                   # As MindSpore Transformers' trainer: the top-level switch, records in output_dir.
                   use_checkpoint_health_monitor=bool(getattr(config, "use_checkpoint_health_monitor",
                                                              False)),
                   embedding_local_norm_threshold=cb_cfg.embedding_local_norm_threshold)

    # ---- paths -------------------------------------------------------------------------------
    def _extra_root(self, kind: str) -> str:
        # checkpoint_network/ and checkpoint_trainable/ sit next to the checkpoint folder.
        return os.path.join(os.path.dirname(self.directory), f"checkpoint_{kind}")

    def _paths(self, rank: int, epoch: int, step: int) -> List[str]:
        """This rank's files of a save: the checkpoint, then the extra file if any."""
        r = rank_dir_name(rank)
        out = [os.path.join(self.directory, r, ckpt_file_name(self.prefix, rank, epoch, step, self.fmt))]
        if self.save_trainable_params:   # takes precedence over save_network_params, as MindSpore Transformers
            out.append(os.path.join(self._extra_root("trainable"), r,
                                    ckpt_file_name(self.prefix, rank, epoch, step, self.fmt, "trainable_params")))
        elif self.save_network_params:
            out.append(os.path.join(self._extra_root("network"), r,
                                    ckpt_file_name(self.prefix, rank, epoch, step, self.fmt, "network")))
        return out

    # ---- MindSpore's callback protocol ------------------------------------------------------
    def _bind(self, run_context):
        """(cb_params, ctx, NetworkState) of the run: our trainer passes its TrainState as
        `mfst_state`; any other caller (MindSpore's Model.train) gives `train_network` and
        `optimizer`, and the job is read from MindSpore's communication state."""
        cb = run_context.original_args()
        state = cb.get("mfst_state")
        if state is not None:
            return cb, state.ctx, ModelState(state.model, state.optimizer, state.ctx)
        from ..parallel.context import context_from_mindspore
        net = cb.get("train_network") or cb.get("network")
        if net is None:
            raise CheckpointError("CheckpointMonitor: the run context has no train_network; use it "
                                  "as a callback of mindspore.train.Model.train")
        ctx = context_from_mindspore()
        return cb, ctx, CellState(net, cb.get("optimizer"), ctx.world_size, self.layouts)

    def on_train_begin(self, run_context) -> None:
        """Create this rank's folders; agree this launch's run id (rank 0 makes it and shares
        it with the saves already committed in `directory`, so every rank prunes the same saves
        and names its files alike); remove leftovers of interrupted saves (`_remove_leftovers`);
        write the strategy files of a network we did not plan (rank 0). A fresh directory gets
        an empty commit record at once, which claims it for this cleanup."""
        cb, ctx, net_state = self._bind(run_context)
        self._ctx, self._net = ctx, net_state
        if self.saved_network is not None:   # MindSpore: save this cell instead of the train network
            self._saved = CellState(self.saved_network, None, ctx.world_size, self.layouts)
        if self.health is not None and ctx.config.pipeline_stage > 1:
            raise ConfigError("use_checkpoint_health_monitor with pipeline_stage > 1 compares the "
                              "embedding local norm of the first stage (MindSpore Transformers' "
                              "runner_wrapper.local_norm), which this runtime does not compute; "
                              "set pipeline_stage 1 or drop use_checkpoint_health_monitor")
        self._last_step = self._global_step(cb)
        if self.remove_redundancy and ctx.world_size == 1:
            logger.info("remove_redundancy on one rank: the file holds everything (nothing is replicated)")
        folders = ([os.path.dirname(p) for p in self._paths(ctx.rank, 0, 0)]
                   if self.use_legacy_format else [self.directory])   # 2.0: no rank_x/
        for folder in folders:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise write_failed("training save folder", folder, exc) from exc
            _sweep_temporaries(folder)
        if ctx.is_main:
            _sweep_temporaries(self.directory)
            if cb.get("mfst_state") is None:
                self._write_strategy(ctx, net_state)
        shared = None
        if ctx.is_main:   # one run id for the whole launch, made once and shared
            recorded = self.use_legacy_format and cm.read_committed(self.directory) is not None
            # Checkpoint 2.0: latest_checkpointed_iteration.txt is the record; no committed.json
            if (self.use_legacy_format and not recorded
                    and not _holds_checkpoints(self.directory)):
                # A fresh folder is claimed before anything is written: a crash before the
                # first commit then leaves a record saying "nothing committed", and the next
                # start may clean up what that crash left.
                cm.write_committed(self.directory, ctx.world_size, [])
                recorded = True
            loaded = cm.load_committed_entries(self.directory)
            _warn_other_prefixes(self.directory, self.prefix, loaded)
            shared = {"run_id": new_run_id(), "recorded": recorded,
                      "entries": [e.to_json() for e in loaded]}
        shared = broadcast_json(ctx, shared)
        self.run_id = shared["run_id"]
        self._committed = [cm.CommittedSave.from_json(e, self.directory, cm.COMMITTED_FILE)
                           for e in shared["entries"]]
        if shared["recorded"]:
            self._remove_leftovers(ctx)
        if self.remove_redundancy:
            self._owned = owned_names(self._saved or net_state, ctx)
        self._rank_slices = rank_slices_of(self._saved or net_state, ctx)
        if self.async_save:
            self._buffers = snapshot_buffers(self._saved or net_state, ctx, self.remove_redundancy,
                                             self._owned)
            step_fn = getattr(cb.get("mfst_state"), "train_step", None)
            if self._fenced is None and isinstance(getattr(step_fn, "before_update", None), list):
                step_fn.before_update.append(self._before_update)
                self._fenced = step_fn
        logger.info("CheckpointMonitor: %s every %d steps to %s (keep %d, %s%s)", self.fmt,
                    self.save_steps, self.directory, self.keep_max,
                    "async" if self.async_save else "sync",
                    ", remove_redundancy" if self.remove_redundancy else "")

    def on_train_step_end(self, run_context) -> None:
        """Commit a finished async save; save when the global step reaches a multiple of
        save_checkpoint_steps (with dataset sink, when one was passed since the last save)."""
        if self._ctx is None:
            self.on_train_begin(run_context)
        cb = run_context.original_args()
        ctx = self._ctx
        if self._pending is not None:
            self._advance_pending(ctx)
        step = self._global_step(cb)
        if step // self.save_steps > self._last_step // self.save_steps:
            self.save(run_context)
        self._last_step = step

    def on_train_end(self, run_context) -> None:
        """Wait for and commit an async save still in flight, and for the background writer to
        finish its pruning and meta.json."""
        if self._pending is not None:
            self._finish_pending(self._ctx)
        if self._writer is not None:
            self._writer.close()
        if self._fenced is not None:
            self._fenced.before_update.remove(self._before_update)
            self._fenced = None
        self._buffers = {}

    def _before_update(self) -> None:
        """TrainStep calls this before the optimizer changes weights or moments: a deferred
        snapshot still being copied is waited for (the save's copy_wait, counted as blocking)."""
        pending = self._pending
        if pending is None or pending.copied.is_set():
            return
        t0 = time.perf_counter()
        pending.copied.wait()
        pending.copy_wait += time.perf_counter() - t0

    def _remove_leftovers(self, ctx) -> None:
        """Delete this rank's files of saves the commit record does not name: files of a save
        killed before its commit, and of saves dropped by a prune a kill cut short. Nothing of
        this launch is being written yet, so every such file of our prefix is a leftover (one
        run per directory and prefix). Rank 0 also cleans ranks beyond the current world.
        Called only for a directory with our commit record: MindSpore Transformers' folders
        are never touched; nor are other prefixes' files, nor safetensors files that carry no
        mindformers_st description (not written by a CheckpointMonitor). Each file is logged."""
        named = set()
        for e in self._committed:
            for r, rel in e.files.items():
                named.add(os.path.abspath(e.path(r)))
                fmt = "ckpt" if rel.endswith(".ckpt") else "safetensors"
                for kind, root in (("network", "network"), ("trainable_params", "trainable")):
                    named.add(os.path.join(self._extra_root(root), rank_dir_name(r),
                                           ckpt_file_name(self.prefix, r, e.epoch, e.step, fmt, kind)))
        roots = [(self.directory, ""), (self._extra_root("network"), "network"),
                 (self._extra_root("trainable"), "trainable_params")]
        stale = []
        for root, kind in roots:
            for r, folder in rank_folders(root).items():
                if r != ctx.rank and not (ctx.is_main and r >= ctx.world_size):
                    continue
                for name in sorted(os.listdir(folder)):
                    path = os.path.join(folder, name)
                    parsed = parse_ckpt_name(name)
                    if parsed is None or path in named or parsed[0] != r:
                        continue
                    if name not in {ckpt_file_name(self.prefix, r, parsed[1], parsed[2], f, kind)
                                    for f in FORMATS}:
                        continue   # another prefix's file
                    if name.endswith(".safetensors") and not _written_by_us(path):
                        continue
                    stale.append(path)
        for path in stale:
            logger.warning("rank %d: removing %s: no committed save names it (left by an "
                           "interrupted save or prune)", ctx.rank, path)
        cm.remove_files(stale)

    def _write_strategy(self, ctx, net_state) -> None:
        """`{output_dir}/strategy/ckpt_strategy_rank_{r}.ckpt` of every rank, as MindSpore writes
        them, so MindSpore's unified_safetensors and our merge read the saves."""
        from ..layout.strategy import (remove_stale_rank_files, strategy_file_name,
                                       write_strategy_file)
        folder = os.path.join(self.output_dir, "strategy")
        os.makedirs(folder, exist_ok=True)
        for r in range(ctx.world_size):
            write_strategy_file(os.path.join(folder, strategy_file_name(r)), net_state.layouts)
        remove_stale_rank_files(folder, ctx.world_size)

    def _global_step(self, cb) -> int:
        """Optimizer updates done: our loop's count, else the optimizer's `global_step` (Model.train
        restarts `cur_step_num` at 1 after a resume with initial_epoch), else `cur_step_num`."""
        state = cb.get("mfst_state")
        if state is not None:
            return int(state.global_step)
        count = self._net.step_count() if self._net is not None else None
        return int(count if count is not None else (cb.get("cur_step_num") or 0))

    def _hyper(self, cb, ctx, net_state):
        """(epoch, step in epoch, global step, hyper values) of the step just finished."""
        state = cb.get("mfst_state")
        if state is not None:
            epoch, step, global_step = int(state.epoch) + 1, int(state.step_in_epoch), int(state.global_step)
            gbs = int(self.global_batch_size or state.global_batch_size or 0)
            lr = float(state.lr if state.lr is not None else 0.0)
            loss_scale = float(state.extra.get("loss_scale", 1.0))
            data_position = int(state.extra.get("data_position", global_step * gbs))
            seed = int(getattr(state.config, "seed", getattr(ctx, "seed", 0)))
        else:
            global_step = self._global_step(cb)
            per_epoch = int(cb.get("batch_num") or 0) or max(1, global_step)
            epoch = int(cb.get("cur_epoch_num") or 1)
            step = (global_step - 1) % per_epoch + 1
            gbs = int(self.global_batch_size or _dataset_batch(cb) * ctx.world_size)
            lr = _learning_rate(cb.get("optimizer"), net_state)
            loss_scale = _loss_scale(cb.get("net_outputs"), cb.get("train_network"))
            data_position = global_step * gbs
            import mindspore as ms
            seed = int(ms.get_seed() or 0)
        hyper = {"epoch_num": epoch, "step_num": global_step, "loss_scale": loss_scale,
                 "global_batch_size": gbs, "learning_rate": lr, "data_position": data_position,
                 "seed": seed}
        return epoch, step, global_step, hyper

    # ---- saving ------------------------------------------------------------------------------
    def save(self, run_context) -> None:
        """Save now (every rank must call this at the same step). An async save still in flight
        is committed first, waiting for it if needed (the wait is counted in its SaveStats)."""
        cb, ctx, net_state = run_context.original_args(), self._ctx, self._net
        if self._pending is not None:   # the previous async save must commit first
            self._finish_pending(ctx)
        t0 = time.perf_counter()
        epoch, step, global_step, hyper = self._hyper(cb, ctx, net_state)
        # Async under our trainer: the copy into the buffers runs on the writer during the next
        # step's forward/backward, and TrainStep waits for it before the optimizer changes any
        # tensor (_before_update); elsewhere (Model.train) it is taken here.
        defer = self.async_save and self._fenced is not None
        snap = snapshot_rank(self._saved or net_state, ctx, epoch=epoch, step=step, hyper=hyper,
                             remove_redundancy=self.remove_redundancy, owned=self._owned,
                             copy=self.async_save, buffers=self._buffers if self.async_save else None,
                             run_id=self.run_id, defer=defer, rank_slices=self._rank_slices)
        paths = self._paths(ctx.rank, epoch, step)
        pending = _Save(epoch, step, global_step, paths, snap.nbytes)
        options.add_append_values(snap, self.append_values, self._saved or net_state)
        jobs = [(paths[0], snap)]
        if not self.use_legacy_format:
            from ..records.iteration import CommonInfo
            from .iteration_save import iteration_files
            jobs = iteration_files(self.directory, snap, ctx.rank, ctx.world_size, global_step)
            pending.paths = paths = [p for p, _ in jobs]
            os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
            # common.json as MindSpore Transformers' monitor fills it: step_num is the global step
            pending.iteration = (CommonInfo(epoch, global_step, global_step,
                                            float(hyper["loss_scale"]),
                                            int(hyper["global_batch_size"])), snap)
        elif len(paths) > 1:
            names = snap.trainable_names if self.save_trainable_params else snap.network_names
            jobs.append((paths[1], snap.subset(names)))

        def write():
            tw = time.perf_counter()
            try:
                try:
                    snap.fill()   # a deferred snapshot's copy; nothing to do otherwise
                finally:
                    pending.copied.set()
                _fault_point("write", global_step)
                for path, s in jobs:
                    write_rank_file(path, s, self.fmt, self.enc_key, self.enc_mode)
            except BaseException as exc:   # reported at commit, on the main thread
                pending.error = exc
                logger.error("rank %d: writing %s failed: %s", ctx.rank, paths[0], exc)
            pending.write_time = time.perf_counter() - tw
            _fault_point("written", global_step)

        if self.async_save:
            if self._writer is None:
                self._writer = BackgroundWriter(f"ckpt-save-{ctx.rank}")
            pending.task = self._writer.submit(write, f"write of global step {global_step}")
            pending.blocked = time.perf_counter() - t0
            self._pending = pending
            logger.info("step %d: async save started (%.1f MB), training blocked %.1f ms",
                        global_step, pending.nbytes / 1e6, pending.blocked * 1e3)
        else:
            write()
            pending.blocked = time.perf_counter() - t0
            self._commit(ctx, pending)

    def save_unsaved_step(self, run_context) -> bool:
        """Save and commit the step `run_context` describes unless a save of it is committed or
        under way (graceful exit, exception_save); an async save is committed before returning.
        Every rank must call this at the same step. Returns True when it saved."""
        if self._ctx is None:
            self.on_train_begin(run_context)
        step = self._global_step(run_context.original_args())
        done = {e.global_step for e in self._committed}
        if self._pending is not None:
            done.add(self._pending.global_step)
        if step <= 0 or step in done:
            if self._pending is not None:
                self._finish_pending(self._ctx)
            return False
        self.save(run_context)
        if self._pending is not None:
            self._finish_pending(self._ctx)
        return True

    # ---- committing --------------------------------------------------------------------------
    # A save commits in the same steps whether sync or async; only where they run differs:
    #   1. agree (all-reduce, main thread) that every rank's files are written and durable;
    #   2. rank 0 writes the commit record (committed.json; Checkpoint 2.0: common.json,
    #      metadata.json, the tracker);
    #   3. once the record is written: each rank deletes its files of the saves the record
    #      dropped and writes its meta.json ("the tail").
    # Sync: all on the main thread, a barrier between 2 and 3. Async: 2 and 3 run on the
    # background writer (in order, after the save's files), and the main thread only agrees:
    # at one step end that the files are written (then rank 0 queues 2 and its own 3), at a later
    # one that rank 0's record is written (then the other ranks queue their 3) — one small
    # all-reduce per step end while a save is pending.

    def _written_everywhere(self, ctx, pending: _Save) -> bool:
        """Step 1: True once every rank's files are written; CheckpointError on every rank when
        one failed (nothing is committed, the last committed save stays valid)."""
        agreed = all_done(ctx, pending.written, pending.error is None
                          and (pending.task is None or pending.task.error is None))
        if agreed is None:
            return False
        if not agreed:
            self._pending = None
            err = pending.error or (pending.task.error if pending.task is not None else None)
            if pending.iteration is not None:
                why = f"this rank: {err}" if err else "another rank failed (see its log)"
                raise CheckpointError(f"save of iteration {pending.global_step} failed and was not "
                                      f"committed ({why}); latest_checkpointed_iteration.txt in "
                                      f"{self.directory} still names the last good save")
            name = os.path.basename(pending.paths[0])
            why = ("another rank failed (see its log)" if err is None else
                   f"this rank: writing {os_error_text(err, pending.paths[0])}"
                   if isinstance(err, OSError) else f"this rank: {err}")
            raise CheckpointError(f"training save of global step {pending.global_step} ({name}) failed and was "
                                  f"not committed ({why}); the last committed save in {self.directory} "
                                  f"is still valid. Fix the cause (disk space? permissions?) and resume.")
        return True

    def _commit(self, ctx, pending: _Save) -> None:
        """A synchronous save's commit, on the main thread: make `pending` count on every rank,
        or raise CheckpointError on every rank."""
        self._pending = None
        t0 = time.perf_counter()
        self._written_everywhere(ctx, pending)   # sync: done everywhere, so True or raise
        record, tail = self._commit_parts(ctx, pending)
        if record is not None:
            record()
        all_ranks(ctx, True)   # the record no longer names the dropped saves past here
        if tail is not None:
            tail()
        pending.commit_time += time.perf_counter() - t0
        self._committed_log(pending)

    def _advance_pending(self, ctx) -> None:
        """Async, at a step end: move the pending save one step of the commit on, if every
        rank is ready for it (one all-reduce)."""
        pending = self._pending
        t0 = time.perf_counter()
        try:
            if pending.tail is _NOT_AGREED:
                if self._written_everywhere(ctx, pending):
                    self._queue_record(ctx, pending)
            elif self._recorded_everywhere(ctx, pending):
                self._queue_tail(pending)
        finally:
            pending.commit_time += time.perf_counter() - t0

    def _finish_pending(self, ctx) -> None:
        """Async: commit the pending save now, waiting for the background writer where it has
        not finished (before the next save, at train end, on a graceful exit). The time
        waited is the save's `wait_time`; the save's tail may still run in the background."""
        pending = self._pending
        if pending.tail is _NOT_AGREED:
            t0 = time.perf_counter()
            pending.task.wait()
            pending.wait_time += time.perf_counter() - t0
            self._advance_pending(ctx)
        if self._pending is pending:
            t0 = time.perf_counter()
            if pending.record is not None:
                pending.record.wait()
            pending.wait_time += time.perf_counter() - t0
            self._advance_pending(ctx)
        if pending.wait_time > 1e-3:
            logger.info("step %d: waited %.1f ms for the async save to finish", pending.global_step,
                        pending.wait_time * 1e3)

    def _queue_record(self, ctx, pending: _Save) -> None:
        """Async step 2: every rank's files are durable; rank 0 queues the commit record and,
        after it, its own tail; the other ranks keep their tail until the record is written."""
        record, tail = self._commit_parts(ctx, pending)
        if record is None:
            pending.tail = tail
            return

        def record_then_tail():
            record()
            if tail is not None:
                tail()
        pending.record = self._writer.submit(record_then_tail,
                                             f"commit of global step {pending.global_step}")
        pending.tail = None

    def _recorded_everywhere(self, ctx, pending: _Save) -> bool:
        """Async step 3: True once rank 0's record is written; CheckpointError on every rank
        when it could not be."""
        record = pending.record
        agreed = all_done(ctx, record is None or record.done, record is None or record.error is None)
        if agreed is None:
            return False
        if not agreed:
            self._pending = None
            if record is not None and isinstance(record.error, MindformersSTError):
                raise record.error
            why = (f"rank 0: {record.error}" if record is not None else
                   "rank 0 failed, see its log")
            raise CheckpointError(f"training save of global step {pending.global_step} could not be "
                                  f"committed in {self.directory} ({why})")
        return True

    def _queue_tail(self, pending: _Save) -> None:
        """Async: the record is written; queue this rank's tail, and the save counts."""
        self._pending = None
        if pending.tail is not None:
            self._writer.submit(pending.tail, f"pruning after global step {pending.global_step}")
        self._committed_log(pending)

    def _commit_parts(self, ctx, pending: _Save):
        """(record, tail) of `pending` on this rank — callables for steps 2 and 3 (None when
        this rank has nothing to do), after updating what this monitor counts as committed."""
        if pending.iteration is not None:
            return self._iteration_parts(ctx, pending)
        name = os.path.basename(pending.paths[0])
        rank_dir = os.path.dirname(pending.paths[0])
        rel = os.path.relpath(pending.paths[0], self.directory)
        files = {r: os.path.join(rank_dir_name(r), ckpt_file_name(self.prefix, r, pending.epoch,
                                                                  pending.step, self.fmt))
                 for r in range(ctx.world_size)}
        assert files[ctx.rank] == rel
        entry = cm.CommittedSave(pending.epoch, pending.step, pending.global_step, files, self.directory,
                                 {"world_size": ctx.world_size, "format": self.fmt}, self.run_id,
                                 save_id_of(self.run_id, pending.epoch, pending.step))
        # Commit order decides what is oldest (as MindSpore prunes by file age): the save just
        # made is newest, so it is never the one dropped.
        committed = [e for e in self._committed if e.key != entry.key] + [entry]
        dropped = committed[:max(0, len(committed) - self.keep_max)]
        self._committed = committed = committed[len(dropped):]
        pending.pruned = [e.key for e in dropped]
        # MindSpore Transformers' per-rank record, written once the save counts: it names only
        # committed files, so a reader of meta.json alone never takes a pending save.
        meta = cm.RankMeta(pending.epoch, pending.step, name,
                           tuple(dict.fromkeys(os.path.basename(e.files[ctx.rank]) for e in committed
                                               if ctx.rank in e.files)),   # each file once
                           entry.run_id, entry.save_id)
        world = ctx.world_size

        def record():
            try:
                cm.write_committed(self.directory, world, committed)
            except OSError as exc:   # the files are written; without the record nothing counts
                raise write_failed(f"training save of global step {pending.global_step}: its "
                                   f"commit record", self.directory, exc) from exc

        def tail():
            _fault_point("committed", pending.global_step)
            if dropped:
                self._prune(ctx, dropped)
            _fault_point("pruned", pending.global_step)
            try:
                cm.write_rank_meta(rank_dir, meta)
            except OSError as exc:   # committed.json already holds the save; meta.json is a mirror
                logger.warning("rank %d: %s: could not write meta.json (%s); the save is committed "
                               "in committed.json", ctx.rank, rank_dir, exc)
            if self.health is not None and ctx.is_main:
                self._record_health(name)

        return (record if ctx.is_main else None), tail

    def _iteration_parts(self, ctx, pending: _Save):
        """Checkpoint 2.0: rank 0 writes common.json, metadata.json and, last, the tracker
        (the record), then removes the folders beyond keep_checkpoint_max (its tail)."""
        from .iteration_save import commit_iteration, prune_iterations
        iterations = [i for i in self._iterations if i != pending.global_step] + [pending.global_step]
        self._iterations = iterations[-self.keep_max:]
        pending.pruned = iterations[:-self.keep_max]
        if not ctx.is_main:
            return None, None
        common, snap = pending.iteration
        layouts, world = self._net.layouts, ctx.world_size

        def record():
            commit_iteration(self.directory, pending.global_step, common, snap, layouts, world)

        def tail():
            prune_iterations(self.directory, iterations, self.keep_max)

        return record, tail

    def _committed_log(self, pending: _Save) -> None:
        self.stats.append(SaveStats(pending.global_step, pending.nbytes, pending.blocked,
                                    pending.write_time, pending.commit_time, pending.wait_time,
                                    pending.task is not None, pending.copy_wait))
        what = (f"iteration {pending.global_step} (Checkpoint 2.0)" if pending.iteration is not None
                else os.path.basename(pending.paths[0]))
        logger.info("step %d: committed %s (%.1f MB; blocked %.1f ms, write %.1f ms, commit %.1f ms"
                    "%s)%s", pending.global_step, what, pending.nbytes / 1e6,
                    pending.blocked * 1e3, pending.write_time * 1e3, pending.commit_time * 1e3,
                    f", waited {(pending.wait_time + pending.copy_wait) * 1e3:.1f} ms"
                    if pending.wait_time + pending.copy_wait > 1e-3 else "",
                    f"; pruning {pending.pruned}" if pending.pruned else "")

    def _record_health(self, name: str) -> None:
        """Append the committed save to health_ckpts.json, as MindSpore Transformers: with one
        pipeline stage (all this runtime runs) its embedding norm is never compared, so every save
        is healthy (is_health 0)."""
        from ..records.health import HealthEntry, append_health
        path = append_health(self.health["dir"], HealthEntry(0, name))
        logger.info("%s: %s is healthy (pipeline_stage 1: embedding_local_norm_threshold %s is "
                    "not compared)", path, name, self.health["threshold"])

    def _prune(self, ctx, dropped: List[cm.CommittedSave]) -> None:
        """Delete this rank's files of saves no record names any more (rank 0 also removes
        files of ranks beyond the current world, left by an earlier larger run)."""
        paths = []
        for e in dropped:
            ranks = [ctx.rank] + ([r for r in e.files if r >= ctx.world_size] if ctx.is_main else [])
            for r in ranks:
                if r in e.files:
                    main = e.path(r)
                    paths.append(main)
                    fmt = "ckpt" if main.endswith(".ckpt") else "safetensors"
                    for kind, root in (("network", "network"), ("trainable_params", "trainable")):
                        paths.append(os.path.join(self._extra_root(root), rank_dir_name(r),
                                                  ckpt_file_name(self.prefix, r, e.epoch, e.step, fmt, kind)))
        cm.remove_files(paths)


def _holds_checkpoints(directory: str) -> bool:
    """True when some rank folder of `directory` holds a checkpoint file (of anyone)."""
    for folder in rank_folders(directory).values():
        if any(format_of(n) for n in os.listdir(folder) if not n.startswith(".")):
            return True
    return False


def _written_by_us(path: str) -> bool:
    """True when the safetensors file at `path` describes itself as a rank file of ours
    (records.rank_meta); False for MindSpore's files and for files whose header is unreadable
    (a leftover of ours is always complete: writers rename only finished files)."""
    try:
        return RankFileMeta.from_metadata(read_header(path)[1], path) is not None
    except (MindformersSTError, OSError):
        return False


def _fault_point(window: str, global_step: int) -> None:
    """Fault-injection hook for the crash tests: with MFST_FAULT_KILL_AT="{window}@{global
    step}" this process kills itself (SIGKILL: nothing runs after it) at that point of that
    save, so a test can crash a run in a known window. Windows, in a save's order:
    "write" (snapshot taken, nothing written; with async_save on the writer thread while
    training goes on), "written" (files renamed into place, not committed), "committed"
    (committed.json names the save and drops the pruned ones, whose files are still there),
    "pruned" (files deleted, meta.json not yet written). Unset: nothing."""
    spec = os.environ.get("MFST_FAULT_KILL_AT")
    if spec and spec == f"{window}@{global_step}":
        logger.warning("MFST_FAULT_KILL_AT=%s: killing this process", spec)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _warn_other_prefixes(directory: str, prefix: str, entries) -> None:
    """Warn when `directory` already holds committed saves of another prefix (another run): this
    run's saves join the same record, keep_checkpoint_max counts both and loads take the newest."""
    from ..records.names import format_step, prefix_of
    other = sorted({(p, format_step(e.key)) for e in entries for f in e.files.values()
                    if (p := prefix_of(f)) is not None and p != prefix})
    if other:
        logger.warning("CheckpointMonitor: %s already holds saves of another run (%s); this run "
                       "(prefix %r) adds its saves to the same committed.json, keep_checkpoint_max "
                       "counts both and loads take the newest: give each run its own output_dir",
                       directory, ", ".join(f"{p} {k}" for p, k in other[:4]), prefix)


def _sweep_temporaries(folder: str) -> None:
    """Remove hidden `.*.tmp*` files a killed save left behind (never a file a record names:
    writers only rename a temporary file into place once it is complete)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    stale = [os.path.join(folder, n) for n in names if n.startswith(".") and ".tmp" in n]
    if stale:
        logger.info("%s: removing %d temporary file(s) left by an interrupted save", folder, len(stale))
        cm.remove_files(stale)


def _dataset_batch(cb) -> int:
    """Batch size of the run's dataset (per rank), 0 when unknown."""
    dataset = cb.get("train_dataset")
    try:
        return int(dataset.get_batch_size()) if dataset is not None else 0
    except Exception:   # MindSpore raises several types for datasets without a batch op
        return 0


def _learning_rate(optimizer, net_state) -> float:
    """The optimizer's current learning rate where MindSpore exposes it as a value, else 0."""
    params = net_state.parameters()
    value = params.get("learning_rate")
    if value is None and optimizer is not None:
        value = getattr(optimizer, "learning_rate", None)
    try:
        return float(np.asarray(value.asnumpy()).reshape(-1)[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return 0.0


def _loss_scale(outputs, train_network) -> float:
    """The loss scale in force: the third output of a loss-scale wrapper (loss, overflow, scale),
    else its `scale_sense`, else the fixed `sens` a TrainOneStepCell multiplies by, else 1."""
    if isinstance(outputs, (tuple, list)) and len(outputs) >= 3:
        try:
            return float(np.asarray(outputs[2].asnumpy()).reshape(-1)[0])
        except (AttributeError, TypeError, ValueError):
            pass
    for attr in ("scale_sense", "sens"):
        value = getattr(train_network, attr, None)
        if value is None:
            continue
        try:
            return float(np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value).reshape(-1)[0])
        except (TypeError, ValueError):
            continue
    return 1.0
