"""Tensor-parallel building blocks (Megatron style) for the Llama family, in MindSpore.

Every layer holds only its rank's slice; the communication is explicit through the conjugate
pair in `parallel/comm.py`:
- column-parallel linear: weight `[out/mp, in]`, output stays split over mp;
- row-parallel linear: weight `[out, in/mp]`, partial outputs are summed over mp (g);
- vocab-parallel embedding: rows `[vocab/mp, hidden]`, out-of-range ids give zeros, then g;
- vocab-parallel cross-entropy: log-sum-exp of each shard, combined across mp with a
  differentiable all-reduce of a zero-padded `[tokens, mp]` buffer (CPU has SUM only).
Parameters are created as zeros of the local shape; the model fills them from global tensors.
Parameter names come from attribute names (MindSpore ignores `Parameter(name=...)` for
attributes), so attributes are named exactly as MindSpore Transformers names its weights.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..parallel.comm import CopyToModelParallel, ReduceFromModelParallel


class ShardableCell(nn.Cell):
    """A layer whose parameters may be optimizer-sharded: `_full(attr)` returns the parameter's
    model-parallel block, gathered by `<attr>_gather` (set by the model) when one is attached."""

    def _full(self, attr: str):
        param = getattr(self, attr)
        gather = getattr(self, attr + "_gather", None)
        return param if gather is None else gather(param)


def _zeros_param(shape, dtype, name) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, np.float32)).astype(dtype), name=name)


class RMSNorm(ShardableCell):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as HF Llama)."""

    def __init__(self, hidden: int, eps: float, param_dtype):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones((hidden,), np.float32)).astype(param_dtype),
                                name="weight")

    def construct(self, x):
        x32 = x.astype(ms.float32)
        var = ops.mean(x32 * x32, -1, True)
        return x32 * ops.rsqrt(var + self.eps) * self._full("weight").astype(ms.float32)


class ColumnParallelLinear(ShardableCell):
    """y = x W^T (+ b) with W split on its output dim: this rank holds `[out/mp, in]`.

    The input must already be replicated and wrapped by `CopyToModelParallel` by the caller
    (one f per block instead of one per projection).
    """

    def __init__(self, in_features: int, out_features: int, mp: int, has_bias: bool,
                 param_dtype, compute_dtype):
        super().__init__()
        if out_features % mp:
            raise ValueError(f"output size {out_features} not divisible by model_parallel {mp}")
        self.compute_dtype = compute_dtype
        self.weight = _zeros_param((out_features // mp, in_features), param_dtype, "weight")
        self.has_bias = has_bias
        if has_bias:
            self.bias = _zeros_param((out_features // mp,), param_dtype, "bias")

    def construct(self, x):
        y = ops.matmul(x.astype(self.compute_dtype), self._full("weight").astype(self.compute_dtype).T)
        if self.has_bias:
            y = y + self._full("bias").astype(self.compute_dtype)
        return y


class RowParallelLinear(ShardableCell):
    """y = (sum over mp of x_r W_r^T) + b: this rank holds `[out, in/mp]` and its input's shard.

    The bias `[out]` is replicated and added once, after the all-reduce (adding it before would
    count it mp times)."""

    def __init__(self, in_features: int, out_features: int, mp: int, group: Optional[str],
                 param_dtype, compute_dtype, has_bias: bool = False):
        super().__init__()
        if in_features % mp:
            raise ValueError(f"input size {in_features} not divisible by model_parallel {mp}")
        self.compute_dtype = compute_dtype
        self.weight = _zeros_param((out_features, in_features // mp), param_dtype, "weight")
        self.reduce = ReduceFromModelParallel(group)
        self.has_bias = has_bias
        if has_bias:
            self.bias = _zeros_param((out_features,), param_dtype, "bias")

    def construct(self, x):
        y = ops.matmul(x.astype(self.compute_dtype), self._full("weight").astype(self.compute_dtype).T)
        y = self.reduce(y)
        if self.has_bias:
            y = y + self._full("bias").astype(self.compute_dtype)
        return y


class VocabEmbedding(ShardableCell):
    """Token embedding, vocab-parallel (`split`) or replicated; parameter `embedding_weight`."""

    def __init__(self, vocab: int, hidden: int, split: bool, mp_rank: int, mp: int,
                 group: Optional[str], param_dtype, compute_dtype):
        super().__init__()
        self.split = split and mp > 1
        self.local_vocab = vocab // mp if self.split else vocab
        self.vocab_start = mp_rank * self.local_vocab if self.split else 0
        self.compute_dtype = compute_dtype
        self.embedding_weight = _zeros_param((self.local_vocab, hidden), param_dtype,
                                             "embedding_weight")
        self.reduce = ReduceFromModelParallel(group if self.split else None)

    def construct(self, input_ids):
        table = self._full("embedding_weight").astype(self.compute_dtype)
        if not self.split:
            return ops.gather(table, input_ids, 0)
        local = input_ids - self.vocab_start
        inside = ops.logical_and(local >= 0, local < self.local_vocab)
        local = ops.where(inside, local, ops.zeros_like(local))
        out = ops.gather(table, local, 0) * ops.expand_dims(inside.astype(self.compute_dtype), -1)
        return self.reduce(out)


def rotary_cos_sin(positions: np.ndarray, inv_freq: np.ndarray):
    """cos, sin of shape [B, 1, S, head_dim] for integer `positions` [B, S] and the
    `head_dim // 2` inverse frequencies `inv_freq` (`models.rope.inv_freq`; HF rotate-half)."""
    freqs = positions.astype(np.float64)[..., None] * inv_freq          # [B, S, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None]               # [B, 1, S, D]
    return (Tensor(np.cos(emb).astype(np.float32)), Tensor(np.sin(emb).astype(np.float32)))


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] (HF Llama convention)."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class Attention(nn.Cell):
    """Causal multi-head / grouped-query attention with heads split over mp.

    This rank holds query heads [r*H/mp, (r+1)*H/mp) and KV heads [r*K/mp, (r+1)*K/mp); with
    contiguous splits every local query head's KV head is local too.
    """

    def __init__(self, cfg, mp: int, group: Optional[str], param_dtype, compute_dtype):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.local_heads = cfg.num_heads // mp
        self.local_kv_heads = cfg.n_kv_heads // mp
        self.rep = self.local_heads // self.local_kv_heads
        self.compute_dtype = compute_dtype
        self.enter = CopyToModelParallel(group)
        bias = cfg.qkv_has_bias
        self.fused = cfg.qkv_concat
        if self.fused:
            # MindSpore Transformers' w_qkv: per KV group [its n_rep q heads, k head, v head];
            # a contiguous mp split hands every rank whole groups
            self.w_qkv = ColumnParallelLinear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.n_kv_heads)
                                              * hd, mp, bias, param_dtype, compute_dtype)
        else:
            self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * hd, mp, bias,
                                           param_dtype, compute_dtype)
            self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.n_kv_heads * hd, mp, bias,
                                           param_dtype, compute_dtype)
            self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.n_kv_heads * hd, mp, bias,
                                           param_dtype, compute_dtype)
        self.wo = RowParallelLinear(cfg.num_heads * hd, cfg.hidden_size, mp, group,
                                    param_dtype, compute_dtype, cfg.attn_proj_has_bias)

    def construct(self, x, cos, sin, mask, past=None):
        """x [B, S, hidden]; mask [B, 1, S, T] additive; past (k, v) [B, kv, P, D] or None.

        Returns (output [B, S, hidden], (k, v) including this step, for the KV cache)."""
        b, s, _ = x.shape
        x = self.enter(x)
        if self.fused:
            qkv = self.w_qkv(x).reshape(b, s, self.local_kv_heads, self.rep + 2, self.head_dim)
            q = qkv[:, :, :, :self.rep].reshape(b, s, self.local_heads, self.head_dim)
            k, v = qkv[:, :, :, self.rep], qkv[:, :, :, self.rep + 1]
        else:
            q = self.wq(x).reshape(b, s, self.local_heads, self.head_dim)
            k = self.wk(x).reshape(b, s, self.local_kv_heads, self.head_dim)
            v = self.wv(x).reshape(b, s, self.local_kv_heads, self.head_dim)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if past is not None:
            k = ops.concat((past[0], k), 2)
            v = ops.concat((past[1], v), 2)
        present = (k, v)
        if self.rep > 1:
            k = ops.repeat_interleave(k, self.rep, 1)
            v = ops.repeat_interleave(v, self.rep, 1)
        scores = ops.matmul(q.astype(ms.float32), k.astype(ms.float32).transpose(0, 1, 3, 2))
        scores = scores / float(np.sqrt(self.head_dim)) + mask
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        return self.wo(out), present


class FeedForward(nn.Cell):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x) (each with its bias under mlp_has_bias); w1, w3 (or
    fused w_gate_hidden) column-parallel, w2 row-parallel."""

    def __init__(self, cfg, mp: int, group: Optional[str], param_dtype, compute_dtype):
        super().__init__()
        self.enter = CopyToModelParallel(group)
        self.fused = cfg.qkv_concat
        bias = cfg.mlp_has_bias
        if self.fused:
            # MindSpore Transformers' w_gate_hidden: rows of w1 and w3 interleaved (2r, 2r+1),
            # so a contiguous mp split keeps each gate row with its up row (bias likewise)
            self.w_gate_hidden = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                                      mp, bias, param_dtype, compute_dtype)
        else:
            self.w1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, mp, bias,
                                           param_dtype, compute_dtype)
            self.w3 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, mp, bias,
                                           param_dtype, compute_dtype)
        self.w2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, mp, group,
                                    param_dtype, compute_dtype, bias)

    def construct(self, x):
        x = self.enter(x)
        if self.fused:
            gh = self.w_gate_hidden(x)
            gh = gh.reshape(gh.shape[:-1] + (gh.shape[-1] // 2, 2))
            return self.w2(ops.silu(gh[..., 0]) * gh[..., 1])
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class VocabParallelCrossEntropy(nn.Cell):
    """Per-token cross-entropy of logits split over mp on the vocab dim.

    Each rank computes its shard's log-sum-exp and target logit; both are combined with the
    differentiable g (all-reduce forward, identity backward), so the gradient each rank gets
    for its shard is softmax - one_hot restricted to the shard, as on one card.
    """

    def __init__(self, split: bool, mp_rank: int, mp: int, group: Optional[str]):
        super().__init__()
        self.split = split and mp > 1
        self.mp, self.mp_rank = mp, mp_rank
        self.reduce = ReduceFromModelParallel(group if self.split else None)
        onehot = np.zeros((1, mp), np.float32)
        onehot[0, mp_rank] = 1.0
        self.rank_onehot = Tensor(onehot)

    def construct(self, logits, labels):
        """logits [N, V_local] float32, labels [N] global ids (any value for masked tokens)."""
        local_vocab = logits.shape[-1]
        start = self.mp_rank * local_vocab if self.split else 0
        local = labels - start
        inside = ops.logical_and(local >= 0, local < local_vocab)
        local = ops.where(inside, local, ops.zeros_like(local))
        target = ops.gather_elements(logits, 1, local.reshape(-1, 1)).reshape(-1)
        target = target * inside.astype(logits.dtype)
        lse = ops.logsumexp(logits, 1, False)
        if not self.split:
            return lse - target
        all_lse = self.reduce(ops.expand_dims(lse, 1) * self.rank_onehot)   # [N, mp]
        return ops.logsumexp(all_lse, 1, False) - self.reduce(target)
