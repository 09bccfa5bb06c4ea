"""Callbacks of our train loop: MindSpore's own protocol, the state they see, MFLossMonitor.

Callbacks are `mindspore.train.Callback`s, driven as `Model.train` drives them:
`on_train_begin(run_context)`, `on_train_step_end(run_context)` after every optimizer step,
`on_train_end(run_context)`. `run_context_of(state)` gives the `RunContext` whose
`original_args()` holds MindSpore's fields (`train_network`, `optimizer`, `cur_epoch_num`,
`cur_step_num`, `batch_num`, `epoch_num`, `net_outputs`) and ours (`mfst_state`: the TrainState
with the model, parallel context, lr, data position and config). So CheckpointMonitor
(checkpoint/monitor.py) is one class for this loop and for any `Model.train` script.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mindspore.train import Callback

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


class CallbackParams(dict):
    """MindSpore's callback parameters: a dict whose keys read as attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def run_context_of(state: TrainState):
    """A `mindspore.train.RunContext` describing the loop's current step (see the module doc)."""
    from mindspore.train import RunContext
    return RunContext(CallbackParams(
        train_network=state.model, network=state.model, optimizer=state.optimizer,
        cur_epoch_num=int(state.epoch) + 1, cur_step_num=int(state.global_step),
        batch_num=int(state.steps_per_epoch), epoch_num=None, net_outputs=state.loss,
        mfst_state=state))


def _state(run_context) -> TrainState:
    state = run_context.original_args().get("mfst_state")
    if state is None:
        raise ConfigError("MFLossMonitor reads the TrainState of mindformers_st's train loop; "
                          "use mindspore.train.LossMonitor with Model.train")
    return state


class MFLossMonitor(Callback):
    """Logs loss, lr, grad norm and throughput every `per_print_times` steps (rank 0 prints;
    every rank logs to its own worker log)."""

    def __init__(self, per_print_times: int = 1):
        self.per_print_times = max(1, int(per_print_times))
        self._t0 = 0.0

    def on_train_begin(self, run_context) -> None:
        self._t0 = time.time()

    def on_train_step_end(self, run_context) -> None:
        state = _state(run_context)
        if state.global_step % self.per_print_times and state.global_step != state.total_steps:
            return
        tput = state.tokens_per_step / state.step_time if state.step_time > 0 else 0.0
        msg = (f"{{ Epoch:[{state.epoch + 1:3d}], step:[{state.step_in_epoch:5d}/"
               f"{state.steps_per_epoch:5d}], global step:[{state.global_step}/{state.total_steps}], "
               f"loss: {state.loss:.6f}, lr: {state.lr:.6e}, global_norm: {state.grad_norm:.4f}, "
               f"per_step_time: {state.step_time * 1000:.0f} ms, "
               f"throughput: {tput:.1f} tokens/s }}")
        # Once per line: rank 0 prints it (the console shows rank 0's output), the other ranks
        # log it to their own files.
        if state.ctx.is_main:
            print(msg, flush=True)
        else:
            logger.info(msg)

    def on_train_end(self, run_context) -> None:
        state = _state(run_context)
        if state.ctx.is_main and state.losses:
            print(f"training done: {len(state.losses)} steps in this run (global step "
                  f"{state.global_step}) in {time.time() - self._t0:.1f} s, loss "
                  f"{state.losses[0]:.4f} -> {state.losses[-1]:.4f}", flush=True)


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
        elif cb.type == "OnRequestExit":
            continue   # the loop's graceful exit (trainer/stop.py) reads it
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
