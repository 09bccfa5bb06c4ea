"""Plans: for each target tensor, which byte ranges of which source files fill which part of it.

A plan is plain frozen data: printable, comparable and testable without touching a file.
Every move of weights (merge, split, reshard, HF conversion, the load hook's slicing) is a
`Plan` executed by `transform.execute`. Coordinates in a `CopyOp` are *local*: offsets inside the
array stored in the source file and inside the target array.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Optional, Tuple

from ..dtypes import ITEMSIZE
from ..fast_init import fast_init
from ..layout.slices import TensorSlice


@fast_init
@dataclass(frozen=True)
class CopyOp:
    """Copy the block `src_offsets`+`sizes` of tensor `src_name` in `src_file` to
    `dst_offsets`+`sizes` of the target tensor. Dtypes of source and target must match
    (a plan never silently casts)."""

    src_file: str
    src_name: str
    src_offsets: Tuple[int, ...]
    dst_offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.sizes)


@fast_init
@dataclass(frozen=True)
class TargetTensor:
    """One tensor to produce: its stored name, dtype, local shape, which block of which global
    tensor it is (`global_name` + `global_slice`, recorded in our files' metadata), and the copies
    that fill it. The copies must cover the local shape exactly once."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    ops: Tuple[CopyOp, ...]
    global_name: Optional[str] = None
    global_slice: Optional[TensorSlice] = None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class TargetFile:
    """One output file (path relative to the output folder) and its tensors, in write order.
    `metadata` goes into the safetensors `__metadata__` (strings only)."""

    path: str
    tensors: Tuple[TargetTensor, ...]
    metadata: Tuple[Tuple[str, str], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """A whole transform: output files, plus side files (index json and the like) written after
    them as (relative path, text). `kind` says what made it (merge, split, reshard, convert...)."""

    kind: str
    files: Tuple[TargetFile, ...]
    side_files: Tuple[Tuple[str, str], ...] = ()
    description: str = ""
