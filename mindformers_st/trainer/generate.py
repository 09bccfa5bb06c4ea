"""Text generation with a KV cache: greedy or sampling (temperature, top_k, top_p), batched.

Prompts are LEFT-padded to a common length (the pad positions are masked out of attention and
positions count real tokens only), so every sequence decodes exactly as it would alone. The
vocab-parallel logits of the last position are gathered over mp (an all-reduce of a zero-padded
buffer, identical bits on every rank) and the token is chosen in numpy with a generator seeded
by `seed`: every rank of the job (all mp and dp ranks run the whole batch) picks the same tokens.
Under pipeline parallelism each decoding step runs the stages in turn (the hidden state moves to
the next stage by `p2p_transfer`), and the last stage's logits reach every stage through an
all-reduce over the pipeline group in which the other stages add zeros (exact).
"""
from __future__ import annotations

import logging
from typing import List, Sequence, Union

import numpy as np
from mindspore import Tensor

from ..parallel.comm import gather_last_dim, p2p_transfer

logger = logging.getLogger(__name__)


def generate(model, ctx, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int,
             do_sample: bool = False, top_k: int = 0, top_p: float = 1.0,
             temperature: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
             pad_token_id: int = 0, seed: int = 0,
             repetition_penalty: float = 1.0) -> List[List[int]]:
    """Each prompt followed by its generated tokens (prompt + new, no padding).

    A sequence stops after emitting an eos token (kept in the output) or after
    `max_new_tokens`; decoding stops when all sequences have stopped. top_k 0 and top_p 1.0
    disable those filters; temperature applies only when sampling. repetition_penalty > 1
    lowers the logits of tokens the sequence already holds (prompt and generated), as Hugging
    Face and MindSpore Transformers do: divided when positive, multiplied when negative.
    """
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else
        {int(e) for e in eos_token_id})
    rng = np.random.default_rng(seed)
    b = len(prompts_ids)
    width = max(len(p) for p in prompts_ids)
    ids = np.full((b, width), pad_token_id, np.int32)
    mask = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts_ids):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    outputs = [list(map(int, p)) for p in prompts_ids]
    done = np.zeros(b, bool)
    cache = None
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        last, cache = _next_logits(model, ctx, step_ids, mask, step_pos, cache)
        if repetition_penalty != 1.0:
            last = _penalize_repeats(last, outputs, repetition_penalty)
        nxt = _choose(last, rng, do_sample, top_k, top_p, temperature)
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(nxt[i]))
                if int(nxt[i]) in eos:
                    done[i] = True
        if done.all():
            break
        nxt = np.where(done, pad_token_id, nxt).astype(np.int32)
        step_ids = nxt[:, None]
        step_pos = positions[:, -1:] + 1
        positions = np.concatenate([positions, step_pos], axis=1)
        mask = np.concatenate([mask, np.ones((b, 1), np.int32)], axis=1)
    return outputs


def _next_logits(model, ctx, step_ids, mask, step_pos, cache):
    """([B, V] float32 numpy logits of the last position, this stage's extended KV cache)."""
    if getattr(model, "num_stages", 1) == 1:
        logits, cache = model.forward_logits(Tensor(step_ids), mask, step_pos, cache)
        return full_vocab_logits(model, ctx, logits[:, -1, :]), cache
    import mindspore as ms
    from mindspore import ops
    b, s = step_ids.shape
    lm_weight = model.shared_lm_weight()   # tied embeddings: the first stage's table, else None
    inputs = Tensor(step_ids)
    if not model.is_first:
        inputs = p2p_transfer(ops.zeros((b, s, model.cfg.hidden_size), model.compute_dtype),
                              ctx.prev_group)
    h, cache = model.forward_hidden(inputs, mask, step_pos, cache)
    if model.is_last:
        last = full_vocab_logits(model, ctx, model.logits_of(h, lm_weight)[:, -1, :])
    else:
        p2p_transfer(h, ctx.next_group)
        last = np.zeros((b, model.cfg.vocab_size), np.float32)
    out = ops.AllReduce(group=ctx.pp_group)(Tensor(last.astype(np.float32), ms.float32))
    return out.asnumpy(), cache


def full_vocab_logits(model, ctx, local_logits: Tensor) -> np.ndarray:
    """[B, V] float32 numpy logits over the whole vocabulary from this rank's shard."""
    if getattr(model, "split_vocab", False) and ctx.mp_group is not None:
        full = gather_last_dim(local_logits, ctx.mp_group, ctx.mp_rank, ctx.config.model_parallel)
        return full.asnumpy()
    return local_logits.asnumpy().astype(np.float32)


def _penalize_repeats(logits: np.ndarray, seqs: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """Logits with every token already in each sequence made less likely by `penalty`."""
    out = logits.copy()
    for i, seq in enumerate(seqs):
        seen = np.unique(np.asarray(seq, np.int64))
        seen = seen[(seen >= 0) & (seen < out.shape[-1])]
        vals = out[i, seen]
        out[i, seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _choose(logits: np.ndarray, rng: np.random.Generator, do_sample: bool, top_k: int,
            top_p: float, temperature: float) -> np.ndarray:
    """Next token per row: argmax, or a sample from the filtered, tempered distribution."""
    logits = logits.astype(np.float64)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(float(temperature), 1e-6)
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])
