"""`RankFileMeta`: how a rank file of ours describes itself in its safetensors `__metadata__`.

Keys of `__metadata__` (all strings, as safetensors requires):
- "format": "ms"                       (MindSpore's own key; its loaders read it)
- "remove_redundancy": "True"|"False"  (MindSpore's own key)
- "mindformers_st": JSON of {version, rank, world_size, parallel_config, remove_redundancy,
  epoch, step, run_id, save_id, slices: {tensor name: TensorSlice JSON}}
A tensor with an entry in `slices` is a block of a global tensor; a tensor without one is a
whole-valued hyper value. `run_id` (the training launch that wrote the file) and `save_id`
(`save_id_of(run_id, epoch, step)`: which save of that run) are optional: training saves carry
them so a reader can refuse a set of rank files mixing runs or steps; files written before
they existed, and files cut offline from complete weights, have none (read as None). Version 1
is the only one; a newer version is refused by name so an old reader never misreads a newer file.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional

from ..caches import process_cache
from ..errors import CheckpointError
from ..layout.slices import TensorSlice

METADATA_KEY = "mindformers_st"
VERSION = 1
# the keys of version 1 (`RankFileMeta.to_json`); any other is refused, not ignored
_KEYS = frozenset({"version", "rank", "world_size", "parallel_config", "remove_redundancy",
                   "epoch", "step", "run_id", "save_id", "slices"})


@dataclass(frozen=True)
class RankFileMeta:
    """The self-description of one rank file (or of a file cut for one rank by `split`)."""

    rank: int
    world_size: int
    slices: Mapping[str, TensorSlice] = field(default_factory=dict)
    parallel_config: Optional[Mapping[str, Any]] = None
    remove_redundancy: bool = False
    epoch: Optional[int] = None
    step: Optional[int] = None
    version: int = VERSION
    run_id: Optional[str] = None
    save_id: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The JSON object stored under `__metadata__["mindformers_st"]`."""
        return {"version": self.version, "rank": int(self.rank), "world_size": int(self.world_size),
                "parallel_config": dict(self.parallel_config) if self.parallel_config is not None
                else None,
                "remove_redundancy": bool(self.remove_redundancy),
                "epoch": None if self.epoch is None else int(self.epoch),
                "step": None if self.step is None else int(self.step),
                **({"run_id": self.run_id} if self.run_id is not None else {}),
                **({"save_id": self.save_id} if self.save_id is not None else {}),
                "slices": {n: s.to_json() for n, s in self.slices.items()}}

    def to_metadata(self) -> Dict[str, str]:
        """The whole `__metadata__` dict a writer passes (checksums are the writer's own)."""
        return {"format": "ms", "remove_redundancy": str(bool(self.remove_redundancy)),
                METADATA_KEY: json.dumps(self.to_json(), separators=(",", ":"))}

    def subset(self, names: Iterable[str]) -> "RankFileMeta":
        """The same description for a file holding only `names`."""
        keep = set(names)
        return RankFileMeta(self.rank, self.world_size,
                            {n: s for n, s in self.slices.items() if n in keep},
                            self.parallel_config, self.remove_redundancy, self.epoch, self.step,
                            self.version, self.run_id, self.save_id)

    @staticmethod
    def from_metadata(metadata: Mapping[str, str], path: str = "") -> Optional["RankFileMeta"]:
        """The description in a file's `__metadata__`, None when the file has none (MindSpore's
        own files). CheckpointError naming `path` when it is present but malformed or of a
        newer version than this reader knows."""
        raw = metadata.get(METADATA_KEY)
        if raw is None:
            return None
        where = f"{path}: __metadata__[{METADATA_KEY!r}]"
        try:
            return _parse_described(raw)
        except CheckpointError as exc:   # the same check, named for this file
            raise type(exc)(str(exc).replace(_WHERE, where)) from exc.__cause__

    @staticmethod
    def from_json(obj: Any, where: str = "rank file metadata") -> "RankFileMeta":
        """Parse the JSON object; CheckpointError naming `where` and the field at fault."""
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where} must be a JSON object, got {type(obj).__name__}")
        version = obj.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{where}: version {version!r} is not an integer")
        if version < 1:
            raise CheckpointError(f"{where}: format version {version} does not exist (versions "
                                  f"start at 1); the header was altered")
        if version > VERSION:
            raise CheckpointError(f"{where}: format version {version} is newer than this reader "
                                  f"(version {VERSION}); upgrade mindformers-st to read it")
        try:
            unknown = sorted(str(k) for k in obj if k not in _KEYS)
            if unknown:   # a later version adds keys with a new version number: this is damage
                raise ValueError(f"unknown keys {unknown[:5]} for version {version} (it has "
                                 f"{', '.join(sorted(_KEYS))})")
            rank, world = _int(obj, "rank"), _int(obj, "world_size")
            slices_obj = obj.get("slices") or {}
            if not isinstance(slices_obj, dict):
                raise ValueError("'slices' must map tensor names to slices")
            slices, made = {}, {}
            for name, s in slices_obj.items():
                try:
                    slices[name] = TensorSlice.from_json(s, made)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"slice of tensor {name!r} is malformed ({exc})") from exc
            pc = obj.get("parallel_config")
            if pc is not None and not isinstance(pc, dict):
                raise ValueError("'parallel_config' must be an object or null")
            epoch, step = obj.get("epoch"), obj.get("step")
            for key, v in (("epoch", epoch), ("step", step)):
                if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                    raise ValueError(f"{key!r} must be an integer or null, got {v!r}")
            ids = {key: obj.get(key) for key in ("run_id", "save_id")}
            for key, v in ids.items():
                if v is not None and (not isinstance(v, str) or not v):
                    raise ValueError(f"{key!r} must be a non-empty string or absent, got {v!r}")
            if rank < 0 or world < 1 or rank >= world:
                raise ValueError(f"rank {rank} is not inside world_size {world}")
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        return RankFileMeta(rank, world, slices, pc, bool(obj.get("remove_redundancy", False)),
                            epoch, step, version, ids["run_id"], ids["save_id"])


def new_run_id() -> str:
    """A fresh identity for one training launch (32 hex digits, random)."""
    return uuid.uuid4().hex


def save_id_of(run_id: str, epoch: int, step: int) -> str:
    """The identity of one save: "{epoch}_{step}@{run_id}" (the same in every rank's file)."""
    return f"{int(epoch)}_{int(step)}@{run_id}"


def _int(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key!r} must be an integer, got {v!r}")
    return v


_WHERE = "\0rank-file-metadata\0"


@process_cache(maxsize=256)
def _parse_described(raw: str) -> RankFileMeta:
    """`RankFileMeta.from_metadata`'s parse of the JSON text, kept per text: the several reads
    of one file in a command (scan, describe, resume) parse and validate its thousands of slices
    once. Errors name the placeholder `_WHERE`, replaced by the caller with the file."""
    try:
        obj = json.loads(raw)
    except RecursionError:   # the header's own parse cannot see inside this string
        raise CheckpointError(f"{_WHERE} is nested too deeply to be a rank file description; "
                              f"the file was damaged — pass the run's strategy "
                              f"(--src-strategy) to read it without its description") from None
    except ValueError as exc:
        raise CheckpointError(f"{_WHERE} is not JSON ({exc}); the file was damaged — pass "
                              f"the run's strategy (--src-strategy) to read it without "
                              f"its description") from exc
    return RankFileMeta.from_json(obj, _WHERE)
