"""The commit protocol of training checkpoints: file names, per-rank `meta.json`, `committed.json`.

A save becomes visible in two steps (contracts.md, "checkpoint/"):
1. every rank writes its file atomically (temporary file, fsync, rename, folder fsync) and then
   its `rank_{r}/meta.json` (atomic);
2. after every rank has reported success, rank 0 appends the save to `{directory}/committed.json`
   (atomic). Only then does the save count: resume and pruning read `committed.json`, never a
   folder listing, so a crash at any moment leaves the previous committed state intact.

This module is pure (no MindSpore): it names files, reads and writes the records, and answers
`committed_saves(directory)` — the saves resume may pick, validated, newest last.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import CheckpointError, MindformersSTError
from ..storage.index import atomic_write_text, check_inside
from ..storage.reader import read_header

logger = logging.getLogger(__name__)

COMMITTED_FILE = "committed.json"
META_FILE = "meta.json"
COMMIT_FORMAT = 1
FORMAT_SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt"}

# MindSpore Transformers' name: {prefix}_rank_{r}-{epoch}_{step}, optionally {prefix}_N_rank_... .
_NAME = re.compile(r"_rank_(\d+)(?:_\d+)?-(\d+)_(\d+)\.(safetensors|ckpt)$")


def rank_dir_name(rank: int) -> str:
    """`rank_{r}`, the per-rank folder name MindSpore Transformers uses."""
    return f"rank_{int(rank)}"


def ckpt_file_name(prefix: str, rank: int, epoch: int, step: int, fmt: str = "safetensors",
                   kind: str = "") -> str:
    """`{prefix}_rank_{r}-{epoch}_{step}.{fmt}`; kind 'network' / 'trainable_params' inserts
    `-{kind}` before the numbers (the extra files of save_network_params/save_trainable_params)."""
    if fmt not in FORMAT_SUFFIX:
        raise CheckpointError(f"checkpoint format {fmt!r}: use 'safetensors' or 'ckpt'")
    middle = f"-{kind}" if kind else ""
    return f"{prefix}_rank_{int(rank)}{middle}-{int(epoch)}_{int(step)}{FORMAT_SUFFIX[fmt]}"


def parse_ckpt_name(name: str):
    """(rank, epoch, step) from a checkpoint file name, or None when it does not follow the pattern."""
    m = _NAME.search(os.path.basename(name))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@dataclass
class CommittedSave:
    """One entry of `committed.json`: a save every rank finished.

    `files` maps each rank to its file, relative to the checkpoint directory."""

    epoch: int
    step: int
    global_step: int
    files: Dict[int, str]
    directory: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def key(self):
        """(epoch, step): the order saves are made in."""
        return (self.epoch, self.step)

    def path(self, rank: int) -> str:
        """Absolute path of rank `rank`'s file."""
        return os.path.join(self.directory, self.files[rank])

    def to_json(self) -> dict:
        out = {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
               "files": {str(r): f for r, f in sorted(self.files.items())}}
        out.update(self.extra)
        return out

    @staticmethod
    def from_json(obj, directory: str, where: str) -> "CommittedSave":
        """Parse one entry; CheckpointError naming `where` when a field is missing or mistyped."""
        try:
            files = {int(r): f for r, f in obj["files"].items()}
            if not files or not all(isinstance(f, str) for f in files.values()):
                raise ValueError("'files' must map ranks to file names")
            extra = {k: v for k, v in obj.items() if k not in ("epoch", "step", "global_step", "files")}
            return CommittedSave(int(obj["epoch"]), int(obj["step"]), int(obj["global_step"]), files,
                                 directory, extra)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed save entry {obj!r} ({exc}); the record is "
                                  f"damaged — delete the entry or the file to fall back to meta.json") from exc


# ---- per-rank meta.json ------------------------------------------------------------------------

def write_rank_meta(rank_dir: str, epoch: int, step: int, file_name: str,
                    committed: Sequence[str]) -> str:
    """Atomically write `rank_dir/meta.json`: MindSpore Transformers' last_epoch/last_step/
    last_ckpt_file plus `committed` (this rank's durable save files, oldest first)."""
    path = os.path.join(rank_dir, META_FILE)
    atomic_write_text(path, json.dumps({"last_epoch": int(epoch), "last_step": int(step),
                                        "last_ckpt_file": file_name,
                                        "committed": list(committed)}, indent=1))
    return path


def read_rank_meta(rank_dir: str) -> Optional[dict]:
    """The rank's meta.json as a dict, None when absent; CheckpointError when unreadable."""
    path = os.path.join(rank_dir, META_FILE)
    return _read_json_object(path, "delete it to let resume fall back to the other records")


def _read_json_object(path: str, remedy: str) -> Optional[dict]:
    """A JSON object from `path`, None when the file does not exist; CheckpointError (ending
    with `remedy`) when it cannot be read or is not an object. Both records are written
    atomically, so damage means a change from outside, not a torn write."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); {remedy}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must be a JSON object, got {type(obj).__name__}; {remedy}")
    return obj


# ---- committed.json ------------------------------------------------------------------------------

def read_committed(directory: str) -> Optional[dict]:
    """`committed.json` parsed (format checked), or None when the directory has none."""
    path = os.path.join(directory, COMMITTED_FILE)
    obj = _read_json_object(path, "it is written atomically, so it was changed by hand or the "
                                  "disk is damaged: delete it to fall back to the per-rank "
                                  "meta.json files")
    if obj is None:
        return None
    if obj.get("format") != COMMIT_FORMAT or not isinstance(obj.get("saves"), list):
        raise CheckpointError(f"{path}: not a format-{COMMIT_FORMAT} commit record "
                              f"(need {{'format': 1, 'world_size': N, 'saves': [...]}})")
    return obj


def load_committed_entries(directory: str) -> List[CommittedSave]:
    """Every entry of `committed.json` as recorded (not validated), in commit order (oldest
    first); [] without one."""
    directory = os.path.abspath(directory)
    obj = read_committed(directory)
    if obj is None:
        return []
    where = os.path.join(directory, COMMITTED_FILE)
    return [CommittedSave.from_json(e, directory, where) for e in obj["saves"]]


def write_committed(directory: str, world_size: int, entries: Sequence[CommittedSave]) -> str:
    """Atomically replace `committed.json` with `entries` (in commit order, oldest first)."""
    path = os.path.join(directory, COMMITTED_FILE)
    saves = [e.to_json() for e in entries]
    atomic_write_text(path, json.dumps({"format": COMMIT_FORMAT, "world_size": int(world_size),
                                        "saves": saves}, indent=1))
    return path


def add_committed(directory: str, world_size: int, entry: CommittedSave,
                  keep: Optional[int] = None) -> List[CommittedSave]:
    """Append `entry` to committed.json (an entry with the same epoch/step is replaced, the new
    one counts as newest); with `keep`, drop the oldest-committed entries beyond it. Returns the
    entries dropped (their files may now be deleted: the record no longer points at them)."""
    entries = [e for e in load_committed_entries(directory) if e.key != entry.key]
    entries.append(entry)
    dropped: List[CommittedSave] = []
    if keep is not None and len(entries) > keep:
        dropped, entries = entries[:len(entries) - keep], entries[len(entries) - keep:]
    write_committed(directory, world_size, entries)
    return dropped


def validate_save(save: CommittedSave, world_size: Optional[int] = None) -> List[str]:
    """Problems that stop `save` from loading: a missing rank, a missing file, a file outside the
    directory, an invalid safetensors header, or a header naming another rank/step. [] when fine.

    Header-level only (cheap); `mindformers-st verify` checks the bytes against the checksums."""
    problems = []
    ranks = set(save.files)
    recorded = save.extra.get("world_size")
    if isinstance(recorded, int) and recorded > 0:   # the run that made this save may differ in size
        world_size = recorded
    if world_size is not None and ranks != set(range(world_size)):
        problems.append(f"save {save.key}: files for ranks {sorted(ranks)}, expected 0..{world_size - 1}")
    for rank, rel in sorted(save.files.items()):
        try:
            path = check_inside(save.directory, rel)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (rank {rank} of save {save.key})")
            continue
        if path.endswith(".safetensors"):
            try:
                _, metadata, _ = read_header(path)
            except (MindformersSTError, OSError) as exc:
                problems.append(f"{path}: {exc}")
                continue
            ours = metadata.get("mindformers_st")
            if ours is not None:
                try:
                    obj = json.loads(ours)
                    if (obj.get("rank"), obj.get("epoch"), obj.get("step")) != (rank, save.epoch, save.step):
                        problems.append(f"{path}: header says rank {obj.get('rank')} epoch "
                                        f"{obj.get('epoch')} step {obj.get('step')}, the commit "
                                        f"record says rank {rank} {save.key}")
                except (ValueError, AttributeError) as exc:
                    problems.append(f"{path}: __metadata__['mindformers_st'] is not JSON ({exc})")
        elif os.path.getsize(path) == 0:
            problems.append(f"{path}: empty file")
    return problems


def committed_saves(directory: str) -> List[CommittedSave]:
    """The saves of `directory` that resume may load: entries of committed.json whose every rank
    file exists and whose headers validate, in commit order (newest last: resume takes [-1]).
    Commit order, not (epoch, step) order: a run restarted from step 0 in the same folder makes
    newer saves with smaller numbers, and those are the ones to resume from (and to keep).

    [] when there is no committed.json (a MindSpore Transformers folder: fall back to meta.json).
    Entries that fail validation are skipped with a warning naming the problem."""
    directory = os.path.abspath(directory)
    obj = read_committed(directory)
    if obj is None:
        return []
    world = obj.get("world_size")
    world = world if isinstance(world, int) and world > 0 else None
    good = []
    for save in load_committed_entries(directory):
        problems = validate_save(save, world)
        if problems:
            logger.warning("%s: skipping committed save %s: %s", directory, save.key, "; ".join(problems[:3]))
            continue
        good.append(save)
    return good


def remove_files(paths: Sequence[str]) -> None:
    """Delete files that no record points at any more (missing ones are fine)."""
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("%s: could not remove pruned checkpoint file (%s)", p, exc)
