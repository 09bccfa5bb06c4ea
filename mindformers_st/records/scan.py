"""The one folder scanner: which save of a `rank_x/` checkpoint folder to read, and its files.

Every reader asks `select_save` (the load hook, resume, merge, split, reshard, inspect, verify,
export-hf), so they all take the same save:
- with a commit record (`committed.json`, written by our CheckpointMonitor) the record is the
  truth: the newest committed save whose files are all present and valid; saves on disk that
  the record does not list (a crash before commit, an older run) are ignored and named in a
  note; `step` picks another committed save;
- without one (MindSpore Transformers' or MindSpore's folders): `step` when given; else the
  step every rank's `meta.json` names when they agree and every rank has its file; else the
  newest step every rank folder holds; a folder with one file per rank takes those files.
Never a mix of two steps or two runs: every rank's file of the selected save, and (whichever
way it was chosen) `check_one_save` refuses a set whose files' own descriptions disagree — a
file whose header names another step than its file name, or files of different runs or saves
(`run_id`/`save_id`, records.rank_meta) — naming the odd file.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from ..errors import CheckpointError, MindformersSTError
from ..storage.reader import read_header
from .commit import COMMITTED_FILE, CommittedSave, read_committed, read_rank_meta, validate_save
from .names import (FORMAT_SUFFIX, format_step, parse_step, parse_step_arg, prefix_of,
                    rank_folders)
from .rank_meta import RankFileMeta

logger = logging.getLogger(__name__)

Key = Tuple[int, int]


@dataclass(frozen=True)
class SaveSelection:
    """A save chosen from a checkpoint folder.

    files: rank -> absolute path of that rank's file of the save.
    key: (epoch, step), None when the files carry no step in their names.
    how: "committed" (newest committed), "named" (asked for), "meta" (meta.json), "files"
        (newest step every rank holds) or "single" (one file per rank).
    record: the committed.json entry, when the folder has a commit record.
    ignored: human-readable notes on saves present on disk that were not taken.
    """

    folder: str
    files: Dict[int, str]
    key: Optional[Key]
    how: str
    record: Optional[CommittedSave] = None
    ignored: Tuple[str, ...] = ()

    @property
    def suffix(self) -> Optional[str]:
        """"{epoch}_{step}" of the save, None when unnamed."""
        return None if self.key is None else format_step(self.key)

    @property
    def global_step(self) -> Optional[int]:
        """The global step the commit record gives, None without a record."""
        return None if self.record is None else self.record.global_step


def files_of(rank_dir: str, fmt: str = "safetensors") -> List[str]:
    """The checkpoint files of format `fmt` in one rank folder, sorted (hidden temporaries of an
    interrupted write are never listed)."""
    ext = FORMAT_SUFFIX[fmt]
    return sorted(f for f in glob.glob(os.path.join(rank_dir, "*" + ext))
                  if not os.path.basename(f).startswith("."))


def steps_on_disk(ranks: Dict[int, str], fmt: str = "safetensors") -> Dict[int, Dict[Key, List[str]]]:
    """rank -> {(epoch, step): [files of that step]} from the file names of each rank folder."""
    out: Dict[int, Dict[Key, List[str]]] = {}
    for r, d in ranks.items():
        steps: Dict[Key, List[str]] = {}
        for f in files_of(d, fmt):
            key = parse_step(f)
            if key is not None:
                steps.setdefault(key, []).append(f)
        out[r] = steps
    return out


def has_commit_record(folder: str) -> bool:
    """True when `folder` holds a `committed.json` (a folder our CheckpointMonitor wrote)."""
    return read_committed(os.path.abspath(folder)) is not None


def select_save(folder: str, step=None, fmt: str = "safetensors",
                fallback: bool = False, by_timestamp: bool = False) -> SaveSelection:
    """The save of `folder` (holding `rank_x/`) to read; `step` ("EPOCH_STEP", an (epoch, step)
    pair or a file name) picks one. CheckpointError, naming the folder and what is there, when
    no save qualifies or the chosen one is not complete (or not committed, with a record).

    With a record, a newest committed save whose files are missing or whose headers are bad is
    an error (the message names the file and the other committed saves); `fallback` (resume)
    takes the previous committed save that validates instead, with a warning.

    `by_timestamp` (MindSpore Transformers' `resume_by_last_timestamp_ckpt`), for folders
    without a record: every rank's newest file by modification time, which must all be of one
    step. With a record the record still decides (an info line says so)."""
    folder = os.path.abspath(folder)
    ranks = rank_folders(folder)
    if not ranks:
        raise CheckpointError(f"{folder}: no rank_x/ folders; this is not a distributed checkpoint")
    if fmt not in FORMAT_SUFFIX:
        raise CheckpointError(f"checkpoint format {fmt!r}: use 'safetensors' or 'ckpt'")
    want: Optional[Key] = None
    if step is not None:
        want = tuple(step) if isinstance(step, tuple) else parse_step_arg(str(step), "step")
    record = read_committed(folder)   # read once: the choice below follows this very record
    if record is not None:
        if by_timestamp:
            logger.info("%s: resume_by_last_timestamp_ckpt: the commit record decides which save "
                        "is newest", folder)
        selection = _select_committed(folder, ranks, record, want, fmt, fallback)
    elif by_timestamp and want is None:
        selection = _select_newest_by_mtime(folder, ranks, fmt)
    else:
        selection = _select_unrecorded(folder, ranks, want, fmt)
    check_one_save(selection.files)
    return _note_other_prefixes(selection, ranks, fmt)


def check_one_save(files: Dict[int, str]) -> None:
    """Refuse a set of rank files (rank -> path) that are not one save: CheckpointError naming
    the odd file when a file's header names another epoch/step than its file name, or when the
    files' run/save identities (records.rank_meta run_id, save_id) differ — the file whose
    identity the other ranks do not share is named (every file, when no identity is shared
    by most). Files without a description (MindSpore's, .ckpt) are not compared."""
    idents: Dict[int, tuple] = {}
    for r, path in sorted(files.items()):
        if not path.endswith(FORMAT_SUFFIX["safetensors"]):
            continue
        try:
            meta = RankFileMeta.from_metadata(read_header(path)[1], path)
        except (MindformersSTError, OSError):
            continue   # an unreadable header is reported by the reader with its own message
        if meta is None:
            continue
        named = parse_step(path)
        if named is not None and meta.step is not None and (meta.epoch, meta.step) != named:
            raise CheckpointError(
                f"{path}: its header says epoch {meta.epoch} step {meta.step} but its name says "
                f"{format_step(named)}: the file holds another save's bytes; restore rank "
                f"{r}'s file of save {format_step(named)}")
        idents[r] = (meta.run_id, meta.save_id)
    if len(set(idents.values())) <= 1:
        return
    counts: Dict[tuple, int] = {}
    for ident in idents.values():
        counts[ident] = counts.get(ident, 0) + 1
    top = max(counts.values())
    common = [i for i, c in counts.items() if c == top]
    shared = common[0] if len(common) == 1 else None

    def says(ident):
        return "no save identity" if ident[1] is None else f"save {ident[1]}"
    if shared is not None:
        odd = [r for r, i in idents.items() if i != shared]
        r = odd[0]
        raise CheckpointError(
            f"{files[r]}: belongs to {says(idents[r])}, the other rank files of this save to "
            f"{says(shared)}: a file of another run or step was put in its place; restore rank "
            f"{r}'s file of the save (or pick another save with --step)")
    listed = "; ".join(f"{files[r]}: {says(i)}" for r, i in sorted(idents.items()))
    raise CheckpointError(f"the rank files of one save come from different runs or steps "
                          f"({listed}); restore the files of one save for every rank")


def _note_other_prefixes(chosen: SaveSelection, ranks, fmt: str) -> SaveSelection:
    """Name the file prefixes of other runs sharing the folder (every reader sees the same note:
    merge, inspect and the loader take the same save and say what else was there)."""
    taken = {prefix_of(f) for f in chosen.files.values()}
    others: Dict[str, set] = {}
    for d in ranks.values():
        for f in files_of(d, fmt):
            p, key = prefix_of(f), parse_step(f)
            if p is not None and p not in taken and key is not None:
                others.setdefault(p, set()).add(key)
    if not others:
        return chosen
    said = ", ".join(f"{p!r} (saves {[format_step(k) for k in sorted(keys)][:4]})"
                     for p, keys in sorted(others.items()))
    note = (f"the folder also holds files of another prefix: {said}; took "
            f"{sorted(p for p in taken if p)} save {chosen.suffix} — give each run its own "
            f"output_dir")
    logger.warning("%s: %s", chosen.folder, note)
    return replace(chosen, ignored=chosen.ignored + (note,))


def _select_newest_by_mtime(folder: str, ranks, fmt: str) -> SaveSelection:
    newest = {}
    for r, d in ranks.items():
        files = files_of(d, fmt)
        if not files:
            raise CheckpointError(f"{d}: no {FORMAT_SUFFIX[fmt]} file in this rank folder")
        newest[r] = max(files, key=os.path.getmtime)
    keys = {parse_step(f) for f in newest.values()}
    if len(keys) != 1 or None in keys:
        raise CheckpointError(
            f"{folder}: resume_by_last_timestamp_ckpt: the ranks' newest files are of different "
            f"steps ({sorted(os.path.basename(f) for f in newest.values())[:4]}); a save was "
            f"interrupted — name the step to resume (resume_training: <file name>)")
    return SaveSelection(folder, newest, keys.pop(), "timestamp")


def _select_committed(folder: str, ranks, record: dict, want: Optional[Key], fmt: str,
                      fallback: bool) -> SaveSelection:
    where = os.path.join(folder, COMMITTED_FILE)
    entries = [CommittedSave.from_json(e, folder, where) for e in record["saves"]]
    world = record.get("world_size") if isinstance(record.get("world_size"), int) else None
    listed = [format_step(s.key) for s in entries]
    if want is not None:
        hit = [s for s in entries if s.key == want]
        if not hit:
            raise CheckpointError(
                f"{folder}: step {format_step(want)} is not a committed save (committed: {listed}); "
                f"a crashed or pruned save is never read — pick one of those (its files may still "
                f"be there: delete committed.json to read the folder without its record)")
        candidates, how = hit[-1:], "named"
    else:
        candidates, how = list(reversed(entries)), "committed"
    if not candidates:
        raise CheckpointError(f"{folder}: committed.json lists no save: nothing was committed "
                              f"(the run writing this folder stopped before its first commit, so "
                              f"its files may be incomplete across ranks); start training "
                              f"without resume_training, or load another checkpoint")
    notes: List[str] = []
    chosen = None
    for save in candidates:
        problems = validate_save(save, world)
        if not problems and not all(f.endswith(FORMAT_SUFFIX[fmt]) for f in save.files.values()):
            problems = [f"its files are not {FORMAT_SUFFIX[fmt]}"]
        if not problems:
            chosen = save
            break
        why = f"committed save {format_step(save.key)} cannot be read: {'; '.join(problems[:3])}"
        if not fallback or how == "named":
            older = [n for n in listed if n != format_step(save.key)]
            raise CheckpointError(f"{folder}: {why.rstrip('.')}. Restore the file(s), or pick "
                                  f"another committed save with --step EPOCH_STEP (committed: "
                                  f"{older})")
        logger.warning("%s: %s; trying the previous committed save", folder, why)
        notes.append(why)
    if chosen is None:
        raise CheckpointError(
            f"{folder}: no committed save can be read ({'; '.join(notes[:3])}); restore the "
            f"missing rank files, or delete committed.json to read the files without a record")
    on_disk = set()
    for steps in steps_on_disk(ranks, fmt).values():
        on_disk |= set(steps)
    uncommitted = sorted(on_disk - {s.key for s in entries})
    if uncommitted:
        note = (f"ignored {len(uncommitted)} uncommitted save(s) on disk "
                f"{[format_step(k) for k in uncommitted][:6]} (not in committed.json: a crash "
                f"before commit or another run)")
        logger.warning("%s: %s; reading committed save %s", folder, note, format_step(chosen.key))
        notes.append(note)
    files = {r: chosen.path(r) for r in sorted(chosen.files)}
    return SaveSelection(folder, files, chosen.key, how, chosen, tuple(notes))


def _select_unrecorded(folder: str, ranks, want: Optional[Key], fmt: str) -> SaveSelection:
    per_rank = steps_on_disk(ranks, fmt)
    for r, d in ranks.items():
        if not files_of(d, fmt):
            raise CheckpointError(f"{d}: no {FORMAT_SUFFIX[fmt]} file in this rank folder; every "
                                  f"rank_x/ folder needs its file")
    if want is not None:
        return _take(folder, ranks, per_rank, want, "named")
    common = set.intersection(*(set(s) for s in per_rank.values()))
    metas = {}
    for r, d in ranks.items():
        try:
            metas[r] = read_rank_meta(d)
        except CheckpointError as exc:
            logger.warning("%s", exc)
            metas[r] = None
    if all(m is not None for m in metas.values()):
        key = min(m.key for m in metas.values())
        if key in common:
            return _take(folder, ranks, per_rank, key, "meta")
    singles = {r: files_of(d, fmt) for r, d in ranks.items()}
    if all(len(fs) == 1 for fs in singles.values()):
        keys = {parse_step(fs[0]) for fs in singles.values()}
        if len(keys) > 1:
            raise CheckpointError(
                f"{folder}: each rank folder holds one file but of different steps "
                f"{sorted({os.path.basename(fs[0]) for fs in singles.values()})[:4]}; the folder "
                f"mixes saves — copy one save's files of every rank")
        return SaveSelection(folder, {r: fs[0] for r, fs in singles.items()}, keys.pop(), "single")
    if not common:
        raise CheckpointError(
            f"{folder}: the rank folders share no '-{{epoch}}_{{step}}' save (ranks "
            f"{sorted(ranks)}); pass --step EPOCH_STEP naming one that every rank holds")
    return _take(folder, ranks, per_rank, max(common), "files")


def _take(folder, ranks, per_rank, key: Key, how: str) -> SaveSelection:
    files = {}
    for r in ranks:
        hits = per_rank[r].get(key, [])
        if len(hits) != 1:
            have = sorted(format_step(k) for k in per_rank[r])
            raise CheckpointError(
                f"{ranks[r]}: {len(hits)} file(s) of step {format_step(key)} (this rank holds "
                f"steps {have[:8]}); every rank needs exactly one file of the step")
        files[r] = hits[0]
    newer = sorted(k for k in set().union(*per_rank.values()) if k > key)
    notes = ()
    if newer and how != "named":
        notes = (f"steps {[format_step(k) for k in newer][:6]} are not held by every rank and "
                 f"were not taken",)
        logger.warning("%s: %s; reading step %s", folder, notes[0], format_step(key))
    return SaveSelection(folder, files, key, how, None, notes)


def complete_files(folder: str):
    """(index or None, [file paths]) of a folder of complete weights: the files its MindSpore or
    Hugging Face index names (plus `hyper_param.safetensors`), else every `*.safetensors`.
    CheckpointError when an indexed file is missing or there is no file at all."""
    from ..storage.index import read_index
    from .names import HYPER_FILE
    folder = os.path.abspath(folder)
    index = read_index(folder)
    if index is not None:
        files = sorted({index.path_of(n) for n in index.weight_map})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{folder}: the index names {missing[0]} which does not exist; "
                                  f"restore the file or rebuild the index")
        hyper = os.path.join(folder, HYPER_FILE)
        if os.path.isfile(hyper) and hyper not in files:
            files.append(hyper)
        return index, files
    files = sorted(f for f in glob.glob(os.path.join(folder, "*.safetensors"))
                   if not os.path.basename(f).startswith("."))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file, no index and no rank_x/ folder; "
                              f"point at a folder of complete weights, a file, or a folder of "
                              f"rank_x/")
    return None, files
