"""Balanced loading at the MindSpore edge (`balanced_load`): each rank has read and checked its
share of a job-wide read plan (`transform.read_plan`); this hands every shared block to the
other ranks that need it, through collectives over exactly those ranks.

Each stream of the plan (the shared blocks of one holder set) goes window by window through
`parallel.comm.share_bytes`: an AllReduce over the set's group where the reader of each byte
gives it and the others give zeros, carried as integers in float32 so the sum is the bytes
themselves, bit for bit, for every dtype. A stream over the whole job uses the world group's
AllGather of int32 words instead (`parallel.comm.gather_bytes`; CPU has it on the world group
only): each rank sends just the bytes it read. Every rank runs its streams in the plan's one global
order, so collectives on overlapping groups cannot wait on each other crosswise. Called on the
main thread, after the ranks agreed that every read succeeded (a reader's checksum failure is
raised by all ranks before anything is exchanged).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Mapping, Tuple

import numpy as np

from ..parallel.comm import gather_bytes, share_bytes
from ..parallel.context import group_for_ranks
from ..transform.read_plan import EXCHANGE_WINDOW, JobReadPlan

logger = logging.getLogger(__name__)

# A stream over the whole job goes through AllGather (bit-exact int32 words, each rank sending
# only its own bytes) instead of the float AllReduce; False forces the AllReduce everywhere
# (tests/checkpoint/balanced_worker.py runs both).
WORLD_GATHER = True


def share_reads(ctx, job: JobReadPlan, arrays: Mapping[str, np.ndarray],
                window: int = EXCHANGE_WINDOW) -> Tuple[Dict[str, np.ndarray], dict]:
    """({name: array} of every tensor this rank holds under `job`, stats): `arrays` (what this
    rank read, `job.reads_of(rank)`) plus the blocks the other readers sent. Collective: every
    rank of the job calls it with the same `job`. stats: bytes this rank read, received, the
    collectives it ran (of which `gathers` AllGathers), and the seconds it took."""
    rank = ctx.rank
    t0 = time.perf_counter()
    out: Dict[str, np.ndarray] = dict(arrays)
    collectives = gathers = received = 0
    groups: Dict[Tuple[int, ...], object] = {}
    for stream in job.streams_of(rank):
        if stream.ranks not in groups:
            groups[stream.ranks] = group_for_ranks(ctx, stream.ranks)
        group = groups[stream.ranks]
        gather = WORLD_GATHER and group is not None and group == ctx.world_group
        for start, stop in stream.windows(window):
            if gather:   # each rank sends only its bytes: int32 words, in rank order
                width = -(-max(stream.share_sizes(start, stop).values()) // 4) * 4
                rows = gather_bytes(stream.share_of(start, stop, rank, out), width, group)
                stream.receive_shares(start, stop, rank, dict(enumerate(rows)), out)
                gathers += 1
            else:
                total = share_bytes(stream.contribution(start, stop, rank, out), group)
                stream.receive(start, stop, rank, total, out)
            collectives += 1
        received += sum(n.nbytes for n in stream.needs if n.reader != rank)
    names = job.names_of(rank)
    missing = [n for n in names if n not in out]
    if missing:   # the plan gives every needed block a reader: this is a defect, not bad input
        raise RuntimeError(f"balanced_load: rank {rank} ended without {missing[:4]}")
    stats = {"read_bytes": sum(a.nbytes for a in arrays.values()), "received_bytes": received,
             "collectives": collectives, "gathers": gathers, "groups": len(groups),
             "seconds": time.perf_counter() - t0}
    logger.info("rank %d: balanced_load read %d bytes, received %d in %d collective(s) over %d "
                "group(s) in %.2f s", rank, stats["read_bytes"], received, collectives,
                len(groups), stats["seconds"])
    return {n: out[n] for n in names}, stats
