"""The commit protocol of training checkpoints: file names, per-rank `meta.json`, `committed.json`.

A save becomes visible in two steps (contracts.md, "checkpoint/"):
1. every rank writes its file atomically (temporary file, fsync, rename, folder fsync) and then
   its `rank_{r}/meta.json` (atomic);
2. after every rank has reported success, rank 0 appends the save to `{directory}/committed.json`
   (atomic). Only then does the save count: resume and pruning read `committed.json`, never a
   folder listing, so a crash at any moment leaves the previous committed state intact.

This module is pure (no MindSpore): it reads and writes the two records and answers
`committed_saves(directory)` — the saves that may be loaded, validated, newest last. File names
are `records.names`; the rank files' own description is `records.rank_meta`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import CheckpointError, MindformersSTError
from ..storage.index import atomic_write_text, check_inside
from ..storage.reader import read_header
from .names import format_of
from .rank_meta import RankFileMeta

logger = logging.getLogger(__name__)

COMMITTED_FILE = "committed.json"
META_FILE = "meta.json"
COMMIT_FORMAT = 1
_ENTRY_KEYS = ("epoch", "step", "global_step", "files", "run_id", "save_id")


@dataclass
class CommittedSave:
    """One entry of `committed.json`: a save every rank finished.

    `files` maps each rank to its file, relative to the checkpoint directory. `run_id` and
    `save_id` are the identity every rank file of the save carries in its metadata
    (records.rank_meta); None in records written before identities existed."""

    epoch: int
    step: int
    global_step: int
    files: Dict[int, str]
    directory: str = ""
    extra: Dict[str, object] = field(default_factory=dict)
    run_id: Optional[str] = None
    save_id: Optional[str] = None

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
        if self.run_id is not None:
            out["run_id"] = self.run_id
        if self.save_id is not None:
            out["save_id"] = self.save_id
        out.update(self.extra)
        return out

    @staticmethod
    def from_json(obj, directory: str, where: str) -> "CommittedSave":
        """Parse one entry; CheckpointError naming `where` when a field is missing or mistyped."""
        try:
            files = {int(r): f for r, f in obj["files"].items()}
            if not files or not all(isinstance(f, str) for f in files.values()):
                raise ValueError("'files' must map ranks to file names")
            extra = {k: v for k, v in obj.items() if k not in _ENTRY_KEYS}
            for key in ("epoch", "step", "global_step"):
                if not isinstance(obj[key], int) or isinstance(obj[key], bool):
                    raise ValueError(f"{key!r} must be an integer, got {obj[key]!r}")
            ids = _ids(obj)
            return CommittedSave(obj["epoch"], obj["step"], obj["global_step"], files,
                                 directory, extra, ids["run_id"], ids["save_id"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed save entry {obj!r} ({exc}); the record is "
                                  f"damaged — delete the entry or the file to fall back to meta.json") from exc


def _ids(obj: dict) -> Dict[str, Optional[str]]:
    """The optional run_id / save_id of a record; ValueError when present but not a string."""
    ids = {key: obj.get(key) for key in ("run_id", "save_id")}
    for key, v in ids.items():
        if v is not None and (not isinstance(v, str) or not v):
            raise ValueError(f"{key!r} must be a non-empty string, got {v!r}")
    return ids


# ---- per-rank meta.json ------------------------------------------------------------------------

@dataclass(frozen=True)
class RankMeta:
    """`rank_{r}/meta.json`: MindSpore Transformers' last_epoch / last_step / last_ckpt_file of
    the rank's last committed save, plus `committed` (this rank's committed files, oldest
    first), plus the `run_id`/`save_id` of that last save (absent in older records). Written
    only after every rank agreed on the save, so it never names a pending file."""

    last_epoch: int
    last_step: int
    last_ckpt_file: str
    committed: tuple = ()
    run_id: Optional[str] = None
    save_id: Optional[str] = None

    def to_json(self) -> dict:
        out = {"last_epoch": int(self.last_epoch), "last_step": int(self.last_step),
               "last_ckpt_file": self.last_ckpt_file, "committed": list(self.committed)}
        out.update({k: v for k, v in (("run_id", self.run_id), ("save_id", self.save_id))
                    if v is not None})
        return out

    @staticmethod
    def from_json(obj: dict, where: str) -> "RankMeta":
        """Parse; CheckpointError naming `where` when a field is missing or mistyped."""
        try:
            committed = obj.get("committed", [])
            if not isinstance(committed, list) or not all(isinstance(f, str) for f in committed):
                raise ValueError("'committed' must be a list of file names")
            name = obj.get("last_ckpt_file", "")
            if not isinstance(name, str):
                raise ValueError("'last_ckpt_file' must be a file name")
            ids = _ids(obj)
            return RankMeta(int(obj["last_epoch"]), int(obj["last_step"]), name, tuple(committed),
                            ids["run_id"], ids["save_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: malformed meta.json ({exc}); delete it to let resume "
                                  f"fall back to the other records") from exc

    @property
    def key(self):
        """(last_epoch, last_step)."""
        return (self.last_epoch, self.last_step)


def write_rank_meta(rank_dir: str, meta: RankMeta) -> str:
    """Atomically write `rank_dir/meta.json`."""
    path = os.path.join(rank_dir, META_FILE)
    atomic_write_text(path, json.dumps(meta.to_json(), indent=1))
    return path


def read_rank_meta(rank_dir: str) -> Optional[RankMeta]:
    """The rank's meta.json, None when absent; CheckpointError when unreadable or malformed."""
    path = os.path.join(rank_dir, META_FILE)
    obj = _read_json_object(path, "delete it to let resume fall back to the other records")
    return None if obj is None else RankMeta.from_json(obj, path)


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
        if format_of(path) == "safetensors":
            try:
                _, metadata, _ = read_header(path)
                ours = RankFileMeta.from_metadata(metadata, path)
            except (MindformersSTError, OSError) as exc:
                text = str(exc)
                problems.append(text if text.startswith(path) else f"{path}: {text}")
                continue
            if ours is not None and (ours.rank, ours.epoch, ours.step) != (rank, save.epoch, save.step):
                problems.append(f"{path}: header says rank {ours.rank} epoch {ours.epoch} step "
                                f"{ours.step}, the commit record says rank {rank} {save.key}")
            elif save.save_id is not None and (ours is None or ours.save_id != save.save_id):
                held = "no save identity" if ours is None or ours.save_id is None \
                    else f"save {ours.save_id}"
                problems.append(f"{path}: holds {held}, the commit record says save "
                                f"{save.save_id}: a file of another run was put in its place")
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
