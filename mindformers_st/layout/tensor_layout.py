"""Which slice of a global tensor each rank holds, with MindSpore's layout semantics.

A `TensorLayout` is exactly what a MindSpore strategy file says about one parameter (device
matrix, tensor map, optimizer shard, pipeline stage) plus the global shape. Conventions, as in
MindSpore's `parallel/_tensor.py` and `train/_utils.py`:

- A rank's coordinate is its row-major index in `dev_matrix` (last axis varies fastest).
- `tensor_map[d] = k` splits tensor dim d over device axis `dev_matrix[-1-k]`; -1 leaves it whole;
  a tuple `(k1, k2, ...)` splits it over several axes, the first one most significant.
- Optimizer shard: dim 0 of the model-parallel slice is split again into `opt_weight_shard_size`
  parts (-1 = the whole replica group). The parts are spread over the replicated axes (the axes
  the tensor map does not use): with `r` the row-major index of the rank over those axes, the rank
  holds part `r % size`. `opt_weight_shard_step` (product of the device axes to the right of the
  replicated one) is carried for MindSpore's sake; the slice does not depend on it.
- All of `dev_matrix` is one pipeline stage; global rank = stage * prod(dev_matrix) + local rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from math import prod
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..caches import process_cache
from ..errors import LayoutError
from .slices import TensorSlice

logger = logging.getLogger(__name__)

MapEntry = Union[int, Tuple[int, ...]]


def _normalize_map_entry(entry) -> MapEntry:
    """One tensor_map entry as an int or a tuple of >= 2 device axes (-1s dropped)."""
    if isinstance(entry, (list, tuple)):
        axes = tuple(int(a) for a in entry if int(a) != -1)
        if not axes:
            return -1
        if len(axes) == 1:
            return axes[0]
        return axes
    return int(entry)


def _axes_of(entry: MapEntry) -> Tuple[int, ...]:
    """The device axes (tensor_map values) one entry uses, most significant first."""
    if isinstance(entry, tuple):
        return entry
    return () if entry == -1 else (entry,)


@dataclass(frozen=True)
class TensorLayout:
    """How one global tensor is spread over the ranks of one pipeline stage.

    `global_shape` may be None for a layout read from a strategy file without shapes (MindSpore's
    files do not record them); complete it with `with_global_shape` or `with_local_shape` before
    asking for slices.
    """

    global_shape: Optional[Tuple[int, ...]]
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[MapEntry, ...]
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0
    stage: int = 0

    def __post_init__(self):
        object.__setattr__(self, "dev_matrix", tuple(int(x) for x in self.dev_matrix))
        object.__setattr__(self, "tensor_map",
                           tuple(_normalize_map_entry(e) for e in self.tensor_map))
        if self.global_shape is not None:
            object.__setattr__(self, "global_shape", tuple(int(x) for x in self.global_shape))
        object.__setattr__(self, "opt_weight_shard_step", int(self.opt_weight_shard_step))
        object.__setattr__(self, "opt_weight_shard_size", int(self.opt_weight_shard_size))
        object.__setattr__(self, "stage", int(self.stage))
        self._validate()

    # ---- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        dm = self.dev_matrix
        if not dm or any(x < 1 for x in dm):
            raise LayoutError(f"dev_matrix {dm} must be a non-empty list of positive sizes")
        if self.stage < 0:
            raise LayoutError(f"pipeline stage {self.stage} must be >= 0")
        used: List[int] = []
        for d, entry in enumerate(self.tensor_map):
            for k in _axes_of(entry):
                if not 0 <= k < len(dm):
                    raise LayoutError(f"tensor_map {self.tensor_map}: value {k} on tensor dim {d} "
                                      f"names no axis of dev_matrix {dm} (valid 0..{len(dm) - 1} "
                                      f"or -1)")
                if k in used:
                    raise LayoutError(f"tensor_map {self.tensor_map} uses device axis {k} twice")
                used.append(k)
        if self.global_shape is None:
            return
        if len(self.global_shape) != len(self.tensor_map):
            raise LayoutError(f"tensor_map {self.tensor_map} has {len(self.tensor_map)} entries but "
                              f"the tensor has shape {self.global_shape}")
        for d, (size, parts) in enumerate(zip(self.global_shape, self.split_counts)):
            if size % parts:
                raise LayoutError(f"tensor dim {d} of size {size} (shape {self.global_shape}) is "
                                  f"not divisible by its {parts}-way split (dev_matrix {dm}, "
                                  f"tensor_map {self.tensor_map})")
        n = self.opt_shard_count
        if n > 1:
            if not self.global_shape:
                raise LayoutError("a 0-d tensor cannot have an optimizer shard")
            if self.replica_count % n:
                raise LayoutError(f"optimizer shard size {n} does not divide the replica group size "
                                  f"{self.replica_count} (dev_matrix {dm}, tensor_map "
                                  f"{self.tensor_map})")
            self._check_opt_shard_fits_axes(n)
            local0 = self.global_shape[0] // self.split_counts[0]
            if local0 % n:
                raise LayoutError(f"dim 0 of the model-parallel slice ({local0} of "
                                  f"{self.global_shape[0]}) is not divisible by the optimizer "
                                  f"shard size {n}")

    def _check_opt_shard_fits_axes(self, n: int) -> None:
        # MindSpore (_construct_tensor_layout_helper) takes whole replicated axes from the right
        # and may split only the last one it reaches; other sizes cannot be written to its files.
        remaining = n
        for axis in reversed(self.replicated_axes):
            size = self.dev_matrix[axis]
            if size == 1:
                continue
            if remaining >= size:
                if remaining % size:
                    break
                remaining //= size
            else:
                if size % remaining == 0:
                    remaining = 1
                break
            if remaining == 1:
                break
        if remaining != 1:
            raise LayoutError(f"optimizer shard size {n} cannot be laid over the replicated device "
                              f"axes {[self.dev_matrix[a] for a in self.replicated_axes]} of "
                              f"dev_matrix {self.dev_matrix} (MindSpore takes whole axes from the "
                              f"right and may split only the last one)")

    # ---- derived sizes ----------------------------------------------------------------------
    @property
    def device_num(self) -> int:
        """Ranks in this layout's stage (product of dev_matrix)."""
        return prod(self.dev_matrix)

    @cached_property   # a layout is frozen: derived values are computed once (hot in planning)
    def split_counts(self) -> Tuple[int, ...]:
        """Model-parallel parts per tensor dim (MindSpore's `_get_tensor_strategy`)."""
        return tuple(prod(self.dev_matrix[-1 - k] for k in _axes_of(e)) for e in self.tensor_map)

    @cached_property
    def replicated_axes(self) -> Tuple[int, ...]:
        """Indices into dev_matrix (left to right) that the tensor map does not use."""
        used = {len(self.dev_matrix) - 1 - k for e in self.tensor_map for k in _axes_of(e)}
        return tuple(i for i in range(len(self.dev_matrix)) if i not in used)

    @property
    def replica_count(self) -> int:
        """Ranks that hold the same model-parallel slice (before any optimizer shard)."""
        return prod(self.dev_matrix[i] for i in self.replicated_axes)

    @property
    def opt_shard_count(self) -> int:
        """Parts the optimizer shard cuts dim 0 of the model-parallel slice into (1 = none).

        As MindSpore, a zero step or size means no optimizer shard; -1 means the whole group."""
        if self.opt_weight_shard_step == 0 or self.opt_weight_shard_size == 0:
            return 1
        if self.opt_weight_shard_size == -1:
            return self.replica_count
        return self.opt_weight_shard_size

    @property
    def local_shape(self) -> Tuple[int, ...]:
        """The shape of the block every rank holds (all blocks have the same shape)."""
        shape = self._require_shape()
        local = [s // c for s, c in zip(shape, self.split_counts)]
        if local:
            local[0] //= self.opt_shard_count
        return tuple(local)

    def _require_shape(self) -> Tuple[int, ...]:
        if self.global_shape is None:
            raise LayoutError("this layout has no global shape (read from a strategy file without "
                              "shapes); call with_global_shape() or with_local_shape() first")
        return self.global_shape

    # ---- completing a layout read from a strategy file --------------------------------------
    def with_global_shape(self, shape: Sequence[int]) -> "TensorLayout":
        """The same layout for a tensor of global `shape` (LayoutError if it cannot be split)."""
        return replace(self, global_shape=tuple(int(x) for x in shape))

    def with_local_shape(self, local_shape: Sequence[int]) -> "TensorLayout":
        """The same layout, its global shape computed from the shape of one rank's block."""
        local = [int(x) for x in local_shape]
        if len(local) != len(self.tensor_map):
            raise LayoutError(f"local shape {tuple(local)} does not match tensor_map "
                              f"{self.tensor_map} ({len(self.tensor_map)} dims)")
        glob = [s * c for s, c in zip(local, self.split_counts)]
        if glob:
            glob[0] *= self.opt_shard_count
        return self.with_global_shape(glob)

    # ---- ranks and slices -------------------------------------------------------------------
    def ranks(self) -> range:
        """The global ranks of this layout's stage."""
        n = self.device_num
        return range(self.stage * n, (self.stage + 1) * n)

    def coordinate(self, rank: int) -> Tuple[int, ...]:
        """The rank's coordinate in dev_matrix (row-major, last axis fastest)."""
        if rank not in self.ranks():
            raise LayoutError(f"rank {rank} is not in pipeline stage {self.stage} "
                              f"(ranks {self.ranks().start}..{self.ranks().stop - 1})")
        local = rank - self.stage * self.device_num
        coord = []
        for size in reversed(self.dev_matrix):
            coord.append(local % size)
            local //= size
        return tuple(reversed(coord))

    def slice_for(self, rank: int) -> TensorSlice:
        """The block of the global tensor that `rank` holds."""
        return _slice_for(self, rank)

    def _compute_slice_for(self, rank: int) -> TensorSlice:
        shape = self._require_shape()
        coord = self.coordinate(rank)
        dm = self.dev_matrix
        counts = self.split_counts
        offsets, sizes = [], []
        for d, (size, entry) in enumerate(zip(shape, self.tensor_map)):
            index = 0
            for k in _axes_of(entry):  # first axis most significant
                axis = len(dm) - 1 - k
                index = index * dm[axis] + coord[axis]
            part = size // counts[d]
            offsets.append(index * part)
            sizes.append(part)
        n = self.opt_shard_count
        if n > 1:
            replica_index = 0
            for axis in self.replicated_axes:
                replica_index = replica_index * dm[axis] + coord[axis]
            part = sizes[0] // n
            offsets[0] += (replica_index % n) * part
            sizes[0] = part
        return TensorSlice(shape, tuple(offsets), tuple(sizes))

    def replica_group(self, rank: int) -> Tuple[int, ...]:
        """All ranks (ascending, `rank` included) holding the same block as `rank`."""
        mine = self.slice_for(rank)
        return tuple(r for r in self.ranks() if self.slice_for(r) == mine)

    def distinct_slices(self) -> Dict[TensorSlice, Tuple[int, ...]]:
        """Every distinct block, in order of its first holder, with the ranks holding it."""
        groups: Dict[TensorSlice, List[int]] = {}
        for r in self.ranks():
            groups.setdefault(self.slice_for(r), []).append(r)
        return {s: tuple(rs) for s, rs in groups.items()}

    def describe(self) -> str:
        """One-line human form, for messages and `inspect`."""
        opt = (f", opt shard {self.opt_shard_count}" if self.opt_shard_count > 1 else "")
        return (f"dev_matrix={list(self.dev_matrix)} tensor_map={list(self.tensor_map)}"
                f"{opt}, stage {self.stage}")


@process_cache(maxsize=1 << 16)
def _slice_for(layout: TensorLayout, rank: int) -> TensorSlice:
    # A model repeats a few layouts (one per kind of layer weight) over all its layers, and a
    # plan asks each for its rank's block: remembered by value (layouts and slices are frozen).
    return layout._compute_slice_for(rank)


def layouts_equivalent(a: TensorLayout, b: TensorLayout) -> bool:
    """True when two layouts give every rank the same block (the encodings may differ, e.g. -1
    versus an explicit optimizer shard size)."""
    if a.global_shape != b.global_shape or a.ranks() != b.ranks():
        return False
    return all(a.slice_for(r) == b.slice_for(r) for r in a.ranks())


def rank_slices(layouts: Iterable[Tuple[str, TensorLayout]], rank: int) -> Dict[str, TensorSlice]:
    """{name: block} for every layout whose stage contains `rank` (a rank's whole state)."""
    return {name: lay.slice_for(rank) for name, lay in layouts if rank in lay.ranks()}
