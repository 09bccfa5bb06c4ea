"""Planners: turn a described source and a wanted target into a `Plan`, without touching data.

- `plan_merge`: distributed (or complete) -> complete folder of `model-0000k-of-0000n` shards,
  `param_name_map.json` and `hyper_param.safetensors`.
- `plan_distributed`: any source -> `rank_{r}/{prefix}_rank_{r}.safetensors` for target layouts
  (split from complete, or reshard distributed -> distributed directly), with our
  self-describing metadata and, under remove_redundancy, each slice in its owner's file only.
- `plan_rank_slices`: the slices one rank needs, for the load hook (`execute_to_memory`).
- `split_plan`: divide a plan among N workers by output file; `plan_stats`: the dry-run costs.

Every target block is covered by source blocks chosen greedily (box subtraction), one replica
per distinct source slice, preferring files the same output already reads.
"""
from __future__ import annotations

import logging
import os
from math import prod
from operator import sub
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..caches import process_cache
from ..errors import PlanError
from ..dtypes import ITEMSIZE
from ..layout.slices import TensorSlice, box_within, tiles
from ..records.names import HYPER_FILE
from ..records.rank_meta import RankFileMeta
from ..storage.index import MS_INDEX, index_text, shard_file_name
from .plan import CopyOp, Plan, TargetFile, TargetTensor
from .sources import SourceCheckpoint, SourceChunk, subtract
from .gc_pause import without_gc

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9


# --------------------------------------------------------------------------- covering
@process_cache(maxsize=4096)
def _cover_geometry(target: TensorSlice, slices: Tuple[TensorSlice, ...]):
    """How the distinct blocks `slices` of one tensor fill the block `target` exactly once:
    (pieces, hole). pieces: ((index into slices, block, block's offsets inside that slice,
    block's offsets inside target), ...), blocks in global coordinates; hole: None, or the
    first part of `target` no slice covers. A function of values only, so a checkpoint's
    thousands of tensors cut the same way are worked out once (remembered by value)."""
    t_off, t_size, t_shape = target.offsets, target.sizes, target.global_shape
    zeros = (0,) * len(t_shape)

    def piece(i: int, block: TensorSlice):
        b_off, s_off = block.offsets, slices[i].offsets
        return (i, block, zeros if b_off == s_off else tuple(map(sub, b_off, s_off)),
                b_off if t_off == zeros else tuple(map(sub, b_off, t_off)))
    if target.numel:
        inside = []   # the source slices lying within the target
        whole = t_size == t_shape   # a merge: every slice lies within, only a whole one holds it
        for i, sl in enumerate(slices):
            if sl.global_shape != t_shape:
                continue
            if (sl.sizes == t_shape if whole else
                    box_within(t_off, t_size, sl.offsets, sl.sizes)):
                return (piece(i, target),), None   # one slice holds all of it (same layout)
            if whole or box_within(sl.offsets, sl.sizes, t_off, t_size):
                inside.append(i)
        # slices within the target, pairwise disjoint, as many elements as it: they tile it
        # exactly (a merge of one layout's slices), each read whole — no box arithmetic
        inside.sort(key=lambda i: slices[i].offsets)
        if tiles(target, [slices[i] for i in inside]):
            return tuple(piece(i, slices[i]) for i in inside), None
    rest = [target] if target.numel else []
    out = []
    for i in sorted(range(len(slices)), key=lambda i: slices[i].offsets):
        if not rest:
            break
        sl, new_rest = slices[i], []
        for box in rest:   # the boxes left lie inside target: no separate target test
            inter = box.intersect(sl)
            if inter is None:
                new_rest.append(box)
                continue
            out.append(piece(i, inter))
            new_rest.extend(b for b in subtract(box, sl, inter) if b.numel)
        rest = new_rest
    return tuple(out), (rest[0] if rest else None)


def _covering(target: TensorSlice, chunks: Sequence[SourceChunk], prefer: Iterable[str],
              hint: int):
    """[(chunk, piece of `_cover_geometry`)] for `cover` and `target_tensor`; PlanError naming
    the hole when the chunks leave one."""
    by_slice: Dict[TensorSlice, List[SourceChunk]] = {}
    for c in chunks:
        by_slice.setdefault(c.slice, []).append(c)
    slices, replicas_of = tuple(by_slice), list(by_slice.values())
    pieces, hole = _cover_geometry(target, slices)
    if hole is not None:
        name = chunks[0].global_name if chunks else "?"
        raise PlanError(f"tensor {name!r}: block {hole.to_json()} is in no source file; "
                        f"a rank file is missing or the source strategy is wrong")
    out = []
    for p in pieces:
        replicas = replicas_of[p[0]]
        if len(replicas) > 1:   # one replica per distinct slice: preferred file, else by hint
            replicas = sorted(replicas, key=lambda c: c.file)
            if not isinstance(prefer, (set, frozenset)):
                prefer = set(prefer)
            chosen = next((c for c in replicas if c.file in prefer), None)
            out.append((chosen or replicas[hint % len(replicas)], p))
        else:
            out.append((replicas[0], p))
    return out


def cover(target: TensorSlice, chunks: Sequence[SourceChunk], prefer: Iterable[str] = (),
          hint: int = 0) -> List[Tuple[SourceChunk, TensorSlice]]:
    """Source pieces that fill the global block `target` exactly once: [(chunk, block)], block
    in global coordinates. One replica is read per distinct source slice: a file in `prefer`
    if one holds it, else replica number `hint` (mod the replica count), to spread reads.
    Raises PlanError naming the hole when the chunks leave part of `target` uncovered."""
    return [(chunk, p[1]) for chunk, p in _covering(target, chunks, prefer, hint)]


def target_tensor(src: SourceCheckpoint, global_name: str, block: TensorSlice,
                  name: Optional[str] = None, prefer: Iterable[str] = (), hint: int = 0,
                  ) -> TargetTensor:
    """A target tensor holding `block` of global tensor `global_name`, filled from `src`."""
    if global_name not in src.chunks:
        raise PlanError(f"tensor {global_name!r} is in no source file; check the source folder "
                        f"(and strategy) or drop it from the target")
    ops = tuple([CopyOp(chunk.file, chunk.name, src_off, dst_off, piece.sizes)
                 for chunk, (_, piece, src_off, dst_off)
                 in _covering(block, src.chunks[global_name], prefer, hint)])
    return TargetTensor(name or global_name, src.dtypes[global_name], tuple(block.sizes), ops,
                        global_name, block)


def _hyper_tensors(src: SourceCheckpoint) -> List[TargetTensor]:
    out = []
    for name, c in src.hyper.items():
        shape = tuple(c.slice.sizes)
        op = CopyOp(c.file, c.name, (0,) * len(shape), (0,) * len(shape), shape)
        out.append(TargetTensor(name, c.dtype, shape, (op,)))
    return out


# --------------------------------------------------------------------------- merge
@without_gc
def plan_merge(src: SourceCheckpoint, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
               names: Optional[Sequence[str]] = None) -> Plan:
    """Complete weights from `src`: tensors in source order packed into shards of at most
    `max_shard_size` bytes (a larger tensor gets a shard of its own), `param_name_map.json`,
    and `hyper_param.safetensors` when the source has hyper values."""
    if max_shard_size <= 0:
        raise PlanError(f"max_shard_size must be positive, got {max_shard_size}")
    names = list(names) if names is not None else src.names
    groups: List[List[TargetTensor]] = [[]]
    size = 0
    prefer: set = set()
    for g in names:
        t = target_tensor(src, g, TensorSlice.whole(src.global_shapes[g]), prefer=prefer)
        nbytes = t.nbytes
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
            prefer = set()
        groups[-1].append(t)
        size += nbytes
        for op in t.ops:
            prefer.add(op.src_file)
    groups = [g for g in groups if g]
    n = len(groups)
    files = [TargetFile(shard_file_name(k + 1, n), tuple(g), (("format", "ms"),))
             for k, g in enumerate(groups)]
    weight_map = {t.name: f.path for f in files for t in f.tensors}
    total = sum(f.nbytes for f in files)
    hyper = _hyper_tensors(src)
    if hyper:
        files.append(TargetFile(HYPER_FILE, tuple(hyper), (("format", "ms"),)))
    return Plan("merge", tuple(files), ((MS_INDEX, index_text(weight_map, total)),),
                f"merge {len(names)} tensors from {src.kind} {src.root} into {n} shard(s)")


# --------------------------------------------------------------------------- distributed
def _world(layouts: Mapping, pc) -> List[int]:
    if pc is not None:
        return list(range(pc.world_size))
    ranks = set()
    for lay in layouts.values():
        ranks.update(lay.ranks())
    return sorted(ranks)


def with_source_shapes(src: SourceCheckpoint, layouts: Mapping) -> Dict:
    """Layouts read from strategy files have no shapes: take them from the source."""
    return {n: (lay.with_global_shape(src.global_shapes[n])
                if lay.global_shape is None and n in src.global_shapes else lay)
            for n, lay in layouts.items()}


def _check_shapes(src: SourceCheckpoint, layouts: Mapping) -> None:
    missing = [n for n in layouts if n not in src.chunks]
    if missing:
        raise PlanError(f"{len(missing)} target tensors are in no source file (e.g. {missing[:3]}); "
                        f"the target layout is for another model or the source lacks them "
                        f"(optimizer states?)")
    for n, lay in layouts.items():
        if tuple(lay.global_shape) != tuple(src.global_shapes[n]):
            raise PlanError(f"tensor {n!r}: source global shape {src.global_shapes[n]} but the "
                            f"target layout says {tuple(lay.global_shape)}; the config or strategy "
                            f"does not describe this checkpoint")


def rank_file_name(rank: int, prefix: str = "checkpoint") -> str:
    """Relative path of a rank's output file: `rank_{r}/{prefix}_rank_{r}.safetensors`."""
    return f"rank_{rank}/{prefix}_rank_{rank}.safetensors"


@without_gc
def plan_distributed(src: SourceCheckpoint, layouts: Mapping, pc=None,
                     remove_redundancy: bool = False, prefix: str = "checkpoint",
                     strict: bool = True) -> Plan:
    """Per-rank files for target `layouts` ({name: TensorLayout}) straight from `src` (complete
    or distributed: no complete copy in between). Every rank file carries our `mindformers_st`
    metadata (slices, parallel config, remove_redundancy, epoch/step) and the hyper values.
    With `remove_redundancy` each distinct slice is stored only in its owner's file
    (layout.owners.assign_owners). `strict` refuses source tensors the layouts do not place."""
    layouts = with_source_shapes(src, layouts)
    _check_shapes(src, layouts)
    extra = [n for n in src.chunks if n not in layouts]
    if extra and strict:
        raise PlanError(f"{len(extra)} source tensors have no target layout (e.g. {extra[:3]}); "
                        f"pass a strategy or config that covers them (optimizer states need "
                        f"their layouts too)")
    owners = None
    if remove_redundancy:
        from ..layout.owners import assign_owners
        owners = assign_owners(layouts, {n: src.dtypes[n] for n in layouts})
    world = _world(layouts, pc)
    hyper = _hyper_tensors(src)
    kind = "split" if src.kind == "complete" else "reshard"
    files = []
    for r in world:
        tensors, slices_meta = [], {}
        prefer: set = set()
        for n, lay in layouts.items():
            if r not in lay.ranks():
                continue
            sl = lay.slice_for(r)
            if owners is not None and owners.get((n, sl)) != r:
                continue
            t = target_tensor(src, n, sl, prefer=prefer, hint=r)
            prefer.update(op.src_file for op in t.ops)
            tensors.append(t)
            slices_meta[n] = sl
        meta = RankFileMeta(r, len(world), slices_meta, pc.to_json() if pc is not None else None,
                            bool(remove_redundancy), src.epoch, src.step)
        metadata = tuple(meta.to_metadata().items())
        files.append(TargetFile(rank_file_name(r, prefix), tuple(tensors) + tuple(hyper), metadata))
    return Plan(kind, tuple(files), (),
                f"{kind} {len(layouts)} tensors from {src.kind} {src.root} into {len(world)} "
                f"rank files{' (remove_redundancy)' if remove_redundancy else ''}")


@without_gc
def plan_rank_slices(src: SourceCheckpoint, layouts: Mapping, rank: int,
                     include_hyper: bool = True) -> Plan:
    """The blocks rank `rank` holds under `layouts`, as one in-memory target (for
    `execute_to_memory`). Source tensors the layouts do not mention are ignored; a layout tensor
    the source lacks is a PlanError. Reads prefer the rank's own files."""
    layouts = with_source_shapes(src, {n: lay for n, lay in layouts.items() if rank in lay.ranks()})
    _check_shapes(src, layouts)
    files = {c.file for cs in src.chunks.values() for c in cs}
    own = {f for f in files if os.path.basename(os.path.dirname(f)) == f"rank_{rank}"}
    tensors = [target_tensor(src, n, lay.slice_for(rank), prefer=own, hint=rank)
               for n, lay in layouts.items()]
    if include_hyper:
        tensors += _hyper_tensors(src)
    return Plan("rank_slices", (TargetFile(f"rank_{rank}", tuple(tensors)),), (),
                f"slices of rank {rank}: {len(layouts)} tensors from {src.kind} {src.root}")


# --------------------------------------------------------------------------- workers, stats
def split_plan(plan: Plan, n_workers: int) -> List[Plan]:
    """`n_workers` plans that together write `plan`'s files, each file in exactly one of them,
    balanced by bytes (largest first to the least loaded). Side files go to worker 0, which
    must run last or after a barrier (they index the others' files)."""
    if n_workers < 1:
        raise PlanError(f"n_workers must be >= 1, got {n_workers}")
    loads = [0] * n_workers
    parts: List[List[TargetFile]] = [[] for _ in range(n_workers)]
    for f in sorted(plan.files, key=lambda f: (-f.nbytes, f.path)):
        w = min(range(n_workers), key=lambda i: (loads[i], i))
        parts[w].append(f)
        loads[w] += f.nbytes
    order = {f.path: i for i, f in enumerate(plan.files)}
    return [Plan(plan.kind, tuple(sorted(p, key=lambda f: order[f.path])),
                 plan.side_files if i == 0 else (), f"{plan.description} [worker {i}/{n_workers}]")
            for i, p in enumerate(parts)]


def plan_stats(plan: Plan, workers: int = 4, processes: int = 1) -> dict:
    """What executing `plan` costs, from headers only (no data read): per output file the bytes
    written and read, the number of contiguous read runs, the source files opened and the
    largest staging buffer a tensor of it needs; plus totals and `peak_buffer`, the most staging
    memory the engine holds at once with `workers` threads in each of `processes` processes
    (`execute.peak_staging` over the same division of files as `execute_in_processes`)."""
    from .execute import peak_staging, read_source_shapes, staging_bytes
    shapes = read_source_shapes(plan)
    per_file = []
    for f in plan.files:
        opened = sorted({op.src_file for t in f.tensors for op in t.ops})
        runs = 0
        read = 0
        peak = 0
        for t in f.tensors:
            item = ITEMSIZE[t.dtype]
            for op in t.ops:
                read += op.numel * item
                runs += contiguous_runs(shapes[(op.src_file, op.src_name)][0], op.src_offsets,
                                        op.sizes)
            peak = max(peak, staging_bytes(t, shapes))
        per_file.append({"file": f.path, "tensors": len(f.tensors), "bytes_written": f.nbytes,
                         "bytes_read": read, "read_runs": runs, "files_opened": len(opened),
                         "peak_buffer": peak})
    parts = [p for p in split_plan(plan, max(1, processes)) if p.files]
    return {"kind": plan.kind, "files": per_file, "workers": max(1, workers),
            "processes": max(1, len(parts)),
            "total_bytes_written": sum(p["bytes_written"] for p in per_file),
            "total_bytes_read": sum(p["bytes_read"] for p in per_file),
            "source_files": len({op.src_file for f in plan.files for t in f.tensors
                                 for op in t.ops}),
            "peak_buffer": sum(peak_staging(p, shapes, workers) for p in parts)}


def contiguous_runs(shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int]) -> int:
    """How many contiguous byte runs the block `offsets`+`sizes` of a C-ordered array of `shape`
    occupies (the block's trailing dims that span the whole array merge into one run)."""
    if prod(sizes) == 0:
        return 0
    k = len(shape)
    # innermost dims that are whole collapse; the first partial dim (from the right) ends a run
    d = k - 1
    while d >= 0 and sizes[d] == shape[d]:
        d -= 1
    if d < 0:
        return 1
    return prod(sizes[:d])


def format_stats(stats: dict) -> str:
    """Human-readable dry-run report of `plan_stats`."""
    def mb(x):
        return f"{x / 2**20:,.1f} MiB"
    lines = [f"plan: {stats['kind']}, {len(stats['files'])} output file(s), "
             f"{stats['source_files']} source file(s)"]
    for p in stats["files"]:
        lines.append(f"  {p['file']}: {p['tensors']} tensors, write {mb(p['bytes_written'])}, "
                     f"read {mb(p['bytes_read'])} in {p['read_runs']} runs from "
                     f"{p['files_opened']} file(s), peak buffer {mb(p['peak_buffer'])}")
    procs = (f" in each of {stats['processes']} processes, plus each child's interpreter"
             if stats.get("processes", 1) > 1 else "")
    lines.append(f"total: read {mb(stats['total_bytes_read'])}, write "
                 f"{mb(stats['total_bytes_written'])}, peak buffer {mb(stats['peak_buffer'])} "
                 f"(staging of {stats.get('workers', 1)} tensor(s) at once{procs})")
    return "\n".join(lines)
