"""Index files of sharded checkpoints (HF `model.safetensors.index.json`, MindSpore `param_name_map.json`),
atomic text writes, and shard file names.

Both index formats are `{"metadata": {"total_size": N}, "weight_map": {tensor name: file}}`. Every
name an index gives must stay inside the checkpoint folder: absolute paths and `..` are refused,
so a downloaded index cannot make us read or overwrite other files by name. Files may be
symlinks (Hugging Face hub cache snapshots): `check_inside` is the rule, for every reader.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from ..errors import CheckpointError, SafetensorsFormatError
from .atomic import atomic_write_text
from .reader import read_header

logger = logging.getLogger(__name__)

HF_INDEX = "model.safetensors.index.json"
MS_INDEX = "param_name_map.json"
_INDEX_NAMES = {"hf": HF_INDEX, "ms": MS_INDEX}


@dataclass
class WeightIndex:
    """A parsed index: which file (relative to `folder`) holds each tensor."""

    folder: str
    kind: str                      # "hf" or "ms"
    weight_map: Dict[str, str]
    total_size: int

    def files(self) -> list:
        """The distinct files the index names, in first-mention order."""
        return list(dict.fromkeys(self.weight_map.values()))

    def path_of(self, name: str) -> str:
        """Absolute path of the file holding tensor `name`."""
        return os.path.join(self.folder, self.weight_map[name])


def shard_file_name(k: int, n: int) -> str:
    """Name of shard k of n (1-based), as Hugging Face names them: model-0000k-of-0000n.safetensors."""
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise ValueError(f"shard number {k} of {n}: need 1 <= k <= n")
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def check_inside(folder: str, rel: str, index_path: str = "", tensor: str = "") -> str:
    """`folder/rel` for a file name a record gives (an index's weight_map, committed.json): the
    one rule every reader follows. The NAME must be relative and stay in the folder — an
    absolute path, a drive or a `..` part is a CheckpointError naming the record and entry.
    The FILE may be a symlink, followed wherever it points, as Hugging Face does (a hub cache
    snapshot links `model-00001-of-00002.safetensors` to `../../blobs/<sha>`); what it reaches
    must be a regular file (storage.reader refuses anything else before opening it)."""
    where = f"{index_path}: " if index_path else ""
    what = f"tensor {tensor!r} -> " if tensor else ""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}{what}{rel!r} is not a file name")
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
        raise CheckpointError(f"{where}{what}{rel!r} points outside the checkpoint folder (absolute path or "
                              f"'..'); an index may only name files inside its folder. Fix the index.")
    return os.path.join(folder, rel)


def _parse_index(folder: str, kind: str) -> WeightIndex:
    path = os.path.join(folder, _INDEX_NAMES[kind])
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-create the index") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CheckpointError(f"{path}: expected {{\"metadata\": {{\"total_size\": N}}, \"weight_map\": "
                              f"{{name: file}}}}; re-create the index")
    weight_map = obj["weight_map"]
    for name, rel in weight_map.items():
        check_inside(folder, rel, path, name)
    missing = sorted({rel for rel in weight_map.values() if not os.path.isfile(os.path.join(folder, rel))})
    if missing:
        raise CheckpointError(f"{path}: names {len(missing)} file(s) that do not exist: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                              f"the checkpoint is incomplete (finish the download or copy)")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    total = meta.get("total_size")
    if isinstance(total, float) and total.is_integer():
        total = int(total)  # some exporters write 123.0
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        total = _data_bytes(folder, weight_map.values())
        logger.info("%s: metadata.total_size missing or invalid; computed %d from the shard headers", path, total)
    return WeightIndex(folder, kind, dict(weight_map), total)


def _data_bytes(folder: str, files) -> int:
    total = 0
    for rel in dict.fromkeys(files):
        p = os.path.join(folder, rel)
        try:
            _, _, data_start = read_header(p)
        except SafetensorsFormatError as exc:
            raise CheckpointError(f"{p}: cannot size the shard named by the index: {exc}") from None
        total += os.path.getsize(p) - data_start
    return total


def read_index(folder, kind: Optional[str] = None) -> Optional[WeightIndex]:
    """The index of `folder` (HF or MindSpore), or None when it has neither.

    `kind` ("hf"/"ms") reads that one only. With both files present and no kind, the HF index is
    returned if the two agree, else CheckpointError. Every entry is checked to stay inside the
    folder and to name an existing file (CheckpointError otherwise).
    """
    folder = os.path.abspath(os.fspath(folder))
    kinds = [kind] if kind else [k for k in ("hf", "ms") if os.path.isfile(os.path.join(folder, _INDEX_NAMES[k]))]
    if kind and kind not in _INDEX_NAMES:
        raise ValueError(f"index kind {kind!r}: use 'hf' or 'ms'")
    if kind and not os.path.isfile(os.path.join(folder, _INDEX_NAMES[kind])):
        return None
    if not kinds:
        return None
    indexes = [_parse_index(folder, k) for k in kinds]
    if len(indexes) == 2 and indexes[0].weight_map != indexes[1].weight_map:
        raise CheckpointError(f"{folder}: {HF_INDEX} and {MS_INDEX} disagree on which file holds which "
                              f"tensor; delete the stale one")
    return indexes[0]


def index_text(weight_map: Mapping[str, str], total_size: int) -> str:
    """The text of an index file (either kind): `{"metadata": {"total_size": N}, "weight_map":
    {name: file}}` with entries sorted by tensor name, the text transformers writes
    (`json.dumps(obj, indent=2, sort_keys=True) + "\n"`: non-ASCII escaped; a test pins it).
    Written entry by entry because the indenting encoder is pure Python, 3 µs an entry."""
    if not weight_map:
        entries = "{}"
    else:
        enc = json.encoder.encode_basestring_ascii   # the C escaper json.dumps uses for str
        entries = "{\n" + ",\n".join([f"    {enc(k)}: {enc(weight_map[k])}"
                                        for k in sorted(weight_map)]) + "\n  }"
    return (f'{{\n  "metadata": {{\n    "total_size": {int(total_size)}\n  }},\n'
            f'  "weight_map": {entries}\n}}\n')


def write_index(folder, kind: str, weight_map: Mapping[str, str], total_size: int) -> str:
    """Write the `kind` ("hf"/"ms") index of `folder` atomically; returns its path.

    Entries are sorted by tensor name (as Hugging Face writes them) and must stay inside the folder.
    """
    if kind not in _INDEX_NAMES:
        raise ValueError(f"index kind {kind!r}: use 'hf' or 'ms'")
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, _INDEX_NAMES[kind])
    for name, rel in weight_map.items():
        check_inside(folder, rel, path, name)
    atomic_write_text(path, index_text(weight_map, total_size))
    return path
