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


def broadcast_json(ctx, obj, root: int = 0):
    """Rank `root`'s `obj` (JSON-serialisable) on every rank, as two sum all-reduces."""
    if _single(ctx):
        return obj
    raw = json.dumps(obj).encode() if ctx.rank == root else b""
    n = int(all_reduce_sum(ctx, np.array([len(raw)]))[0])
    if n >= 1 << 24:
        raise CheckpointError(f"a record of {n} bytes is too large to share between ranks")
    buf = np.zeros(max(n, 1), np.int64)
    if ctx.rank == root:
        buf[:n] = np.frombuffer(raw, np.uint8)
    data = all_reduce_sum(ctx, buf)[:n].astype(np.uint8).tobytes()
    return json.loads(data.decode())


def host_identity() -> str:
    """This machine: its host name and boot id (containers of two machines may share a name)."""
    import socket
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def on_one_host(ctx) -> bool:
    """True on every rank iff every rank runs on rank 0's machine (they share one page cache).
    Collective: rank 0's identity is shared, then the ranks agree (three all-reduces)."""
    if _single(ctx):
        return True
    return all_ranks(ctx, broadcast_json(ctx, host_identity()) == host_identity())


def first_failure(ctx, failure) -> tuple:
    """(the lowest rank whose `failure` is not None, that failure's text on one line) on every
    rank, so all can stop with the same message. Collective: every rank calls it, failed or
    not, once the ranks know that one failed."""
    text = " ".join(str(failure).split()) if failure is not None else None
    if _single(ctx):
        return (ctx.rank if ctx is not None else 0), text
    mine = np.zeros(ctx.world_size, np.int64)
    mine[ctx.rank] = failure is not None
    failed = np.flatnonzero(all_reduce_sum(ctx, mine))
    root = int(failed[0]) if failed.size else 0
    return root, broadcast_json(ctx, text, root)
