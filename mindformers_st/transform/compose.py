"""Reading a planned checkpoint before it is written: a plan's output as a source.

A conversion plan (Hugging Face -> MindSpore names, q/k/v fused or not) says, for every tensor of
the complete checkpoint it would write, which bytes of which source files fill which part of it.
A rank that needs only some blocks of those tensors can read them straight from the sources:
each target tensor of the plan restricted to the rank's block is again a `TargetTensor` whose
copies point into the original files. So the load hook sets a run's parameters from a Hugging
Face folder without waiting for `ms_safetensors` to be written (issue 10: nothing but loading on
the critical path), and the copy it reads is, byte for byte, what the written folder would hold.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping

from ..errors import PlanError
from ..layout.slices import TensorSlice
from .plan import CopyOp, Plan, TargetFile, TargetTensor
from .sources import SourceCheckpoint, SourceChunk


def restrict(t: TargetTensor, block: TensorSlice) -> TargetTensor:
    """The part `block` (global coordinates of `t`, a whole tensor: its shape is the global
    shape) of target tensor `t`: every copy of `t` cut to the block, coordinates made local to
    it. The result fills `block` exactly once when `t`'s copies fill `t` exactly once."""
    if tuple(block.global_shape) != tuple(t.shape):
        raise PlanError(f"tensor {t.name!r}: block of a {tuple(block.global_shape)} tensor asked "
                        f"of a planned {tuple(t.shape)} tensor")
    ops = []
    for op in t.ops:   # the copy's destination box, cut by TensorSlice's own box arithmetic
        inter = TensorSlice(t.shape, op.dst_offsets, op.sizes).intersect(block)
        if inter is None or not inter.numel:
            continue
        from_dst, sizes = inter.relative_to(TensorSlice(t.shape, op.dst_offsets, op.sizes))
        dst, _ = inter.relative_to(block)
        ops.append(CopyOp(op.src_file, op.src_name,
                          tuple(so + d for so, d in zip(op.src_offsets, from_dst)), dst, sizes))
    return TargetTensor(t.name, t.dtype, tuple(block.sizes), tuple(ops), t.name, block)


def planned_tensors(plan: Plan) -> Dict[str, TargetTensor]:
    """Every target tensor of `plan` by name (a name twice is a PlanError)."""
    out: Dict[str, TargetTensor] = {}
    for f in plan.files:
        for t in f.tensors:
            if t.name in out:
                raise PlanError(f"tensor {t.name!r} is planned twice ({plan.kind})")
            out[t.name] = t
    return out


def planned_source(plan: Plan, root: str) -> SourceCheckpoint:
    """The complete checkpoint `plan` would write under `root`, described as a source (names,
    shapes, dtypes; each tensor one whole chunk in the file the plan puts it in). For messages
    and name checks only: its files do not exist yet; read it with `plan_planned_slices`."""
    src = SourceCheckpoint({}, {}, {}, kind="complete", root=root)
    for f in plan.files:
        for t in f.tensors:
            src.add(SourceChunk(os.path.join(root, f.path), t.name, t.dtype, t.name,
                                TensorSlice.whole(t.shape)))
    return src


def plan_planned_slices(plan: Plan, layouts: Mapping, rank: int, root: str = "") -> Plan:
    """The blocks rank `rank` holds under `layouts` (global name -> TensorLayout; tensors of
    other ranks skipped), read straight from `plan`'s sources: one in-memory target (for
    `execute_to_memory`), as `plan_rank_slices` gives for the written checkpoint."""
    tensors = planned_tensors(plan)
    out = []
    for name, lay in layouts.items():
        if rank not in lay.ranks():
            continue
        if name not in tensors:
            raise PlanError(f"tensor {name!r} is in no source file of {root or plan.kind}")
        t = tensors[name]
        if lay.global_shape is None:
            lay = lay.with_global_shape(t.shape)
        if tuple(lay.global_shape) != tuple(t.shape):
            raise PlanError(f"tensor {name!r}: source global shape {t.shape} but the target "
                            f"layout says {tuple(lay.global_shape)}; the config does not "
                            f"describe this checkpoint")
        out.append(restrict(t, lay.slice_for(rank)))
    return Plan("rank_slices", (TargetFile(f"rank_{rank}", tuple(out)),), (),
                f"slices of rank {rank}: {len(out)} tensors read through the plan "
                f"'{plan.kind}' from {root}")
