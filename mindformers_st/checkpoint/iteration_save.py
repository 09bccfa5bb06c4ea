"""CheckpointMonitor's `use_legacy_format: False` saves: MindSpore Transformers 2.x's Checkpoint
2.0 layout (records/iteration.py), written from the same rank snapshot as a legacy save.

Per save at global step N (the iteration), every rank writes into `iteration_{N:08d}/`:
- `model-{r:07d}-{world:07d}.safetensors`: its blocks of the network parameters;
- `opt-{r:07d}-{world:07d}.safetensors`: its blocks of the optimizer moments and `global_step`;
both through our streaming writer (xxh3 checksums and the rank's slice description in
`__metadata__`, which MindSpore Transformers' readers ignore). Then the commit, after every rank
reported success: rank 0 writes `common.json` (the counters), `metadata.json` (every rank's
blocks, computed from the layouts: no gathering) when there is more than one rank, and last,
atomically, `latest_checkpointed_iteration.txt` — the tracker is the commit record: a save
without it (a crash) is never what the top folder loads. Folders beyond keep_checkpoint_max,
oldest first, are removed after the tracker moved on.
Hyper values other than global_step (learning_rate, data_position, seed) are not stored: the
layout has no place for them (common.json takes only its six keys); resume derives them.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Mapping, Tuple

from ..dtypes import numpy_to_st
from ..layout.slices import TensorSlice
from ..records.hyper import GLOBAL_STEP
from ..records.iteration import (MODEL_KIND, OPT_KIND, CommonInfo, build_metadata,
                                 iteration_dir_name, parse_iteration_dir, shard_file_name,
                                 write_common, write_metadata, write_tracker)
from .state import RankSnapshot


def iteration_files(directory: str, snap: RankSnapshot, rank: int, world: int, iteration: int,
                    prefix=None) -> List[Tuple[str, RankSnapshot]]:
    """(path, snapshot) of this rank's `model-` and `opt-` files of the save at `iteration`
    (the opt file only when there is optimizer state)."""
    folder = os.path.join(directory, iteration_dir_name(iteration))
    weights = set(snap.network_names)
    opt = [n for n in snap.arrays if n not in weights and (n in snap.slices or n == GLOBAL_STEP)]
    jobs = [(os.path.join(folder, shard_file_name(MODEL_KIND, rank, world, prefix)),
             snap.subset(snap.network_names))]
    if opt:
        jobs.append((os.path.join(folder, shard_file_name(OPT_KIND, rank, world, prefix)),
                     snap.subset(opt)))
    return jobs


def iteration_metadata(layouts: Mapping, arrays_dtypes: Mapping[str, str], names_by_kind:
                       Mapping[str, List[str]], world: int, prefix=None):
    """The `metadata.json` record of a save where every rank holds `layouts[n].slice_for(r)` of
    each sliced tensor `n` (kind "model" or "opt" says its file)."""
    pieces: Dict[str, List[Tuple[TensorSlice, str, int]]] = {}
    for kind, names in names_by_kind.items():
        for n in names:
            for r in range(world):
                pieces.setdefault(n, []).append(
                    (layouts[n].slice_for(r), shard_file_name(kind, r, world, prefix), r))
    return build_metadata(pieces, arrays_dtypes)


def commit_iteration(directory: str, iteration: int, common: CommonInfo, snap: RankSnapshot,
                     layouts: Mapping, world: int, prefix=None) -> None:
    """Rank 0, after every rank wrote its files: common.json, metadata.json (world > 1), then
    the tracker (the commit)."""
    folder = os.path.join(directory, iteration_dir_name(iteration))
    write_common(folder, common)
    if world > 1:
        weights = [n for n in snap.network_names if n in snap.slices]
        opt = [n for n in snap.slices if n not in set(snap.network_names)]
        dtypes = {n: numpy_to_st(a.dtype) for n, a in snap.arrays.items()}
        write_metadata(folder, iteration_metadata(layouts, dtypes,
                                                  {MODEL_KIND: weights, OPT_KIND: opt},
                                                  world, prefix))
    write_tracker(directory, iteration)


def prune_iterations(directory: str, committed: List[int], keep: int) -> List[int]:
    """Remove the oldest iteration folders of `committed` (this run's, oldest first) beyond
    `keep`; returns what is left. Never the one the tracker names (the newest)."""
    dropped, left = committed[:max(0, len(committed) - keep)], committed[-keep:]
    for it in dropped:
        path = os.path.join(directory, iteration_dir_name(it))
        if parse_iteration_dir(path) == it and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    return left
