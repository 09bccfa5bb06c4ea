"""Save owners for `remove_redundancy`: every distinct slice is written by exactly one rank.

Each distinct block of each tensor is given to one rank of its replica group. The choice is
deterministic (every rank computes the same answer alone, without communication) and balances
the bytes each rank writes: largest blocks first, each to the least-loaded holder so far
(ties: lowest rank). This is the longest-processing-time rule, within 4/3 of optimal.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import LayoutError
from .param_table import ITEMSIZE
from .slices import TensorSlice
from .tensor_layout import TensorLayout

logger = logging.getLogger(__name__)

Owners = Dict[Tuple[str, TensorSlice], int]


def assign_owners(layouts: Mapping[str, TensorLayout], dtypes: Mapping[str, str]) -> Owners:
    """{(tensor name, distinct block): owning rank}; the owner always holds that block.

    `dtypes` gives each tensor's safetensors dtype (for its bytes); LayoutError if one is missing
    or unknown."""
    items: List[Tuple[int, str, TensorSlice, Tuple[int, ...]]] = []
    for name in sorted(layouts):
        dtype = dtypes.get(name)
        if dtype not in ITEMSIZE:
            raise LayoutError(f"tensor {name}: dtype {dtype!r} unknown; give assign_owners the "
                              f"safetensors dtype of every laid-out tensor")
        for block, holders in layouts[name].distinct_slices().items():
            items.append((block.numel * ITEMSIZE[dtype], name, block, holders))
    chosen = least_loaded([(nbytes, (name, block.offsets), holders)
                           for nbytes, name, block, holders in items])
    return {(name, block): owner for (_, name, block, _), owner in zip(items, chosen)}


def least_loaded(items: Sequence[Tuple[int, Any, Sequence[int]]],
                 load: Optional[Dict[int, int]] = None) -> List[int]:
    """For each item (nbytes, tie-break key, candidate ranks), the rank that takes it: largest
    items first, each to the candidate with the fewest bytes so far (ties: lowest rank),
    starting from `load` (bytes each rank already has; updated in place when given). The keys
    must be distinct and orderable, so every rank computes the same answer alone."""
    load = {} if load is None else load
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], items[i][1]))
    chosen: List[int] = [0] * len(items)
    for i in order:
        nbytes, _, holders = items[i]
        rank = min(holders, key=lambda r: (load.get(r, 0), r))
        chosen[i] = rank
        load[rank] = load.get(rank, 0) + nbytes
    return chosen


def owned_by(owners: Owners, rank: int) -> Dict[str, TensorSlice]:
    """{tensor name: block} that `rank` must write (a rank holds one block per tensor)."""
    return {name: block for (name, block), owner in owners.items() if owner == rank}


def bytes_per_rank(owners: Owners, dtypes: Mapping[str, str]) -> Dict[int, int]:
    """How many bytes each owning rank writes (ranks owning nothing are absent)."""
    load: Dict[int, int] = {}
    for (name, block), owner in owners.items():
        load[owner] = load.get(owner, 0) + block.numel * ITEMSIZE[dtypes[name]]
    return load
