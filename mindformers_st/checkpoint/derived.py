"""Derived folders: what the load hook builds from a source once and reuses — Hugging Face
weights converted to `{output_dir}/ms_safetensors`, distributed weights merged into
`{output_dir}/unified_checkpoint`, `.ckpt` files copied to `{output_dir}/ckpt_safetensors`.

One protocol for all three (`build_derived_folder`), run together by every rank:
1. reuse the folder when the fingerprint it records equals the source's (file names, sizes,
   mtimes, options);
2. otherwise rank 0 makes an empty staging folder `<out>.building`; the `transform_process_num`
   builder ranks (MindSpore Transformers' choice: ranks 0, W/N, 2W/N, ... of W) each build
   their share of the content in it while the others wait; the ranks agree that every share
   succeeded (`agree_or_raise`: when one fails, all raise and the staging folder is removed);
3. rank 0 finishes (side files), writes the fingerprint and renames the staging folder into
   place, so the folder appears complete or not at all.

The load hook no longer waits for the Hugging Face conversion or the online merge (issue 10):
it reads each rank's blocks straight from the sources and `start_background_build` writes the
folder on a thread of each builder rank while training runs. The ranks only agree, before the
threads start, that a build is needed (step 1) and that rank 0 made the staging folder; each
builder then marks its share done in the staging folder and the builder whose mark completes
the set (an exclusive create decides between two at once) finishes, writes the fingerprint and
renames, as in step 3. A failure is a warning naming the folder (the parameters are loaded; the
next start builds it again) and removes the staging folder. `derived_write: first` keeps the
collective build before the load.
"""
from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook is registered before ours)
import json
import logging
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import ChecksumError, CheckpointError, ConfigError, MindformersSTError, write_failed
from ..parallel.agree import all_reduce_sum, first_failure
from ..storage.atomic import atomic_write_text
from ..transform.execute import (commit_folder, execute_files, read_source_shapes,
                                 write_side_files)
from ..transform.planner import split_plan
from ..transform.verify import keys_to_verify

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "source_fingerprint.json"
LOAD_WORKERS = 2


def fingerprint(paths: Sequence[str], root: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """What identifies a source for a derived folder: its absolute root, every file's relative
    name, size and mtime, and the options of the derivation. Equal fingerprints mean the
    derived folder can be reused."""
    files: List[list] = []
    for p in sorted(set(paths)):
        st = os.stat(p)
        files.append([os.path.relpath(p, root), st.st_size, st.st_mtime_ns])
    return {"version": 1, "source": os.path.abspath(root), "files": files,
            "options": dict(options)}


def read_fingerprint(folder: str) -> Optional[Dict[str, Any]]:
    """The fingerprint a derived folder was built from, or None (absent or unreadable)."""
    try:
        with open(os.path.join(folder, FINGERPRINT_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def agree_or_raise(ctx, failure: Optional[BaseException], what: str) -> None:
    """Every rank raises when any rank failed (one all-reduce, also a barrier), all with the
    same one-line message — the lowest failing rank's, which names the file and tensor (under
    balanced_load only the rank that read a block can): the failing ranks their own errors,
    the others a CheckpointError with that text — a ChecksumError when some rank found corrupt
    bytes, so a resume on every rank falls back together. Each rank reads other files, and one
    that trained on would wait forever for the failed one in its first collective."""
    flags = np.array([failure is not None, isinstance(failure, ChecksumError)], dtype=np.int64)
    failed, corrupt = (int(x) for x in all_reduce_sum(ctx, flags))
    if not failed:
        return
    root, text = first_failure(ctx, failure)
    if failure is not None:
        raise failure
    kind = ChecksumError if corrupt else CheckpointError
    logger.error("%s: rank %d could not read its part (%d rank(s) failed); nothing was loaded",
                 what, root, failed)
    raise kind(text)


def rank_world(ctx):
    """(rank, world size) of `ctx`, (0, 1) without one."""
    return (0, 1) if ctx is None else (ctx.rank, ctx.world_size)


def transform_ranks(process_num: int, world: int) -> List[int]:
    """The ranks that build a derived folder for `transform_process_num` = `process_num` in a
    job of `world` ranks, as MindSpore Transformers chooses them (TransformCkpt): ranks 0,
    W/N, 2W/N, ...; more than `world` is lowered to `world` with a warning naming the key; a
    value that does not divide `world` (or is below 1) is a ConfigError."""
    if not isinstance(process_num, int) or isinstance(process_num, bool) or process_num < 1:
        raise ConfigError(f"config key 'transform_process_num' must be a whole number >= 1, "
                          f"got {process_num!r}")
    if process_num > world:
        logger.warning("config key 'transform_process_num' is %d but the job has %d rank(s): "
                       "%d used (as MindSpore Transformers)", process_num, world, world)
        process_num = world
    if world % process_num:
        raise ConfigError(f"config key 'transform_process_num' is {process_num}, which does not "
                          f"divide the job's {world} ranks (MindSpore Transformers' rule); use a "
                          f"divisor of {world}, e.g. 1 or {world}")
    return list(range(0, world, world // process_num))


def _barrier(ctx) -> None:
    if ctx is not None:
        ctx.barrier()


def is_current(out_dir: str, fp: Dict[str, Any], ctx) -> bool:
    """Whether `out_dir` was built from the source fingerprint `fp` (so it is reused). Every
    rank must call this: it returns once every rank has decided, before any may change it."""
    wait_for_build(out_dir)   # a build of it this process started earlier decides first
    reuse = read_fingerprint(out_dir) == fp
    _barrier(ctx)
    return reuse


def build_derived_folder(out_dir: str, fp: Dict[str, Any], ctx, what: str,
                         build_share: Callable[[str, int, int], None],
                         finish: Optional[Callable[[str], None]] = None,
                         process_num: int = 1) -> bool:
    """Make `out_dir` hold what `build_share(staging, i, n)` writes on the n builder ranks
    (`transform_ranks(process_num, world)`; i is this rank's index among them), then
    `finish(staging)` on rank 0, for the source fingerprint `fp` — or reuse it when it records
    `fp` already (see the module doc). Every rank must call this. Returns True when rebuilt."""
    rank, world = rank_world(ctx)
    builders = transform_ranks(process_num, world)
    if is_current(out_dir, fp, ctx):
        logger.info("%s: reusing %s (source unchanged)", what, out_dir)
        return False
    staging = out_dir.rstrip("/") + ".building"
    failure = None
    if rank == 0:
        logger.info("%s: building %s on %d of %d rank(s) (transform_process_num; ranks %s)",
                    what, out_dir, len(builders), world, builders)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.makedirs(staging)
        except OSError as exc:
            failure = write_failed(what, staging, exc)
    _barrier(ctx)
    if failure is None and rank in builders:
        try:
            build_share(staging, builders.index(rank), len(builders))
        except MindformersSTError as exc:
            failure = exc
        except OSError as exc:   # full, read-only...: one line naming the folder, not a traceback
            failure = write_failed(f"{what} into {os.path.basename(out_dir)}", staging, exc)
    try:   # also the barrier: every share is written past here
        agree_or_raise(ctx, failure, f"{what}: building {out_dir}")
        if rank == 0:
            if finish is not None:
                finish(staging)
            atomic_write_text(os.path.join(staging, FINGERPRINT_FILE), json.dumps(fp, indent=1))
            commit_folder(staging, out_dir, overwrite=True)
    except BaseException as exc:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(f"{what} into {os.path.basename(out_dir)}", out_dir, exc) from exc
        raise
    _barrier(ctx)
    return True


def build_shared_folder(out_dir: str, fp: Dict[str, Any], plan, ctx, what: str,
                        verify: str = "read", process_num: int = 1) -> bool:
    """`build_derived_folder` for a transform plan: its files split over the builder ranks
    (`split_plan`; `process_num` is transform_process_num), source checksums checked per
    `verify` as decided on the whole plan, rank 0 adding the side files once every file is
    there."""
    def build_share(staging: str, index: int, count: int) -> None:
        _write_share(plan, staging, index, count, verify)

    def finish(staging: str) -> None:
        _finish_plan_folder(plan, staging, out_dir, what)

    return build_derived_folder(out_dir, fp, ctx, what, build_share, finish, process_num)


def _write_share(plan, staging: str, index: int, count: int, verify: str) -> None:
    """Builder `index` of `count`'s files of `plan` into `staging`, source checksums checked
    per `verify` as decided on the whole plan (a tensor split across shares is still checked)."""
    keys = keys_to_verify(plan, read_source_shapes(plan), verify)
    execute_files(split_plan(plan, count)[index], staging, workers=LOAD_WORKERS,
                  progress=False, verify_keys=keys)


def _finish_plan_folder(plan, staging: str, out_dir: str, what: str) -> None:
    """Refuse a staging folder missing any of `plan`'s files, then add its side files."""
    absent = [f.path for f in plan.files if not os.path.isfile(os.path.join(staging, f.path))]
    if absent:   # a rank that did not take part must never yield a half folder
        raise CheckpointError(f"{what}: {len(absent)} file(s) of {out_dir} were not written "
                              f"(e.g. {absent[0]}); every rank must run the load hook")
    write_side_files(plan, staging)


# --------------------------------------------------------------------------- in the background
_SHARE_DONE = ".share-{index}-of-{count}.done"
_COMMITTING = ".committing"
_pending: List["BackgroundBuild"] = []
_pending_lock = threading.Lock()


BACKGROUND_NICE = 10   # how much lower a background build's threads run than the training


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (and so that of the worker threads it starts, which
    inherit it) by BACKGROUND_NICE: the training's threads come first when the cores are busy
    (Linux gives each thread its own nice value; elsewhere nothing changes)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass


class BackgroundBuild:
    """One builder rank's share of a derived folder, written on a (non-daemon) thread.

    `wait()` returns once this rank's share is written (and the folder committed, when this
    rank's share completed the set); `error` is then None or the one-line reason it failed."""

    def __init__(self, out_dir: str, staging: str, fp: Dict[str, Any], plan, what: str,
                 verify: str, index: int, count: int, after: Optional[threading.Event] = None):
        self.out_dir, self.staging, self.fp, self.plan = out_dir, staging, fp, plan
        self.what, self.verify, self.index, self.count = what, verify, index, count
        self.after = after
        self.error: Optional[str] = None
        self.committed = False
        self._state = threading.Lock()   # "held" -> "writing" or "cancelled", once
        self._writing = False
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"build {os.path.basename(out_dir)}")

    def start(self) -> "BackgroundBuild":
        with _pending_lock:
            _pending.append(self)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for this rank's share; True when it succeeded (the folder may still wait for
        other builder ranks' shares)."""
        self._thread.join(timeout)
        return self.error is None and not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> bool:
        """If this build is still held by `after` (nothing written), it never writes: once
        released, its thread ends at once (removing the staging folder when it is the only
        builder). True when cancelled in time, False when it had begun writing."""
        with self._state:
            if self._writing:
                return False
            self._cancelled = True
            return True

    def _run(self) -> None:
        if self.after is not None:
            # The load reads the same sources first: writing meanwhile would share the disk
            # with it (the write-back of a whole model) and slow the first step; afterwards
            # the sources are in the page cache and only the writes go to the disk.
            self.after.wait()
        with self._state:
            if self._cancelled:
                self.error = "cancelled before writing (the load was interrupted)"
                if self.count == 1:
                    shutil.rmtree(self.staging, ignore_errors=True)
                return
            self._writing = True
        t0 = time.perf_counter()
        _yield_cpu()
        try:
            _write_share(self.plan, self.staging, self.index, self.count, self.verify)
            with open(os.path.join(self.staging, _SHARE_DONE.format(index=self.index,
                                                                    count=self.count)), "w"):
                pass
            if self._complete() and self._claim():
                self._commit()
                self.committed = True
                logger.info("%s: wrote %s in the background (%.1f s)", self.what, self.out_dir,
                            time.perf_counter() - t0)
                print(f"[background write] {self.what}: wrote {self.out_dir} in the background "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:   # noqa: BLE001 - a thread's error becomes this one warning
            if isinstance(exc, OSError):
                exc = write_failed(f"{self.what} into {os.path.basename(self.out_dir)}",
                                   self.staging, exc)
            elif not isinstance(exc, MindformersSTError):   # a bug: keep its trace in the log
                logger.debug("background build of %s", self.out_dir, exc_info=True)
                exc = CheckpointError(f"{type(exc).__name__}: {exc}")
            self.error = str(exc)
            shutil.rmtree(self.staging, ignore_errors=True)   # nothing half-built stays
            logger.warning("%s: writing %s in the background failed, the folder is not there "
                           "(the parameters are loaded; the next start builds it again): %s",
                           self.what, self.out_dir, self.error)

    def _complete(self) -> bool:
        names = set(os.listdir(self.staging))
        return all(_SHARE_DONE.format(index=i, count=self.count) in names
                   for i in range(self.count))

    def _claim(self) -> bool:
        try:   # two builders finishing at once both see the set complete: one commits
            os.close(os.open(os.path.join(self.staging, _COMMITTING),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def _commit(self) -> None:
        staging = self.staging
        _finish_plan_folder(self.plan, staging, self.out_dir, self.what)
        for i in range(self.count):
            os.remove(os.path.join(staging, _SHARE_DONE.format(index=i, count=self.count)))
        os.remove(os.path.join(staging, _COMMITTING))
        atomic_write_text(os.path.join(staging, FINGERPRINT_FILE), json.dumps(self.fp, indent=1))
        commit_folder(staging, self.out_dir, overwrite=True)


def start_background_build(out_dir: str, fp: Dict[str, Any], plan, ctx, what: str,
                           verify: str = "read", process_num: int = 1,
                           after: Optional[threading.Event] = None
                           ) -> Optional[BackgroundBuild]:
    """Start writing `plan` into `out_dir` (for source fingerprint `fp`) on a thread of each
    builder rank (`transform_ranks(process_num, world)`), the folder committed atomically by the
    last builder to finish. Every rank must call this (once `is_current` said False): the
    staging folder is made by rank 0 before any thread starts. With `after`, the thread writes
    only once that event is set (the caller must set it, also when it fails: until then
    `wait_for_build` waits). Returns this rank's build (None on a rank that does not build, or
    when the staging folder could not be made: a warning)."""
    rank, world = rank_world(ctx)
    builders = transform_ranks(process_num, world)
    staging = out_dir.rstrip("/") + ".building"
    wait_for_build(out_dir)   # never two builds of one folder in a process
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.makedirs(staging)
        except OSError as exc:
            logger.warning("%s: %s; the load goes on without it",
                           what, write_failed(f"{what} into {os.path.basename(out_dir)}",
                                              staging, exc))
    _barrier(ctx)
    if rank not in builders or not os.path.isdir(staging):
        return None
    logger.info("%s: writing %s in the background on %d of %d rank(s) (transform_process_num; "
                "ranks %s)", what, out_dir, len(builders), world, builders)
    return BackgroundBuild(out_dir, staging, fp, plan, what, verify, builders.index(rank),
                           len(builders), after).start()


def cancel_held_builds(out_dir: str) -> None:
    """Cancel (`BackgroundBuild.cancel`) the builds of `out_dir` this process started that
    have not begun writing; their holder must still release them (set `after`)."""
    with _pending_lock:
        held = [b for b in _pending if b.out_dir == out_dir]
    for b in held:
        b.cancel()


def wait_for_build(out_dir: str) -> None:
    """Wait for the background builds of `out_dir` this process started."""
    with _pending_lock:
        running = [b for b in _pending if b.out_dir == out_dir]
    for b in running:
        b.wait()


def wait_background_builds(announce: bool = True) -> List[BackgroundBuild]:
    """Wait for every background build this process started (a job calls this before it
    exits, so the folders it promised are there); returns them. With `announce`, says what it
    waits for when one is still running."""
    with _pending_lock:
        builds = list(_pending)
        _pending.clear()
    for b in builds:
        if b.running and announce:
            print(f"[background write] waiting for {b.what} to finish writing {b.out_dir}",
                  flush=True)
        b.wait()
    return builds


def _wait_at_exit() -> None:
    wait_background_builds()


# A process that ends without wait_background_builds() (a script around load_checkpoint, a run
# that raised) would lose the folder: interpreter shutdown first runs threading's exit hooks —
# concurrent.futures' among them, after which no thread pool takes work — and only then joins
# the builds' (non-daemon) threads, which then fail to write. Threading's hooks run newest
# first, so this one, registered after concurrent.futures' (imported at the top), waits for the
# builds while they can still write. (threading._register_atexit: CPython 3.9+.)
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_wait_at_exit)
