"""Write safetensors files by streaming: header first, then tensors or blocks of them, then an atomic commit.

The header (names, dtypes, shapes, offsets, metadata and room for the checksums) is fixed when the
writer is created, so every tensor has a known place and can be written with `os.pwrite` as soon
as its bytes exist; memory never has to hold the whole file. Bytes go to a hidden temporary file
in the target folder, which `commit()` checks (every byte written), fsyncs and renames into place:
a crash or an exception leaves no file under the final name.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
from math import prod
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError, SafetensorsFormatError
from ..dtypes import ITEMSIZE
from . import checksum as ck
from ..dtypes import ST_TO_NUMPY, numpy_to_st
from .atomic import publish, temp_path
from .reader import METADATA_KEY, block_runs, normalize_block, open_safetensors

logger = logging.getLogger(__name__)

_HASH_CHUNK = 16 << 20
_COPY_FILE_RANGE = hasattr(os, "copy_file_range")  # bytes read back per pread when a checksum must be computed from the file


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)  # may write less than asked (e.g. > 2 GiB on Linux)
        view, offset = view[n:], offset + n




class _Slot:
    """Bookkeeping for one tensor: where it goes, what has been written, its running checksum."""

    __slots__ = ("name", "dtype", "shape", "begin", "nbytes", "runs", "hasher", "hashed", "in_order")

    def __init__(self, name, dtype, shape, begin):
        self.name, self.dtype, self.shape, self.begin = name, dtype, shape, begin
        self.nbytes = prod(shape) * ITEMSIZE[dtype]
        self.runs: List[np.ndarray] = []  # (start, length) runs written, tensor-relative
        self.hasher = ck.new_hasher()
        self.hashed = 0          # bytes [0, hashed) went through the hasher, in order
        self.in_order = True     # False once bytes arrived out of order: hash from the file at commit

    def missing_bytes(self) -> int:
        """Bytes of the tensor no write has covered yet."""
        if self.nbytes == 0:
            return 0
        if not self.runs:
            return self.nbytes
        runs = np.concatenate(self.runs)
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
        starts, ends = runs[:, 0], runs[:, 0] + runs[:, 1]
        # Union length of sorted intervals: clip each start to the furthest end seen before it.
        reach = np.maximum.accumulate(ends)
        prev_reach = np.concatenate([[0], reach[:-1]])
        covered = int(np.sum(np.maximum(ends - np.maximum(starts, prev_reach), 0)))
        self.runs = [runs]  # keep the sorted form; later calls are cheaper
        return self.nbytes - covered


class SafetensorsWriter:
    """Stream tensors into a new safetensors file whose layout is fixed up front.

    `specs` gives (name, safetensors dtype, shape) in the order tensors are laid out. Use as a
    context manager: leaving the block normally commits, an exception aborts.
    """

    def __init__(self, path, specs: Sequence[Tuple[str, str, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None, checksums: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self.checksums = checksums
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._done = True  # until the temporary file exists there is nothing to commit or abort
        self._slots: Dict[str, _Slot] = {}
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SafetensorsFormatError(f"{self.path}: __metadata__ must map strings to strings; "
                                             f"{key!r}: {value!r} is not (json.dumps() values first)")
        if checksums and ck.CHECKSUM_KEY in metadata:
            raise SafetensorsFormatError(f"{self.path}: __metadata__[{ck.CHECKSUM_KEY!r}] is reserved for "
                                         f"the writer's checksums; pass checksums=False to set it yourself")
        offset = 0
        for spec in specs:
            name, dtype, shape = spec
            shape = tuple(shape)
            if not isinstance(name, str) or name == METADATA_KEY:
                raise SafetensorsFormatError(f"{self.path}: {name!r} cannot be a tensor name")
            if name in self._slots:
                raise SafetensorsFormatError(f"{self.path}: tensor {name!r} is listed twice in the specs")
            if dtype not in ST_TO_NUMPY:
                raise SafetensorsFormatError(f"{self.path}: tensor {name!r}: unknown dtype {dtype!r}; "
                                             f"use one of {', '.join(ST_TO_NUMPY)}")
            if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise SafetensorsFormatError(f"{self.path}: tensor {name!r}: shape {list(shape)} must be "
                                             f"non-negative integers")
            slot = _Slot(name, dtype, tuple(int(d) for d in shape), offset)
            self._slots[name] = slot
            offset += slot.nbytes
        self.data_size = offset

        # Reserve the checksums with zero digests: every digest is 16 hex digits, so writing the
        # real ones at commit keeps the header length, and no tensor ever moves.
        self._metadata = metadata
        if checksums:
            self._metadata[ck.CHECKSUM_KEY] = ck.encode_checksums({n: "0" * ck.HEX_WIDTH for n in self._slots})
        header = self._header_bytes()
        self.data_start = 8 + len(header)

        folder, base = os.path.split(self.path)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{self.path}: folder {folder} does not exist; create it first")
        # Hidden and not ending in .safetensors, so folder scans never mistake it for a result.
        self.tmp_path = temp_path(self.path)
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._done = False
        try:
            os.ftruncate(self._fd, self.data_start + self.data_size)
            _pwrite_all(self._fd, len(header).to_bytes(8, "little") + header, 0)
        except BaseException:
            self.abort()
            raise
        logger.debug("%s: writing %d tensors, %d data bytes via %s", self.path, len(self._slots),
                     self.data_size, self.tmp_path)

    # -- header
    def _header_bytes(self) -> bytes:
        obj: Dict[str, object] = {}
        if self._metadata:
            obj[METADATA_KEY] = self._metadata
        for s in self._slots.values():
            obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.begin, s.begin + s.nbytes]}
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Pad with spaces so the data area starts 8-byte aligned, as the Rust writer does.
        return raw + b" " * (-len(raw) % 8)

    # -- context manager
    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _slot(self, name: str) -> _Slot:
        if self._done:
            raise CheckpointError(f"{self.path}: writer already committed or aborted; cannot write {name!r}")
        try:
            return self._slots[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this writer's specs") from None

    # -- writing
    def write(self, name: str, array) -> None:
        """Write the whole tensor `name` (any strides; non-contiguous arrays are copied first)."""
        slot = self._slot(name)
        array = np.asarray(array)
        if tuple(array.shape) != slot.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(slot.shape)} in the specs "
                                  f"but the array is {list(array.shape)}")
        self.write_block(name, (0,) * len(slot.shape), array)

    def copy_rows_from(self, name: str, row: int, src_fd: int, src_offset: int,
                       view: np.ndarray) -> None:
        """Write rows [row, row + len(view)) of tensor `name` — whole rows, contiguous in both
        files — by copying `view.nbytes` bytes at `src_offset` of the open file `src_fd` inside
        the kernel (`os.copy_file_range`: no pass through this process's memory, the page
        cache copies or the file system shares the blocks). `view` is those same bytes as
        mapped (the checksum is computed over it; it must be the file's bytes at that
        offset). Falls back to `write_block` where the kernel cannot copy between the two."""
        slot = self._slot(name)
        array = np.asarray(view)
        if array.dtype != ST_TO_NUMPY[slot.dtype] or tuple(array.shape[1:]) != slot.shape[1:] \
                or not array.flags.c_contiguous:
            raise CheckpointError(f"{self.path}: tensor {name!r}: copy_rows_from needs whole "
                                  f"C-contiguous rows of {slot.dtype}")
        offsets = (row,) + (0,) * (len(slot.shape) - 1)
        if not _COPY_FILE_RANGE:
            return self.write_block(name, offsets, array)
        offsets, sizes = normalize_block(name, slot.shape, offsets, array.shape)
        runs = block_runs(slot.shape, ITEMSIZE[slot.dtype], offsets, sizes)
        if len(runs) != 1:   # whole rows are one run
            return self.write_block(name, offsets, array)
        dst, todo, src_pos = self.data_start + slot.begin + int(runs[0, 0]), int(runs[0, 1]), src_offset
        while todo:
            try:
                n = os.copy_file_range(src_fd, self._fd, todo, src_pos, dst)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    done = int(runs[0, 1]) - todo   # the rest through this process
                    flat = array.reshape(-1).view(np.uint8)
                    _pwrite_all(self._fd, flat[done:], dst)
                    break
                raise
            if n == 0:
                raise CheckpointError(f"{self.path}: the source ended before offset "
                                      f"{src_pos + todo} while copying {name!r}")
            todo, src_pos, dst = todo - n, src_pos + n, dst + n
        self._record(slot, runs, array.reshape(-1).view(np.uint8))

    def write_block(self, name: str, offsets, array) -> None:
        """Write `array` as the block of tensor `name` starting at `offsets` (tensor-local indices)."""
        slot = self._slot(name)
        array = np.asarray(array)
        want = ST_TO_NUMPY[slot.dtype]
        if array.dtype != want:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {slot.dtype} but the array is {array.dtype}; "
                                  f"cast it to {want} first (e.g. arr.astype(...))")
        offsets, sizes = normalize_block(name, slot.shape, offsets, array.shape)
        runs = block_runs(slot.shape, ITEMSIZE[slot.dtype], offsets, sizes)
        if len(runs) == 0:
            return
        # Never hand raw memory of a strided view to the kernel: make the block C-contiguous.
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        base = self.data_start + slot.begin
        run_len = int(runs[0, 1])
        for i, start in enumerate(runs[:, 0].tolist()):
            _pwrite_all(self._fd, flat[i * run_len:(i + 1) * run_len], base + start)
        self._record(slot, runs, flat)

    def _record(self, slot: "_Slot", runs, flat: np.ndarray) -> None:
        """Note the runs written to `slot` and hash `flat` (their bytes, in order) when in order."""
        run_len = int(runs[0, 1])
        with self._lock:
            slot.runs.append(runs)
            if self.checksums and slot.in_order:
                if len(runs) == 1 and int(runs[0, 0]) == slot.hashed:
                    slot.hasher.update(flat)
                    slot.hashed += run_len
                else:
                    slot.in_order = False

    # -- finishing
    def _file_checksum(self, slot: _Slot) -> str:
        h = ck.new_hasher()
        pos, end = self.data_start + slot.begin, self.data_start + slot.begin + slot.nbytes
        while pos < end:
            chunk = os.pread(self._fd, min(_HASH_CHUNK, end - pos), pos)
            h.update(chunk)
            pos += len(chunk)
        return ck.hex_digest(h)

    def commit(self) -> str:
        """Check every byte was written, record checksums, fsync, rename into place, fsync the folder.

        Returns the final path. On any failure the temporary file is removed and the error raised
        (CheckpointError naming the tensors not fully written).
        """
        if self._done:
            raise CheckpointError(f"{self.path}: writer already committed or aborted")
        try:
            with self._lock:
                incomplete = [(s.name, s.missing_bytes()) for s in self._slots.values()]
                incomplete = [(n, m) for n, m in incomplete if m]
                if incomplete:
                    listed = ", ".join(f"{n!r} ({m} bytes missing)" for n, m in incomplete[:10])
                    more = f" and {len(incomplete) - 10} more" if len(incomplete) > 10 else ""
                    raise CheckpointError(f"{self.path}: not every tensor was fully written: {listed}{more}; "
                                          f"nothing was saved. Write every tensor (or all its blocks) before commit.")
                if self.checksums:
                    digests = {}
                    for s in self._slots.values():
                        if s.in_order and s.hashed == s.nbytes:
                            digests[s.name] = ck.hex_digest(s.hasher)
                        else:
                            digests[s.name] = self._file_checksum(s)
                    self._metadata[ck.CHECKSUM_KEY] = ck.encode_checksums(digests)
                    header = self._header_bytes()
                    assert 8 + len(header) == self.data_start, "checksums changed the header length"
                    _pwrite_all(self._fd, header, 8)
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                publish(self.tmp_path, self.path)
                self._done = True
        except BaseException:
            self.abort()
            raise
        logger.debug("%s: committed (%d bytes)", self.path, self.data_start + self.data_size)
        return self.path

    def abort(self) -> None:
        """Forget the file: close and remove the temporary file. Safe to call more than once."""
        self._done = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self.tmp_path)
        except (FileNotFoundError, AttributeError):
            pass

    def __del__(self):
        # A writer dropped without commit() must not leave its temporary file behind.
        if not getattr(self, "_done", True):
            try:
                logger.warning("%s: writer dropped without commit(); discarding", self.path)
                self.abort()
            except Exception:
                pass


def save_tensors(path, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None,
                 checksums: bool = True) -> str:
    """Write a dict of arrays (any strides) to `path` atomically; returns the path written."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    specs = [(name, numpy_to_st(a.dtype), a.shape) for name, a in arrays.items()]
    with SafetensorsWriter(path, specs, metadata=metadata, checksums=checksums) as w:
        for name, a in arrays.items():
            w.write(name, a)
    return w.path


def load_tensors(path) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file as fresh numpy arrays, in file order."""
    with open_safetensors(path) as f:
        return {name: f.read(name) for name in f.tensors}
