"""`mindformers-st verify PATH [--strategy FILE_OR_DIR]`: is this checkpoint whole and intact?

Checks, collecting every problem rather than stopping at the first:
- every file's header is valid safetensors (strict rules of storage/reader.py);
- recorded xxh3 checksums match the bytes (files without checksums are only header-checked);
- complete folders: the index names existing files that hold the tensors it lists;
- Checkpoint 2.0 folders: every chunk metadata.json names is in its file with its shape and
  dtype, and the blocks tile each tensor (as distributed folders);
- distributed folders: no rank folder is missing; each stored tensor has the shape of its block;
  the distinct blocks of every global tensor tile it exactly (no hole, no partial overlap);
  with remove_redundancy every block is stored once; replicas agree in dtype and, where both
  record one, checksum.
Exit 0 only when all holds; otherwise the problems are printed and the exit code is 1.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from ..errors import MindformersSTError
from ..layout.slices import TensorSlice
from ..storage.checksum import decode_checksums, verify_checksums
from ..records.hyper import is_whole_value
from ..records.names import rank_folders
from ..records.scan import complete_files, select_save
from ..storage.reader import open_safetensors
from ..records.iteration import find_iteration, refuse_mixed_layouts
from .inspect import Checkpoint, StoredFile, apply_strategy, load_file, scan_iteration
from .options import add_step_arg

logger = logging.getLogger(__name__)


def _try_load(path: str, rank: Optional[int], problems: List[str]) -> Optional[StoredFile]:
    try:
        return load_file(path, rank)
    except (MindformersSTError, OSError) as exc:
        problems.append(str(exc))
        return None


def _check_checksums(files: List[StoredFile], problems: List[str]) -> int:
    """Recompute recorded checksums; returns how many tensors were verified."""
    checked = 0
    for f in files:
        if "checksums" not in f.metadata:
            if f.ours is not None:   # our writer always records them: the header was altered
                problems.append(f"{f.path}: written by mindformers-st but records no checksums; "
                                f"the header was altered")
            continue
        try:
            with open_safetensors(f.path) as sf:
                # every tensor must have a digest and every digest a tensor
                try:
                    names = sorted(set(sf.tensors) | set(decode_checksums(sf.metadata) or {}))
                except ValueError:
                    names = None   # malformed: verify_checksums reports it
                found = verify_checksums(sf, names)
                problems.extend(found)
                try:
                    checked += len(decode_checksums(sf.metadata) or {})
                except ValueError:
                    pass   # verify_checksums already reported the malformed record
        except (MindformersSTError, OSError) as exc:
            problems.append(str(exc))
    return checked


def _holes(whole: TensorSlice, blocks: List[TensorSlice]) -> List[TensorSlice]:
    """Parts of `whole` no block covers (blocks are disjoint or equal; see _check_tiling)."""
    from ..transform.sources import uncovered
    return uncovered(whole, blocks)


def _check_complete_folder(folder: str, problems: List[str]) -> List[StoredFile]:
    try:
        index, paths = complete_files(folder)
    except (MindformersSTError, OSError) as exc:
        problems.append(str(exc))
        return []
    files = [f for p in paths if (f := _try_load(p, None, problems)) is not None]
    if index is not None:
        held = {f.path: f.tensors for f in files}
        for name, rel in index.weight_map.items():
            p = index.path_of(name)
            if p in held and name not in held[p]:
                problems.append(f"{folder}: the index says tensor {name!r} is in {rel}, "
                                f"but that file does not hold it")
    return files


def _check_distributed(folder: str, strategy: Optional[str], problems: List[str],
                       step: Optional[str] = None) -> List[StoredFile]:
    files: List[StoredFile] = []
    try:
        selection = select_save(folder, step)
    except MindformersSTError as exc:
        problems.append(str(exc))
        return files
    for r, path in selection.files.items():
        f = _try_load(path, r, problems)
        if f is not None:
            files.append(f)
    world = max([max(selection.files) + 1] + [f.ours.world_size for f in files if f.ours])
    for r in range(world):
        if r not in selection.files:
            what = ("is missing" if not os.path.isdir(os.path.join(folder, f"rank_{r}"))
                    else f"has no file of save {selection.suffix}")
            problems.append(f"{folder}: rank_{r}/ {what} (world size {world}); its slices "
                            f"cannot be checked or merged")
    if strategy:
        try:
            apply_strategy(Checkpoint(folder, "distributed", files), strategy)
        except (MindformersSTError, OSError) as exc:
            problems.append(str(exc))
            return files
    elif len(files) > 1 and not any(f.slices for f in files):
        problems.append(f"{folder}: the rank files carry no mindformers_st slice metadata; pass "
                        f"--strategy (the strategy files of the run that saved them) to check "
                        f"that the slices cover every tensor")
        return files
    _check_tiling(folder, files, problems)
    return files


def _check_tiling(folder: str, files: List[StoredFile], problems: List[str]) -> None:
    dedup = any((f.ours is not None and f.ours.remove_redundancy) or
                f.metadata.get("remove_redundancy") == "True" for f in files)
    # global name -> block -> [(file, dtype, checksum or None)]
    pieces: Dict[str, Dict[TensorSlice, List[Tuple[str, str, Optional[str]]]]] = {}
    shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for f in files:
        try:
            digests = decode_checksums(f.metadata) or {}
        except ValueError:
            digests = {}
        for name, entry in f.tensors.items():
            block = f.slices.get(name)
            if block is None:
                if not is_whole_value(name, entry.shape) and f.slices:
                    problems.append(f"{f.path}: tensor {name!r} has no slice in the file's "
                                    f"metadata (or the strategy); its place is unknown")
                continue
            if tuple(entry.shape) != tuple(block.sizes):
                problems.append(f"{f.path}: tensor {name!r} is stored with shape "
                                f"{tuple(entry.shape)} but its block {block.to_json()} has "
                                f"sizes {tuple(block.sizes)}")
                continue
            known = shapes.setdefault(name, (block.global_shape, f.path))
            if known[0] != block.global_shape:
                problems.append(f"tensor {name!r}: {f.path} says global shape "
                                f"{block.global_shape}, {known[1]} says {known[0]}")
                continue
            pieces.setdefault(name, {}).setdefault(block, []).append(
                (f.path, entry.dtype, digests.get(name)))
    for name, blocks in pieces.items():
        distinct = list(blocks)
        overlap = False
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                if a.intersect(b) is not None:
                    problems.append(f"tensor {name!r}: blocks {a.to_json()} and {b.to_json()} "
                                    f"overlap without being the same block")
                    overlap = True
        if not overlap:
            for hole in _holes(TensorSlice.whole(distinct[0].global_shape), distinct):
                problems.append(f"tensor {name!r}: block {hole.to_json()} is in no rank file; "
                                f"a slice is missing")
        for block, holders in blocks.items():
            if dedup and len(holders) > 1:
                problems.append(f"tensor {name!r}: block {block.to_json()} is stored "
                                f"{len(holders)} times ({[os.path.relpath(h[0], folder) for h in holders]}) "
                                f"in a remove_redundancy checkpoint")
            first = holders[0]
            for other in holders[1:]:
                if other[1] != first[1]:
                    problems.append(f"tensor {name!r}: block {block.to_json()} is {first[1]} in "
                                    f"{first[0]} but {other[1]} in {other[0]}")
                elif first[2] and other[2] and first[2] != other[2]:
                    problems.append(f"tensor {name!r}: replicas of block {block.to_json()} in "
                                    f"{first[0]} and {other[0]} have different checksums")


def _check_iteration(path: str, problems: List[str]) -> List[StoredFile]:
    from ..transform.sources import describe_iteration
    try:
        ckpt = scan_iteration(find_iteration(path))
        describe_iteration(path)   # each chunk in its file, shapes, dtypes, no hole
    except (MindformersSTError, OSError) as exc:
        problems.append(str(exc))
        return []
    if ckpt.kind == "distributed":
        _check_tiling(ckpt.path, ckpt.files, problems)
    return ckpt.files


def verify_path(path: str, strategy: Optional[str] = None, step: Optional[str] = None
                ) -> Tuple[List[str], dict]:
    """(problems, stats) for the checkpoint at `path`; problems is [] when it is sound."""
    problems: List[str] = []
    path = os.path.abspath(path)
    if os.path.isfile(path):
        files = [f for f in [_try_load(path, None, problems)] if f is not None]
        kind = "file"
    elif os.path.isdir(path):
        try:
            refuse_mixed_layouts(path, bool(rank_folders(path)))
            iteration = find_iteration(path)
        except MindformersSTError as exc:
            return [str(exc)], {}
        if iteration is not None:
            kind = "Checkpoint 2.0"
            files = _check_iteration(path, problems)
        elif rank_folders(path):
            kind = "distributed"
            files = _check_distributed(path, strategy, problems, step)
        else:
            kind = "complete"
            files = _check_complete_folder(path, problems)
    else:
        return [f"{path}: no such file or folder"], {}
    checked = _check_checksums(files, problems)
    return problems, {"kind": kind, "files": len(files),
                      "tensors": sum(len(f.tensors) for f in files), "checksums": checked}


def run(args) -> int:
    """The command body: 0 when sound, 1 with the list of problems otherwise."""
    problems, stats = verify_path(args.path, args.strategy, args.step)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"OK: {stats['kind']} checkpoint, {stats['files']} files, {stats['tensors']} tensors, "
          f"{stats['checksums']} checksums verified")
    return 0


def register(subparsers) -> None:
    """Add `verify` to the CLI."""
    p = subparsers.add_parser("verify", help="check headers, checksums and slice coverage",
                              description=__doc__.splitlines()[0])
    p.add_argument("path", help="a safetensors file, a complete folder or a rank_x/ folder")
    p.add_argument("--strategy", help="MindSpore strategy file or folder giving the slices of "
                                      "rank files (default: the files' own metadata)")
    add_step_arg(p)
    p.set_defaults(func=run)
