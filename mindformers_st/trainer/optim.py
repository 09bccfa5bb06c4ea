"""AdamW with MindSpore Transformers' state names: `adam_m.<param>`, `adam_v.<param>`, `global_step`.

`mindspore.nn.AdamWeightDecay` has the right names but keeps moments in the parameter dtype
(bf16 for bf16 models) and does no bias correction (measured on 2.10), so this is a small Cell
of our own: float32 moments (as FP32StateAdamWeightDecay), bias-corrected, decoupled weight
decay on matrices only (norms and biases are not decayed, as MindSpore Transformers groups them).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

OPTIMIZER_TYPES = ("AdamW", "AdamWeightDecay", "FP32StateAdamWeightDecay", "FusedAdamWeightDecay")
_KEYS = {"type", "betas", "beta1", "beta2", "eps", "weight_decay", "learning_rate"}


class AdamW(nn.Cell):
    """Decoupled-weight-decay Adam over `params` with a learning-rate schedule.

    State: `adam_m.<name>`, `adam_v.<name>` (float32, the parameter's local shape) and
    `global_step` (int32 [1], the number of updates done).
    """

    def __init__(self, params: Sequence[Parameter], lr_schedule, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__()
        self.params = list(params)
        self.lr_schedule = lr_schedule
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.global_step = Parameter(Tensor(np.zeros((1,), np.int32)), name="global_step",
                                     requires_grad=False)
        self.adam_m = [Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_m." + p.name,
                                 requires_grad=False) for p in self.params]
        self.adam_v = [Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_v." + p.name,
                                 requires_grad=False) for p in self.params]
        self.decay = [len(p.shape) >= 2 for p in self.params]

    @property
    def step_count(self) -> int:
        """Number of updates applied so far (the `global_step` parameter)."""
        return int(self.global_step.asnumpy()[0])

    def current_lr(self) -> float:
        """Learning rate the next update will use."""
        return float(self.lr_schedule.lr_at(self.step_count))

    def construct(self, grads):
        """Apply one update with float32 `grads` (same order as params); returns the lr used."""
        step = self.step_count
        lr = self.current_lr()
        t = step + 1
        c1 = 1.0 - self.beta1 ** t
        c2 = 1.0 - self.beta2 ** t
        for p, m, v, g, decay in zip(self.params, self.adam_m, self.adam_v, grads, self.decay):
            g = g.astype(ms.float32)
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * g * g
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            w = p.astype(ms.float32)
            if decay and self.weight_decay:
                w = w * (1.0 - lr * self.weight_decay)
            w = w - lr * (m_new / c1) / (ops.sqrt(v_new / c2) + self.eps)
            if p.dtype == ms.bfloat16:
                p.set_data(w.astype(p.dtype))   # CPU Assign has no bf16 kernel (measured)
            else:
                ops.assign(p, w.astype(p.dtype))
        self.global_step.set_data(Tensor(np.array([t], np.int32)))
        return lr

    # ---- numpy access for checkpoints ---------------------------------------------------
    def get_state_arrays(self) -> Dict[str, np.ndarray]:
        """`adam_m.<name>`, `adam_v.<name>` (local slices, float32) and `global_step` (int32 [1])."""
        out = {p.name: np.array(p.asnumpy()) for p in self.adam_m + self.adam_v}
        out["global_step"] = np.array(self.global_step.asnumpy())
        return out

    def set_state_arrays(self, arrays: Mapping[str, np.ndarray], strict: bool = True) -> List[str]:
        """Restore moments and global_step from `arrays`; CheckpointError on shape mismatch or
        (strict) on missing names. Returns the names set."""
        targets = {p.name: p for p in self.adam_m + self.adam_v}
        targets["global_step"] = self.global_step
        missing = sorted(set(targets) - set(arrays))
        if strict and missing:
            raise CheckpointError(f"optimizer state: missing {missing[:8]} in the checkpoint; "
                                  "resume needs the adam_m/adam_v moments and global_step")
        done = []
        for name, value in arrays.items():
            if name not in targets:
                continue
            p = targets[name]
            value = np.asarray(value)
            if name == "global_step":
                value = value.reshape(-1)[:1].astype(np.int32)
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"optimizer state {name}: shape {tuple(value.shape)} but "
                                      f"this rank holds {tuple(p.shape)}")
            p.set_data(Tensor(value.astype(np.int32 if name == "global_step" else np.float32)))
            done.append(name)
        return done


def build_optimizer(model, opt_cfg: Optional[Dict[str, Any]], lr_schedule) -> AdamW:
    """AdamW over `model.trainable_params()` from YAML `optimizer` (MindSpore Transformers keys:
    type, betas, eps, weight_decay; learning_rate is taken from `lr_schedule`)."""
    cfg = dict(opt_cfg or {"type": "AdamW"})
    kind = cfg.get("type", "AdamW")
    if kind not in OPTIMIZER_TYPES:
        raise ConfigError(f"optimizer.type {kind!r} is not supported; use one of {OPTIMIZER_TYPES} "
                          "(all run as AdamW with float32 moments)")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ConfigError(f"optimizer: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    if cfg.get("learning_rate") is not None:
        # As MindSpore Transformers, whose trainer hands the optimizer the lr_schedule.
        logger.warning("config key 'optimizer.learning_rate' = %r has no effect here: the "
                       "learning rate is lr_schedule's", cfg["learning_rate"])
    betas = cfg.get("betas", [cfg.get("beta1", 0.9), cfg.get("beta2", 0.999)])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
    for key, default in (("eps", 1e-8), ("weight_decay", 0.0)):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"optimizer.{key} must be a non-negative number, got {v!r}")
    return AdamW(model.trainable_params(), lr_schedule, tuple(betas), cfg.get("eps", 1e-8),
                 cfg.get("weight_decay", 0.0))
