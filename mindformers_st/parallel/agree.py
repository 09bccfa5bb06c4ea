"""Agreement between ranks on the main thread: every rank takes the same decision.

Built on one collective, the context's `all_reduce_sum` (ParallelContext: an AllReduce on the
world group, which the CPU backend has everywhere). With one rank each function answers locally.
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import CheckpointError


def _single(ctx) -> bool:
    # A ParallelContext built without communication (world_group None, e.g. a planning-only
    # or test context) has nobody to agree with: each rank decides alone.
    return ctx is None or ctx.world_size <= 1 or getattr(ctx, "world_group", "") is None


def all_reduce_sum(ctx, values: np.ndarray) -> np.ndarray:
    """Element-wise sum of `values` (small non-negative integers) over every rank."""
    if _single(ctx):
        return np.asarray(values).astype(np.int64)
    return np.asarray(ctx.all_reduce_sum(np.asarray(values))).astype(np.int64)


def all_ranks(ctx, flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank (one all-reduce; also a barrier)."""
    if _single(ctx):
        return bool(flag)
    total = all_reduce_sum(ctx, np.array([1 if flag else 0]))
    return int(total[0]) == ctx.world_size


def all_done(ctx, done: bool, ok: bool):
    """One all-reduce for a task every rank runs in the background: None while some rank's is
    not `done`, else True iff every rank's is also `ok` (the same answer on every rank)."""
    flags = np.array([1 if done else 0, 1 if done and ok else 0])
    if _single(ctx):
        return None if not done else bool(ok)
    total = all_reduce_sum(ctx, flags)
    if int(total[0]) < ctx.world_size:
        return None
    return int(total[1]) == ctx.world_size


def broadcast_json(ctx, obj):
    """Rank 0's `obj` (JSON-serialisable) on every rank, as two sum all-reduces."""
    if _single(ctx):
        return obj
    raw = json.dumps(obj).encode() if ctx.rank == 0 else b""
    n = int(all_reduce_sum(ctx, np.array([len(raw)]))[0])
    if n >= 1 << 24:
        raise CheckpointError(f"a record of {n} bytes is too large to share between ranks")
    buf = np.zeros(max(n, 1), np.int64)
    if ctx.rank == 0:
        buf[:n] = np.frombuffer(raw, np.uint8)
    data = all_reduce_sum(ctx, buf)[:n].astype(np.uint8).tobytes()
    return json.loads(data.decode())
