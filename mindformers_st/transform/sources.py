"""What a source checkpoint holds: for every global tensor, which stored tensors in which files
carry which slice of it. Built from safetensors headers (and strategy files) only, never data.

Three shapes of input are understood:
- complete: one file, or a folder with `param_name_map.json` (MindSpore) or
  `model.safetensors.index.json` (Hugging Face), or a folder of `*.safetensors` without index;
  every stored tensor is whole. `hyper_param.safetensors` holds the hyper values.
- MindSpore Transformers 2.x Checkpoint 2.0 (`iteration_XXXXXXXX/`, `records.iteration`): the
  iteration the tracker names (or the iteration folder given); its `metadata.json` says which
  chunk each `model-`/`opt-` file holds (none: a one-card save, every tensor whole), and its
  `common.json` counters become `counters`;
- distributed: `rank_{r}/*.safetensors`, one file per rank (which save, when a folder holds
  several, is `records.scan.select_save`'s answer: the commit record decides), described by MindSpore strategy
  files or by the `__metadata__["mindformers_st"]["slices"]` our own files carry. Files saved with
  `remove_redundancy` hold only some slices: the headers say which, never rank 0 by assumption.
Non-sliced values (global_step, epoch_num, step_num, loss_scale, scalars not in the strategy) are
"hyper" values and travel whole.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from ..errors import CheckpointError, LayoutError, UndescribedRankFilesError
from ..fast_init import fast_init
from ..layout.slices import TensorSlice, tiles
from ..records.hyper import HYPER_NAMES
from ..records.iteration import (TRACKER_FILE, find_iteration, iterations_on_disk,
                                 parse_iteration_dir, read_common, read_metadata,
                                 refuse_mixed_layouts, shard_files)
from ..records.names import HYPER_FILE, rank_folders
from ..records.rank_meta import RankFileMeta
from ..records.scan import SaveSelection, complete_files, select_save
from ..storage.checksum import decode_checksums
from ..storage.reader import read_header
from .gc_pause import without_gc

logger = logging.getLogger(__name__)


@fast_init
@dataclass(frozen=True)
class SourceChunk:
    """One stored tensor: `name` in `file` (absolute path) holds `slice` of global tensor
    `global_name`, with safetensors dtype `dtype`. The stored array's shape is `slice.sizes`."""

    file: str
    name: str
    dtype: str
    global_name: str
    slice: TensorSlice


@dataclass
class SourceCheckpoint:
    """Everything a planner needs to know about a source, without its data.

    chunks: global name -> the stored pieces of it (replicas of the same slice may repeat).
    global_shapes / dtypes: per global name.
    hyper: name -> the whole stored value (a `SourceChunk` with a whole slice) of non-sliced values.
    kind: "complete" or "distributed"; epoch/step when the source says so (file name or metadata).
    layout: "legacy" (MindSpore Transformers' default layouts) or "iteration" (Checkpoint 2.0).
    counters: hyper values recorded beside the tensors rather than in a file (Checkpoint 2.0's
        `common.json`: epoch_num, step_num, global_step, loss_scale, global_batch_size).
    """

    chunks: Dict[str, List[SourceChunk]]
    global_shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    hyper: Dict[str, SourceChunk] = field(default_factory=dict)
    kind: str = "complete"
    root: str = ""
    epoch: Optional[int] = None
    step: Optional[int] = None
    selection: Optional[SaveSelection] = None   # which save of a rank_x/ folder (distributed)
    layout: str = "legacy"
    counters: Dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        """Global tensor names in source order."""
        return list(self.chunks)

    @property
    def files(self) -> List[str]:
        """Every file a chunk or hyper value lives in, sorted."""
        out = {c.file for cs in self.chunks.values() for c in cs}
        out.update(c.file for c in self.hyper.values())
        return sorted(out)

    def add(self, chunk: SourceChunk) -> None:
        """Record one stored piece, checking it agrees with what is known about its tensor."""
        g = chunk.global_name
        shape = tuple(chunk.slice.global_shape)
        known = self.global_shapes.get(g)
        if known is None:   # the first piece of its tensor
            self.global_shapes[g] = shape
            self.dtypes[g] = chunk.dtype
            self.chunks[g] = [chunk]
            return
        if known != shape:
            raise CheckpointError(
                f"tensor {g!r}: {chunk.file} says global shape {shape}, another file says "
                f"{self.global_shapes[g]}; the files come from different models or strategies")
        if self.dtypes[g] != chunk.dtype:
            raise CheckpointError(
                f"tensor {g!r}: dtype {chunk.dtype} in {chunk.file} but {self.dtypes[g]} elsewhere; "
                f"a checkpoint must store one dtype per tensor")
        self.chunks[g].append(chunk)

    def check_complete(self) -> None:
        """Raise CheckpointError naming the first tensor whose stored pieces leave a hole."""
        complete = set()   # (shape, pieces) found covered: most tensors repeat a few cuts
        for g, chunks in self.chunks.items():
            # keyed with the shape too: no pieces at all (a caller emptied the list) cover an
            # empty tensor but not another, and pieces say nothing of a shape changed by hand
            key = (self.global_shapes[g], tuple([c.slice for c in chunks]))
            if key in complete:
                continue
            hole = uncovered(TensorSlice.whole(key[0]), key[1])
            if not hole:
                complete.add(key)
            else:
                files = sorted({os.path.relpath(c.file, self.root or "/") for c in chunks})
                raise CheckpointError(
                    f"tensor {g!r}: block {hole[0].to_json()} is in no file (pieces found in "
                    f"{files}); a rank file is missing or was saved with remove_redundancy by a "
                    f"run whose files are not all here")


# --------------------------------------------------------------------------- box arithmetic
def subtract(box: TensorSlice, cut: TensorSlice,
             inter: Optional[TensorSlice] = None) -> List[TensorSlice]:
    """`box` minus `cut` as disjoint boxes (at most 2 per dimension); `inter` is their
    intersection when the caller has it already."""
    inter = box.intersect(cut) if inter is None else inter
    if inter is None:
        return [box]
    out = []
    offs, sizes = list(box.offsets), list(box.sizes)
    for d in range(len(offs)):
        lo, hi = offs[d], offs[d] + sizes[d]
        ilo, ihi = inter.offsets[d], inter.offsets[d] + inter.sizes[d]
        if ilo > lo:
            o, s = list(offs), list(sizes)
            o[d], s[d] = lo, ilo - lo
            out.append(TensorSlice._trusted(box.global_shape, tuple(o), tuple(s)))
        if ihi < hi:
            o, s = list(offs), list(sizes)
            o[d], s[d] = ihi, hi - ihi
            out.append(TensorSlice._trusted(box.global_shape, tuple(o), tuple(s)))
        offs[d], sizes[d] = ilo, ihi - ilo   # continue inside the intersection on this dim
    return out


def _tile(whole: TensorSlice, pieces, most: int = 16) -> bool:
    """True when a few distinct `pieces` of `whole`'s tensor are pairwise disjoint and hold as
    many elements as it: then they cover it (the quick answer for a tensor split over a few
    ranks; False means "not known", never "not covered")."""
    distinct = list(set(pieces))
    if len(distinct) > most or any(p.global_shape != whole.global_shape for p in distinct):
        return False
    return tiles(whole, distinct)   # a whole target holds every block of its tensor


def uncovered(target: TensorSlice, pieces) -> List[TensorSlice]:
    """The parts of `target` that none of `pieces` covers ([] when fully covered)."""
    rest = [target] if target.numel else []
    if rest and any(p.sizes == p.global_shape == target.global_shape for p in pieces):
        return []   # a whole piece covers any block of its tensor
    if rest and target.is_whole and _tile(target, pieces):
        return []
    for p in pieces:
        if not rest:
            break
        rest = [r for box in rest for r in subtract(box, p)]
    return [r for r in rest if r.numel]


# --------------------------------------------------------------------------- header access
def _header(path: str):
    return read_header(path)


def _chunk_whole(path: str, name: str, entry) -> SourceChunk:
    return SourceChunk(path, name, entry.dtype, name, TensorSlice.whole(entry.shape))


# --------------------------------------------------------------------------- complete
@without_gc
def describe_complete(folder_or_file: str) -> SourceCheckpoint:
    """Describe complete (unsliced) weights: one file, or a folder with a MindSpore or Hugging
    Face index, or a folder of `*.safetensors`. Tensors in `hyper_param.safetensors` and known
    hyper names (global_step, epoch_num, ...) become hyper values."""
    path = os.path.abspath(folder_or_file)
    if os.path.isfile(path):
        files, root = [path], os.path.dirname(path)
    elif os.path.isdir(path):
        root = path
        _, files = complete_files(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    src = SourceCheckpoint({}, {}, {}, kind="complete", root=root)
    for f in files:
        tensors, metadata, _ = _header(f)
        is_hyper_file = os.path.basename(f) == HYPER_FILE
        for name, entry in tensors.items():
            chunk = _chunk_whole(f, name, entry)
            if is_hyper_file or name in HYPER_NAMES:
                src.hyper.setdefault(name, chunk)
            elif name in src.chunks:
                raise CheckpointError(f"tensor {name!r} is stored twice in complete weights "
                                      f"({src.chunks[name][0].file} and {f}); remove one copy")
            else:
                src.add(chunk)
    return src


# --------------------------------------------------------------------------- distributed
def _load_layouts(strategy) -> Optional[dict]:
    if strategy is None or isinstance(strategy, Mapping):
        return strategy
    from ..layout.strategy import read_strategy
    return read_strategy(strategy)


@without_gc
def describe_distributed(folder: str, strategy=None, step=None) -> SourceCheckpoint:
    """Describe one save of `folder/rank_{r}/*.safetensors` from headers only.

    Which save is `records.scan.select_save(folder, step)`'s answer (the commit record decides;
    `step` "EPOCH_STEP" picks another).

    `strategy` is None (use each file's `mindformers_st` slices metadata), a strategy path (one
    file, a folder of per-rank files, or pipeline-merged; see layout.strategy.read_strategy) or
    a `{name: TensorLayout}` mapping. Tensors neither in the strategy nor in the slices metadata
    are hyper values. Raises CheckpointError before anything is written when a rank folder is
    missing, a stored shape disagrees with the strategy, or a tensor has a hole no file covers.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    ranks = rank_folders(folder)
    if not ranks:
        raise CheckpointError(f"{folder}: no rank_x/ folders; for complete weights use "
                              f"describe_complete (the commands detect this themselves)")
    selection = select_save(folder, step)
    layouts = _load_layouts(strategy)
    expected = set(selection.files) | set(range(max(ranks) + 1 if selection.record is None else 0))
    first = selection.files[min(selection.files)]
    meta0 = RankFileMeta.from_metadata(_header(first)[1], first)
    if layouts:
        from ..layout.strategy import check_strategy_world
        saved_by = meta0.world_size if meta0 is not None else max(expected) + 1
        try:
            check_strategy_world(layouts, strategy if isinstance(strategy, (str, os.PathLike))
                                 else "given", saved_by, folder)
        except LayoutError as exc:
            raise CheckpointError(str(exc)) from exc
        expected |= {r for lay in layouts.values() for r in lay.ranks()}
    elif meta0 is not None:   # our files know the world size: a missing last rank is caught too
        expected |= set(range(meta0.world_size))
    src = SourceCheckpoint({}, {}, {}, kind="distributed", root=folder, selection=selection)
    if selection.key is not None:
        src.epoch, src.step = selection.key
    metadata_of: Dict[str, Mapping[str, str]] = {}   # for the replicas' checksums, if any
    for r in sorted(expected):
        if r not in selection.files:
            what = "is missing" if r not in ranks else f"has no file of save {selection.suffix}"
            raise CheckpointError(
                f"{folder}: rank_{r}/ {what} (found ranks {sorted(selection.files)}); copy every "
                f"rank's folder, or pass the strategy of the run that wrote these files")
        path = selection.files[r]
        tensors, metadata, _ = _header(path)
        meta = RankFileMeta.from_metadata(metadata, path)
        if layouts is None and meta is None and len(ranks) > 1:
            raise UndescribedRankFilesError(
                f"{path}: no strategy given and the file carries no mindformers_st slice "
                f"metadata; pass --src-strategy (the strategy files of the run that saved it)")
        if r == min(selection.files) and meta is not None and meta.step is not None:
            src.epoch, src.step = meta.epoch, meta.step
        metadata_of[path] = metadata
        slices_meta = meta.slices if meta is not None else {}
        for name, entry in tensors.items():
            if layouts is None:   # our files: the slice is in the file's own metadata
                sl = slices_meta.get(name)
                if sl is not None and sl.sizes == entry.shape:
                    src.add(SourceChunk(path, name, entry.dtype, name, sl))
                    continue
            lay = layouts.get(name) if layouts else None
            if lay is not None:
                if r not in lay.ranks():
                    raise CheckpointError(
                        f"{path}: holds {name!r} but the strategy puts it on ranks "
                        f"{list(lay.ranks())[:8]}..., not rank {r}; the strategy does not match "
                        f"these files (pipeline stages?), pass the strategy of the run that saved them")
                if lay.global_shape is None:   # strategy files carry no shapes
                    try:
                        lay = lay.with_local_shape(entry.shape)
                    except LayoutError as exc:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} of shape {tuple(entry.shape)} cannot be a "
                            f"block of the strategy's layout ({exc}); the strategy does not match "
                            f"these files, pass the one of the run that saved them") from exc
                sl = lay.slice_for(r)
                if name in slices_meta and slices_meta[name] != sl:
                    raise CheckpointError(
                        f"{path}: tensor {name!r}: the file says it holds "
                        f"{slices_meta[name].to_json()} but the strategy says {sl.to_json()}; the "
                        f"strategy does not match these files (omit it to use the files' own "
                        f"metadata)")
            elif name in slices_meta:
                sl = slices_meta[name]
            elif layouts is None and meta is None:   # a single rank without description: whole
                sl = None if name in HYPER_NAMES else TensorSlice.whole(entry.shape)
            else:
                sl = None
            if sl is None:
                src.hyper.setdefault(name, _chunk_whole(path, name, entry))
                continue
            if tuple(sl.sizes) != tuple(entry.shape):
                raise CheckpointError(
                    f"{path}: tensor {name!r} is stored with shape {tuple(entry.shape)} but the "
                    f"{'strategy' if lay is not None else 'slice metadata'} says rank {r} holds "
                    f"{tuple(sl.sizes)} of {tuple(sl.global_shape)}; the strategy does not match "
                    f"these files, pass the one of the run that saved them")
            src.add(SourceChunk(path, name, entry.dtype, name, sl))
    if layouts:
        absent = [n for n in layouts if n not in src.chunks]
        if absent:
            logger.warning("%d tensors of the strategy are in no rank file (e.g. %s); they are "
                           "skipped", len(absent), absent[:3])
    src.check_complete()
    _check_replicas_agree(src, metadata_of)
    return src


def _check_replicas_agree(src: SourceCheckpoint,
                          metadata_of: Mapping[str, Mapping[str, str]]) -> None:
    """Replicas of one block must hold the same bytes. Files that record checksums (in the
    `__metadata__` `metadata_of` gives per file) let us check that without reading data; a
    difference means the layout (strategy) read them wrongly."""
    recorded: Dict[str, Mapping[str, str]] = {}

    def digest(c: SourceChunk) -> Optional[str]:
        if c.file not in recorded:   # decoded only for files holding a replica
            try:
                recorded[c.file] = decode_checksums(metadata_of.get(c.file, {})) or {}
            except ValueError:
                recorded[c.file] = {}   # a damaged record is reported when the bytes are read
        return recorded[c.file].get(c.name)
    for g, chunks in src.chunks.items():
        if len(chunks) < 2:
            continue
        seen: Dict[TensorSlice, SourceChunk] = {}
        for c in chunks:
            first = seen.setdefault(c.slice, c)
            if first is c:
                continue
            d, d0 = digest(c), digest(first)
            if d is not None and d0 is not None and d != d0:
                raise CheckpointError(
                    f"tensor {g!r}: {first.file} and {c.file} should hold the same block "
                    f"{c.slice.to_json()} but their checksums differ; the strategy does not "
                    f"match these files, pass the one of the run that saved them")


# --------------------------------------------------------------------------- Checkpoint 2.0
@without_gc
def describe_iteration(path: str) -> SourceCheckpoint:
    """Describe one iteration of a Checkpoint 2.0 folder from its headers, `metadata.json` and
    `common.json`: `path` is the folder holding `latest_checkpointed_iteration.txt` (its
    iteration) or one `iteration_XXXXXXXX/` folder. Without metadata.json (a one-card save)
    every tensor is whole and the source is "complete"; with it, "distributed". Hyper names
    (global_step, learning_rate, ...) are hyper values. CheckpointError naming the file and
    tensor when a file, a tensor or a chunk the metadata names is missing or of another shape
    or dtype, or a tensor is left with a hole."""
    it = find_iteration(path)
    if it is None:
        raise CheckpointError(f"{os.path.abspath(path)}: not a Checkpoint 2.0 folder (no "
                              f"latest_checkpointed_iteration.txt, not an iteration_XXXXXXXX "
                              f"folder)")
    files = shard_files(it.folder)
    meta = read_metadata(it.folder)
    common = read_common(it.folder)
    src = SourceCheckpoint({}, {}, {}, kind="complete" if meta is None else "distributed",
                           root=it.folder, layout="iteration",
                           counters=common.hyper_values() if common else {})
    if common is not None:
        src.epoch, src.step = common.epoch_num, common.step_num
    headers = {os.path.basename(f): _header(f)[0] for f in files}
    described = set()
    if meta is not None:
        for name, tensor in meta.tensors.items():
            for chunk in tensor.chunks:
                for fname in chunk.files:
                    fpath = os.path.join(it.folder, fname)
                    entry = headers.get(fname, {}).get(name)
                    if entry is None:
                        what = "does not exist" if fname not in headers else "does not hold it"
                        raise CheckpointError(
                            f"{fpath}: metadata.json says this file holds {name!r} at "
                            f"{list(chunk.slice.offsets)} but the file {what}; the iteration "
                            f"folder is incomplete — copy every rank's model-/opt- file")
                    if tuple(entry.shape) != tuple(chunk.slice.sizes) or entry.dtype != tensor.dtype:
                        raise CheckpointError(
                            f"{fpath}: tensor {name!r} is stored as {entry.dtype}{list(entry.shape)} "
                            f"but metadata.json says {tensor.dtype}{list(chunk.slice.sizes)}; the "
                            f"metadata belongs to another save")
                    described.add((fname, name))
                    piece = SourceChunk(fpath, name, entry.dtype, name, chunk.slice)
                    if name in HYPER_NAMES:
                        src.hyper.setdefault(name, piece)
                    else:
                        src.add(piece)
    for f in files:
        fname = os.path.basename(f)
        for name, entry in headers[fname].items():
            if (fname, name) in described:
                continue
            chunk = _chunk_whole(f, name, entry)
            if name in HYPER_NAMES:
                src.hyper.setdefault(name, chunk)
            elif meta is not None:
                raise CheckpointError(f"{f}: tensor {name!r} is not described by metadata.json; "
                                      f"the metadata belongs to another save")
            elif name in src.chunks:
                raise CheckpointError(f"tensor {name!r} is stored twice in a one-card save "
                                      f"({src.chunks[name][0].file} and {f}); remove one copy")
            else:
                src.add(chunk)
    src.check_complete()
    return src


def is_iteration_layout(path: str) -> bool:
    """True when `path` is a Checkpoint 2.0 folder (a tracker or a folder of iteration folders)
    or one `iteration_XXXXXXXX/` folder."""
    path = os.path.abspath(path)
    return os.path.isdir(path) and (parse_iteration_dir(path) is not None
                                    or os.path.isfile(os.path.join(path, TRACKER_FILE))
                                    or bool(iterations_on_disk(path)))


def is_distributed(path: str) -> bool:
    """True when `path` is a folder holding rank_x/ subfolders."""
    return os.path.isdir(path) and bool(rank_folders(path))


def describe_source(path: str, strategy=None, step=None) -> SourceCheckpoint:
    """Describe whatever `path` is: a folder of rank_x/ (distributed; `step` picks a save), a
    Checkpoint 2.0 folder (the tracker's iteration, or the iteration folder given) or complete
    weights."""
    if os.path.isdir(path):
        refuse_mixed_layouts(os.path.abspath(path), is_distributed(path))
    if is_distributed(path):
        return describe_distributed(path, strategy, step)
    if is_iteration_layout(path):
        if step is not None:
            raise CheckpointError(f"{path}: a Checkpoint 2.0 folder has no EPOCH_STEP saves; "
                                  f"point at its iteration_XXXXXXXX folder instead of --step")
        if strategy is not None:
            logger.warning("%s: metadata.json describes the slices; the source strategy is not "
                           "used", path)
        return describe_iteration(path)
    if strategy is not None:
        logger.warning("%s holds complete weights; the source strategy is not needed", path)
    return describe_complete(path)
