"""`mindformers-st inspect PATH [--json]`: what a checkpoint holds, from its headers only.

PATH is one safetensors file, a complete folder (MindSpore `param_name_map.json`, Hugging Face
index or a lone `model.safetensors`, or just `*.safetensors`), a distributed `rank_x/` folder, or
a Checkpoint 2.0 folder (its tracker's iteration, or one `iteration_XXXXXXXX/`: blocks from its
metadata.json, counters from its common.json).
Prints one row per stored tensor (dtype, shape, bytes, file; for rank files the block of the
global tensor it holds, from our `__metadata__` or `--strategy`), step/epoch/metadata, totals.
`--json` prints the same as one JSON object. Exit 0 when readable; on any error the message and 1.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import CheckpointError, LayoutError
from ..layout.slices import TensorSlice
from ..records.hyper import DISPLAY_ORDER, is_hyper, is_whole_value
from ..records.iteration import (IterationSave, find_iteration, parse_shard_file, read_common,
                                 read_metadata, refuse_mixed_layouts, shard_files)
from ..records.names import parse_step, rank_folders
from ..records.rank_meta import RankFileMeta
from ..records.scan import SaveSelection, complete_files, select_save
from ..storage.reader import TensorEntry, open_safetensors, read_header
from .options import add_step_arg

logger = logging.getLogger(__name__)


@dataclass
class StoredFile:
    """One safetensors file of a checkpoint, its header parsed (never its data)."""

    path: str
    rank: Optional[int]
    tensors: Dict[str, TensorEntry]
    metadata: Dict[str, str]
    ours: Optional[RankFileMeta] = None   # the file's own description, if it has one
    slices: Dict[str, TensorSlice] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """What PATH is and which files make it up (see `scan`)."""

    path: str
    kind: str                          # "file" | "complete" | "distributed"
    files: List[StoredFile]
    index: Optional[object] = None     # storage.index.WeightIndex for complete folders
    missing_ranks: List[int] = field(default_factory=list)
    selection: Optional[SaveSelection] = None   # which save of a rank_x/ folder, and why
    layout: str = "legacy"             # or "iteration" (Checkpoint 2.0)
    counters: Dict[str, float] = field(default_factory=dict)   # common.json


def load_file(path: str, rank: Optional[int] = None) -> StoredFile:
    """Parse and validate one file's header (SafetensorsFormatError / CheckpointError)."""
    tensors, metadata, _ = read_header(path)
    ours = RankFileMeta.from_metadata(metadata, path)
    return StoredFile(path, rank, tensors, metadata, ours, dict(ours.slices) if ours else {})


def scan(path: str, strategy: Optional[str] = None, step: Optional[str] = None) -> Checkpoint:
    """Find and parse every file of the checkpoint at `path` (for a rank_x/ folder, the save
    `records.scan.select_save` chooses, or `step`); the first bad header raises."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return Checkpoint(path, "file", [load_file(path)])
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    ranks = rank_folders(path)
    refuse_mixed_layouts(path, bool(ranks))
    it = find_iteration(path)
    if it is not None:
        return scan_iteration(it)
    if not ranks:
        index, files = complete_files(path)
        return Checkpoint(path, "complete", [load_file(f) for f in files], index)
    selection = select_save(path, step)   # one save for every rank, never a mix
    files = [load_file(p, r) for r, p in selection.files.items()]
    world = max([max(selection.files) + 1] + [f.ours.world_size for f in files if f.ours])
    ckpt = Checkpoint(path, "distributed", files,
                      missing_ranks=[r for r in range(world) if r not in selection.files],
                      selection=selection)
    if strategy:
        apply_strategy(ckpt, strategy)
    return ckpt


def scan_iteration(it: IterationSave) -> Checkpoint:
    """The files of one Checkpoint 2.0 iteration, each rank file's blocks from metadata.json
    ("distributed"), or a one-card save without it ("complete")."""
    meta = read_metadata(it.folder)
    common = read_common(it.folder)
    files = [load_file(p, parse_shard_file(p).rank if meta else None)
             for p in shard_files(it.folder)]
    if meta is not None:
        by_name = {os.path.basename(f.path): f for f in files}
        for t in meta.tensors.values():
            for chunk in t.chunks:
                for fname in chunk.files:
                    if fname in by_name:
                        by_name[fname].slices[t.name] = chunk.slice
    return Checkpoint(it.folder, "distributed" if meta else "complete", files,
                      layout="iteration", counters=common.hyper_values() if common else {})


def apply_strategy(ckpt: Checkpoint, strategy: str) -> None:
    """Set every rank file's slices from a MindSpore strategy (overriding its own metadata)."""
    from ..layout.strategy import check_strategy_world, read_strategy
    layouts = read_strategy(strategy)
    saved_by = max([(f.rank or 0) + 1 for f in ckpt.files] + [r + 1 for r in ckpt.missing_ranks]
                   + [f.ours.world_size for f in ckpt.files if f.ours])
    try:
        check_strategy_world(layouts, strategy, saved_by, ckpt.path)
    except LayoutError as exc:
        raise CheckpointError(str(exc)) from exc
    for f in ckpt.files:
        f.slices = {}
        for name, entry in f.tensors.items():
            lay = layouts.get(name)
            if lay is None:
                continue
            if f.rank not in lay.ranks():
                raise CheckpointError(f"{f.path}: holds {name!r} but the strategy {strategy} puts "
                                      f"it on ranks {lay.ranks().start}..{lay.ranks().stop - 1}; "
                                      f"pass the strategy of the run that saved these files")
            try:
                full = lay.with_local_shape(entry.shape) if lay.global_shape is None else lay
            except LayoutError as exc:
                raise CheckpointError(f"{f.path}: tensor {name!r} of shape {entry.shape} does not "
                                      f"fit the strategy ({exc})") from exc
            f.slices[name] = full.slice_for(f.rank)


def _hyper_values(f: StoredFile) -> Dict[str, list]:
    out = {}
    wanted = [n for n in DISPLAY_ORDER if n in f.tensors and f.tensors[n].numel <= 16]
    # then the other whole scalars (a CheckpointMonitor's append_info): 0-d and not a slice
    wanted += sorted(n for n, e in f.tensors.items()
                     if is_whole_value(n, e.shape) and e.numel == 1 and n not in f.slices
                     and n not in DISPLAY_ORDER)
    if wanted:
        with open_safetensors(f.path) as sf:
            for n in wanted:
                out[n] = sf.read(n).reshape(-1).tolist()
    return out


def summarize(ckpt: Checkpoint) -> dict:
    """The JSON-able description `inspect` prints."""
    root = ckpt.path if ckpt.kind != "file" else os.path.dirname(ckpt.path)
    rows, files, step, epoch, pcfg, dedup, hyper = [], [], None, None, None, None, {}
    for f in ckpt.files:
        rel = os.path.relpath(f.path, root)
        nbytes = sum(e.nbytes for e in f.tensors.values())
        meta = {k: v for k, v in f.metadata.items() if k not in ("checksums", "mindformers_st")}
        files.append({"file": rel, "rank": f.rank, "tensors": len(f.tensors), "bytes": nbytes,
                      "metadata": meta, "checksums": "checksums" in f.metadata})
        for name, e in f.tensors.items():
            row = {"name": name, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes,
                   "file": rel}
            if f.rank is not None:
                row["rank"] = f.rank
            if name in f.slices:
                row.update(f.slices[name].to_json())
            rows.append(row)
        if f.ours:
            step = f.ours.step if step is None else step
            epoch = f.ours.epoch if epoch is None else epoch
            pcfg = pcfg or f.ours.parallel_config
            dedup = f.ours.remove_redundancy if dedup is None else dedup
        if dedup is None and "remove_redundancy" in f.metadata:
            dedup = f.metadata["remove_redundancy"] == "True"
        key = parse_step(f.path)
        if key and step is None:
            epoch, step = key
        for k, v in _hyper_values(f).items():
            hyper.setdefault(k, v)
    for k, v in ckpt.counters.items():   # common.json
        hyper.setdefault(k, [v])
    if step is None and "step_num" in ckpt.counters:
        step = ckpt.counters["step_num"]
    if step is None and "global_step" in hyper:
        step = hyper["global_step"][0]
    if epoch is None and "epoch_num" in hyper:
        epoch = hyper["epoch_num"][0]
    global_names = {r["name"] for r in rows}
    return {
        "path": ckpt.path, "kind": ckpt.kind, "layout": ckpt.layout,
        "index": ({"kind": ckpt.index.kind, "total_size": ckpt.index.total_size}
                  if ckpt.index is not None else None),
        "step": step, "epoch": epoch, "parallel_config": pcfg, "remove_redundancy": dedup,
        "hyper": hyper, "missing_ranks": ckpt.missing_ranks, "files": files, "tensors": rows,
        "selected": ({"save": ckpt.selection.suffix, "how": ckpt.selection.how,
                      "notes": list(ckpt.selection.ignored)} if ckpt.selection else None),
        "totals": {"files": len(files), "stored_tensors": len(rows),
                   "global_tensors": len(global_names),
                   "bytes": sum(f["bytes"] for f in files)},
    }


def _fmt_block(row: dict) -> str:
    if "offsets" not in row:
        return ""
    dims = ", ".join(f"{o}:{o + s}" for o, s in zip(row["offsets"], row["sizes"]))
    return f"[{dims}] of {tuple(row['global_shape'])}"


def print_table(summary: dict) -> None:
    """Human form of `summarize`'s result."""
    layout = " (Checkpoint 2.0)" if summary.get("layout") == "iteration" else ""
    print(f"{summary['kind']} checkpoint{layout}: {summary['path']}")
    for key in ("step", "epoch", "remove_redundancy", "parallel_config", "index"):
        if summary.get(key) is not None:
            print(f"  {key}: {summary[key]}")
    for k, v in summary["hyper"].items():
        print(f"  {k}: {v if len(v) > 1 else v[0]}")
    sel = summary.get("selected")
    if sel:
        print(f"  save: {sel['save']} ({sel['how']})")
        for note in sel["notes"]:
            print(f"  note: {note}")
    if summary["missing_ranks"]:
        print(f"  missing ranks: {summary['missing_ranks']}")
    distributed = summary["kind"] == "distributed"
    head = ["tensor", "dtype", "shape", "bytes", "file"] + (["rank", "slice"] if distributed else [])
    body = [[r["name"], r["dtype"], str(tuple(r["shape"])), str(r["bytes"]), r["file"]]
            + ([str(r.get("rank", "")),
                 _fmt_block(r) or ("whole (hyper value)" if is_hyper(r["name"])
                                  else "unknown (no slice metadata: --strategy)")]
               if distributed else [])
            for r in summary["tensors"]]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
    for f in summary["files"]:
        if f["metadata"]:
            print(f"metadata {f['file']}: {json.dumps(f['metadata'], sort_keys=True)}")
    t = summary["totals"]
    print(f"total: {t['files']} files, {t['stored_tensors']} stored tensors "
          f"({t['global_tensors']} distinct names), {t['bytes']} bytes")


def run(args) -> int:
    """The command body: 0 when every header is readable (errors propagate to cli.main)."""
    try:
        summary = summarize(scan(args.path, getattr(args, "strategy", None),
                                 getattr(args, "step", None)))
    except OSError as exc:
        raise CheckpointError(f"{args.path}: cannot read ({exc})") from exc
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_table(summary)
    return 0


def register(subparsers) -> None:
    """Add `inspect` to the CLI."""
    p = subparsers.add_parser("inspect", help="list the tensors, slices and metadata of a checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("path", help="a safetensors file, a complete folder or a rank_x/ folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--strategy", help="MindSpore strategy file or folder giving the slices of "
                                      "rank files (default: the files' own metadata)")
    add_step_arg(p)
    p.set_defaults(func=run)

