"""The training-callback protocol, the state it sees, and MFLossMonitor.

The train loop calls `on_train_begin(state)`, `on_step_end(state)` after every optimizer step,
and `on_train_end(state)`. `TrainState` carries everything a callback may need: step counters,
the last loss/lr/grad norm, the model, optimizer, parallel context, data position and config.
CheckpointMonitor (mindformers_st/checkpoint/monitor.py) plugs in through the same protocol.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop knows after a step.

    global_step: optimizer steps done in total (resumed steps included).
    epoch: 0-based epoch of the last step; step_in_epoch: 1-based step within it.
    data_position: {"epoch", "step_in_epoch", "steps_per_epoch", "seed"}: where the next batch
        comes from (restoring it resumes the same data order).
    """

    config: Any
    model: Any
    optimizer: Any
    ctx: Any
    train_step: Any = None
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    global_batch_size: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    step_time: float = 0.0
    tokens_per_step: int = 0
    losses: List[float] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def data_position(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "seed": int(self.config.seed)}


class Callback:
    """Base class: override the hooks you need (all no-ops here)."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step (after weights are loaded)."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step."""


class MFLossMonitor(Callback):
    """Logs loss, lr, grad norm and throughput every `per_print_times` steps (rank 0 prints;
    every rank logs to its own worker log)."""

    def __init__(self, per_print_times: int = 1):
        self.per_print_times = max(1, int(per_print_times))
        self._t0 = 0.0

    def on_train_begin(self, state: TrainState) -> None:
        self._t0 = time.time()

    def on_step_end(self, state: TrainState) -> None:
        if state.global_step % self.per_print_times and state.global_step != state.total_steps:
            return
        tput = state.tokens_per_step / state.step_time if state.step_time > 0 else 0.0
        msg = (f"{{ Epoch:[{state.epoch + 1:3d}], step:[{state.step_in_epoch:5d}/"
               f"{state.steps_per_epoch:5d}], global step:[{state.global_step}/{state.total_steps}], "
               f"loss: {state.loss:.6f}, lr: {state.lr:.6e}, global_norm: {state.grad_norm:.4f}, "
               f"per_step_time: {state.step_time * 1000:.0f} ms, "
               f"throughput: {tput:.1f} tokens/s }}")
        logger.info(msg)
        if state.ctx.is_main:
            print(msg, flush=True)

    def on_train_end(self, state: TrainState) -> None:
        if state.ctx.is_main and state.losses:
            print(f"training done: {state.global_step} steps in {time.time() - self._t0:.1f} s, "
                  f"loss {state.losses[0]:.4f} -> {state.losses[-1]:.4f}", flush=True)


def build_callbacks(config) -> List[Callback]:
    """The callbacks the config's `callbacks:` list asks for, in order.

    CheckpointMonitor comes from mindformers_st.checkpoint.monitor; a config that enables it
    when that module is not available fails here (saving is never silently skipped).
    """
    out: List[Callback] = []
    for cb in config.callbacks:
        if cb.type == "MFLossMonitor":
            out.append(MFLossMonitor(cb.per_print_times))
        elif cb.type == "CheckpointMonitor":
            out.append(_checkpoint_monitor(cb, config))
        else:  # the schema only lets known types through
            raise ConfigError(f"callback type {cb.type!r} has no implementation")
    if not any(isinstance(c, MFLossMonitor) for c in out):
        out.insert(0, MFLossMonitor())   # losses are always reported
    return out


def _checkpoint_monitor(cb_cfg, config) -> Callback:
    try:
        from ..checkpoint import monitor
    except ImportError as exc:
        if getattr(exc, "name", None) not in ("mindformers_st.checkpoint.monitor", None):
            raise
        raise ConfigError(
            "callbacks: CheckpointMonitor is configured but mindformers_st/checkpoint/monitor.py "
            "is not available in this build, so no checkpoint would be saved. Remove the "
            "CheckpointMonitor entry to train without saving.") from exc
    return monitor.CheckpointMonitor.from_config(cb_cfg, config)
