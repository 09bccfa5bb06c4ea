"""The one engine that runs every `Plan`: bounded memory, parallel reads, streaming writes.

How it moves bytes:
- sources are memory-mapped read-only (page cache pages, not anonymous memory), with faults that
  never read ahead; the engine reads exactly the pages of the byte ranges the plan names
  (`read_ranges`), requesting each block's ranges (`madvise(WILLNEED)`) while the block before it
  is copied and written, so disk reads overlap copying and writing;
- a target tensor is produced in row blocks along dim 0 (`_blocks`). A block that one source
  block fills with whole contiguous rows is written straight from the mmap; any other block is
  assembled in a per-thread staging buffer of at most `CHUNK_BYTES` (reused, so its pages fault
  in once);
- writes go through `storage.writer.SafetensorsWriter` (pwrite, xxh3 checksums, fsync, rename);
- the output folder is built under a hidden sibling name and renamed at the end, so it appears
  complete or not at all.
Peak anonymous memory is the `workers` largest staging needs of the plan (`peak_staging`, what
`--dry-run` prints), at most `workers * CHUNK_BYTES` (+ one row when a row is larger), whatever
the model size.
"""
from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from multiprocessing.connection import wait as mp_wait
from math import prod
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError, PlanError
from ..layout.slices import block_inside
from ..dtypes import ITEMSIZE
from ..dtypes import ST_TO_NUMPY
from ..storage.reader import (MADV_POPULATE_READ, SafetensorsFile, advise_will_need,
                              block_runs, read_header)
from ..storage.atomic import fsync_dir
from ..storage.writer import SafetensorsWriter
from .gc_pause import without_gc
from .plan import CopyOp, Plan, TargetFile, TargetTensor
from .planner import split_plan
from .verify import Verifier, keys_to_verify

logger = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20      # staging buffer per worker thread
DIRECT_PIECE = 64 << 20     # largest single write straight from a source mapping
SMALL_DIRECT_BYTES = 1 << 20  # direct ranges below this are staged with their neighbours


# --------------------------------------------------------------------------- sources
class _Source(SafetensorsFile):
    """One memory-mapped source file (storage's reader), mapped copy-on-write so that a load can
    give a parameter the pages of a tensor stored whole (`private_view`) — the same pages its
    checksum was computed over. Page faults on it never read ahead
    (MADV_RANDOM): the engine names every byte range it copies in advance (`will_need`), so a
    fault brings in its own page only and a column slice does not pull in the columns around it
    (the kernel's read-around or sequential read-ahead would read several MiB per fault)."""

    def __init__(self, path: str):
        super().__init__(path, private=True)
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_RANDOM)

    def populate_range(self, start: int, length: int) -> None:
        """Map the pages of bytes [start, start + length) of the file now, in one sweep
        (MADV_POPULATE_READ; their reads were asked for ahead by `will_need`). A hint."""
        mm = self._mmap
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        if mm is None or length <= 0 or not hasattr(mm, "madvise"):
            return
        try:
            mm.madvise(MADV_POPULATE_READ, lo, start + length - lo)
        except (OSError, ValueError, OverflowError):
            pass   # before Linux 5.14: the hash's own faults bring the pages in

    def raw(self, name: str) -> memoryview:
        """The stored bytes of `name` (zero-copy; release before close)."""
        return self.raw_bytes(name)

    def runs(self, name: str, offsets: Sequence[int], sizes: Sequence[int]):
        """The reader's `byte_ranges(name, offsets, sizes)` for the engine, cheaply: one (absolute
        start, length) extent when the runs lie less than a page apart (their pages touch, so
        they are one sequential read whatever the gaps: whole tensors, row ranges, narrow rows),
        else the (n, 2) int64 array of runs (`block_runs`). The block was checked against the
        tensor already (validate_plan)."""
        e = self.entry(name)
        base = self.data_start + e.begin
        shape, item = e.shape, ITEMSIZE[e.dtype]
        k = len(shape) - 1
        while k >= 0 and sizes[k] == shape[k]:   # trailing dims taken whole merge into one run
            k -= 1
        if k < 0:
            return (base, e.nbytes)
        strides = [item] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        span, gap = sizes[k] * strides[k], 0   # bytes from the first run's start to the last's end
        for d in range(k - 1, -1, -1):
            if sizes[d] > 1:
                gap = max(gap, strides[d] - span)
                span += (sizes[d] - 1) * strides[d]
        if gap < mmap.PAGESIZE:
            return (base + sum(o * st for o, st in zip(offsets, strides)), span)
        runs = block_runs(shape, item, offsets, sizes)
        runs[:, 0] += base
        return runs

    def will_need(self, ranges: Sequence[Tuple[int, int]]) -> None:
        """Start reading the page-aligned (start, length) `ranges` of the file (a hint: errors
        are ignored), in pieces the kernel does not cut short (storage.reader.advise_will_need)."""
        for start, length in ranges:
            if not advise_will_need(self._mmap, start, start + length):
                return


class _Sources:
    """Lazily opened source files, shared by the worker threads. `view` checks a tensor's
    checksum the first time it is used when the verifier asks for it (transform/verify.py)."""

    def __init__(self, verifier: Optional[Verifier] = None):
        self._open: Dict[str, _Source] = {}
        self._lock = threading.Lock()
        self.verifier = verifier
        # (file, tensor) whose pages the checksum pass brought in whole: reading them again
        # needs no read-ahead hints
        self.populated: set = set()

    def view(self, path: str, name: str) -> np.ndarray:
        """A read-only array over the stored tensor, its bytes checked first when required."""
        src = self.get(path)
        v = self.verifier
        if v is not None and v.wants(path, name):
            src.populate(name)   # the hash reads all of it: one sweep, not a fault per page
            raw = src.raw(name)
            try:
                v.check(path, name, src.metadata, raw, src.tensors)
            finally:
                raw.release()
            self.populated.add((path, name))
        return src.view(name)

    def get(self, path: str) -> _Source:
        with self._lock:
            s = self._open.get(path)
            if s is None:
                s = self._open[path] = _Source(path)
            return s

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()


@without_gc
def read_source_shapes(plan: Plan, tensors_of: Optional[Callable[[str], Mapping]] = None
                       ) -> Dict[Tuple[str, str], Tuple[Tuple[int, ...], str]]:
    """(source file, tensor) -> (stored shape, dtype) for every source the plan reads, from the
    headers (`tensors_of(path)`: a file's tensor entries, e.g. of a file already open; by
    default its header read now, once per file). CheckpointError when a file or tensor the
    plan names is not there."""
    out: Dict[Tuple[str, str], Tuple[Tuple[int, ...], str]] = {}
    headers: Dict[str, Mapping] = {}
    for f in plan.files:
        for t in f.tensors:
            for op in t.ops:
                key = (op.src_file, op.src_name)
                if key in out:
                    continue
                if op.src_file not in headers:
                    headers[op.src_file] = (tensors_of(op.src_file) if tensors_of is not None
                                            else read_header(op.src_file)[0])
                entry = headers[op.src_file].get(op.src_name)
                if entry is None:
                    raise CheckpointError(f"{op.src_file}: has no tensor {op.src_name!r} (needed "
                                          f"for {t.name!r}); the source changed since planning?")
                out[key] = (tuple(entry.shape), entry.dtype)
    return out


@without_gc
def validate_plan(plan: Plan, shapes=None) -> None:
    """PlanError unless every op stays inside its source and target, dtypes match, each target
    tensor is covered exactly once (counted by elements), and output paths are unique."""
    shapes = read_source_shapes(plan) if shapes is None else shapes
    paths = [f.path for f in plan.files] + [p for p, _ in plan.side_files]
    if len(set(paths)) != len(paths):
        raise PlanError(f"plan writes the same output path twice: {sorted(paths)}")
    for f in plan.files:
        if os.path.isabs(f.path) or ".." in f.path.split("/"):
            raise PlanError(f"output path {f.path!r} must stay inside the output folder")
        names = [t.name for t in f.tensors]
        if len(set(names)) != len(names):
            raise PlanError(f"{f.path}: a tensor name appears twice")
        for t in f.tensors:
            total = 0
            for op in t.ops:
                shape, dtype = shapes[(op.src_file, op.src_name)]
                if dtype != t.dtype:
                    raise PlanError(f"{f.path}: {t.name!r} is {t.dtype} but its source "
                                    f"{op.src_name!r} in {op.src_file} is {dtype}; plans never cast")
                if not block_inside(shape, op.src_offsets, op.sizes):
                    raise PlanError(f"{f.path}: {t.name!r}: copy {op} leaves the source "
                                    f"tensor of shape {list(shape)}")
                if not block_inside(t.shape, op.dst_offsets, op.sizes):
                    raise PlanError(f"{f.path}: {t.name!r}: copy {op} leaves the target "
                                    f"tensor of shape {list(t.shape)}")
                total += prod(op.sizes)
            if total != prod(t.shape):
                raise PlanError(f"{f.path}: {t.name!r}: copies fill {total} of {prod(t.shape)} "
                                f"elements; every element must come from exactly one copy")


# --------------------------------------------------------------------------- scheduling
def _segments(t: TargetTensor, shapes) -> List[Tuple[int, int, List[CopyOp], bool]]:
    """Row ranges [a, b) of the target with the ops filling them, and whether the range can be
    written straight from the single source (whole contiguous rows) without staging."""
    if not t.shape:
        return [(0, 1, list(t.ops), True)]
    bounds = {0, t.shape[0]}
    for op in t.ops:
        bounds.add(op.dst_offsets[0])
        bounds.add(op.dst_offsets[0] + op.sizes[0])
    bounds = sorted(bounds)
    # Sweep the row boundaries once with the ops sorted by first row: every boundary is some op's
    # start or end, so the ops active at `a` span all of [a, b). Linear in ops, not ops x rows
    # (a fused w_gate_hidden has one op per row).
    pending = sorted(t.ops, key=lambda op: op.dst_offsets[0])
    nxt, active, out = 0, [], []
    for a, b in zip(bounds, bounds[1:]):
        while nxt < len(pending) and pending[nxt].dst_offsets[0] <= a:
            active.append(pending[nxt])
            nxt += 1
        active = [op for op in active if op.dst_offsets[0] + op.sizes[0] > a]
        ops = list(active)
        direct = False
        if len(ops) == 1:
            op = ops[0]
            src_shape = shapes[(op.src_file, op.src_name)][0]
            direct = (tuple(op.sizes[1:]) == tuple(t.shape[1:]) and
                      tuple(src_shape[1:]) == tuple(op.sizes[1:]))
        out.append((a, b, ops, direct))
    return out


def _row_bytes(t: TargetTensor) -> int:
    return prod(t.shape[1:]) * ITEMSIZE[t.dtype] if t.shape else ITEMSIZE[t.dtype]


Block = Tuple[int, int, Tuple[CopyOp, ...], bool]


def _blocks(t: TargetTensor, shapes) -> List[Block]:
    """The engine's schedule for writing `t` (a tensor with at least one element and one
    dimension): row blocks (r, e, ops, direct) in row order covering [0, rows) once. A direct block
    is written straight from the single source mapping in `ops`; any other is assembled in the
    staging buffer from `ops` and is at most `CHUNK_BYTES` (or one row when a row is larger).
    `_write_tensor` runs exactly these blocks, and `staging_bytes` sizes the buffer from them."""
    row = _row_bytes(t)
    chunk_rows = max(1, CHUNK_BYTES // max(1, row))
    direct_rows = max(1, DIRECT_PIECE // max(1, row))
    out: List[Block] = []
    staged_from, staged_ops, staged_set = None, [], set()   # small row ranges share a chunk

    def flush(end: int) -> None:
        ops = tuple(staged_ops)
        out.extend((r, min(end, r + chunk_rows), ops, False)
                   for r in range(staged_from, end, chunk_rows))

    for a, b, ops, direct in _segments(t, shapes):
        # A direct range too small to be worth its own pwrite (e.g. the one-row copies of an
        # interleaved w_gate_hidden) is staged with its neighbours instead.
        if direct and (b - a) * row < SMALL_DIRECT_BYTES:
            direct = False
        if not direct:
            if staged_from is not None and (b - staged_from > chunk_rows):
                flush(a)
                staged_from, staged_ops, staged_set = None, [], set()
            if staged_from is None:
                staged_from = a
            for op in ops:   # an op spanning several ranges is staged once
                if op not in staged_set:
                    staged_set.add(op)
                    staged_ops.append(op)
            continue
        if staged_from is not None:
            flush(a)
            staged_from, staged_ops, staged_set = None, [], set()
        out.extend((r, min(b, r + direct_rows), (ops[0],), True) for r in range(a, b, direct_rows))
    if staged_from is not None:
        flush(t.shape[0])
    return out


def _staging_need(t: TargetTensor, blocks: Sequence[Block]) -> int:
    row = _row_bytes(t)
    return max(((e - r) * row for r, e, _, direct in blocks if not direct), default=0)


def staging_bytes(t: TargetTensor, shapes) -> int:
    """The staging buffer the engine holds for target tensor `t`: its largest staged block (0
    when every block is written straight from a source mapping, or `t` is a scalar or empty).
    The engine sizes its buffer with this same computation (`_Staging.reserve`)."""
    if not t.shape or prod(t.shape) == 0:
        return 0
    return _staging_need(t, _blocks(t, shapes))


def peak_staging(plan: Plan, shapes, workers: int) -> int:
    """The most staging memory `execute_files(plan, workers=workers)` can hold at once. Each of
    the `workers` threads runs one tensor at a time (several may be of the same file) and keeps
    one buffer, grown to the largest need of the tensors it has run; since no tensor runs twice,
    the worst case is the `workers` largest needs of the plan, one per thread."""
    needs = sorted((staging_bytes(t, shapes) for f in plan.files for t in f.tensors), reverse=True)
    return sum(needs[:max(1, workers)])


# --------------------------------------------------------------------------- reading
def _portion(op: CopyOp, row0: int, row1: int):
    """The part of `op` that falls in target rows [row0, row1): (first target row, source
    offsets, sizes), or None when they do not meet."""
    lo = max(row0, op.dst_offsets[0])
    hi = min(row1, op.dst_offsets[0] + op.sizes[0])
    if hi <= lo:
        return None
    return (lo, (op.src_offsets[0] + lo - op.dst_offsets[0],) + tuple(op.src_offsets[1:]),
            (hi - lo,) + tuple(op.sizes[1:]))


def coalesce(ranges, page: int = mmap.PAGESIZE) -> List[Tuple[int, int]]:
    """The pages holding the byte `ranges` ((start, length) pairs, or an (n, 2) array), as sorted
    page-aligned (start, length) runs: ranges whose pages touch or overlap become one run, so
    consecutive rows are one sequential read and no page is named twice, while a gap of a whole
    page or more stays unread."""
    if isinstance(ranges, np.ndarray) and len(ranges) > 16:
        arr = ranges[ranges[:, 1] > 0]
        lo = arr[:, 0] // page * page
        hi = -(-(arr[:, 0] + arr[:, 1]) // page) * page
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], np.maximum.accumulate(hi[order])
        new = np.flatnonzero(lo[1:] > hi[:-1]) + 1   # a run starts where the pages stop touching
        lo, hi = lo[np.concatenate(([0], new))], hi[np.concatenate((new - 1, [len(hi) - 1]))]
        return list(zip(lo.tolist(), (hi - lo).tolist()))
    # a few ranges (the usual case: one run per copy): plain Python is cheaper than numpy
    spans = sorted((s // page * page, -(-(s + n) // page) * page)
                   for s, n in (ranges.tolist() if isinstance(ranges, np.ndarray) else ranges)
                   if n > 0)
    out: List[List[int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]


def read_ranges(ops: Sequence[CopyOp], row0: int, row1: int,
                sources: "_Sources") -> Dict[str, List[Tuple[int, int]]]:
    """{source file: coalesced page-aligned (start, length) runs} the engine reads to fill target
    rows [row0, row1) from `ops`: exactly the bytes the plan names (the reader's `byte_ranges`
    of each copy, `_Source.runs`), rounded out to whole pages."""
    per_file: Dict[str, list] = {}
    for op in ops:
        part = _portion(op, row0, row1)
        if part is None or not op.numel:
            continue
        _, offsets, sizes = part
        per_file.setdefault(op.src_file, []).append(
            sources.get(op.src_file).runs(op.src_name, offsets, sizes))
    out = {}
    for path, parts in per_file.items():
        if len(parts) == 1 and isinstance(parts[0], tuple):   # the common case, made cheap
            start, length = parts[0]
            lo = start // mmap.PAGESIZE * mmap.PAGESIZE
            out[path] = [(lo, -(-(start + length) // mmap.PAGESIZE) * mmap.PAGESIZE - lo)]
        elif all(isinstance(p, tuple) for p in parts):
            out[path] = coalesce(parts)
        else:
            out[path] = coalesce(np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1, 2)
                                                 for p in parts]))
    return out


def _prefetch(ops: Sequence[CopyOp], row0: int, row1: int, sources: "_Sources") -> None:
    """Start reading the source bytes of target rows [row0, row1) (no more: see `read_ranges`),
    except those of tensors the checksum pass brought in already."""
    if sources.populated:
        ops = [op for op in ops if (op.src_file, op.src_name) not in sources.populated]
    for path, ranges in read_ranges(ops, row0, row1, sources).items():
        sources.get(path).will_need(ranges)


def _prefetch_head(t: TargetTensor, sources: "_Sources") -> None:
    """Start reading the first staging chunk's worth of `t`'s rows: a head start for the thread
    that takes it next (which prefetches its blocks exactly as it goes)."""
    if t.shape and prod(t.shape):
        _prefetch(t.ops, 0, max(1, CHUNK_BYTES // max(1, _row_bytes(t))), sources)


# --------------------------------------------------------------------------- copying
class _Staging(threading.local):
    """Each worker thread's staging buffer, kept across tensors (its pages fault in once) and
    grown to what the tensor being written needs (`staging_bytes`), never more."""

    buf: Optional[np.ndarray] = None

    def reserve(self, nbytes: int) -> None:
        if nbytes and (self.buf is None or self.buf.nbytes < nbytes):
            self.buf = None   # free the smaller buffer first: never hold both
            self.buf = np.empty(nbytes, dtype=np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        self.reserve(nbytes)
        return self.buf[:nbytes]


def _fill(block: np.ndarray, row0: int, ops: Sequence[CopyOp], sources: _Sources) -> None:
    """Copy into `block` (target rows [row0, row0+len(block))) the parts of `ops` it spans.
    Reads through the source mappings touch exactly the pages of `read_ranges`."""
    rows = block.shape[0]
    for op in ops:
        part = _portion(op, row0, row0 + rows)
        if part is None:
            continue
        lo, offsets, sizes = part
        src = sources.view(op.src_file, op.src_name)
        src_idx = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        dst_idx = (slice(lo - row0, lo - row0 + sizes[0]),) + tuple(
            slice(o, o + s) for o, s in zip(op.dst_offsets[1:], op.sizes[1:]))
        np.copyto(block[dst_idx], src[src_idx])
        del src


def _write_tensor(t: TargetTensor, writer: SafetensorsWriter, shapes, sources: _Sources,
                  staging: _Staging, progress: Callable[[int], None]) -> None:
    dtype = ST_TO_NUMPY[t.dtype]
    if not t.shape:   # 0-d scalar
        op = t.ops[0]
        writer.write(t.name, np.array(sources.view(op.src_file, op.src_name)))
        progress(ITEMSIZE[t.dtype])
        return
    if prod(t.shape) == 0:
        writer.write(t.name, np.empty(t.shape, dtype=dtype))
        return
    row = _row_bytes(t)
    blocks = _blocks(t, shapes)
    staging.reserve(_staging_need(t, blocks))
    _prefetch(blocks[0][2], blocks[0][0], blocks[0][1], sources)
    for k, (r, e, ops, direct) in enumerate(blocks):
        if k + 1 < len(blocks):   # read the next block while this one is copied and written
            _prefetch(blocks[k + 1][2], blocks[k + 1][0], blocks[k + 1][1], sources)
        at = (r,) + (0,) * (len(t.shape) - 1)
        if direct:   # whole rows, contiguous in both files: copied inside the kernel
            op = ops[0]
            src = sources.view(op.src_file, op.src_name)   # checked first when required
            source = sources.get(op.src_file)
            s0 = op.src_offsets[0] + (r - op.dst_offsets[0])
            start = source.data_start + source.entry(op.src_name).begin + s0 * row
            if writer.checksums and (op.src_file, op.src_name) not in sources.populated:
                source.populate_range(start, (e - r) * row)   # the checksum reads these rows
            writer.copy_rows_from(t.name, r, source.fileno(), start, src[s0:s0 + e - r])
            del src, source
        else:
            block = staging.get((e - r) * row).view(dtype).reshape((e - r,) + tuple(t.shape[1:]))
            _fill(block, r, ops, sources)
            writer.write_block(t.name, at, block)
        progress((e - r) * row)


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fault_pause() -> None:
    """Fault-injection hook for the signal tests: with MFST_FAULT_PAUSE_AFTER_FILE=seconds the
    engine sleeps after committing each output file, so a test can interrupt a run at a known
    point (a file done, the folder not). Unset: nothing."""
    pause = os.environ.get("MFST_FAULT_PAUSE_AFTER_FILE")
    if pause:
        time.sleep(float(pause))


def execute_files(plan: Plan, folder: str, workers: int = 4, progress: bool = True,
                  shapes=None, verify: str = "read", verify_keys=None,
                  on_file: Optional[Callable[[int], None]] = None,
                  validated: bool = False) -> List[str]:
    """Write `plan.files` into the existing `folder` (no side files, no folder rename): the part
    a worker runs when several share one output (see `split_plan`). Each file is committed
    atomically by the writer; on error every unfinished file is removed. Source checksums are
    checked per `verify` (transform/verify.py), or exactly for `verify_keys` when given (a part
    of a split plan must check what the whole plan's mode selects: see `execute_in_processes`).
    `on_file(nbytes)` is called after each file is committed; `validated` says the caller has
    just validated `plan` against `shapes` (it is not checked twice). Returns the paths."""
    shapes = read_source_shapes(plan) if shapes is None else shapes
    if not validated:
        validate_plan(plan, shapes)
    folder = os.path.abspath(folder)
    verifier = Verifier(keys_to_verify(plan, shapes, verify) if verify_keys is None
                        else verify_keys)
    sources = _Sources(verifier)
    staging = _Staging()
    bar = _Progress(sum(f.nbytes for f in plan.files), progress, plan.kind)
    writers: Dict[str, SafetensorsWriter] = {}
    remaining: Dict[str, int] = {}
    lock = threading.Lock()
    done: List[str] = []
    tasks: List[Tuple[TargetFile, TargetTensor]] = []
    try:
        for f in plan.files:
            path = os.path.join(folder, f.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            writers[f.path] = SafetensorsWriter(
                path, [(t.name, t.dtype, t.shape) for t in f.tensors], dict(f.metadata))
            remaining[f.path] = len(f.tensors)
            tasks.extend((f, t) for t in f.tensors)
        for f in plan.files:   # files without tensors commit now
            if not f.tensors:
                done.append(writers[f.path].commit())
                if on_file is not None:
                    on_file(f.nbytes)

        def run(i: int) -> None:
            f, t = tasks[i]
            if i + 1 < len(tasks):   # start reading the next tensor while this one copies
                _prefetch_head(tasks[i + 1][1], sources)
            _write_tensor(t, writers[f.path], shapes, sources, staging, bar)
            with lock:
                remaining[f.path] -= 1
                last = remaining[f.path] == 0
            if last:
                path = writers[f.path].commit()
                with lock:
                    done.append(path)
                    if on_file is not None:
                        on_file(f.nbytes)
                _fault_pause()

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            futures = [pool.submit(run, i) for i in range(len(tasks))]
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and fut.exception() is not None:
                    raise fut.exception()
        finally:
            # on an error or a signal, tensors not started are dropped at once (the ones in
            # flight finish their block) before the writers are aborted
            pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        sources.close()
    verifier.report()
    return sorted(done)


# --------------------------------------------------------------------------- processes
def _part_main(conn, part: Plan, folder: str, workers: int, shapes, keys) -> None:
    """One worker process of `execute_in_processes`: write `part` into `folder` with the
    ordinary engine, telling the parent ("file", nbytes) per committed file, then ("done",
    paths) — or ("error", exception) on failure."""
    # Ctrl-C in a terminal reaches the whole process group: the parent alone decides, and
    # terminates us; SIGTERM ends us at once (the parent removes the staging folder).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        paths = execute_files(part, folder, workers, progress=False, shapes=shapes,
                              verify_keys=keys, on_file=lambda n: conn.send(("file", n)))
    except BaseException as exc:   # noqa: B902 - every failure goes back to the parent
        try:
            conn.send(("error", exc))
        except Exception:   # an exception that does not pickle: its text, as our error type
            conn.send(("error", CheckpointError(f"{type(exc).__name__}: {exc}")))
        return
    conn.send(("done", paths))


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join()


def execute_in_processes(plan: Plan, folder: str, processes: int, workers: int = 4,
                         progress: bool = True, shapes=None, verify: str = "read") -> List[str]:
    """`execute_files` with the plan's files divided over `processes` child processes
    (`split_plan`: each output file written by exactly one process, balanced by bytes), each
    running the same engine with `workers` threads and the same bounded memory (so the whole
    run holds about `processes x workers x CHUNK_BYTES`). Children are started with 'spawn'
    (a fresh interpreter: no MindSpore or thread state is forked). Which source tensors are
    checked is decided on the whole plan, so a split changes nothing that is verified.

    A plan with fewer output files than `processes` uses one process per file; one file runs
    here, without a child. The first failure in a child stops the others and is raised here
    as the same exception (type and message); a child that dies without a word (killed, out of
    memory) is a CheckpointError naming its exit code. Any exception in this process (a
    signal's, Ctrl-C) terminates and waits for the children before it propagates, so the
    caller may remove `folder` at once. Returns the paths written."""
    shapes = read_source_shapes(plan) if shapes is None else shapes
    validate_plan(plan, shapes)
    keys = keys_to_verify(plan, shapes, verify)
    parts = [p for p in split_plan(plan, max(1, processes)) if p.files]
    if len(parts) <= 1:
        return execute_files(plan, folder, workers, progress, shapes, verify_keys=keys,
                             validated=True)
    if len(parts) < processes:
        logger.info("%s: the plan has %d output file(s); %d process(es) used, not %d",
                    plan.kind, len(parts), len(parts), processes)
    folder = os.path.abspath(folder)
    ctx = multiprocessing.get_context("spawn")
    bar = _Progress(sum(f.nbytes for f in plan.files), progress,
                    f"{plan.kind} ({len(parts)} processes)")
    procs, pending, done = [], {}, []
    try:
        for part in parts:
            reads = {(op.src_file, op.src_name) for f in part.files for t in f.tensors
                     for op in t.ops}
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_part_main, daemon=True,
                               args=(send, part, folder, workers,
                                     {k: v for k, v in shapes.items() if k in reads},
                                     {k for k in keys if k in reads}))
            proc.start()
            send.close()
            procs.append(proc)
            pending[recv] = proc
        while pending:
            for conn in mp_wait(list(pending)):
                try:
                    kind, value = conn.recv()
                except EOFError:
                    proc = pending[conn]
                    proc.join()
                    raise CheckpointError(
                        f"{plan.kind}: worker process {proc.pid} ended (exit code "
                        f"{proc.exitcode}) before writing its files; nothing was committed")
                if kind == "file":
                    bar(value)
                elif kind == "done":
                    done.extend(value)
                    del pending[conn]
                    conn.close()
                else:
                    raise value
    except BaseException:
        _stop(procs)
        raise
    finally:
        bar.close()
        for conn in pending:
            conn.close()
    _stop(procs)
    return sorted(done)


def _check_destination(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"{out_dir}: exists and is not a folder; choose another output")
        if os.listdir(out_dir) and not overwrite:
            raise CheckpointError(f"{out_dir}: exists and is not empty; choose another output "
                                  f"folder or pass --overwrite (overwrite=True)")


def _check_not_over_sources(plan: Plan, out_dir: str) -> None:
    """CheckpointError when `out_dir` is a source file's folder or one of its ancestors: the
    output replaces that folder, so the sources would be deleted (with --overwrite) or mixed
    with the output."""
    real_out = os.path.realpath(out_dir)
    for src in sorted({op.src_file for f in plan.files for t in f.tensors for op in t.ops}):
        real = os.path.realpath(src)
        if real == real_out or real.startswith(real_out.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{out_dir}: the output folder holds the source {src}; writing "
                                  f"it would replace the checkpoint being read. Choose a DST "
                                  f"outside the source folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale_staging(out_dir: str) -> List[str]:
    """Remove hidden staging folders of `out_dir` (`.{name}.tmp-{pid}-*`) whose process is gone
    (a run killed with SIGKILL, or a power loss); a live run's folder is left alone. Returns the
    folders removed (each logged)."""
    parent, base = os.path.split(os.path.abspath(out_dir).rstrip("/"))
    removed = []
    try:
        entries = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    prefix = f".{base}.tmp-"
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            path = os.path.join(parent, entry)
            logger.warning("%s: removing the staging folder of a run that did not finish "
                           "(process %s is gone)", path, pid)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_folder(out_dir: str) -> str:
    """Create and return a hidden sibling of `out_dir` to build it in (after removing the
    staging folders earlier runs that died left for the same output)."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(out_dir)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    return tmp


def write_side_files(plan: Plan, folder: str) -> List[str]:
    """Write the plan's side files (index json and the like) into `folder`, fsynced."""
    out = []
    for rel, text in plan.side_files:
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        out.append(path)
    return out


def commit_folder(tmp: str, out_dir: str, overwrite: bool = False) -> str:
    """Rename the finished staging folder `tmp` to `out_dir` (replacing an empty folder, or a
    full one when `overwrite`), fsync the parent. Returns `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir.rstrip("/"))
    for root, _, _ in os.walk(tmp):
        fsync_dir(root)
    trash = None
    if os.path.exists(out_dir):
        _check_destination(out_dir, overwrite)
        trash = f"{tmp}.old"
        os.rename(out_dir, trash)
    os.rename(tmp, out_dir)
    fsync_dir(parent)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)
    return out_dir


def execute(plan: Plan, out_dir: str, workers: int = 4, progress: bool = True,
            overwrite: bool = False, finalize: Optional[Callable[[str], None]] = None,
            verify: str = "read", processes: int = 1) -> List[str]:
    """Run `plan` into `out_dir`: validate it against the source headers, stream every file with
    at most `workers` tensors in flight (in each of `processes` worker processes, the files
    divided among them: `execute_in_processes`), write side files, call
    `finalize(staging_folder)` (e.g. to add strategy files), then rename the staging folder
    into place. The folder appears complete or not at all; an existing non-empty `out_dir` is
    refused unless `overwrite`. Returns the final paths of the safetensors files written."""
    out_dir = os.path.abspath(out_dir)
    _check_destination(out_dir, overwrite)
    _check_not_over_sources(plan, out_dir)
    shapes = read_source_shapes(plan)
    validate_plan(plan, shapes)   # refuse a bad plan before creating anything
    tmp = staging_folder(out_dir)
    try:
        if processes > 1:
            written = execute_in_processes(plan, tmp, processes, workers, progress, shapes,
                                           verify)
        else:
            written = execute_files(plan, tmp, workers, progress, shapes, verify,
                                    validated=True)
        write_side_files(plan, tmp)
        if finalize is not None:
            finalize(tmp)
        commit_folder(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s: wrote %d file(s), %.1f MiB", out_dir, len(written),
                sum(f.nbytes for f in plan.files) / 2 ** 20)
    return [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in written]


def execute_to_memory(plan: Plan, workers: int = 4, verify: str = "read") -> Dict[str, np.ndarray]:
    """Run `plan` into fresh numpy arrays: {tensor name: array} over all the plan's files (names
    must be unique across them). Holds exactly the target bytes. Source checksums are checked
    per `verify` before any array is filled (`execute_into`)."""
    prepared = prepare_read(plan, verify)
    try:
        out = {t.name: np.empty(t.shape, dtype=ST_TO_NUMPY[t.dtype]) for t in prepared.tensors}
        prepared.verify(workers)
        prepared.fill(out, workers)
    finally:
        prepared.close()
    return out


def execute_into(plan: Plan, destinations: Mapping[str, np.ndarray], workers: int = 4,
                 verify: str = "read") -> List[str]:
    """Copy the plan's target tensors named in `destinations` straight into those caller-given
    arrays (e.g. views of a network's parameters), each byte copied once from the mapped source
    slices. Source checksums are checked per `verify` before any destination is written, so a
    ChecksumError leaves them all unchanged. Returns the names filled."""
    prepared = prepare_read(plan, verify)
    try:
        prepared.verify(workers)
        return prepared.fill(destinations, workers)
    finally:
        prepared.close()


def prepare_read(plan: Plan, verify: str = "read") -> "PreparedRead":
    """Open the plan's sources and validate the plan for reading into memory (`PreparedRead`)."""
    return PreparedRead(plan, verify)


class PreparedRead:
    """A plan made ready to be read into memory, in two steps a load can place apart:
    `verify()` checks the source bytes the checksum mode selects (reading them: the page cache
    is warm afterwards), `fill(destinations)` copies each target tensor once, straight from the
    mapped source slices into the caller's array (a cast to the destination's dtype, when it
    differs, goes through one per-thread staging buffer in bounded row chunks). Every source
    header is parsed once (when its file is opened) and the plan validated once.
    `read(names)` gives small tensors (counters) as fresh arrays. `close()` unmaps."""

    def __init__(self, plan: Plan, verify: str = "read"):
        self.plan = plan
        self.tensors = [t for f in plan.files for t in f.tensors]
        self.by_name = {t.name: t for t in self.tensors}
        if len(self.by_name) != len(self.tensors):
            raise PlanError(f"{plan.kind}: a tensor name appears in two target files; a plan "
                            f"read into memory needs unique names")
        self.sources = _Sources()
        try:
            self.shapes = read_source_shapes(plan, lambda path: self.sources.get(path).tensors)
            validate_plan(plan, self.shapes)
            self.sources.verifier = Verifier(keys_to_verify(plan, self.shapes, verify))
        except BaseException:
            self.sources.close()
            raise
        self._verified = False

    def verify(self, workers: int = 4) -> None:
        """Check every selected source tensor against its recorded checksum (ChecksumError
        naming the file and tensor) before anything is filled; hashed in `workers` threads."""
        keys = sorted({(op.src_file, op.src_name) for t in self.tensors for op in t.ops
                       if self.sources.verifier.wants(op.src_file, op.src_name)})

        def check(key) -> None:
            self.sources.view(*key)   # populates the tensor's pages, then hashes them

        _for_each(keys, check, workers)
        self.sources.verifier.report()
        self._verified = True

    def prefetch(self) -> None:
        """Ask the kernel to start reading every byte range the plan needs (a hint: a load
        prepared in the background reads ahead while the network is built)."""
        for t in self.tensors:
            if t.shape and prod(t.shape):
                _prefetch(t.ops, 0, t.shape[0], self.sources)

    def read(self, names) -> Dict[str, np.ndarray]:
        """Fresh arrays for the target tensors `names` (small values: counters)."""
        out = {n: np.empty(self.by_name[n].shape, dtype=ST_TO_NUMPY[self.by_name[n].dtype])
               for n in names}
        self.fill(out, 1)
        return out

    def mapped(self, name: str) -> Optional[np.ndarray]:
        """Target tensor `name` as a writable copy-on-write array over its source file's pages
        (`_Source.private_view`) when it is exactly one whole stored tensor of the same dtype —
        a complete or same-layout load — so a load can hand the array to its parameter instead
        of copying (as MindSpore's `load_checkpoint` maps safetensors files); None otherwise.
        The source's checksum is checked first (`verify()`), so the pages are in the page
        cache and what the parameter will read is what was checked."""
        t = self.by_name[name]
        if len(t.ops) != 1 or not t.shape or prod(t.shape) == 0:
            return None
        op = t.ops[0]
        shape, dtype = self.shapes[(op.src_file, op.src_name)]
        if (dtype != t.dtype or any(op.src_offsets) or tuple(op.sizes) != tuple(shape)
                or tuple(op.sizes) != tuple(t.shape)):
            return None
        if not self._verified:
            self.verify()
        src = self.sources.get(op.src_file)
        arr = src.private_view(op.src_name)
        if arr is None:
            return None
        if (op.src_file, op.src_name) not in self.sources.populated:
            src.read_ahead(op.src_name)   # unchecked: the first step would fault page by page
        return arr.reshape(t.shape)

    def check_destinations(self, destinations: Mapping[str, np.ndarray]) -> None:
        """PlanError unless every destination is a target of the plan with its shape, writable."""
        for n, arr in destinations.items():
            t = self.by_name.get(n)
            if t is None:
                raise PlanError(f"{self.plan.kind}: no target tensor {n!r} to fill")
            if tuple(arr.shape) != tuple(t.shape):
                raise PlanError(f"{self.plan.kind}: {n!r} is {list(t.shape)} in the plan but "
                                f"its destination array is {list(arr.shape)}")
            if not arr.flags.writeable:
                raise PlanError(f"{self.plan.kind}: the destination of {n!r} is read-only")

    def fill(self, destinations: Mapping[str, np.ndarray], workers: int = 4) -> List[str]:
        """Copy each target tensor named in `destinations` into its array (same shape; any
        numeric dtype, cast from the stored one as numpy casts). Verifies first if `verify()`
        was not called. Returns the names filled."""
        self.check_destinations(destinations)
        if not self._verified:
            self.verify(workers)
        staging = _Staging()
        names = list(destinations)

        def run(name: str) -> None:
            t = self.by_name[name]
            _fill_into(t, destinations[name], self.sources, staging)

        _for_each(names, run, workers)
        return names

    def close(self) -> None:
        """Unmap the sources."""
        self.sources.close()


def _for_each(items: Sequence, fn: Callable, workers: int) -> None:
    """`fn(item)` for every item on `workers` threads that take the next item in turn (no
    per-item future: thousands of small tensors cost microseconds each, not a submit). The
    first error stops the others taking more and is raised."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    it, lock, errors = iter(items), threading.Lock(), []

    def worker() -> None:
        while not errors:
            with lock:
                item = next(it, _DONE)
            if item is _DONE:
                return
            try:
                fn(item)
            except BaseException as exc:   # noqa: B902 - raised again by the caller's thread
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(workers, len(items)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


_DONE = object()


def _fill_into(t: TargetTensor, dest: np.ndarray, sources: _Sources, staging: _Staging) -> None:
    """Fill `dest` (the whole target tensor `t`) from the plan's ops: straight from the mapped
    sources when the dtypes match, else through the staging buffer in row chunks, cast."""
    stored = ST_TO_NUMPY[t.dtype]
    if not t.shape:
        op = t.ops[0]
        src = sources.view(op.src_file, op.src_name)
        np.copyto(dest, src.reshape(()), casting="unsafe")
        del src
        return
    if prod(t.shape) == 0:
        return
    row = _row_bytes(t)
    rows = max(1, CHUNK_BYTES // max(1, row))
    _prefetch(t.ops, 0, rows, sources)
    for r in range(0, t.shape[0], rows):
        e = min(t.shape[0], r + rows)
        if e < t.shape[0]:   # reading the next chunk overlaps this chunk's copy
            _prefetch(t.ops, e, e + rows, sources)
        if dest.dtype == stored:   # straight into the destination
            _fill(dest[r:e], r, t.ops, sources)
            continue
        block = staging.get((e - r) * row).view(stored).reshape((e - r,) + tuple(t.shape[1:]))
        _fill(block, r, [op for op in t.ops
                         if op.dst_offsets[0] < e and op.dst_offsets[0] + op.sizes[0] > r],
              sources)
        np.copyto(dest[r:e], block, casting="unsafe")
