"""The one description of a slice of a global tensor: global shape, offset and extent per dim.

Everything that moves bytes (layouts, owners, plans, the engine) speaks in `TensorSlice`s.
Pure Python; no numpy needed except for `index()` consumers.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Optional, Tuple

from ..caches import process_cache
from ..fast_init import fast_init


@fast_init
@dataclass(frozen=True, order=True)
class TensorSlice:
    """A rectangular block of a global tensor.

    `offsets[d]` is where the block starts on dimension d, `sizes[d]` how many elements it spans.
    A whole tensor is `TensorSlice.whole(shape)`. A 0-d tensor has empty tuples.
    """

    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]

    def __post_init__(self):
        if block_inside(self.global_shape, self.offsets, self.sizes):
            return
        if not (len(self.global_shape) == len(self.offsets) == len(self.sizes)):
            raise ValueError(f"TensorSlice rank mismatch: shape {self.global_shape}, "
                             f"offsets {self.offsets}, sizes {self.sizes}")
        for d, (g, o, s) in enumerate(zip(self.global_shape, self.offsets, self.sizes)):
            if not block_inside((g,), (o,), (s,)):   # name the first dimension it leaves
                raise ValueError(f"TensorSlice dim {d}: offset {o} + size {s} outside global "
                                 f"size {g}")

    @classmethod
    def _trusted(cls, global_shape, offsets, sizes) -> "TensorSlice":
        """A slice known valid by construction (a part of valid slices: an intersection, a
        remainder): built without re-checking, as box arithmetic in hot loops makes many."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "global_shape", global_shape)
        object.__setattr__(obj, "offsets", offsets)
        object.__setattr__(obj, "sizes", sizes)
        return obj

    @staticmethod
    def whole(shape) -> "TensorSlice":
        """The slice covering all of a tensor of `shape` (the same object for an equal shape:
        a checkpoint's tensors share a few shapes)."""
        return _whole(tuple(shape))

    @property
    def numel(self) -> int:
        """Number of elements in the block."""
        return prod(self.sizes)

    @property
    def is_whole(self) -> bool:
        """True when the block is the entire tensor."""
        return self.sizes == self.global_shape

    def index(self) -> Tuple[slice, ...]:
        """Python slices selecting this block out of the global array."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: "TensorSlice") -> Optional["TensorSlice"]:
        """The overlap of two blocks of the same tensor, or None when they do not overlap."""
        if self.global_shape != other.global_shape:
            raise ValueError(f"cannot intersect slices of different tensors: "
                             f"{self.global_shape} vs {other.global_shape}")
        offs, sizes = [], []
        for a_o, a_s, b_o, b_s in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(a_o, b_o), min(a_o + a_s, b_o + b_s)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return TensorSlice._trusted(self.global_shape, tuple(offs), tuple(sizes))

    def relative_to(self, outer: "TensorSlice") -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(offsets, sizes) of this block inside `outer`'s local array; it must lie within it."""
        rel = tuple(o - oo for o, oo in zip(self.offsets, outer.offsets))
        for d, (r, s, os_) in enumerate(zip(rel, self.sizes, outer.sizes)):
            if r < 0 or r + s > os_:
                raise ValueError(f"slice {self} is not inside {outer} (dim {d})")
        return rel, self.sizes

    def to_json(self) -> dict:
        """JSON-able form used in safetensors `__metadata__` and plans."""
        return {"global_shape": list(self.global_shape), "offsets": list(self.offsets),
                "sizes": list(self.sizes)}

    @staticmethod
    def from_json(obj: dict, memo: Optional[dict] = None) -> "TensorSlice":
        """Inverse of `to_json`. ValueError unless every number is an integer (not a bool or a
        float) and the block lies inside its tensor, or when the object has a key besides
        global_shape, offsets, sizes; KeyError or TypeError for a malformed object. `memo` (a
        dict the caller keeps): blocks already made, by value; an equal block is returned as the
        same object (a rank file names a few distinct blocks thousands of times, and each is
        validated once)."""
        key = (tuple(obj["global_shape"]), tuple(obj["offsets"]), tuple(obj["sizes"]))
        if len(obj) != 3:   # the three keys are there: anything more is unknown, not ignored
            extra = sorted(str(k) for k in obj if k not in ("global_shape", "offsets", "sizes"))
            raise ValueError(f"unknown keys {extra} (a slice has global_shape, offsets, sizes)")
        for part in key:
            for x in part:
                if type(x) is not int:
                    raise ValueError(f"slice numbers must be integers, found {x!r}")
        if memo is None:
            return TensorSlice(*key)
        made = memo.get(key)
        if made is None:
            made = memo[key] = TensorSlice(*key)
        return made

    def __hash__(self) -> int:
        # planning keys dicts by slices thousands of times a checkpoint: hash the fields once
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.global_shape, self.offsets, self.sizes))
        return h


@process_cache(maxsize=4096)
def _whole(shape: Tuple[int, ...]) -> TensorSlice:
    shape = tuple(int(x) for x in shape)
    if any(x < 0 for x in shape):
        raise ValueError(f"TensorSlice.whole: negative size in shape {shape}")
    return TensorSlice._trusted(shape, (0,) * len(shape), shape)


def block_inside(shape, offsets, sizes) -> bool:
    """True when the block `offsets`+`sizes` lies inside an array of `shape`: one entry per
    dimension each, no offset or size negative, no block end past the shape (the rule for
    slices and for plans' copies). A block that is all of `shape` is answered first: most
    copies of a plan read or fill a whole tensor."""
    if sizes == shape and len(offsets) == len(shape) and not any(offsets):
        return True
    if not len(shape) == len(offsets) == len(sizes):
        return False
    for n, o, s in zip(shape, offsets, sizes):
        if o < 0 or s < 0 or o + s > n:
            return False
    return True


def box_within(inner_offsets, inner_sizes, outer_offsets, outer_sizes) -> bool:
    """True when the box `inner_offsets`+`inner_sizes` lies inside `outer_offsets`+`outer_sizes`
    (same number of dims; plain tuples, as planning's hot loops test millions of boxes)."""
    for io, isz, oo, osz in zip(inner_offsets, inner_sizes, outer_offsets, outer_sizes):
        if io < oo or io + isz > oo + osz:
            return False
    return True


def tiles(target: TensorSlice, pieces) -> bool:
    """True when `pieces` (a sequence of distinct blocks, each lying inside `target`) fill
    `target` exactly: as many elements as it and no two sharing one, so no element is left
    out or read twice. The one rule behind planning's shortcuts for a tensor split evenly."""
    return sum(p.numel for p in pieces) == target.numel and pairwise_disjoint(pieces)


def pairwise_disjoint(slices) -> bool:
    """True when no two of `slices` (blocks of one tensor) share an element."""
    slices = list(slices)
    for i, a in enumerate(slices):
        for b in slices[i + 1:]:
            for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes):
                if ao + asz <= bo or bo + bsz <= ao:
                    break   # apart on this dim: these two do not overlap
            else:
                return False
    return True
