"""Collectives for explicit tensor and data parallelism on any MindSpore backend (CPU included).

MindSpore's AllReduce is differentiable but its backward is again an AllReduce, which is wrong
for Megatron's conjugate pair; so the pair is written as Cells with custom `bprop`:
`CopyToModelParallel` (f: identity forward, all-reduce backward) and `ReduceFromModelParallel`
(g: all-reduce forward, identity backward). Only SUM is used: on CPU AllReduce supports nothing
else (measured: "AllReduce only support reduce sum on CPU"), and AllGather works only on the world
group, so gathers are written as the all-reduce of a zero-padded buffer.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops


class CopyToModelParallel(nn.Cell):
    """f: identity forward; backward sums the gradient over the mp group.

    Placed where a replicated activation enters column-parallel layers: each mp rank only
    sees the gradient through its own shard, and the true gradient is their sum.
    """

    def __init__(self, group: Optional[str]):
        super().__init__()
        self.group = group
        self.all_reduce = ops.AllReduce(group=group) if group else None

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        if self.all_reduce is None:
            return (dout,)
        return (self.all_reduce(dout),)


class ReduceFromModelParallel(nn.Cell):
    """g: forward sums partial results over the mp group; backward is the identity."""

    def __init__(self, group: Optional[str]):
        super().__init__()
        self.group = group
        self.all_reduce = ops.AllReduce(group=group) if group else None

    def construct(self, x):
        if self.all_reduce is None:
            return x
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


def all_reduce_sum(x: Tensor, group: Optional[str]) -> Tensor:
    """Sum `x` over `group` (not for use inside differentiated code); identity when group is None."""
    if group is None:
        return x
    return ops.AllReduce(group=group)(x)


def gather_last_dim(local: Tensor, group: Optional[str], index: int, size: int) -> Tensor:
    """Concatenate equal shards of the last dim across `group` (rank `index` of `size`).

    Written as the all-reduce of a zero-padded buffer because AllGather only works on the world
    group on CPU. Every rank gets bit-identical results (the same sum), which generation relies on.
    Not differentiable on purpose (used on logits for decoding only).
    """
    if group is None or size == 1:
        return local
    width = local.shape[-1]
    arr = local.asnumpy().astype(np.float32)
    buf = np.zeros(arr.shape[:-1] + (width * size,), np.float32)
    buf[..., index * width:(index + 1) * width] = arr
    return ops.AllReduce(group=group)(Tensor(buf))


def scalar_all_reduce(value: float, group: Optional[str]) -> float:
    """Sum a Python float over `group` (fp64 is not guaranteed on every backend: fp32 used)."""
    if group is None:
        return float(value)
    out = ops.AllReduce(group=group)(Tensor(np.array([value], np.float32)))
    return float(out.asnumpy()[0])


def ms_dtype(name: str):
    """MindSpore dtype for a YAML dtype name ("float32", "float16", "bfloat16")."""
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


class GatherOptimizerShard(nn.Cell):
    """Rebuild a parameter's model-parallel block from its optimizer-shard (ZeRO) parts.

    Forward: this rank's `rows` rows are placed at `offset` in a zero buffer of `full_rows`
    rows and summed over `group` (AllGather is not available on sub-groups on CPU). Backward:
    every rank used the whole block, so the gradient of the shard is the SUM over the group of
    the block gradients, restricted to the shard, divided by the group size: that is the
    data-parallel MEAN directly (for an mp-split parameter the group is the dp group; for a
    replicated one it is dp x mp ranks whose mp members hold identical gradients).
    """

    def __init__(self, group: str, group_size: int, offset: int, full_rows: int):
        super().__init__()
        self.group_size, self.offset, self.full_rows = group_size, offset, full_rows
        self.all_reduce = ops.AllReduce(group=group)

    def construct(self, shard):
        rows = shard.shape[0]
        rest = shard.shape[1:]
        parts = []
        if self.offset:
            parts.append(ops.zeros((self.offset,) + rest, ms.float32))
        parts.append(shard.astype(ms.float32))
        if self.full_rows - self.offset - rows:
            parts.append(ops.zeros((self.full_rows - self.offset - rows,) + rest, ms.float32))
        return self.all_reduce(ops.concat(parts, 0))

    def bprop(self, shard, out, dout):
        rows = shard.shape[0]
        total = self.all_reduce(dout.astype(ms.float32))
        return ((total[self.offset:self.offset + rows] / self.group_size).astype(shard.dtype),)


def p2p_transfer(x: Tensor, group: str) -> Tensor:
    """Move a tensor between the two ranks of `group` (neighbouring pipeline stages).

    The sender passes the tensor, the receiver zeros of the same shape and dtype; both get the
    sender's values back (x + 0 is exact). CPU has no Send/Receive and no AllGather on
    sub-groups (measured), but AllReduce works on any group. Both ranks must call it at the
    same point of their collective order. Not differentiable: the pipeline schedule sends
    gradients back explicitly.
    """
    return ops.AllReduce(group=group)(x)


# Bytes through a float32 sum. The CPU AllReduce takes float16 and float32 only (measured on
# MindSpore 2.10: int8, uint8, int32, int64, float64 are refused), and a float sum is not a byte
# copy (-0.0 + 0.0 is +0.0, a NaN's payload or a subnormal may change). Three bytes per float32
# are an integer below 2**24, which float32 holds exactly, and the sum of one such integer with
# zeros is exact in any order: every byte arrives unchanged, whatever dtype it belongs to.
BYTES_PER_FLOAT = 3


def bytes_to_floats(buf: np.ndarray) -> np.ndarray:
    """uint8 bytes -> float32 integers below 2**24, three bytes each (zero-padded)."""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    n = -(-buf.size // BYTES_PER_FLOAT)
    wide = np.zeros((n, 4), np.uint8)
    padded = np.zeros(n * BYTES_PER_FLOAT, np.uint8)
    padded[:buf.size] = buf
    wide[:, :BYTES_PER_FLOAT] = padded.reshape(n, BYTES_PER_FLOAT)
    return wide.view("<u4").reshape(n).astype(np.float32)


def floats_to_bytes(values: np.ndarray, size: int) -> np.ndarray:
    """The inverse of `bytes_to_floats`: the first `size` bytes. ValueError when a value is not
    such an integer (the sum had two non-zero contributors, or was not exact)."""
    ints = np.asarray(values, np.float32).astype("<u4")
    if ints.size and (ints.max() >= 1 << 24 or not np.array_equal(ints.astype(np.float32), values)):
        raise ValueError("a shared byte buffer came back altered: more than one rank gave a byte")
    return ints.view(np.uint8).reshape(-1, 4)[:, :BYTES_PER_FLOAT].reshape(-1)[:size].copy()


def share_bytes(buf: np.ndarray, group: Optional[str]) -> np.ndarray:
    """The element-wise sum over `group` of every rank's uint8 `buf` (same size everywhere),
    exact: each byte must be given by one rank, the others giving 0 (a broadcast from
    several senders at once). Every rank of `group` must call it at the same point of its
    collective order; identity when group is None."""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    if group is None:
        return buf.copy()
    out = ops.AllReduce(group=group)(Tensor(bytes_to_floats(buf))).asnumpy()
    return floats_to_bytes(out, buf.size)


def gather_bytes(buf: np.ndarray, width: int, group: str) -> np.ndarray:
    """Every rank's uint8 `buf` (at most `width` bytes, `width` a multiple of 4, the same on
    every rank), as rows of a (group size, width) uint8 array in rank order, zero-padded. An
    AllGather of int32 words: bit-exact, and each rank sends only its own bytes (measured 2-3x
    faster than `share_bytes` per byte shared). On CPU AllGather works on the world group only
    and refuses 8-bit integers (MindSpore 2.10)."""
    if width % 4:
        raise ValueError(f"gather width must be a multiple of 4, got {width}")
    buf = np.asarray(buf, np.uint8).reshape(-1)
    if buf.size > width:
        raise ValueError(f"{buf.size} bytes do not fit a gather of width {width}")
    padded = np.zeros(width, np.uint8)
    padded[:buf.size] = buf
    out = ops.AllGather(group=group)(Tensor(padded.view("<i4"))).asnumpy()
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1, width)
