"""Checkpoint folder and file names, as MindSpore Transformers spells them, and their parsers.

- rank folders: `rank_{r}`;
- rank files: `{prefix}_rank_{r}-{epoch}_{step}.{safetensors|ckpt}` (the extra files of
  save_network_params / save_trainable_params insert `-network` / `-trainable_params` before
  the numbers; MindSpore may add `_N` after the rank when a name is taken);
- a step is named by its suffix `-{epoch}_{step}` (anchored: step 1_1 never matches 11_1);
- complete MindSpore weights keep their hyper values in `hyper_param.safetensors`.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple

from ..errors import CheckpointError

HYPER_FILE = "hyper_param.safetensors"
FORMAT_SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt"}
EXTRA_KINDS = ("network", "trainable_params")

_RANK_DIR = re.compile(r"^rank_(\d+)$")
_STEP = re.compile(r"-(\d+)_(\d+)\.(safetensors|ckpt)$")
_RANK_FILE = re.compile(r"_rank_(\d+)(?:_\d+)?(?:-(?:network|trainable_params))?"
                        r"-(\d+)_(\d+)\.(safetensors|ckpt)$")


def rank_dir_name(rank: int) -> str:
    """`rank_{r}`, the per-rank folder name MindSpore Transformers uses."""
    return f"rank_{int(rank)}"


def parse_rank_dir(name: str) -> Optional[int]:
    """The rank of a `rank_{r}` folder name, else None."""
    m = _RANK_DIR.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else None


def rank_folders(folder: str) -> Dict[int, str]:
    """rank -> `folder/rank_{r}` for every rank folder present (sorted by rank); {} when none
    or when `folder` is not a folder."""
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        rank = parse_rank_dir(entry)
        if rank is not None and os.path.isdir(os.path.join(folder, entry)):
            out[rank] = os.path.join(folder, entry)
    return dict(sorted(out.items()))


def format_of(name: str) -> Optional[str]:
    """'safetensors' or 'ckpt' by the file's extension, else None."""
    for fmt, ext in FORMAT_SUFFIX.items():
        if name.endswith(ext):
            return fmt
    return None


def ckpt_file_name(prefix: str, rank: int, epoch: int, step: int, fmt: str = "safetensors",
                   kind: str = "") -> str:
    """`{prefix}_rank_{r}-{epoch}_{step}.{fmt}`; kind 'network' / 'trainable_params' inserts
    `-{kind}` before the numbers (the extra files of save_network_params/save_trainable_params)."""
    if fmt not in FORMAT_SUFFIX:
        raise CheckpointError(f"checkpoint format {fmt!r}: use 'safetensors' or 'ckpt'")
    if kind and kind not in EXTRA_KINDS:
        raise CheckpointError(f"checkpoint file kind {kind!r}: use one of {EXTRA_KINDS}")
    middle = f"-{kind}" if kind else ""
    return f"{prefix}_rank_{int(rank)}{middle}-{int(epoch)}_{int(step)}{FORMAT_SUFFIX[fmt]}"


def parse_ckpt_name(name: str) -> Optional[Tuple[int, int, int]]:
    """(rank, epoch, step) from a rank file name, or None when it does not follow the pattern."""
    m = _RANK_FILE.search(os.path.basename(name))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def prefix_of(name: str) -> Optional[str]:
    """The `{prefix}` of a rank file name `{prefix}_rank_{r}-...`, else None."""
    base = os.path.basename(name)
    m = _RANK_FILE.search(base)
    return base[:m.start()] if m else None


def parse_step(name: str) -> Optional[Tuple[int, int]]:
    """(epoch, step) from any checkpoint file name ending in `-{epoch}_{step}.{ext}` (ours,
    MindSpore Transformers' or MindSpore's `net-1_6.safetensors`), else None."""
    m = _STEP.search(os.path.basename(name))
    return (int(m.group(1)), int(m.group(2))) if m else None


def step_suffix(name: str) -> Optional[str]:
    """"{epoch}_{step}" from a checkpoint file name, else None."""
    key = parse_step(name)
    return None if key is None else format_step(key)


def format_step(key: Tuple[int, int]) -> str:
    """"{epoch}_{step}" of an (epoch, step) key: how a save is named on the command line."""
    return f"{int(key[0])}_{int(key[1])}"


def parse_step_arg(text: str, what: str = "--step") -> Tuple[int, int]:
    """(epoch, step) from "EPOCH_STEP" (or a file name with that suffix); CheckpointError
    naming `what` otherwise."""
    text = str(text).strip()
    m = re.fullmatch(r"(\d+)_(\d+)", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    key = parse_step(text)
    if key is None:
        raise CheckpointError(f"{what} {text!r}: give EPOCH_STEP (e.g. 1_20) or a checkpoint "
                              f"file name ending in -EPOCH_STEP.safetensors")
    return key
