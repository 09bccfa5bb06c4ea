"""Read safetensors files: strict header validation, then memory-mapped whole-tensor or block reads.

The header is checked against every rule of the format before a single tensor byte is touched
(see docs/storage.md for the list). A block (offsets/sizes per dimension) is read through a
strided view of the memory map, so only the bytes of the block are copied; `byte_ranges()` lists
those bytes as coalesced (absolute start, length) runs.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from math import prod
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..caches import on_forget
from ..errors import CheckpointError, SafetensorsFormatError
from ..fast_init import fast_init
from ..dtypes import ITEMSIZE
from ..dtypes import ST_TO_NUMPY

logger = logging.getLogger(__name__)

# The Rust implementation refuses headers above 100 MB; we do the same so that a corrupt length
# can never make us allocate more than that.
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
# Runs at least this long are prefetched one by one (MADV_WILLNEED) when a block has gaps; shorter
# runs are left to page faults, since one madvise call per tiny run costs more than it saves.
_WILLNEED_MIN_RUN = 256 << 10
# Largest range one MADV_WILLNEED call is trusted to read: the kernel caps a call at its
# read-ahead window (max(read_ahead_kb, max_sectors_kb), 128 KiB by default) and drops the rest.
READ_AHEAD_PIECE = 128 << 10
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # Linux 5.14+


def advise_will_need(mm, start: int, end: int) -> bool:
    """Ask the kernel to start reading bytes [start, end) of the mapping `mm` (`start` page
    aligned), in pieces of READ_AHEAD_PIECE: one MADV_WILLNEED reads at most the read-ahead
    window and silently drops the rest of a longer range. A hint: False when the mapping is
    gone or refuses it (nothing else happens), True when every piece was advised."""
    if mm is None or not hasattr(mm, "madvise"):
        return False
    for piece in range(start, end, READ_AHEAD_PIECE):
        try:
            mm.madvise(mmap.MADV_WILLNEED, piece, min(READ_AHEAD_PIECE, end - piece))
        except (OSError, ValueError, OverflowError):
            return False
    return True


@fast_init
@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; begin/end are byte offsets relative to the data area."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Number of elements."""
        return prod(self.shape)


# ---------------------------------------------------------------------------------------------
# header validation


def _fail(path, rule: str, tensor: Optional[str] = None) -> SafetensorsFormatError:
    where = f"tensor {tensor!r}: " if tensor is not None else ""
    return SafetensorsFormatError(
        f"{path}: {where}{rule}. The file is not a valid safetensors file (truncated, corrupt or "
        f"written by a broken writer); re-download or re-save it.")


def _reject_duplicates(pairs):
    obj = dict(pairs)   # built in C; a repeated key shows as fewer keys than pairs
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


# JSON may spell a UTF-16 surrogate as an escape (\ud800); alone it is no character, and a name
# holding one can be neither compared with the files' other records nor written back (UTF-8).
# Only an escape makes one (the strict UTF-8 decode refuses an encoded surrogate), and a str
# holding one is not ASCII (an O(1) flag): most headers are cleared without looking further.
def _refuse_lone_surrogates(path, obj: dict) -> None:
    meta = obj.get(METADATA_KEY)
    meta = meta if isinstance(meta, dict) else {}
    if "".join(obj).isascii() and all(type(s) is not str or s.isascii()
                                      for pair in meta.items() for s in pair):
        return
    for name, info in obj.items():
        strings = [name]
        if name == METADATA_KEY and isinstance(info, dict):
            strings += [s for pair in info.items() for s in pair if isinstance(s, str)]
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                rule = ("lone surrogate escape (\\ud800-\\udfff without its pair): not Unicode "
                        "text, which every string of a header must be")
                if s is name and name != METADATA_KEY:
                    raise _fail(path, f"the name holds a {rule}", name) from None
                raise _fail(path, f"__metadata__ string {_short(s)} holds a {rule}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path, raw: bytes, data_len: int) -> Tuple[Dict[str, TensorEntry], Dict[str, str]]:
    """Validate the header bytes against every rule; return entries (offset order) and metadata."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise _fail(path, "header must start with '{' (a JSON object)")
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise _fail(path, f"header JSON has the key {exc.args[0]!r} twice (duplicate keys are refused)") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, int too long, NaN/Infinity
        raise _fail(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"header must be a JSON object, found {type(obj).__name__}")
    if "\\" in text:   # an escape: it may spell a lone surrogate
        _refuse_lone_surrogates(path, obj)

    metadata: Dict[str, str] = {}
    if METADATA_KEY in obj:
        meta = obj.pop(METADATA_KEY)
        if not isinstance(meta, dict):
            raise _fail(path, f"__metadata__ must be a map of strings to strings, found {type(meta).__name__}")
        for key, value in meta.items():
            if not isinstance(value, str):
                raise _fail(path, f"__metadata__[{key!r}] must be a string, found {type(value).__name__}")
        metadata = meta

    entries: List[TensorEntry] = []
    cursor = 0   # where the entries so far end while they tile in header order, else -1
    for name, info in obj.items():
        # The common, valid entry checked in one pass of exact-type tests (bool is not an int
        # here: type() is exact); anything else falls through to the checks that say what
        # is wrong. Thousands of entries a file: this loop is most of describing a checkpoint.
        if type(info) is dict and len(info) == 3:
            dtype, shape, offsets = (info.get("dtype"), info.get("shape"),
                                     info.get("data_offsets"))
            if (type(shape) is list and type(offsets) is list and len(offsets) == 2
                    and type(dtype) is str and dtype in ITEMSIZE):
                need = ITEMSIZE[dtype]
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    need *= d
                else:
                    begin, end = offsets
                    if (type(begin) is int and type(end) is int and 0 <= begin
                            and end - begin == need and end <= data_len):
                        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
                        cursor = end if begin == cursor else -1
                        continue
        if not isinstance(info, dict):
            raise _fail(path, f"entry must be an object with dtype, shape, data_offsets; found "
                              f"{type(info).__name__}", name)
        missing, extra = _ENTRY_KEYS - info.keys(), info.keys() - _ENTRY_KEYS
        if missing:
            raise _fail(path, f"entry lacks {sorted(missing)} (dtype, shape, data_offsets are required)", name)
        if extra:
            raise _fail(path, f"entry has unknown keys {sorted(extra)} (only dtype, shape, data_offsets are allowed)", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_TO_NUMPY:
            raise _fail(path, f"dtype {dtype!r} is not one of the format's dtypes "
                              f"({', '.join(ST_TO_NUMPY)})", name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"shape {_short(shape)} must be a list of non-negative integers", name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise _fail(path, f"data_offsets {_short(offsets)} must be [start, end], two non-negative integers", name)
        begin, end = offsets
        if begin > end:
            raise _fail(path, f"data_offsets [{begin}, {end}] have start after end", name)
        if end > data_len:
            raise _fail(path, f"data_offsets [{begin}, {end}] lie outside the data area of {data_len} "
                              f"bytes (the file may be truncated)", name)
        # prod() of a long list of huge ints is still bounded: every factor came from a header of
        # at most MAX_HEADER_SIZE bytes, and we only compare the result.
        need = prod(shape) * ITEMSIZE[dtype]
        if end - begin != need:
            raise _fail(path, f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape "
                              f"{shape} of {dtype} needs {need} (rule: end - start == prod(shape) * itemsize)", name)
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
        cursor = end if begin == cursor else -1

    # Sorted by offset, the tensors must tile the data area exactly: no overlap, no hole. A
    # header whose entries already tile it in their own order (writers write it so) is done.
    if cursor == data_len:
        return {e.name: e for e in entries}, metadata
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor, prev = 0, None
    for e in entries:
        if e.begin < cursor:
            raise _fail(path, f"data_offsets [{e.begin}, {e.end}] overlap tensor {prev!r} which ends at {cursor}", e.name)
        if e.begin > cursor:
            raise _fail(path, f"data_offsets start at {e.begin} but the previous tensor ends at {cursor}: "
                              f"{e.begin - cursor} bytes are not covered by any tensor (holes are refused)", e.name)
        cursor, prev = e.end, e.name
    if cursor != data_len:
        raise _fail(path, f"the tensors cover {cursor} bytes but the data area holds {data_len}: "
                          f"{data_len - cursor} trailing bytes belong to no tensor")
    return {e.name: e for e in entries}, metadata


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Parsed headers by file identity (device, inode, size, mtime): a command that opens the same
# file several times (describe, plan, validate, read) parses and validates its header once; a
# file changed in between has another identity and is parsed again.
_HEADER_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_HEADER_CACHE_SIZE = 512
_HEADER_LOCK = threading.Lock()


@on_forget
def _forget_headers() -> None:
    with _HEADER_LOCK:
        _HEADER_CACHE.clear()


def _read_header_fd(path, fd) -> Tuple[Dict[str, TensorEntry], Dict[str, str], int, int]:
    st = os.fstat(fd)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HEADER_LOCK:
        hit = _HEADER_CACHE.get(key)
        if hit is not None:
            _HEADER_CACHE.move_to_end(key)
    if hit is not None:
        tensors, metadata, data_start, size = hit
        return dict(tensors), dict(metadata), data_start, size
    out = _parse_header_fd(path, fd, st.st_size)
    with _HEADER_LOCK:
        _HEADER_CACHE[key] = out
        while len(_HEADER_CACHE) > _HEADER_CACHE_SIZE:
            _HEADER_CACHE.popitem(last=False)
    tensors, metadata, data_start, size = out
    return dict(tensors), dict(metadata), data_start, size


def _parse_header_fd(path, fd, size: int) -> Tuple[Dict[str, TensorEntry], Dict[str, str], int, int]:
    if size < 8:
        raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length prefix")
    prefix = os.pread(fd, 8, 0)
    if len(prefix) != 8:
        raise _fail(path, "could not read the 8-byte header length prefix (file shrank while reading?)")
    n = int.from_bytes(prefix, "little")
    # Check the length before reading anything: a corrupt prefix must not make us allocate.
    if n > MAX_HEADER_SIZE:
        raise _fail(path, f"header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes")
    if n > size - 8:
        raise _fail(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
    if n == 0:
        raise _fail(path, "header length is 0; a header is at least '{}'")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise _fail(path, "header could not be read in full (file shrank while reading?)")
    data_start = 8 + n
    tensors, metadata = _parse_header(path, raw, size - data_start)
    return tensors, metadata, data_start, size


def read_header(path) -> Tuple[Dict[str, TensorEntry], Dict[str, str], int]:
    """Validate and parse the header of `path` without mapping the data.

    Returns (tensors in offset order, __metadata__ ({} if absent), absolute data-area offset).
    Raises SafetensorsFormatError naming the file, tensor and rule for any violation.
    """
    path = os.fspath(path)
    fd = _open_fd(path)
    try:
        tensors, metadata, data_start, _ = _read_header_fd(path, fd)
    finally:
        os.close(fd)
    return tensors, metadata, data_start


def _open_fd(path: str) -> int:
    """A read-only descriptor of `path`, a regular file or a symlink to one (storage.index's
    rule); a FIFO, device or folder is refused before it is opened (a FIFO would block)."""
    if not os.path.lexists(path) or (os.path.islink(path) and not os.path.exists(path)):
        raise CheckpointError(f"{path}: no such safetensors file"
                              f"{' (a dangling symlink)' if os.path.islink(path) else ''}; check the path")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file; point at a .safetensors file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such safetensors file; check the path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):   # swapped between the check and the open
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file; point at a .safetensors file")
    return fd


# ---------------------------------------------------------------------------------------------
# blocks

def normalize_block(name: str, shape: Sequence[int], offsets, sizes) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Check a block request against a tensor shape; None offsets/sizes mean the whole tensor.

    Raises CheckpointError when the block has the wrong rank or leaves the tensor.
    """
    shape = tuple(shape)
    offsets = (0,) * len(shape) if offsets is None else tuple(int(o) for o in offsets)
    sizes = tuple(s - o for s, o in zip(shape, offsets)) if sizes is None else tuple(int(s) for s in sizes)
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise CheckpointError(f"tensor {name!r} of shape {list(shape)}: block offsets {list(offsets)} / "
                              f"sizes {list(sizes)} must have one entry per dimension")
    for d, (g, o, s) in enumerate(zip(shape, offsets, sizes)):
        if o < 0 or s < 0 or o + s > g:
            raise CheckpointError(f"tensor {name!r} of shape {list(shape)}: block offsets {list(offsets)} "
                                  f"sizes {list(sizes)} leave the tensor on dimension {d}")
    return offsets, sizes


def block_runs(shape: Sequence[int], itemsize: int, offsets: Sequence[int],
               sizes: Sequence[int]) -> np.ndarray:
    """Byte runs of a rectangular block inside a C-ordered tensor, relative to the tensor start.

    Returns an int64 array of shape (n, 2) of (start, length), in block C order, maximally
    coalesced: the trailing dimensions the block spans fully are merged into each run, so runs
    never touch each other. An empty block gives no runs.
    """
    ndim = len(shape)
    if prod(sizes) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    strides = [itemsize] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    # k: the last dimension the block does not cover fully; everything after it is contiguous.
    k = ndim - 1
    while k >= 0 and sizes[k] == shape[k]:
        k -= 1
    if k < 0:
        return np.array([[0, prod(shape) * itemsize]], dtype=np.int64)
    run_len = sizes[k] * strides[k]
    starts = np.array([sum(o * s for o, s in zip(offsets, strides))], dtype=np.int64)
    for d in range(k - 1, -1, -1):
        if sizes[d] > 1:
            steps = np.arange(sizes[d], dtype=np.int64) * strides[d]
            starts = (steps[:, None] + starts[None, :]).reshape(-1)
    return np.stack([starts, np.full_like(starts, run_len)], axis=1)


# ---------------------------------------------------------------------------------------------
# the file

class SafetensorsFile:
    """An open safetensors file: validated header plus a read-only memory map of the data.

    Use as a context manager or call close(). Arrays returned by read() are fresh copies, so they
    stay valid after close().
    """

    def __init__(self, path, private: bool = False):
        """`private`: map the file copy-on-write (MAP_PRIVATE) instead of read-only, so that
        `private_view` can hand out writable arrays over its pages; every other view stays
        read-only and the file is never written either way."""
        self.path: str = os.fspath(path)
        self._mmap: Optional[mmap.mmap] = None
        self.private = private
        self._handed_out = False
        fd = _open_fd(self.path)
        try:
            self.tensors, self.metadata, self.data_start, self._size = _read_header_fd(self.path, fd)
            # The header is validated; now map the file (never empty here: the prefix is 8 bytes).
            self._mmap = mmap.mmap(fd, self._size,
                                   access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ)
            # a private file keeps its descriptor: kernel-side copies read the very file mapped
            self._fd: Optional[int] = os.dup(fd) if private else None
        finally:
            os.close(fd)

    # -- context manager
    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"

    def keys(self) -> List[str]:
        """Tensor names in file (offset) order."""
        return list(self.tensors)

    def entry(self, name: str) -> TensorEntry:
        """The header entry of `name`; CheckpointError naming the file if it is absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} (the file holds "
                                  f"{len(self.tensors)} tensors)") from None

    def byte_ranges(self, name: str, offsets=None, sizes=None) -> List[Tuple[int, int]]:
        """The coalesced (absolute file offset, length) runs a block of `name` occupies."""
        e = self.entry(name)
        offsets, sizes = normalize_block(name, e.shape, offsets, sizes)
        runs = block_runs(e.shape, ITEMSIZE[e.dtype], offsets, sizes)
        base = self.data_start + e.begin
        return [(int(s) + base, int(n)) for s, n in runs]

    def _view(self, e: TensorEntry, writable: bool = False) -> np.ndarray:
        if self._mmap is None:
            raise CheckpointError(f"{self.path}: file is closed; open it again to read {e.name!r}")
        arr = np.ndarray(e.shape, dtype=ST_TO_NUMPY[e.dtype], buffer=self._mmap,
                         offset=self.data_start + e.begin)
        if not writable:
            arr.flags.writeable = False
        return arr

    def _advise(self, e: TensorEntry, offsets, sizes) -> None:
        """Tell the kernel which bytes are about to be read (hints only; failures are ignored).

        One contiguous run: read it ahead. A block with gaps (e.g. a column block): mark the tensor
        random-access so read-ahead does not pull in the bytes between runs (without this a 1/8
        column block faults in the whole tensor), and ask for each run ahead when runs are large.
        """
        mm = self._mmap
        if mm is None or not hasattr(mm, "madvise"):
            return
        runs = block_runs(e.shape, ITEMSIZE[e.dtype], offsets, sizes)
        base = self.data_start + e.begin

        def advise(flag, start, length):
            lo = start // mmap.PAGESIZE * mmap.PAGESIZE
            if length > 0:
                try:
                    mm.madvise(flag, lo, start + length - lo)
                except (OSError, ValueError, OverflowError):
                    pass

        if len(runs) == 1:
            advise(mmap.MADV_SEQUENTIAL, base + int(runs[0, 0]), int(runs[0, 1]))
            advise(mmap.MADV_WILLNEED, base + int(runs[0, 0]), int(runs[0, 1]))
        elif len(runs) > 1:
            advise(mmap.MADV_RANDOM, base, e.nbytes)
            if int(runs[0, 1]) >= _WILLNEED_MIN_RUN:
                for start, length in runs.tolist():
                    advise(mmap.MADV_WILLNEED, base + start, length)

    def read_into(self, name: str, out: np.ndarray, offsets=None, sizes=None) -> None:
        """Copy a block of `name` into `out` (any strides, e.g. a view into a bigger array).

        `out` must have the block's shape and the tensor's dtype. Only the block's bytes are read.
        """
        e = self.entry(name)
        offsets, sizes = normalize_block(name, e.shape, offsets, sizes)
        want = ST_TO_NUMPY[e.dtype]
        if tuple(out.shape) != sizes:
            raise CheckpointError(f"{self.path}: tensor {name!r}: output array has shape {list(out.shape)} "
                                  f"but the block is {list(sizes)}")
        if out.dtype != want:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {e.dtype} but the output array is "
                                  f"{out.dtype}; pass an array of {want} and cast afterwards")
        if out.size == 0:
            return
        self._advise(e, offsets, sizes)
        view = self._view(e)
        try:
            np.copyto(out, view[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])
        finally:
            del view  # drop the export of the mmap so close() can unmap it

    def read(self, name: str, offsets=None, sizes=None) -> np.ndarray:
        """The whole tensor, or the block offsets/sizes of it, as a fresh C-contiguous array."""
        e = self.entry(name)
        offsets, sizes = normalize_block(name, e.shape, offsets, sizes)
        out = np.empty(sizes, dtype=ST_TO_NUMPY[e.dtype])
        self.read_into(name, out, offsets, sizes)
        return out

    def view(self, name: str) -> np.ndarray:
        """A zero-copy read-only array over the stored tensor (drop it before close())."""
        return self._view(self.entry(name))

    def private_view(self, name: str) -> Optional[np.ndarray]:
        """A writable array over the stored tensor `name` in this file's copy-on-write mapping
        (a file opened with `private=True`): a page written is first copied into this process's
        memory, the file never changes. None when the data is not aligned for its dtype or
        empty. Reads nothing itself; the mapping lives as long as any such array does (also
        after `close()`)."""
        e = self.entry(name)
        if not self.private:
            raise CheckpointError(f"{self.path}: opened read-only; open it with private=True "
                                  f"for a copy-on-write view of {name!r}")
        if e.nbytes == 0 or (self.data_start + e.begin) % ITEMSIZE[e.dtype]:
            return None
        arr = self._view(e, writable=True)
        self._handed_out = True   # close() must not unmap what the array still points into
        return arr

    def fileno(self) -> int:
        """The open descriptor of the file mapped (a file opened with `private=True`), for
        copies inside the kernel that must read the same file as the mapping, not whatever the
        path names now."""
        if self._fd is None:
            raise CheckpointError(f"{self.path}: no descriptor kept; open it with private=True")
        return self._fd

    def populate(self, name: str) -> None:
        """Bring every page of `name` into the page cache and this mapping now (the kernel's
        read-ahead, then MADV_POPULATE_READ where the kernel has it): one sweep instead of a
        fault per page when all of the tensor is about to be read. A hint: failures are ignored."""
        lo, end = self._will_need_whole(name)
        if end > lo:
            try:
                self._mmap.madvise(MADV_POPULATE_READ, lo, end - lo)
            except (OSError, ValueError, OverflowError):
                pass   # before Linux 5.14: the reader's own faults bring the pages in

    def read_ahead(self, name: str) -> None:
        """Start reading all of `name` in the background (MADV_WILLNEED) and let a later fault
        on it map its neighbouring pages too (MADV_NORMAL): for a tensor handed out whole
        (`private_view`) whose pages nothing has read yet. A hint: failures are ignored."""
        lo, end = self._will_need_whole(name)
        if end > lo:
            try:
                self._mmap.madvise(mmap.MADV_NORMAL, lo, end - lo)
            except (OSError, ValueError, OverflowError):
                pass

    def _will_need_whole(self, name: str) -> Tuple[int, int]:
        """MADV_WILLNEED over all of `name`, in pieces the kernel does not cut short; returns the
        page-aligned (start, end) advised, start == end when nothing was."""
        e = self.entry(name)
        if e.nbytes == 0:
            return 0, 0
        start = self.data_start + e.begin
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        if not advise_will_need(self._mmap, lo, start + e.nbytes):
            return 0, 0
        return lo, start + e.nbytes

    def prefetch(self, name: str, row0: int = 0, rows: Optional[int] = None) -> None:
        """Ask the kernel to start reading rows [row0, row0+rows) of `name` (dim 0; the whole
        tensor by default). A hint only: failures are ignored."""
        e = self.entry(name)
        mm = self._mmap
        if mm is None or not hasattr(mm, "madvise") or not e.shape or e.nbytes == 0:
            return
        row_bytes = e.nbytes // max(1, e.shape[0])
        rows = e.shape[0] - row0 if rows is None else rows
        start = self.data_start + e.begin + row0 * row_bytes
        advise_will_need(mm, start // mmap.PAGESIZE * mmap.PAGESIZE, start + rows * row_bytes)

    def raw_bytes(self, name: str) -> memoryview:
        """A zero-copy read-only view of the stored bytes of `name` (release it before close())."""
        e = self.entry(name)
        if self._mmap is None:
            raise CheckpointError(f"{self.path}: file is closed")
        return memoryview(self._mmap).toreadonly()[self.data_start + e.begin:self.data_start + e.end]

    def close(self) -> None:
        """Unmap the file. Arrays from read() stay valid; views from raw_bytes() must be released."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if self._mmap is not None:
            try:
                if not self._handed_out:   # else unmapped when the last array over it goes
                    self._mmap.close()
            except BufferError:
                # Someone still holds a raw_bytes() view; the map is freed when it is dropped.
                logger.debug("%s: mmap still exported at close; leaving it to the GC", self.path)
            self._mmap = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def open_safetensors(path) -> SafetensorsFile:
    """Open `path`, validate its header strictly, and memory-map it for reading."""
    return SafetensorsFile(path)
