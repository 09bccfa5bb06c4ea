"""MindSpore Transformers 2.x "Checkpoint 2.0" layout (`use_legacy_format: False`): its names and
its three records, the one definition every reader and writer of that layout uses.

    {root}/latest_checkpointed_iteration.txt    the newest complete iteration ("6"), written last
    {root}/iteration_{iteration:08d}/
        model-{rank:07d}-{world:07d}.safetensors  each rank's network parameters (its slices)
        opt-{rank:07d}-{world:07d}.safetensors    each rank's optimizer state (not the weights)
        common.json       epoch_num, step_num, global_step, loss_scale, global_batch_size,
                          ckpt_status (`CommonInfo`; MindSpore Transformers builds its
                          dataclass from every key, so no other key may be written)
        metadata.json     distributed saves only: per tensor its global shape, dtype and chunks
                          (global offset + local shape), and per chunk the file(s) storing it
                          (`IterationMetadata`); a one-card save has none (every tensor whole)

File names may carry a user prefix (`{prefix}-model-...`). Reference: mindformers 2.0.0
`mindformers/checkpoint/{checkpoint,utils,metadata}.py`. Pure Python over `layout/slices` and
`storage/atomic`.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple

from ..dtypes import MINDSPORE_TO_ST as MS_DTYPE_TO_ST
from ..errors import CheckpointError
from ..layout.slices import TensorSlice
from ..storage.atomic import atomic_write_text

TRACKER_FILE = "latest_checkpointed_iteration.txt"
COMMON_FILE = "common.json"
METADATA_FILE = "metadata.json"
ITERATION_PREFIX = "iteration_"
MODEL_KIND, OPT_KIND = "model", "opt"

_ITER_DIR = re.compile(r"^iteration_(\d+)$")
_SHARD = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<kind>model|opt)-(?P<rank>\d{7})-(?P<world>\d{7})"
                    r"\.safetensors$")

# metadata.json spells dtypes as MindSpore names them (str(mindspore dtype))
ST_TO_MS_DTYPE = {v: k for k, v in MS_DTYPE_TO_ST.items()}


# --------------------------------------------------------------------------- names
def iteration_dir_name(iteration: int) -> str:
    """`iteration_{iteration:08d}`."""
    if int(iteration) < 0:
        raise CheckpointError(f"iteration {iteration}: must be >= 0")
    return f"{ITERATION_PREFIX}{int(iteration):08d}"


def parse_iteration_dir(name: str) -> Optional[int]:
    """The iteration of an `iteration_XXXXXXXX` folder name, else None."""
    m = _ITER_DIR.match(os.path.basename(str(name).rstrip("/")))
    return int(m.group(1)) if m else None


def shard_file_name(kind: str, rank: int, world: int, prefix: Optional[str] = None) -> str:
    """`[{prefix}-]{model|opt}-{rank:07d}-{world:07d}.safetensors`."""
    if kind not in (MODEL_KIND, OPT_KIND):
        raise CheckpointError(f"shard kind {kind!r}: use 'model' or 'opt'")
    if not 0 <= int(rank) < int(world):
        raise CheckpointError(f"shard rank {rank} outside world size {world}")
    head = f"{prefix}-" if prefix else ""
    return f"{head}{kind}-{int(rank):07d}-{int(world):07d}.safetensors"


@dataclass(frozen=True)
class ShardName:
    """A parsed shard file name."""

    kind: str
    rank: int
    world: int
    prefix: Optional[str] = None


def parse_shard_file(name: str) -> Optional[ShardName]:
    """The parts of a `model-`/`opt-` shard file name, else None."""
    m = _SHARD.match(os.path.basename(name))
    if not m:
        return None
    return ShardName(m.group("kind"), int(m.group("rank")), int(m.group("world")),
                     m.group("prefix"))


# --------------------------------------------------------------------------- tracker
def read_tracker(root: str) -> Optional[int]:
    """The iteration `latest_checkpointed_iteration.txt` names, None when `root` has no tracker.
    CheckpointError when it is not an integer or its iteration folder is missing."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        text = fh.read().strip()
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{path}: {text[:40]!r} is not an iteration number; write the "
                              f"number of the newest complete iteration_XXXXXXXX folder")
    iteration = int(text)
    if not os.path.isdir(os.path.join(root, iteration_dir_name(iteration))):
        raise CheckpointError(f"{path} names iteration {iteration} but {iteration_dir_name(iteration)}/ "
                              f"is missing; restore it or fix the tracker (iterations present: "
                              f"{iterations_on_disk(root)[-6:]})")
    return iteration


def write_tracker(root: str, iteration: int) -> str:
    """Atomically point `latest_checkpointed_iteration.txt` at `iteration` (the commit of a
    save in this layout: written after every file of the iteration). Returns its path."""
    return atomic_write_text(os.path.join(root, TRACKER_FILE), str(int(iteration)))


def iterations_on_disk(root: str) -> List[int]:
    """Every `iteration_XXXXXXXX/` folder's iteration in `root`, sorted."""
    try:
        entries = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i for e in entries if (i := parse_iteration_dir(e)) is not None
                  and os.path.isdir(os.path.join(root, e)))


@dataclass(frozen=True)
class IterationSave:
    """One iteration of a Checkpoint 2.0 folder: `root` (holding the tracker, or the iteration's
    parent), `iteration`, and `folder` (the `iteration_XXXXXXXX/` path)."""

    root: str
    iteration: int
    folder: str
    how: str   # "tracker" (the newest committed) or "named" (the path was the iteration folder)


def find_iteration(path: str) -> Optional[IterationSave]:
    """The iteration `path` means: a folder with `latest_checkpointed_iteration.txt` -> the
    iteration it names; an `iteration_XXXXXXXX/` folder -> itself. None for other paths.
    A folder of iteration folders without a tracker is a CheckpointError (nothing committed)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return None
    iteration = parse_iteration_dir(path)
    if iteration is not None:
        return IterationSave(os.path.dirname(path), iteration, path, "named")
    it = read_tracker(path)
    if it is not None:
        return IterationSave(path, it, os.path.join(path, iteration_dir_name(it)), "tracker")
    present = iterations_on_disk(path)
    if present:
        raise CheckpointError(
            f"{path}: holds iteration folders {[iteration_dir_name(i) for i in present[-4:]]} but "
            f"no {TRACKER_FILE}: no save was committed; point load_checkpoint at one "
            f"iteration_XXXXXXXX folder to read it anyway")
    return None


def refuse_mixed_layouts(path: str, has_rank_folders: bool) -> None:
    """CheckpointError when `path` holds both legacy `rank_x/` folders and Checkpoint 2.0
    iteration folders: which one a reader takes must never depend on the reader."""
    if has_rank_folders and (os.path.isfile(os.path.join(path, TRACKER_FILE))
                             or iterations_on_disk(path)):
        raise CheckpointError(
            f"{path}: holds both rank_x/ folders (legacy layout) and iteration_XXXXXXXX/ folders "
            f"(Checkpoint 2.0); point at one iteration_XXXXXXXX folder, or move one layout's "
            f"saves to another folder")


def shard_files(folder: str) -> List[str]:
    """The `model-`/`opt-` shard files of an iteration folder, sorted (absolute paths); any
    other `*.safetensors` there is a CheckpointError (MindSpore Transformers would load it)."""
    out = []
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".safetensors") or entry.startswith("."):
            continue
        if parse_shard_file(entry) is None:
            raise CheckpointError(f"{os.path.join(folder, entry)}: not a model-/opt- shard of a "
                                  f"Checkpoint 2.0 iteration folder; move it out (MindSpore "
                                  f"Transformers would load it as weights)")
        out.append(os.path.join(folder, entry))
    if not out:
        raise CheckpointError(f"{folder}: no model-*.safetensors / opt-*.safetensors file in this "
                              f"iteration folder")
    return out


# --------------------------------------------------------------------------- common.json
@dataclass(frozen=True)
class CommonInfo:
    """`common.json`: the training counters of an iteration (MindSpore Transformers'
    `CommonInfo`, every field optional there)."""

    epoch_num: Optional[int] = None
    step_num: Optional[int] = None
    global_step: Optional[int] = None
    loss_scale: Optional[float] = None
    global_batch_size: Optional[int] = None
    ckpt_status: Optional[int] = None

    def to_json(self) -> str:
        """The file text, exactly the six keys MindSpore Transformers' dataclass accepts."""
        return json.dumps(asdict(self), indent=4) + "\n"

    @staticmethod
    def from_json(obj, where: str = COMMON_FILE) -> "CommonInfo":
        """Checked parse: a JSON object of the known keys with numbers or nulls; CheckpointError
        naming `where` and the key otherwise."""
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(CommonInfo)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {unknown}; common.json holds only "
                                  f"{sorted(known)}")
        for k, v in obj.items():
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            if k != "loss_scale" and isinstance(v, float) and not float(v).is_integer():
                ok = False
            if not ok:
                raise CheckpointError(f"{where}: {k} is {v!r}; expected "
                                      f"{'a number' if k == 'loss_scale' else 'an integer'} or null")
        return CommonInfo(**{k: (v if k == "loss_scale" or v is None else int(v))
                             for k, v in obj.items()})

    def hyper_values(self) -> Dict[str, float]:
        """The counters this record holds (nulls left out) by their hyper-value names."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "ckpt_status"}


def _read_json_record(folder: str, name: str, parse):
    """`parse(obj, path)` of the JSON file `name` in `folder`; None when absent; CheckpointError
    naming the file when it is not JSON."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    return parse(obj, path)


def read_common(folder: str) -> Optional[CommonInfo]:
    """The `common.json` of an iteration folder, None when absent."""
    return _read_json_record(folder, COMMON_FILE, CommonInfo.from_json)


def write_common(folder: str, info: CommonInfo) -> str:
    """Atomically write `common.json` into an iteration folder. Returns its path."""
    return atomic_write_text(os.path.join(folder, COMMON_FILE), info.to_json())


# --------------------------------------------------------------------------- metadata.json
@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a tensor (`slice`) and the shard file(s) that store it (replicas)."""

    slice: TensorSlice
    files: Tuple[str, ...]
    storage_ranks: Tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of `metadata.json`: global shape, safetensors dtype, its chunks."""

    name: str
    global_shape: Tuple[int, ...]
    dtype: str
    chunks: Tuple[StoredChunk, ...]


def shard_id(name: str, offsets) -> str:
    """The storage key of a chunk, as MindSpore Transformers spells it: str((name, offsets))."""
    return str((name, tuple(int(o) for o in offsets)))


def parse_shard_id(text: str, where: str) -> Tuple[str, Tuple[int, ...]]:
    """(name, offsets) from a storage key "('name', (0, 8))"; CheckpointError otherwise."""
    try:
        name, offsets = ast.literal_eval(text)
        offsets = tuple(int(o) for o in offsets)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise CheckpointError(f"{where}: storage key {text[:80]!r} is not ('name', (offsets))") \
            from exc
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: storage key {text[:80]!r} does not start with a name")
    return name, offsets


def _ints(value, what: str, where: str) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        raise CheckpointError(f"{where}: {what} is {value!r}; expected a list of integers >= 0")
    return tuple(value)


@dataclass(frozen=True)
class IterationMetadata:
    """`metadata.json`, read into our slice types: name -> TensorMeta.

    Its per-tensor `layout` (a serialized MindSpore Layout), `axis_fragmentations` and
    `replica_id` are not read: the chunks (global offset + local shape) and the files storing
    each say where every byte is, which is all a reader needs; they are written in
    MindSpore Transformers' shape so its readers accept our files."""

    tensors: Dict[str, TensorMeta]

    @staticmethod
    def from_json(obj, where: str = METADATA_FILE) -> "IterationMetadata":
        """Checked parse of the file's object: every chunk inside its tensor, every chunk
        stored in at least one file and every storage key naming a known chunk."""
        if not isinstance(obj, dict) or not isinstance(obj.get("state_dict_metadata"), dict) \
                or not isinstance(obj.get("storage_data"), dict):
            raise CheckpointError(f"{where}: expected an object with 'state_dict_metadata' and "
                                  f"'storage_data'")
        storage: Dict[Tuple[str, Tuple[int, ...]], List[dict]] = {}
        for key, entries in obj["storage_data"].items():
            ident = parse_shard_id(key, where)
            if not isinstance(entries, list) or not entries or not all(
                    isinstance(e, dict) and isinstance(e.get("file_name"), str) for e in entries):
                raise CheckpointError(f"{where}: storage_data[{key!r}] must be a non-empty list "
                                      f"of {{file_name, storage_rank, rank_group}}")
            storage[ident] = entries
        tensors: Dict[str, TensorMeta] = {}
        used = set()
        for name, meta in obj["state_dict_metadata"].items():
            w = f"{where}: tensor {name!r}"
            if not isinstance(meta, dict):
                raise CheckpointError(f"{w}: expected an object")
            shape = _ints(meta.get("global_shape"), "global_shape", w)
            props = meta.get("properties") or {}
            ms_dtype = props.get("dtype")
            if ms_dtype not in MS_DTYPE_TO_ST:
                raise CheckpointError(f"{w}: dtype {ms_dtype!r} is not one of "
                                      f"{sorted(MS_DTYPE_TO_ST)}")
            raw_chunks = meta.get("chunk")
            if not isinstance(raw_chunks, list) or not raw_chunks:
                raise CheckpointError(f"{w}: 'chunk' must be a non-empty list")
            chunks = []
            for c in raw_chunks:
                offsets = _ints((c or {}).get("global_offset"), "global_offset", w)
                sizes = _ints((c or {}).get("local_shape"), "local_shape", w)
                if not shape and offsets == (0,):   # a 0-d tensor is keyed at offset (0,)
                    offsets = ()
                try:
                    sl = TensorSlice(shape, offsets, sizes)
                except ValueError as exc:
                    raise CheckpointError(f"{w}: chunk {c} does not fit global shape "
                                          f"{list(shape)} ({exc})") from exc
                key = (name, tuple(c["global_offset"]))
                if key not in storage:
                    raise CheckpointError(f"{w}: chunk at {list(c['global_offset'])} is in no "
                                          f"file (no storage_data entry {shard_id(*key)!r})")
                used.add(key)
                entries = storage[key]
                chunks.append(StoredChunk(sl, tuple(e["file_name"] for e in entries),
                                          tuple(int(e.get("storage_rank", -1)) for e in entries)))
            tensors[name] = TensorMeta(name, shape, MS_DTYPE_TO_ST[ms_dtype], tuple(chunks))
        stray = sorted(set(storage) - used)
        if stray:
            raise CheckpointError(f"{where}: storage_data names chunk(s) no tensor has, e.g. "
                                  f"{shard_id(*stray[0])!r}")
        return IterationMetadata(tensors)

    def to_json(self) -> str:
        """The file text in MindSpore Transformers' shape (layout null, replica_id 0)."""
        sdm, storage = {}, {}
        for t in self.tensors.values():
            sdm[t.name] = {
                "properties": {"dtype": ST_TO_MS_DTYPE[t.dtype], "replica_id": 0,
                               "allow_shape_mismatch": False, "allow_to_save": True},
                "global_shape": list(t.global_shape),
                "axis_fragmentations": _fragmentations(t),
                "layout": None,
                "chunk": [{"global_offset": list(c.slice.offsets) or [0],
                           "local_shape": list(c.slice.sizes)} for c in t.chunks],
            }
            for c in t.chunks:
                ranks = list(c.storage_ranks) if c.storage_ranks else [0] * len(c.files)
                storage[shard_id(t.name, tuple(c.slice.offsets) or (0,))] = [
                    {"file_name": f, "storage_rank": r, "rank_group": ranks}
                    for f, r in zip(c.files, ranks)]
        return json.dumps({"state_dict_metadata": sdm, "storage_data": storage}, indent=4) + "\n"


def _fragmentations(t: TensorMeta) -> List[int]:
    return [len({c.slice.offsets[d] for c in t.chunks}) for d in range(len(t.global_shape))]


def read_metadata(folder: str) -> Optional[IterationMetadata]:
    """The `metadata.json` of an iteration folder, None when absent (a one-card save)."""
    return _read_json_record(folder, METADATA_FILE, IterationMetadata.from_json)


def write_metadata(folder: str, meta: IterationMetadata) -> str:
    """Atomically write `metadata.json` into an iteration folder. Returns its path."""
    return atomic_write_text(os.path.join(folder, METADATA_FILE), meta.to_json())


def build_metadata(pieces: Mapping[str, List[Tuple[TensorSlice, str, int]]],
                   dtypes: Mapping[str, str]) -> IterationMetadata:
    """An IterationMetadata from name -> [(slice, file name, storage rank)] (replicas of one
    slice become one chunk stored in several files)."""
    tensors = {}
    for name, items in pieces.items():
        by_slice: Dict[TensorSlice, List[Tuple[str, int]]] = {}
        for sl, f, r in items:
            by_slice.setdefault(sl, []).append((f, r))
        chunks = tuple(StoredChunk(sl, tuple(f for f, _ in fr), tuple(r for _, r in fr))
                       for sl, fr in sorted(by_slice.items(), key=lambda kv: kv[0].offsets))
        tensors[name] = TensorMeta(name, tuple(items[0][0].global_shape), dtypes[name], chunks)
    return IterationMetadata(tensors)
