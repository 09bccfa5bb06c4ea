"""Which source bytes the engine checks against their recorded checksums, and the check itself.

Our files record one xxh3_64 digest per tensor (storage/checksum.py), over all of its bytes, so a
tensor can only be checked when all of it is read. Modes (`--verify`, `verify_checksums`):
- "read" (default): every source tensor the plan reads in full is hashed as it is first used,
  before any of its bytes reach a target; merges, same-layout loads and resumes read every
  tensor in full, so everything they copy is checked. A plan that reads only part of a tensor
  (cutting complete weights for one rank, a direct re-cut) does not check that tensor;
- "full": every source tensor the plan touches is checked, reading all of it even where the plan
  needs only a block (costs the extra reads);
- "off": nothing is checked.
Files without recorded checksums (MindSpore's own, `transformers`') are read unchecked with one
info line. A mismatch is a ChecksumError naming the file, the tensor and both digests; since the
check precedes the copy, the engine aborts before the target is committed.
"""
from __future__ import annotations

import logging
import threading
from math import prod
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..errors import ChecksumError, ConfigError
from ..layout.slices import TensorSlice
from ..storage.checksum import ALGO, decode_checksums, hex_digest, new_hasher
from ..records.rank_meta import METADATA_KEY
from .plan import Plan
from .sources import uncovered
from .gc_pause import without_gc

logger = logging.getLogger(__name__)

MODES = ("read", "full", "off")
_HASH_CHUNK = 64 << 20

Key = Tuple[str, str]


def verify_mode(value) -> str:
    """The mode for a config value or flag: True/"read" -> "read", "full", False/"off" -> "off"."""
    if value is True or value is None:
        return "read"
    if value is False:
        return "off"
    if isinstance(value, str) and value in MODES:
        return value
    raise ConfigError(f"verify_checksums must be True, False, 'read', 'full' or 'off', got {value!r}")


@without_gc
def keys_to_verify(plan: Plan, shapes: Dict[Key, Tuple[Tuple[int, ...], str]], mode: str) -> Set[Key]:
    """The (source file, tensor) pairs the engine hashes under `mode` (see the module doc).

    In `read` mode a stored tensor counts as read whole when the plan's reads of it — together
    with its replicas' (the same tensor name and stored shape in other files, which a plan may
    read part of each, e.g. rows 0-7 from one data-parallel copy and 8-15 from the other) —
    cover all of it; then every copy the plan touched is hashed whole. Grouping by name and
    shape can only check more than needed, never less."""
    mode = verify_mode(mode)
    if mode == "off":
        return set()
    boxes: Dict[Key, Set[Tuple[Tuple[int, ...], Tuple[int, ...]]]] = {}
    read_whole: Set[Key] = set()   # some copy reads all of it: no box arithmetic needed
    for f in plan.files:
        for t in f.tensors:
            for op in t.ops:
                key = (op.src_file, op.src_name)
                if key in read_whole:
                    continue
                sizes = tuple(op.sizes)
                if sizes == tuple(shapes[key][0]) and not any(op.src_offsets):
                    read_whole.add(key)
                else:
                    boxes.setdefault(key, set()).add((tuple(op.src_offsets), sizes))
    if mode == "full":
        return read_whole | set(boxes)
    out = set(read_whole)
    if not boxes:
        return out
    read_whole_groups = {(k[1], tuple(shapes[k][0])) for k in read_whole}
    groups: Dict[Tuple[str, Tuple[int, ...]], List[Key]] = {}
    for key in boxes:
        if key in read_whole:
            continue
        group = (key[1], tuple(shapes[key][0]))
        if group in read_whole_groups:   # a replica was read whole: this copy counts too
            out.add(key)
        else:
            groups.setdefault(group, []).append(key)
    for (_, shape), keys in groups.items():
        seen = set().union(*(boxes[k] for k in keys))
        whole = TensorSlice.whole(shape)
        if whole.numel and sum(prod(s) for _, s in seen) < whole.numel:
            continue
        pieces = [TensorSlice(shape, o, s) for o, s in sorted(seen)]
        if not whole.numel or not uncovered(whole, pieces):
            out.update(keys)
    return out


def check_record(path: str, metadata, names: Iterable[str] = ()) -> Optional[Dict[str, str]]:
    """The digests a file records, None for a file that records none and is not ours.
    ChecksumError (naming the file and the fix) for a malformed record, a digest of a tensor the
    file does not hold, or a file of ours (with a `mindformers_st` description) whose record is
    missing — one flipped header bit must not switch checking off."""
    try:
        recorded = decode_checksums(metadata)
    except ValueError as exc:
        raise ChecksumError(f"{path}: __metadata__['checksums'] is malformed ({exc}); the "
                            f"file's integrity cannot be checked — restore it, or read it "
                            f"unchecked with --verify off") from exc
    if recorded is None:
        if METADATA_KEY in metadata:
            raise ChecksumError(f"{path}: written by mindformers-st (it carries "
                                f"__metadata__[{METADATA_KEY!r}]) but records no checksums; the "
                                f"header was altered — restore the file, or read it unchecked "
                                f"with --verify off")
        return None
    names = set(names)
    extra = sorted(set(recorded) - names) if names else []
    if extra:
        raise ChecksumError(f"{path}: the checksum record names tensor(s) the file does not hold "
                            f"({extra[:3]}); the header was altered — restore the file, or read "
                            f"it unchecked with --verify off")
    return recorded


class Verifier:
    """Hashes each selected source tensor once, the first time any thread uses it; thread-safe.
    `check(path, name, raw)` takes the tensor's stored bytes (a memoryview of the mapping)."""

    def __init__(self, keys: Iterable[Key]):
        self._pending = set(keys)
        self._locks: Dict[Key, threading.Lock] = {}   # made when a key is first checked
        self._recorded: Dict[str, Optional[Dict[str, str]]] = {}
        self._unrecorded: Set[str] = set()
        self._meta_lock = threading.Lock()
        self.checked = 0

    def wants(self, path: str, name: str) -> bool:
        """True while (path, name) still has to be checked."""
        return (path, name) in self._pending

    def recorded(self, path: str, metadata, names: Iterable[str] = ()) -> Optional[Dict[str, str]]:
        """The file's recorded digests (None without any); ChecksumError when the record is
        malformed, names a tensor the file lacks, or is absent from a file of ours (its
        `mindformers_st` description says our writer made it, and our writer always records
        checksums: a missing record means an altered header)."""
        with self._meta_lock:
            if path not in self._recorded:
                self._recorded[path] = check_record(path, metadata, names)
                if self._recorded[path] is None:
                    self._unrecorded.add(path)
            return self._recorded[path]

    def check(self, path: str, name: str, metadata, raw: memoryview,
              names: Iterable[str] = ()) -> None:
        """Hash `raw` (the stored bytes of `name` in `path`) and compare with the record, once."""
        key = (path, name)
        if key not in self._pending:
            return
        lock = self._locks.get(key)
        if lock is None:
            with self._meta_lock:
                lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._pending:
                return
            recorded = self.recorded(path, metadata, names)
            if recorded is not None:
                want = recorded.get(name)
                if want is None:
                    raise ChecksumError(f"{path}: tensor {name!r} has no recorded checksum though "
                                        f"the file records them for others; the header was altered "
                                        f"— restore the file, or read it with --verify off")
                h = new_hasher()
                for i in range(0, len(raw), _HASH_CHUNK):
                    h.update(raw[i:i + _HASH_CHUNK])
                got = hex_digest(h)
                if got != want:
                    raise ChecksumError(
                        f"{path}: tensor {name!r} is corrupt: recorded {ALGO} {want}, computed "
                        f"{got}; nothing was written from it — restore the file from a good copy "
                        f"(or, for a training checkpoint, resume from an earlier committed save)")
                self.checked += 1
            self._pending.discard(key)

    def report(self) -> None:
        """One info line for the files read without checksums to check."""
        if self._unrecorded:
            files = sorted(self._unrecorded)
            logger.info("%d source file(s) record no checksums and were read unchecked (e.g. %s)",
                        len(files), files[0])
