"""What `load_checkpoint` points at: Hugging Face weights, complete MindSpore weights, a folder of
`rank_x/` distributed weights, one file, MindSpore `.ckpt` files, or MindSpore Transformers 2.x's
Checkpoint 2.0 layout (`iteration_XXXXXXXX/`, records.iteration).

Detection reads directory listings and safetensors headers only (never tensor data), so it is
cheap enough to run on every rank. It also enforces `load_ckpt_format`: a folder that holds the
other format is a ConfigError that says which value to set, instead of loading nothing.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

from ..convert.rules import ALL_RENAMES, translate
from ..errors import ConfigError, CheckpointError
from ..records.iteration import (METADATA_FILE, find_iteration, refuse_mixed_layouts,
                                 parse_iteration_dir, parse_shard_file, shard_files)
from ..records.names import HYPER_FILE, parse_rank_dir, rank_folders, step_suffix
from ..storage.index import HF_INDEX, MS_INDEX, read_index
from ..storage.reader import read_header

logger = logging.getLogger(__name__)

FORMATS = ("ckpt", "safetensors")


@dataclass(frozen=True)
class CheckpointSource:
    """The result of detection.

    kind: "hf" (Hugging Face names, converted before use), "complete" (MindSpore names, every
        tensor whole) or "distributed" (a folder of `rank_x/`).
    format: "safetensors" or "ckpt".
    path: the folder (or the single complete file) to read.
    file_suffix: "{epoch}_{step}" when a rank file was named, so every rank takes that step.
    files: the weight files found (top level for complete/hf; rank 0's folder for distributed).
    layout: "legacy", or "iteration" for a Checkpoint 2.0 save (path is then its
        `iteration_XXXXXXXX/` folder; kind "complete" for a one-card save without
        metadata.json, "distributed" with one).
    """

    kind: str
    format: str
    path: str
    file_suffix: Optional[str] = None
    files: tuple = ()
    layout: str = "legacy"


def _ext(fmt: str) -> str:
    return ".safetensors" if fmt == "safetensors" else ".ckpt"


def _other(fmt: str) -> str:
    return "ckpt" if fmt == "safetensors" else "safetensors"


def _files(folder: str, fmt: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, "*" + _ext(fmt))))


def _wrong_format(path: str, found: str, fmt: str) -> ConfigError:
    return ConfigError(
        f"load_checkpoint {path} holds {found} files but load_ckpt_format is {fmt!r}; set "
        f"load_ckpt_format: {found!r} (in the YAML or --load_ckpt_format {found})")


def tensor_names(path: str) -> List[str]:
    """Tensor names of a complete safetensors folder (from its index, else every file's header)
    or of one file. Hyper values (hyper_param.safetensors) are left out."""
    if os.path.isfile(path):
        return list(read_header(path)[0])
    index = read_index(path)
    if index is not None:
        return list(index.weight_map)
    names: List[str] = []
    for f in _files(path, "safetensors"):
        if os.path.basename(f) != HYPER_FILE:
            names.extend(read_header(f)[0])
    return names


def is_hf_names(names) -> bool:
    """True when the names are Hugging Face Llama-family names (`model.embed_tokens.weight`,
    `...self_attn.q_proj.weight`, ...) that convert to different MindSpore names."""
    return any(translate(n, ALL_RENAMES, 0) not in (None, n) for n in names)


def detect_checkpoint(path: str, load_ckpt_format: str = "ckpt") -> CheckpointSource:
    """Classify `load_checkpoint`.

    - a file: `.safetensors` / `.ckpt` (must match `load_ckpt_format`); inside `rank_{r}/` it
      names a step of distributed weights (every rank loads the file of that step), otherwise it
      is complete weights in one file (Hugging Face names are detected);
    - a folder with `rank_x/` subfolders: distributed weights;
    - a Checkpoint 2.0 folder (`latest_checkpointed_iteration.txt`: its iteration), one
      `iteration_XXXXXXXX/` folder, or a `model-`/`opt-` file in one: that iteration;
    - a folder with weight files: complete weights, Hugging Face when `config.json` /
      `model.safetensors.index.json` or the tensor names say so.
    CheckpointError when the path does not exist or holds no weights; ConfigError when it holds
    only the other format than `load_ckpt_format`.
    """
    if load_ckpt_format not in FORMATS:
        raise ConfigError(f"load_ckpt_format must be one of {FORMATS}, got {load_ckpt_format!r}")
    fmt = load_ckpt_format
    if not path:
        raise ConfigError("load_checkpoint is empty; set it to a weights file or folder")
    path = os.path.abspath(path.rstrip("/") or "/")
    if not os.path.exists(path):
        raise CheckpointError(f"load_checkpoint {path} does not exist; check the path (relative "
                              f"paths are taken from the working directory {os.getcwd()})")
    if os.path.isfile(path):
        return _detect_file(path, fmt)
    ranks = rank_folders(path)
    refuse_mixed_layouts(path, bool(ranks))
    if find_iteration(path) is not None:
        return _detect_iteration(path, fmt)
    if ranks:
        first = ranks[min(ranks)]
        files = _files(first, fmt)
        if not files:
            if _files(first, _other(fmt)):
                raise _wrong_format(path, _other(fmt), fmt)
            raise CheckpointError(f"{first}: no {_ext(fmt)} file in this rank folder; every "
                                  f"rank_x/ folder of distributed weights needs its file(s)")
        return CheckpointSource("distributed", fmt, path, None, tuple(files))
    files = _files(path, fmt)
    if not files:
        if _files(path, _other(fmt)):
            raise _wrong_format(path, _other(fmt), fmt)
        raise CheckpointError(
            f"load_checkpoint {path}: no {_ext(fmt)} file and no rank_x/ folder; point it at a "
            f"folder of complete weights, a folder of rank_x/ distributed weights, or one file")
    kind = "complete"
    if fmt == "safetensors":
        has_hf_index = os.path.isfile(os.path.join(path, HF_INDEX))
        has_ms_index = os.path.isfile(os.path.join(path, MS_INDEX))
        names = tensor_names(path)
        if is_hf_names(names):
            kind = "hf"
        elif has_hf_index and not has_ms_index and not names:
            kind = "hf"
    return CheckpointSource(kind, fmt, path, None, tuple(files))


def _detect_iteration(path: str, fmt: str) -> CheckpointSource:
    it = find_iteration(path)
    if fmt != "safetensors":
        raise _wrong_format(path, "safetensors", fmt)
    files = shard_files(it.folder)
    kind = "distributed" if os.path.isfile(os.path.join(it.folder, METADATA_FILE)) else "complete"
    return CheckpointSource(kind, fmt, it.folder, None, tuple(files), "iteration")


def _detect_file(path: str, fmt: str) -> CheckpointSource:
    ext = os.path.splitext(path)[1]
    if ext not in (".safetensors", ".ckpt"):
        raise CheckpointError(f"load_checkpoint {path}: not a .safetensors or .ckpt file")
    found = ext[1:]
    if found != fmt:
        raise _wrong_format(path, found, fmt)
    parent = os.path.dirname(path)
    if parse_iteration_dir(parent) is not None and parse_shard_file(path) is not None:
        # one rank's shard of a Checkpoint 2.0 save: the save is the whole iteration folder
        return _detect_iteration(parent, fmt)
    if parse_rank_dir(parent) is not None:
        # A rank file names a step of distributed weights: MindSpore Transformers globbed
        # `<file>/rank_r/...` here and silently loaded nothing; we load that step on every rank.
        suffix = step_suffix(path)
        if suffix is None:
            raise CheckpointError(
                f"load_checkpoint {path} is a file inside {os.path.basename(parent)}/ but its "
                f"name has no '-{{epoch}}_{{step}}' suffix to find the other ranks' files; point "
                f"load_checkpoint at the folder holding the rank_x/ folders")
        return CheckpointSource("distributed", fmt, os.path.dirname(parent), suffix, (path,))
    kind = "hf" if fmt == "safetensors" and is_hf_names(read_header(path)[0]) else "complete"
    return CheckpointSource(kind, fmt, path, None, (path,))
