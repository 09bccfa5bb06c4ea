"""Save owners for `remove_redundancy`: every distinct slice is written by exactly one rank.

Each distinct block of each tensor is given to one rank of its replica group. The choice is
deterministic (every rank computes the same answer alone, without communication) and balances
the bytes each rank writes: largest blocks first, each to the least-loaded holder so far
(ties: lowest rank). This is the longest-processing-time rule, within 4/3 of optimal.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Tuple

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
    # Largest first; name and offsets break ties so every rank sorts the same way.
    items.sort(key=lambda it: (-it[0], it[1], it[2].offsets))
    load: Dict[int, int] = {}
    owners: Owners = {}
    for nbytes, name, block, holders in items:
        owner = min(holders, key=lambda r: (load.get(r, 0), r))
        owners[(name, block)] = owner
        load[owner] = load.get(owner, 0) + nbytes
    return owners


def owned_by(owners: Owners, rank: int) -> Dict[str, TensorSlice]:
    """{tensor name: block} that `rank` must write (a rank holds one block per tensor)."""
    return {name: block for (name, block), owner in owners.items() if owner == rank}


def bytes_per_rank(owners: Owners, dtypes: Mapping[str, str]) -> Dict[int, int]:
    """How many bytes each owning rank writes (ranks owning nothing are absent)."""
    load: Dict[int, int] = {}
    for (name, block), owner in owners.items():
        load[owner] = load.get(owner, 0) + block.numel * ITEMSIZE[dtypes[name]]
    return load
