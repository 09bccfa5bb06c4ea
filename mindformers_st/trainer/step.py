"""One training step: forward, backward, dp-mean gradient all-reduce, global-norm clipping, AdamW.

Input is THIS rank's data-parallel share of the global batch (`ParallelContext.local_batch`
cuts it); every mp rank of a dp group gets the same rows. The loss returned is the dp mean of
the local losses (the global-batch loss when every share counts the same number of tokens).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..errors import ConfigError
from ..parallel.comm import all_reduce_sum

logger = logging.getLogger(__name__)


class TrainStep:
    """`step(input_ids, labels=None) -> float loss`; after a call, `last_lr`, `last_grad_norm`,
    `last_loss` describe it and `step_count` is the optimizer's global_step.

    Gradient norm: sum of squares of mp-split parameters' local gradients is summed over the mp
    group; replicated parameters (identical gradients on every mp rank) are counted once. Every
    rank therefore uses the same clipping factor and replicated weights stay identical.
    clip_norm <= 0 or None disables clipping (the norm is still computed and reported).

    Pipeline parallel (pipeline_stage > 1): the rows are cut into `micro_batch_num`
    micro-batches run by the GPipe schedule of `trainer.pipeline` (gradient_accumulation_steps
    does not apply, as in MindSpore Transformers); each stage averages its own gradients over
    dp, the norm is summed over every rank of every stage, and the last stage's loss is made
    known to all ranks in the same all-reduce.
    """

    def __init__(self, model, optimizer, ctx, clip_norm: Optional[float] = 1.0,
                 accumulation_steps: int = 1):
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.clip_norm = clip_norm
        if int(accumulation_steps) < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {accumulation_steps}")
        self.accumulation_steps = int(accumulation_steps)
        self.params = list(optimizer.params)
        layouts = model.layouts()
        self.split = [any(_split(e) for e in layouts[p.name].tensor_map) for p in self.params]
        # optimizer-sharded parameters: their gradient arrives already dp-averaged (the gather's
        # backward), and each rank holds a distinct part of it
        sharded = getattr(model, "opt_sharded", set())
        self.sharded = [p.name in sharded for p in self.params]
        self.stages = ctx.config.pipeline_stage
        if self.stages > 1:
            from .pipeline import PipelineStage
            if self.accumulation_steps > 1:
                raise ConfigError("gradient_accumulation_steps > 1 with pipeline_stage > 1: "
                                  "the pipeline's micro_batch_num already accumulates; set "
                                  "gradient_accumulation_steps to 1")
            self.micro_batches = int(ctx.config.micro_batch_num)
            self.pipeline = PipelineStage(model, self.params, ctx)
        else:
            self.grad_fn = ms.value_and_grad(model, None, self.params)
        self.last_lr: Optional[float] = None
        self.last_grad_norm: Optional[float] = None
        self.last_loss: Optional[float] = None
        self.updating = False
        # Called with no arguments after the gradients are computed and before the optimizer
        # changes any weight or moment: an async checkpoint save copies its snapshot during the
        # forward/backward and waits here until the copy is done (checkpoint/monitor.py).
        self.before_update: List = []

    @property
    def step_count(self) -> int:
        return self.optimizer.step_count

    def __call__(self, input_ids, labels=None) -> float:
        if self.stages > 1:
            loss, grads = self._pipeline_grads(input_ids, labels)
            grads, loss_value = self._dp_mean(grads, loss)
            norm, loss_value = self._pipeline_norm_and_loss(grads, loss_value)
        else:
            loss, grads = self._accumulated_grads(input_ids, labels)
            grads, loss_value = self._dp_mean(grads, loss)
            norm = self._global_norm(grads)
        if self.clip_norm and self.clip_norm > 0 and norm > self.clip_norm:
            scale = self.clip_norm / (norm + 1e-6)
            grads = [g * scale for g in grads]
        for hook in list(self.before_update):
            hook()
        # True while weights and moments are being changed: an exception in this window leaves
        # a mix of two steps, which exception_save must not save (trainer/stop.py).
        self.updating = True
        self.last_lr = float(self.optimizer(grads))
        self.updating = False
        self.last_grad_norm, self.last_loss = norm, loss_value
        return loss_value

    def _accumulated_grads(self, input_ids, labels):
        """Loss and fp32 gradients of this rank's rows, averaged over `accumulation_steps`
        equal micro-batches run one after another (one optimizer update for all of them, as
        MindSpore Transformers' gradient_accumulation_steps)."""
        k = self.accumulation_steps
        if not isinstance(input_ids, Tensor):
            input_ids = np.asarray(input_ids)
        if labels is not None and not isinstance(labels, Tensor):
            labels = np.asarray(labels)
        rows = int(input_ids.shape[0])
        if rows % k:
            raise ConfigError(f"this rank got {rows} rows per step, not divisible into "
                              f"gradient_accumulation_steps={k} micro-batches")
        mb = rows // k
        loss_sum, grad_sum = None, None
        for i in range(k):
            ids = _tensor(input_ids[i * mb:(i + 1) * mb])
            if labels is None:
                loss, grads = self.grad_fn(ids)
            else:
                loss, grads = self.grad_fn(ids, _tensor(labels[i * mb:(i + 1) * mb]))
            grads = [g.astype(ms.float32) for g in grads]
            if grad_sum is None:
                loss_sum, grad_sum = loss, grads
            else:
                loss_sum = loss_sum + loss
                grad_sum = [a + g for a, g in zip(grad_sum, grads)]
        if k == 1:
            return loss_sum, grad_sum
        return loss_sum / k, [g / k for g in grad_sum]

    def _pipeline_grads(self, input_ids, labels):
        """This stage's (loss, gradients) of this rank's rows cut into micro_batch_num
        micro-batches and run by the pipeline schedule."""
        if not isinstance(input_ids, Tensor):
            input_ids = np.asarray(input_ids)
        if labels is not None and not isinstance(labels, Tensor):
            labels = np.asarray(labels)
        rows, n = int(input_ids.shape[0]), self.micro_batches
        if rows % n:
            raise ConfigError(f"this rank got {rows} rows per step, not divisible into "
                              f"micro_batch_num={n} micro-batches")
        mb = rows // n
        batches = [(_tensor(input_ids[i * mb:(i + 1) * mb]),
                    None if labels is None else _tensor(labels[i * mb:(i + 1) * mb]))
                   for i in range(n)]
        return self.pipeline.run(batches)

    def _pipeline_norm_and_loss(self, grads: List[Tensor], stage_loss: float):
        """(global gradient norm, loss) under pipeline parallelism, from ONE world all-reduce.

        Each rank adds its share of the squared norm: an optimizer-sharded block is distinct
        on every rank (weight 1), an mp-split one is repeated on the dp ranks of its stage
        (1/dp), a replicated one on all dp x mp ranks of its stage (1/(dp x mp)). The loss
        (already the dp mean on the last stage) is added by one rank only, so it arrives exact."""
        dp, mp = self.ctx.config.data_parallel, self.ctx.config.model_parallel
        squares = ops.stack([ops.sum(g * g) for g in grads]).asnumpy().astype(np.float64)
        split, sharded = np.array(self.split, bool), np.array(self.sharded, bool)
        mine = (squares[sharded].sum() + squares[split & ~sharded].sum() / dp
                + squares[~split & ~sharded].sum() / (dp * mp))
        stage, dp_idx, mp_idx = self.ctx.coords
        says_loss = stage == self.stages - 1 and dp_idx == 0 and mp_idx == 0
        both = all_reduce_sum(Tensor(np.array([mine, stage_loss if says_loss else 0.0],
                                              np.float32)), self.ctx.world_group).asnumpy()
        return float(np.sqrt(max(float(both[0]), 0.0))), float(both[1])

    def _dp_mean(self, grads: List[Tensor], loss: Tensor):
        """Average gradients and the loss over the dp group with ONE all-reduce (flat buffer)."""
        group, dp = self.ctx.dp_group, self.ctx.config.data_parallel
        if group is None:
            return grads, float(loss.asnumpy())
        todo = [g for g, s in zip(grads, self.sharded) if not s]
        flat = ops.concat([g.reshape(-1) for g in todo] + [loss.astype(ms.float32).reshape(1)])
        flat = all_reduce_sum(flat, group) / float(dp)
        out, off = [], 0
        for g, sharded in zip(grads, self.sharded):
            if sharded:
                out.append(g)
                continue
            n = int(np.prod(g.shape))
            out.append(flat[off:off + n].reshape(g.shape))
            off += n
        return out, float(flat[off:off + 1].asnumpy()[0])

    def _global_norm(self, grads: List[Tensor]) -> float:
        """sqrt of the sum of squares over DISTINCT gradient blocks of the whole model."""
        squares = ops.stack([ops.sum(g * g) for g in grads]).asnumpy().astype(np.float64)
        split, sharded = np.array(self.split, bool), np.array(self.sharded, bool)
        sq_sharded = float(squares[sharded].sum())             # distinct on every rank
        sq_split = float(squares[split & ~sharded].sum())      # distinct over mp, same over dp
        sq_once = float(squares[~split & ~sharded].sum())      # the same on every rank
        if sharded.any():
            both = all_reduce_sum(Tensor(np.array([sq_sharded, sq_split], np.float32)),
                                  self.ctx.world_group).asnumpy()
            total = float(both[0]) + float(both[1]) / self.ctx.config.data_parallel + sq_once
        elif self.ctx.mp_group is not None:
            total = float(all_reduce_sum(Tensor(np.array([sq_split], np.float32)),
                                         self.ctx.mp_group).asnumpy()[0]) + sq_once
        else:
            total = sq_split + sq_once
        return float(np.sqrt(total))


def _split(entry) -> bool:
    if isinstance(entry, tuple):
        return any(e != -1 for e in entry)
    return entry != -1


def _tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x.astype(ms.int32)
    return Tensor(np.asarray(x).astype(np.int32))
