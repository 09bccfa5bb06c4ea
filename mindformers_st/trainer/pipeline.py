"""The GPipe schedule of one training step on this pipeline stage (explicit, PyNative).

Every rank of a stage runs the same schedule; neighbouring stages talk only through
`parallel.comm.p2p_transfer` on their 2-rank group, in the same order on both sides:
1. forward, micro-batch 0..n-1: receive the hidden state from the previous stage, run this
   stage under `mindspore.vjp` (the backward closure keeps the activations), send the output
   to the next stage. The last stage computes the loss and its gradients at once (value_and_grad
   with respect to the received hidden state and its weights).
2. backward, micro-batch n-1..0: receive the gradient of this stage's output from the next
   stage, apply the stored closure, send the gradient of this stage's input back.
Weights' gradients are summed over micro-batches; each micro-batch loss is divided by n, so
the result is the mean over micro-batches, as gradient accumulation computes it.
Tied embeddings: before the forwards the first stage's embedding reaches the last stage
(`model.shared_lm_weight`), which differentiates its loss with respect to it too; after the
backwards that gradient goes back over the same group and the first stage adds it to the
embedding's, so the table gets both its uses' gradients, as on one stage.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..models.llama import EMBEDDING
from ..parallel.comm import all_reduce_sum, p2p_transfer


class PipelineStage:
    """Runs `model.stage_construct` of this rank's stage over micro-batches (see the module).

    `model` must expose `is_first`, `is_last`, `stage_construct(hidden_in, input_ids, labels,
    lm_weight)`, `shared_lm_weight()` and `cfg.hidden_size`; `ctx` gives `prev_group`,
    `next_group` and `pp_group`."""

    def __init__(self, model, params: Sequence, ctx):
        self.model, self.params, self.ctx = model, list(params), ctx
        self.hidden_dtype = getattr(model, "compute_dtype", ms.float32)

    def run(self, micro_batches: List[Tuple[Tensor, Optional[Tensor]]]) -> Tuple[Tensor, List[Tensor]]:
        """(mean loss over the micro-batches on the last stage, 0 elsewhere; float32 gradients
        of this stage's weights summed over the micro-batches' (loss / n))."""
        model, n = self.model, len(micro_batches)
        first, last = model.is_first, model.is_last
        backs, input_grads = [], []
        loss_sum = Tensor(np.zeros((), np.float32))
        grad_sum = None
        lm_weight = model.shared_lm_weight() if hasattr(model, "shared_lm_weight") else None
        lm_grad = None if lm_weight is None else ops.zeros_like(lm_weight)

        def accumulate(grads):
            nonlocal grad_sum
            grads = [g.astype(ms.float32) for g in grads]
            grad_sum = grads if grad_sum is None else [a + g for a, g in zip(grad_sum, grads)]

        for ids, labels in micro_batches:
            b, s = ids.shape
            hidden = self._zeros(b, s - 1)
            if not first:
                hidden = p2p_transfer(hidden, self.ctx.prev_group)

            def stage_fn(h, w=None, ids=ids, labels=labels):
                out = model.stage_construct(h, ids, labels, w)
                return out / n if last else out

            if last and lm_weight is not None:
                grad_fn = ms.value_and_grad(stage_fn, (0, 1), self.params)
                loss, ((d_hidden, d_weight), grads) = grad_fn(hidden, lm_weight)
                lm_grad = lm_grad + d_weight
            elif last:
                grad_fn = ms.value_and_grad(stage_fn, 0, self.params)
                loss, (d_hidden, grads) = grad_fn(hidden)
            if last:
                loss_sum = loss_sum + loss
                accumulate(grads)
                input_grads.append(d_hidden)
            else:
                out, back = ms.vjp(stage_fn, hidden, weights=self.params)
                p2p_transfer(out, self.ctx.next_group)
                backs.append((back, out.shape, out.dtype))
        for m in reversed(range(n)):
            if not last:
                back, shape, dtype = backs[m]
                d_out = p2p_transfer(ops.zeros(shape, dtype), self.ctx.next_group)
                (d_hidden,), grads = back(d_out)
                accumulate(grads)
                backs[m] = None     # free this micro-batch's activations
            else:
                d_hidden = input_grads[m]
            if not first:
                p2p_transfer(d_hidden.astype(self.hidden_dtype), self.ctx.prev_group)
        if lm_weight is not None:
            # the last stage's gradient of the tied table, summed into the first stage's
            lm_grad = all_reduce_sum(lm_grad if last else ops.zeros_like(lm_grad),
                                     self.ctx.pp_group)
            if first:
                at = [p.name for p in self.params].index(EMBEDDING)
                grad_sum[at] = grad_sum[at] + lm_grad
        return loss_sum, grad_sum

    def _zeros(self, b: int, s: int) -> Tensor:
        return ops.zeros((b, s, self.model.cfg.hidden_size), self.hidden_dtype)
