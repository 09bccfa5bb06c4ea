"""Stopping a training run cleanly: graceful exit on SIGTERM (`use_graceful_exit`) and the
CheckpointMonitor's `exception_save`, as MindSpore Transformers does them.

Graceful exit (MindSpore's `OnRequestExit`, which MindSpore Transformers enables with
`use_graceful_exit: True`; here `use_graceful_exit` alone is enough, an OnRequestExit entry adds
its `config_file` and `save_ckpt`): SIGTERM only sets a flag; at the end of the step under way every
rank learns whether any rank was asked to stop (one all-reduce per step on more than one rank,
so all stop after the same step), the CheckpointMonitor saves and commits that step unless it
has just done so, the callbacks' `on_train_end` runs and the run returns normally: exit code 0.

exception_save (MindSpore's `_save_final_ckpt`): when a step raises, the state before that step
(the last completed one) is saved and committed before the error propagates — unless the
exception came while the optimizer was changing the weights (a mix of two steps is never saved),
or the run has more than one rank (a save is a collective of every rank, and the other ranks are
not known to have stopped: they would wait for it forever).

`MFST_FAULT_RAISE_AT_STEP=K` (fault injection for tests) raises a RuntimeError when global step K
starts, before any of its work.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from typing import List, Optional

from ..parallel.agree import all_ranks

logger = logging.getLogger(__name__)

FAULT_ENV = "MFST_FAULT_RAISE_AT_STEP"


class GracefulExit:
    """While active, SIGTERM — or `config_file` holding `{"GracefulExit": 1}` (OnRequestExit's)
    — asks the run to stop after the current step (see the module doc); `save` says whether
    that step is saved first (OnRequestExit's save_ckpt). `enabled` False: SIGTERM keeps
    whatever handler was installed (run_mindformer.py: exit 143)."""

    def __init__(self, enabled: bool, ctx, config_file: Optional[str] = None, save: bool = True):
        self.enabled = bool(enabled)
        self.ctx = ctx
        self.config_file = config_file
        self.save = bool(save)
        self.requested = False
        self._previous = None

    @classmethod
    def of_config(cls, config, ctx) -> "GracefulExit":
        """From `use_graceful_exit` and the OnRequestExit callback entry, if any. As in
        MindSpore, OnRequestExit without use_graceful_exit does nothing (a warning says so)."""
        entry = config.callback("OnRequestExit")
        if entry is not None and not config.use_graceful_exit:
            logger.warning("callbacks: OnRequestExit has no effect without use_graceful_exit: "
                           "True (as in MindSpore Transformers)")
        return cls(config.use_graceful_exit, ctx,
                   entry.config_file if entry is not None else None,
                   entry.save_ckpt if entry is not None else True)

    def __enter__(self) -> "GracefulExit":
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if not self.requested:
            logger.warning("SIGTERM received: stopping after the current step (use_graceful_exit)")
        self.requested = True

    def stop_now(self) -> bool:
        """True on every rank when any rank was asked to stop (call at every step end, on every
        rank: a collective on more than one rank)."""
        if not self.enabled:
            return False
        if not self.requested and self.config_file and _asks_to_exit(self.config_file):
            logger.warning("%s asks for a graceful exit: stopping after the current step",
                           self.config_file)
            self.requested = True
        return not all_ranks(self.ctx, not self.requested)


def _asks_to_exit(path: str) -> bool:
    """True when the JSON file `path` exists and holds `"GracefulExit": 1` (MindSpore's key)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("GracefulExit") == 1
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("%s: cannot read the graceful-exit request (%s)", path, exc)
        return False


def inject_fault(global_step: int) -> None:
    """Raise RuntimeError when `MFST_FAULT_RAISE_AT_STEP` names `global_step` (tests only)."""
    at = os.environ.get(FAULT_ENV)
    if at and int(at) == global_step:
        raise RuntimeError(f"fault injected at global step {global_step} ({FAULT_ENV}={at})")


def exception_save(callbacks: List, run_context, state, exc: BaseException) -> Optional[int]:
    """Save and commit the last completed step through every CheckpointMonitor with
    `exception_save` on, after `exc` stopped a step; returns the global step saved (None when
    nothing was saved, the reason logged). Never raises: the original error must propagate."""
    monitors = [cb for cb in callbacks if getattr(cb, "exception_save", False)]
    if not monitors:
        return None
    step = int(state.global_step)
    why = None
    if getattr(state.train_step, "updating", False):
        why = "the exception came while the optimizer was changing the weights"
    elif state.ctx.world_size > 1:
        why = (f"the run has {state.ctx.world_size} ranks and a save needs every one of them; "
               f"the others are not known to have stopped")
    elif step == 0:
        why = "no step was completed"
    if why:
        logger.warning("exception_save: nothing saved (%s)", why)
        return None
    saved = None
    for monitor in monitors:
        try:
            if monitor.save_unsaved_step(run_context):
                saved = step
        except Exception as err:   # the save failing too must not hide the first error
            logger.error("exception_save: saving global step %d failed: %s", step, err)
            return None
    if saved is not None and state.ctx.is_main:
        print(f"[train] exception_save: {type(exc).__name__} stopped the run; saved and "
              f"committed global step {step}, the last completed step", flush=True)
    return saved
