"""What a benchmark run measured about itself: machine, load, code version, cache eviction, memory.

Every benchmark in benchmarks/ records these facts through this one module, read at run time
rather than written down as assumptions:

- `Run(bench_dir)` opens a run: date, load average, machine facts (CPU count and model, memory,
  kernel, the filesystem holding `bench_dir`), the git commit of the scripts and whether the tree
  was dirty; `Run.finish()` adds the end date and load average and returns the JSON header.
- `evict(paths, drop_caches=...)` evicts files from the page cache and says what it attempted and
  what it achieved: the bytes of those files still resident afterwards, counted with mincore(2).
- `TreePss(pid)` samples the proportional set size (PSS, /proc/PID/smaps_rollup) summed over a
  process and all its descendants: shared pages (a forked worker's copy-on-write pages, shared
  libraries) are split between the processes that map them instead of counted once per process,
  so a tool that forks workers is not billed twice for the same pages.

Linux only (the benchmarks are).
"""
from __future__ import annotations

import ctypes
import datetime
import mmap
import json
import os
import platform
import subprocess
import threading
import time
from typing import Dict, Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fields every benchmark JSON carries in its "provenance" header (tests/test_bench_docs.py).
FIELDS = ("date_start", "date_end", "loadavg_start", "loadavg_end", "machine", "script")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> dict:
    """/proc/loadavg now: the 1/5/15-minute averages and runnable/total scheduling entities."""
    with open("/proc/loadavg") as fh:
        one, five, fifteen, ents, _ = fh.read().split()
    running, total = ents.split("/")
    return {"1min": float(one), "5min": float(five), "15min": float(fifteen),
            "runnable": int(running), "threads": int(total)}


def _meminfo() -> Dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def filesystem(path: str) -> dict:
    """The mount holding `path` (from /proc/self/mountinfo: longest mount point that prefixes it)."""
    real = os.path.realpath(path)
    best = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, right = line.split(" - ", 1)
            point = left.split()[4].replace("\\040", " ")
            if real == point or real.startswith(point.rstrip("/") + "/") or point == "/":
                if best is None or len(point) >= len(best[0]):
                    fstype, source = right.split()[:2]
                    best = (point, fstype, source)
    st = os.statvfs(real)
    return {"path": real, "mount_point": best[0], "fstype": best[1], "device": best[2],
            "free_gib": round(st.f_bavail * st.f_frsize / 2 ** 30, 1)}


def _disk_of(path: str) -> Optional[str]:
    """The /proc/diskstats name of the whole disk holding `path` (None when not found)."""
    dev = os.stat(path).st_dev
    sys_path = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not os.path.exists(sys_path):
        return None
    if os.path.exists(os.path.join(sys_path, "partition")):
        sys_path = os.path.dirname(sys_path)   # a partition's parent is its disk
    return os.path.basename(sys_path)


def _disk_counters(name: str) -> Optional[tuple]:
    """(I/Os in flight, reads, writes, discards, flushes completed) of disk `name`."""
    with open("/proc/diskstats") as fh:
        for line in fh:
            f = line.split()
            if len(f) > 3 and f[2] == name:
                nums = [int(x) for x in f[3:]]
                extra = nums[11:12] + nums[15:16]   # discards, flushes (newer kernels)
                return (nums[8], nums[0], nums[4], *extra)
    return None


def settle_disk(path: str, quiet: float = 1.0, limit: float = 60.0) -> float:
    """Wait until the disk holding `path` has had nothing in flight and completed no read,
    write, discard or flush for `quiet` seconds (at most `limit`); returns the seconds waited.
    Removing a large output leaves work the kernel finishes later (on ext4 mounted with
    `discard`, the freed blocks are trimmed after the transaction commits): a run timed while
    it drains pays for its predecessor."""
    name = _disk_of(path)
    if name is None or _disk_counters(name) is None:
        return 0.0
    start = time.monotonic()
    last, since = _disk_counters(name), time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(0.1)
        now = _disk_counters(name)
        if now != last or now[0] != 0:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - start


def machine(bench_dir: str) -> dict:
    """Machine facts read now: CPUs, CPU model, memory, kernel, Python, the bench dir's filesystem."""
    mem = _meminfo()
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(), "mem_total_gib": round(mem["MemTotal"] / 2 ** 30, 1),
            "mem_available_gib_at_start": round(mem.get("MemAvailable", 0) / 2 ** 30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "bench_dir": filesystem(bench_dir)}


# What a measurement depends on: a change elsewhere (docs/) does not make a run "dirty".
CODE_PATHS = ("benchmarks", "mindformers_st", "run_mindformer.py", "configs", "scripts")


def script_version() -> dict:
    """The git commit of this checkout and whether tracked code (CODE_PATHS) differs from it."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=30).stdout
    try:
        commit = git("rev-parse", "HEAD").strip() or None
        changed = git("status", "--porcelain", "--untracked-files=no", "--",
                      *CODE_PATHS).splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changed),
            "dirty_files": sorted(line[3:] for line in changed)[:20]}


class Run:
    """One benchmark run's provenance: opened at the start, closed by `finish()`."""

    def __init__(self, bench_dir: str, command: Optional[List[str]] = None):
        os.makedirs(bench_dir, exist_ok=True)
        # Paths inside the checkout are recorded relative to it: the same in every clone.
        command = [os.path.relpath(a, ROOT) if str(a).startswith(ROOT + os.sep) else a
                   for a in command] if command else command
        self.header = {"date_start": _now(), "loadavg_start": loadavg(),
                       "machine": machine(bench_dir), "script": script_version(),
                       "command": command}
        self._loads: List[float] = [self.header["loadavg_start"]["1min"]]

    def note_load(self) -> float:
        """Sample the 1-minute load average during the run (its min/max go in the header)."""
        now = loadavg()["1min"]
        self._loads.append(now)
        return now

    def finish(self, **extra) -> dict:
        """The header, with the end date and load average and any `extra` fields (e.g. the cache)."""
        end = loadavg()
        self._loads.append(end["1min"])
        self.header.update(date_end=_now(), loadavg_end=end,
                           load1_min_max=[min(self._loads), max(self._loads)], **extra)
        return self.header


# --------------------------------------------------------------------------- the page cache
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: str) -> int:
    """Bytes of `path` in the page cache now (mincore over a read-only shared mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        return min(size, sum(1 for v in vec if v & 1) * mmap.PAGESIZE)
    finally:
        _libc.munmap(addr, size)


def evict(paths: Iterable[str], drop_caches: bool = False) -> dict:
    """Evict `paths` from the page cache and report what was attempted and achieved.

    Always `sync` then posix_fadvise(DONTNEED) on every file; with `drop_caches` first also
    `echo 3 > /proc/sys/vm/drop_caches` (root only, and it empties the cache of every other job
    on the machine too), whose outcome is recorded. `achieved` is True when mincore finds none of
    the files' pages resident afterwards. (A host below a virtual disk may still cache the
    blocks; that is outside what the guest can see or evict.)"""
    paths = list(paths)
    os.sync()
    rec = {"attempted": [], "files": len(paths), "bytes": sum(os.path.getsize(p) for p in paths)}
    if drop_caches:
        rec["attempted"].append("drop_caches")
        try:
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3\n")
            rec["drop_caches"] = "ok"
        except OSError as e:
            rec["drop_caches"] = f"refused: {e.strerror}"
    rec["attempted"].append("fadvise_dontneed")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    rec["resident_after"] = sum(resident_bytes(p) for p in paths)
    rec["achieved"] = rec["resident_after"] == 0
    return rec


def write_result(path: str, doc: dict, run: "Run", evictions: List[dict]) -> None:
    """Close `run`'s provenance into `doc` (with the evictions' summary, or "warm only" when
    nothing was evicted) and write `doc` as the benchmark's JSON at `path`."""
    doc["provenance"] = run.finish(cache=summarize_evictions(evictions) if evictions
                                   else "warm only")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {path}")


def summarize_evictions(records: List[dict]) -> dict:
    """One line for a run's many evictions: methods, how many achieved, worst bytes left."""
    return {"method": sorted({m for r in records for m in r["attempted"]}),
            "drop_caches": sorted({r["drop_caches"] for r in records if "drop_caches" in r}),
            "evictions": len(records), "achieved": sum(1 for r in records if r["achieved"]),
            "max_resident_after": max((r["resident_after"] for r in records), default=0),
            "bytes_per_eviction": max((r["bytes"] for r in records), default=0)}


# --------------------------------------------------------------------------- memory (PSS)
_ROLLUP_KEYS = {"Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_File:": "pss_file",
                "Pss_Shmem:": "pss_shmem", "Rss:": "rss", "Anonymous:": "anon"}


def rollup_kib(pid: int) -> Dict[str, int]:
    """/proc/PID/smaps_rollup's PSS (total, anon, file, shmem), Rss and Anonymous in KiB; {} once gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key = _ROLLUP_KEYS.get(line.split(None, 1)[0])
                if key:
                    out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def descendants(pid: int) -> List[int]:
    """`pid` and every live descendant (from /proc/*/stat parent links, read now)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_kib(pid: int) -> Dict[str, int]:
    """smaps_rollup fields summed over `pid` and its descendants, plus `processes`."""
    total = {k: 0 for k in _ROLLUP_KEYS.values()}
    n = 0
    for p in descendants(pid):
        r = rollup_kib(p)
        if r:
            n += 1
            for k, v in r.items():
                total[k] += v
    total["processes"] = n
    return total


class TreePss:
    """Samples a process tree's summed smaps_rollup every `interval` s on a thread; keeps peaks.

    Use as a context manager around the work; `result()` gives peak PSS (total, anon, file) in MiB,
    the peak of summed Rss-anonymous (the former measure, which counts a forked worker's shared
    pages once per process) and the most processes seen at once."""

    def __init__(self, pid: Optional[int] = None, interval: float = 0.05):
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.peak = {k: 0 for k in _ROLLUP_KEYS.values()}
        self.peak["processes"] = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                break

    def sample(self):
        now = tree_kib(self.pid)
        if now["processes"]:
            self.samples += 1
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)

    def start(self) -> "TreePss":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.result()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def result(self) -> dict:
        mib = lambda k: round(self.peak[k] / 1024, 1)  # noqa: E731
        return {"peak_pss_mib": mib("pss"), "peak_pss_anon_mib": mib("pss_anon"),
                "peak_pss_file_mib": mib("pss_file"), "peak_rss_anon_sum_mib": mib("anon"),
                "max_processes": self.peak["processes"], "pss_samples": self.samples,
                "pss_interval_s": self.interval}

