"""Plan a MindSpore Transformers 2.x Checkpoint 2.0 save (records/iteration.py) from any source.

`plan_iteration(src, iteration, common)` writes `iteration_XXXXXXXX/` under the output folder:
- a complete source: `model-0000000-0000001.safetensors` (every weight whole) and
  `opt-0000000-0000001.safetensors` (optimizer moments and `global_step`), no metadata.json —
  as MindSpore Transformers' one-card save_checkpoint writes them;
- a distributed source: each rank's stored blocks kept as they are, in `model-{r}-{world}` /
  `opt-{r}-{world}` files, described by `metadata.json` (global shape and offset of each chunk,
  the files holding it);
plus `common.json` (the counters, `CommonInfo`) and `latest_checkpointed_iteration.txt` last:
`execute` writes side files after the tensors and publishes the folder atomically. Other hyper
values (epoch_num, step_num, ...) are in common.json only; `global_step` travels as a tensor
in every opt file, as MindSpore Transformers stores the optimizer's counter.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from ..errors import PlanError
from ..layout.param_table import OPTIMIZER_STATE_PREFIXES
from ..layout.slices import TensorSlice
from ..records.hyper import GLOBAL_STEP
from ..records.iteration import (MODEL_KIND, OPT_KIND, TRACKER_FILE, CommonInfo, build_metadata,
                                 iteration_dir_name, shard_file_name, METADATA_FILE, COMMON_FILE)
from ..records.names import parse_rank_dir
from .plan import CopyOp, Plan, TargetFile, TargetTensor
from .planner import target_tensor
from .sources import SourceCheckpoint, SourceChunk


def _kind(name: str) -> str:
    return OPT_KIND if name.startswith(OPTIMIZER_STATE_PREFIXES) or name == GLOBAL_STEP \
        else MODEL_KIND


def _copy(chunk: SourceChunk, name: str) -> TargetTensor:
    shape = tuple(chunk.slice.sizes)
    zero = (0,) * len(shape)
    return TargetTensor(name, chunk.dtype, shape, (CopyOp(chunk.file, chunk.name, zero, zero, shape),),
                        chunk.global_name, chunk.slice)


def _rank_of(path: str, ranks: Dict[str, int]) -> int:
    rank = parse_rank_dir(os.path.dirname(path))
    return ranks.setdefault(path, rank if rank is not None else len(ranks))


def plan_iteration(src: SourceCheckpoint, iteration: int, common: CommonInfo,
                   prefix: Optional[str] = None) -> Plan:
    """The Checkpoint 2.0 folder of `src` at `iteration` with `common` as its common.json (see
    the module doc). PlanError when the source holds nothing to write."""
    if not src.chunks:
        raise PlanError(f"{src.root}: no tensor to write")
    folder = iteration_dir_name(iteration)
    step = src.hyper.get(GLOBAL_STEP)
    if src.kind == "complete":
        files: Dict[Tuple[str, int], List[TargetTensor]] = {}
        for g in src.names:
            t = target_tensor(src, g, TensorSlice.whole(src.global_shapes[g]))
            files.setdefault((_kind(g), 0), []).append(t)
        world = 1
        metadata = None
    else:
        ranks: Dict[str, int] = {}
        for f in sorted({c.file for cs in src.chunks.values() for c in cs}):
            _rank_of(f, ranks)
        world = len(ranks)
        files = {}
        pieces: Dict[str, List[Tuple[TensorSlice, str, int]]] = {}
        for g in src.names:
            seen = set()
            for c in src.chunks[g]:
                r = ranks[c.file]
                if (r, c.slice) in seen:
                    continue
                seen.add((r, c.slice))
                files.setdefault((_kind(g), r), []).append(_copy(c, g))
                pieces.setdefault(g, []).append(
                    (c.slice, shard_file_name(_kind(g), r, world, prefix), r))
        if step is not None:
            for r in range(world):
                pieces.setdefault(GLOBAL_STEP, []).append(
                    (step.slice, shard_file_name(OPT_KIND, r, world, prefix), r))
        metadata = build_metadata(pieces, {**src.dtypes, GLOBAL_STEP: step.dtype}
                                  if step is not None else src.dtypes)
    if step is not None:
        for r in range(world):
            files.setdefault((OPT_KIND, r), []).append(_copy(step, GLOBAL_STEP))
    targets = tuple(TargetFile(f"{folder}/{shard_file_name(kind, r, world, prefix)}",
                               tuple(tensors), (("format", "ms"),))
                    for (kind, r), tensors in sorted(files.items(), key=lambda kv: (kv[0][1],
                                                                                   kv[0][0])))
    side = [(f"{folder}/{COMMON_FILE}", common.to_json())]
    if metadata is not None:
        side.append((f"{folder}/{METADATA_FILE}", metadata.to_json()))
    side.append((TRACKER_FILE, str(int(iteration))))
    return Plan("iteration", targets, tuple(side),
                f"Checkpoint 2.0 iteration {iteration} of {src.kind} {src.root}: "
                f"{len(targets)} file(s) over {world} rank(s)")
