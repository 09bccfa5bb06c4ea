"""The parameter table: what a model's parameters are, independent of any framework.

A model exports one `ParamTable` (see `mindformers_st.models.param_table`); `layout/` turns it,
with a `ParallelConfig`, into per-rank layouts. Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Dict, Iterator, Optional, Tuple

from ..dtypes import ITEMSIZE  # re-exported: layout's users size tensors with it
from .slices import TensorSlice

OPTIMIZER_STATE_PREFIXES: Tuple[str, ...] = ("adam_m.", "adam_v.")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the global (unsplit) model.

    split_dim: the dimension tensor parallelism (model_parallel) splits, or None if replicated.
    vocab_parallel: True for the embedding table and lm_head, whose split obeys `vocab_emb_dp`
        (vocab_emb_dp=True keeps them whole on every mp rank, as MindSpore Transformers does).
    layer: transformer layer index for pipeline placement; -1 = before the first layer
        (embedding, first stage), `num_layers` = after the last (final norm, lm_head, last stage).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str = "F32"
    split_dim: Optional[int] = None
    vocab_parallel: bool = False
    layer: int = 0

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def whole(self) -> TensorSlice:
        return TensorSlice.whole(self.shape)


@dataclass(frozen=True)
class ParamTable:
    """All parameters of a model plus the number of layers (for pipeline stage assignment)."""

    params: Tuple[ParamSpec, ...]
    num_layers: int

    def __iter__(self) -> Iterator[ParamSpec]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def by_name(self) -> Dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def with_optimizer_states(self, dtype: Optional[str] = "F32") -> "ParamTable":
        """The table plus AdamW moments `adam_m.<name>`, `adam_v.<name>` laid out like their
        parameter (same split) in `dtype` (fp32 moments by default, as MindSpore Transformers)."""
        extra = []
        for p in self.params:
            for prefix in OPTIMIZER_STATE_PREFIXES:
                extra.append(replace(p, name=prefix + p.name, dtype=dtype or p.dtype))
        return ParamTable(self.params + tuple(extra), self.num_layers)
