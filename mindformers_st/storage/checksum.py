"""Per-tensor xxh3_64 checksums, stored in `__metadata__["checksums"]` and verified on demand.

The value is a JSON string `{"algo": "xxh3_64", "tensors": {name: "16 hex digits"}}`; each digest
is the xxh3_64 (seed 0) of the tensor's stored bytes, as lower-case hex padded to 16 digits, so
the header length is known before any data is written (see storage/writer.py).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Dict, Iterable, List, Optional

import xxhash

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "checksums"
ALGO = "xxh3_64"
HEX_WIDTH = 16
_HEX = re.compile(r"[0-9a-f]*")
_CHUNK = 64 << 20  # hash large tensors in 64 MiB pieces so a memoryview slice stays small


def new_hasher() -> "xxhash.xxh3_64":
    """A fresh streaming hasher of the algorithm we record."""
    return xxhash.xxh3_64()


def hex_digest(hasher) -> str:
    """Fixed-width (16 lower-case hex digits) form of a hasher's digest."""
    return format(hasher.intdigest(), f"0{HEX_WIDTH}x")


def encode_checksums(digests: Dict[str, str]) -> str:
    """The `__metadata__["checksums"]` string for name -> hex digest (compact JSON, order kept)."""
    return json.dumps({"algo": ALGO, "tensors": digests}, separators=(",", ":"), ensure_ascii=False)


def decode_checksums(metadata: Dict[str, str]) -> Optional[Dict[str, str]]:
    """name -> hex digest from a file's metadata; None when the file records no checksums.

    Raises ValueError when the key is present but malformed or uses another algorithm.
    """
    raw = metadata.get(CHECKSUM_KEY)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except RecursionError:   # the header's own parse cannot see inside this string
        raise ValueError(f"the record is nested too deeply to be {{'algo': '{ALGO}', "
                         f"'tensors': {{...}}}}") from None
    if not isinstance(obj, dict) or obj.get("algo") != ALGO or not isinstance(obj.get("tensors"), dict):
        raise ValueError(f"expected {{'algo': '{ALGO}', 'tensors': {{...}}}}, found {raw[:80]!r}")
    digests = obj["tensors"]
    # one pass over all digests (thousands per file): each a str of HEX_WIDTH, all hex together
    if not (all(isinstance(d, str) and len(d) == HEX_WIDTH for d in digests.values())
            and _HEX.fullmatch("".join(digests.values()))):
        for name, digest in digests.items():   # name the first bad one
            if not (isinstance(digest, str) and _HEX.fullmatch(digest)
                    and len(digest) == HEX_WIDTH):
                raise ValueError(f"checksum of {name!r} is {digest!r}, not {HEX_WIDTH} "
                                 f"lower-case hex digits")
    return digests


def tensor_checksum(f, name: str) -> str:
    """xxh3_64 hex of the stored bytes of tensor `name` in an open SafetensorsFile."""
    h = new_hasher()
    view = f.raw_bytes(name)
    try:
        for i in range(0, len(view), _CHUNK):
            h.update(view[i:i + _CHUNK])
    finally:
        view.release()
    return hex_digest(h)


def has_checksums(f) -> bool:
    """True when the file records checksums (files from other writers usually do not)."""
    return CHECKSUM_KEY in f.metadata


def verify_checksums(f, names: Optional[Iterable[str]] = None) -> List[str]:
    """Recompute checksums of `names` (default: every recorded tensor) of an open SafetensorsFile.

    Returns a list of human-readable problems, [] when everything matches. A file with no
    recorded checksums has nothing to verify and gives [] (use has_checksums() to tell).
    A malformed checksums entry, a named tensor without a checksum, a checksum for a tensor the
    file lacks, or a mismatch are each one problem naming the file and tensor.
    """
    try:
        recorded = decode_checksums(f.metadata)
    except ValueError as exc:
        return [f"{f.path}: __metadata__['{CHECKSUM_KEY}'] is malformed: {exc}"]
    if recorded is None:
        logger.debug("%s: no checksums recorded; nothing to verify", f.path)
        return []
    problems = []
    wanted = list(recorded) if names is None else list(names)
    for name in wanted:
        if name not in f.tensors:
            why = "has a recorded checksum but" if name in recorded else "was asked for but"
            problems.append(f"{f.path}: tensor {name!r} {why} is not in the file")
            continue
        if name not in recorded:
            problems.append(f"{f.path}: tensor {name!r} has no recorded checksum")
            continue
        actual = tensor_checksum(f, name)
        if actual != recorded[name]:
            problems.append(f"{f.path}: tensor {name!r} checksum mismatch: recorded {recorded[name]}, "
                            f"computed {actual} ({ALGO}); the data is corrupt, restore it from a good copy")
    return problems
