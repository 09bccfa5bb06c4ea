"""Learning-rate schedules with MindSpore Transformers' keys (CosineWithWarmUpLR, ConstantWarmUpLR).

`build_lr_schedule(lr_cfg, total_steps)` returns a MindSpore `LearningRateSchedule` whose
`lr_at(step)` is the same schedule as a plain float (for logging and resume). Step 0 is the
first optimizer update, as MindSpore's `global_step`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import numpy as np
from mindspore import Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from ..errors import ConfigError

logger = logging.getLogger(__name__)

_COMMON = {"type", "learning_rate", "warmup_ratio", "warmup_steps", "warmup_lr_init",
           "total_steps"}
_KEYS = {"CosineWithWarmUpLR": _COMMON | {"lr_end", "num_cycles", "decay_steps"},
         "ConstantWarmUpLR": _COMMON}


class WarmupSchedule(LearningRateSchedule):
    """Linear warmup from warmup_lr_init to learning_rate, then cosine decay to lr_end
    (`cosine=True`, MindSpore Transformers' CosineWithWarmUpLR) or constant."""

    def __init__(self, learning_rate: float, warmup_steps: int, total_steps: int,
                 lr_end: float = 0.0, warmup_lr_init: float = 0.0, num_cycles: float = 0.5,
                 cosine: bool = True, decay_steps: Optional[int] = None):
        super().__init__()
        self.decay_steps = decay_steps
        self.learning_rate, self.lr_end = float(learning_rate), float(lr_end)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.warmup_lr_init, self.num_cycles, self.cosine = float(warmup_lr_init), num_cycles, cosine

    def lr_at(self, step: int) -> float:
        """The learning rate used by optimizer update number `step` (0-based)."""
        step = int(step)
        if step < self.warmup_steps:
            frac = step / max(1, self.warmup_steps)
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * frac
        if not self.cosine:
            return self.learning_rate
        decay = max(1, self.decay_steps or (self.total_steps - self.warmup_steps))
        progress = min(1.0, (step - self.warmup_steps) / decay)
        percent = max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))
        return self.lr_end + (self.learning_rate - self.lr_end) * percent

    def construct(self, global_step):
        return Tensor(np.float32(self.lr_at(int(np.asarray(global_step.asnumpy()).reshape(-1)[0]))))


def build_lr_schedule(lr_cfg: Optional[Dict[str, Any]], total_steps: int) -> WarmupSchedule:
    """The schedule described by YAML `lr_schedule` for a run of `total_steps` updates.

    Keys: type (CosineWithWarmUpLR | ConstantWarmUpLR), learning_rate, lr_end, warmup_ratio or
    warmup_steps, warmup_lr_init, num_cycles, decay_steps (default total - warmup), total_steps
    (-1/None = the run's total_steps).
    ConfigError names unknown keys, wrong types, and a warmup longer than the run.
    """
    cfg = dict(lr_cfg or {"type": "ConstantWarmUpLR", "learning_rate": 1e-4})
    kind = cfg.get("type", "CosineWithWarmUpLR")
    if kind not in _KEYS:
        raise ConfigError(f"lr_schedule.type {kind!r} is not supported; use one of {sorted(_KEYS)}")
    unknown = sorted(set(cfg) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"lr_schedule: unknown key(s) {unknown} for {kind}; known: "
                          f"{sorted(_KEYS[kind])}")
    for key in ("learning_rate", "lr_end", "warmup_ratio", "warmup_lr_init", "num_cycles"):
        if key in cfg and cfg[key] is not None and (isinstance(cfg[key], bool)
                                                    or not isinstance(cfg[key], (int, float))):
            raise ConfigError(f"lr_schedule.{key} must be a number, got {cfg[key]!r}")
    if "learning_rate" not in cfg:
        raise ConfigError("lr_schedule.learning_rate is required")
    total = cfg.get("total_steps")
    if total is None or total == -1:
        total = total_steps
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError(f"lr_schedule.total_steps must be a positive int or -1, got {total!r}")
    warmup = cfg.get("warmup_steps")
    if warmup is None:
        warmup = int(total * float(cfg.get("warmup_ratio") or 0.0))
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= total:
        raise ConfigError(f"lr_schedule warmup steps {warmup!r} must be an int in [0, {total}]")
    decay_steps = cfg.get("decay_steps")
    if decay_steps is not None and (isinstance(decay_steps, bool) or not isinstance(decay_steps, int)
                                    or decay_steps < 1):
        raise ConfigError(f"lr_schedule.decay_steps must be a positive int, got {decay_steps!r}")
    sched = WarmupSchedule(cfg["learning_rate"], warmup, total, cfg.get("lr_end", 0.0) or 0.0,
                           cfg.get("warmup_lr_init", 0.0) or 0.0, cfg.get("num_cycles", 0.5),
                           cosine=(kind == "CosineWithWarmUpLR"), decay_steps=decay_steps)
    logger.info("lr schedule %s: lr %g, warmup %d, total %d", kind, sched.learning_rate, warmup, total)
    return sched
