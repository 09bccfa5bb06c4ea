"""The job-wide read plan of a load: every block any rank needs is read from storage by exactly
one rank, and reaches the other ranks that need it through collectives (`balanced_load`).

Every rank's own load plan (`plan_rank_slices`) is a pure function of the source description
and the job's layouts, so each rank computes every other rank's plan alone and they all reach
the same job plan without talking. From those plans:
- a *need* is one target block (same tensor, dtype, shape and global block — the same bytes
  whichever replica is read) with the ranks that need it (its holders);
- each need gets one reader among its holders, balanced by bytes over the job: blocks only one
  rank needs are read by it, the shared ones go largest first to the holder that reads the
  fewest bytes so far (`layout.owners.least_loaded`, the rule the save owners follow);
- the shared needs of one holder set form a *stream*: their bytes end to end, exchanged in
  windows of at most `window` bytes, each one collective over exactly that set. Every rank
  runs the windows of its streams in the one global order of `JobReadPlan.streams`, so
  collectives on overlapping groups never wait on each other crosswise.
Pure: no MindSpore, no file touched (checkpoint/exchange.py moves the bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import numpy as np

from ..dtypes import ST_TO_NUMPY
from ..errors import PlanError
from ..layout.owners import least_loaded
from .plan import Plan, TargetFile, TargetTensor

EXCHANGE_WINDOW = 24 << 20   # bytes per collective (its float buffer is 4/3 of it: 32 MiB)


def need_key(t: TargetTensor) -> Tuple[Any, ...]:
    """What makes two ranks' targets the same bytes: the tensor, dtype, shape and global block
    (any replica of a block holds the same values); a target without a global block (a hyper
    value) is the same only when it is copied from the same place."""
    where = t.global_slice if t.global_slice is not None else t.ops
    return (t.name, t.dtype, tuple(t.shape), t.global_name, where)


def _order_key(t: TargetTensor) -> Tuple[Any, ...]:
    sl = t.global_slice
    return (t.name, sl.offsets if sl is not None else (), repr(t.ops) if sl is None else "")


@dataclass(frozen=True)
class Need:
    """One target block: the reader's target (its ops say which file bytes it reads), the
    ranks that need it (ascending) and the one rank that reads it."""

    target: TargetTensor
    holders: Tuple[int, ...]
    reader: int

    @property
    def nbytes(self) -> int:
        return self.target.nbytes


@dataclass(frozen=True)
class Stream:
    """The shared needs of one holder set, end to end: need i occupies bytes
    [offsets[i], offsets[i] + needs[i].nbytes) of a stream of `nbytes` bytes."""

    ranks: Tuple[int, ...]
    needs: Tuple[Need, ...]
    offsets: Tuple[int, ...]
    nbytes: int

    def windows(self, window: int = EXCHANGE_WINDOW) -> Iterator[Tuple[int, int]]:
        """[start, stop) byte windows covering the stream, each at most `window` bytes."""
        if window <= 0:
            raise PlanError(f"exchange window must be positive, got {window}")
        for start in range(0, self.nbytes, window):
            yield start, min(self.nbytes, start + window)

    def contribution(self, start: int, stop: int, rank: int,
                     arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The window's bytes as `rank` adds them to the collective: the bytes of the needs it
        read (from `arrays`), zeros elsewhere — so the sum over the stream's ranks is the
        window, each byte given by exactly one rank."""
        buf = np.zeros(stop - start, np.uint8)
        for need, at, pos, n in self.pieces(start, stop):
            if need.reader == rank:
                buf[pos:pos + n] = _bytes_of(arrays[need.target.name])[at:at + n]
        return buf

    def receive(self, start: int, stop: int, rank: int, window: np.ndarray,
                arrays: Dict[str, np.ndarray]) -> None:
        """Copy the window's bytes (the collective's result, uint8) into the arrays of the
        needs `rank` did not read, creating them (empty, the target's dtype and shape) first."""
        for need, at, pos, n in self.pieces(start, stop):
            if need.reader != rank:
                _target_bytes(need.target, arrays)[at:at + n] = window[pos:pos + n]

    def share_sizes(self, start: int, stop: int) -> Dict[int, int]:
        """{rank: bytes of the window it read} for every rank of the stream (0 for some)."""
        sizes = {r: 0 for r in self.ranks}
        for need, _, _, n in self.pieces(start, stop):
            sizes[need.reader] += n
        return sizes

    def share_of(self, start: int, stop: int, rank: int,
                 arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The bytes of the window `rank` read, end to end in stream order (what it gives to a
        gather: no zeros for the others' bytes)."""
        parts = [_bytes_of(arrays[need.target.name])[at:at + n]
                 for need, at, _, n in self.pieces(start, stop) if need.reader == rank]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def receive_shares(self, start: int, stop: int, rank: int,
                       shares: Mapping[int, np.ndarray], arrays: Dict[str, np.ndarray]) -> None:
        """Like `receive`, from every reader's `share_of` the window (uint8, any padding
        after it ignored)."""
        at_reader = {r: 0 for r in self.ranks}
        for need, at, _, n in self.pieces(start, stop):
            pos = at_reader[need.reader]
            at_reader[need.reader] += n
            if need.reader != rank:
                _target_bytes(need.target, arrays)[at:at + n] = shares[need.reader][pos:pos + n]

    def pieces(self, start: int, stop: int) -> Iterator[Tuple[Need, int, int, int]]:
        """(need, byte offset inside the need, offset inside the window, length) for every need
        overlapping the window [start, stop)."""
        for need, off in zip(self.needs, self.offsets):
            lo, hi = max(start, off), min(stop, off + need.nbytes)
            if lo < hi:
                yield need, lo - off, lo - start, hi - lo


@dataclass(frozen=True)
class JobReadPlan:
    """Who reads what in one load over the whole job (see the module docstring)."""

    needs: Tuple[Need, ...]
    streams: Tuple[Stream, ...]   # the global collective order

    def reads_of(self, rank: int) -> Plan:
        """What `rank` reads from storage, as one in-memory target for `execute_to_memory`."""
        tensors = tuple(n.target for n in self.needs if n.reader == rank)
        return Plan("rank_reads", (TargetFile(f"rank_{rank}", tensors),), (),
                    f"balanced reads of rank {rank}: {len(tensors)} tensors")

    def streams_of(self, rank: int) -> List[Stream]:
        """The streams `rank` takes part in, in the global order."""
        return [s for s in self.streams if rank in s.ranks]

    def names_of(self, rank: int) -> List[str]:
        """The tensors `rank` holds once the exchange is done."""
        return [n.target.name for n in self.needs if rank in n.holders]

    def bytes_read(self) -> Dict[int, int]:
        """Bytes each rank reads from storage (ranks reading nothing are absent)."""
        out: Dict[int, int] = {}
        for n in self.needs:
            out[n.reader] = out.get(n.reader, 0) + n.nbytes
        return out


def _bytes_of(arr: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array (no copy)."""
    return arr.reshape(-1).view(np.uint8)


def _target_bytes(t, arrays: Dict[str, np.ndarray]) -> np.ndarray:
    """The bytes of target `t`'s array in `arrays`, created (empty, its dtype and shape) when
    this rank has none yet."""
    arr = arrays.get(t.name)
    if arr is None:
        arr = arrays[t.name] = np.empty(t.shape, dtype=ST_TO_NUMPY[t.dtype])
    return _bytes_of(arr)


def plan_job_reads(plans: Mapping[int, Plan]) -> JobReadPlan:
    """The job plan from every rank's own load plan ({rank: Plan}, e.g. `plan_rank_slices` of
    each rank). Each rank's plan must name each target once. Deterministic: the same plans give
    the same JobReadPlan on every rank."""
    found: Dict[Tuple[Any, ...], Dict[int, TargetTensor]] = {}
    for rank in sorted(plans):
        seen = set()
        for f in plans[rank].files:
            for t in f.tensors:
                if t.name in seen:
                    raise PlanError(f"rank {rank}: tensor {t.name!r} is planned twice")
                seen.add(t.name)
                found.setdefault(need_key(t), {})[rank] = t
    keys = sorted(found, key=lambda k: _order_key(next(iter(found[k].values()))))
    load: Dict[int, int] = {}
    shared = []
    for k in keys:   # a block only one rank needs is read by it, and counts towards its load
        holders = tuple(sorted(found[k]))
        t = found[k][holders[0]]
        if len(holders) == 1:
            load[holders[0]] = load.get(holders[0], 0) + t.nbytes
        else:
            shared.append((t.nbytes, _order_key(t), holders))
    readers = iter(least_loaded(shared, load))
    needs: List[Need] = []
    for k in keys:
        holders = tuple(sorted(found[k]))
        reader = holders[0] if len(holders) == 1 else next(readers)
        needs.append(Need(found[k][reader], holders, reader))
    by_set: Dict[Tuple[int, ...], List[Need]] = {}
    for n in needs:
        if len(n.holders) > 1:
            by_set.setdefault(n.holders, []).append(n)
    streams = []
    for ranks in sorted(by_set, key=lambda rs: (len(rs), rs)):
        offsets, pos = [], 0
        for n in by_set[ranks]:
            offsets.append(pos)
            pos += n.nbytes
        streams.append(Stream(ranks, tuple(by_set[ranks]), tuple(offsets), pos))
    return JobReadPlan(tuple(needs), tuple(streams))
