"""Row layouts of the fused `qkv_concat` tensors, as lists of row blocks.

A fused tensor stacks rows of its parts along dim 0 in a fixed order; columns (dim 1, when
there is one) are untouched. We describe that order as `RowBlock`s (rows of one part going to
rows of the fused tensor); each block is one `CopyOp` in a plan, so fusing and splitting stream
through the plan engine like any rename. The layouts are MindSpore Transformers' own
(`mindformers/utils/convert_utils.py`):

- "qkv" (`qkv_concat_hf2mg`): for each KV group g in 0..n_kv_heads-1, the n_rep = num_heads /
  n_kv_heads query heads of the group, then key head g, then value head g:
  `[q(g*n_rep .. g*n_rep+n_rep-1), k(g), v(g)]` repeated for every g (each head is head_dim rows).
  Biases (1-D) follow the same order.
- "ffn" (`ffn_concat_hf2mg`): rows of w1 (gate) and w3 (up) interleaved one by one:
  fused row 2r = w1 row r, fused row 2r+1 = w3 row r.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from ..errors import ConversionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowBlock:
    """`rows` rows starting at `part_row` of part `part` sit at `fused_row` of the fused tensor."""

    part: int
    part_row: int
    fused_row: int
    rows: int


def qkv_blocks(num_heads: int, n_kv_heads: int, head_dim: int) -> List[RowBlock]:
    """The per-KV-group layout of `w_qkv` (parts: q, k, v), 3 blocks per KV group."""
    if num_heads <= 0 or n_kv_heads <= 0 or head_dim <= 0 or num_heads % n_kv_heads:
        raise ConversionError(
            f"qkv_concat needs num_heads divisible by n_kv_heads (got num_heads={num_heads}, "
            f"n_kv_heads={n_kv_heads}, head_dim={head_dim}); check the model config")
    n_rep = num_heads // n_kv_heads
    blocks, row = [], 0
    for g in range(n_kv_heads):
        blocks.append(RowBlock(0, g * n_rep * head_dim, row, n_rep * head_dim))
        row += n_rep * head_dim
        blocks.append(RowBlock(1, g * head_dim, row, head_dim))
        row += head_dim
        blocks.append(RowBlock(2, g * head_dim, row, head_dim))
        row += head_dim
    return blocks


def ffn_blocks(ffn_hidden: int) -> List[RowBlock]:
    """The row-interleaved layout of `w_gate_hidden` (parts: w1, w3), one-row blocks."""
    if ffn_hidden <= 0:
        raise ConversionError(f"ffn_concat needs a positive intermediate size (got {ffn_hidden})")
    blocks = []
    for r in range(ffn_hidden):
        blocks.append(RowBlock(0, r, 2 * r, 1))
        blocks.append(RowBlock(1, r, 2 * r + 1, 1))
    return blocks


def fuse_rows(parts: Sequence[np.ndarray], blocks: Sequence[RowBlock]) -> np.ndarray:
    """In-memory reference of a fuse: the fused array the blocks describe (tests and small
    tensors; conversions go through plans)."""
    rows = sum(p.shape[0] for p in parts)
    out = np.empty((rows,) + parts[0].shape[1:], dtype=parts[0].dtype)
    for b in blocks:
        out[b.fused_row:b.fused_row + b.rows] = parts[b.part][b.part_row:b.part_row + b.rows]
    return out


def split_rows(fused: np.ndarray, part_rows: Sequence[int], blocks: Sequence[RowBlock],
               ) -> List[np.ndarray]:
    """In-memory inverse of `fuse_rows`: the parts (with `part_rows` rows each) of `fused`."""
    parts = [np.empty((n,) + fused.shape[1:], dtype=fused.dtype) for n in part_rows]
    for b in blocks:
        parts[b.part][b.part_row:b.part_row + b.rows] = fused[b.fused_row:b.fused_row + b.rows]
    return parts


def check_cover(blocks: Sequence[RowBlock], part_rows: Sequence[int]) -> None:
    """Raise ConversionError unless the blocks cover every row of every part and of the fused
    tensor exactly once (a guard on the layout functions, cheap next to any copy)."""
    fused_seen = np.zeros(sum(part_rows), dtype=np.int32)
    part_seen = [np.zeros(n, dtype=np.int32) for n in part_rows]
    ok = True
    for b in blocks:
        # numpy clips out-of-range slices silently, so bounds are checked first
        ok &= b.part_row + b.rows <= part_rows[b.part] and b.fused_row + b.rows <= len(fused_seen)
        fused_seen[b.fused_row:b.fused_row + b.rows] += 1
        part_seen[b.part][b.part_row:b.part_row + b.rows] += 1
    if not ok or not (fused_seen == 1).all() or not all((s == 1).all() for s in part_seen):
        raise ConversionError(f"fused layout does not cover parts of {list(part_rows)} rows "
                              f"exactly once; the shapes do not fit num_heads/n_kv_heads")
