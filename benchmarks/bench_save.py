"""How long a checkpoint save blocks training: CheckpointMonitor against a raw write of the same
bytes, and async_save against a synchronous save of the same state.

One process, a real Llama (default: hidden 768, vocab 16000, 2 layers: ~440 MB per save with
the AdamW moments), trained with TrainStep. Per round, interleaved so disk noise hits both alike:
- raw:  the same arrays written back to back into one file, then fsync (the floor for a durable save);
- sync: CheckpointMonitor.save (snapshot, streaming safetensors write with xxh3 checksums,
        fsync + rename, meta.json, committed.json) — time the training loop is blocked.
Then async against sync, alternating rounds: two monitors (keep_checkpoint_max 1, so every save
also prunes) on the same training; per round each mode trains two steps and saves at the second,
and its blocking time is the main-thread time spent inside its callback over those two step
ends (async: snapshot into the buffers allocated at train begin, hand-off to the writer, the
per-step agreement, any wait for an unfinished writer). Page cache evicted between modes
(posix_fadvise DONTNEED, checked with mincore); load average at start and end; git commit.

    .venv/bin/python benchmarks/bench_save.py [--rounds 5] [--hidden 768] [--vocab 16000]

Prints the ratios (goals: sync/raw <= 1.2, async/sync <= 0.1) and writes docs/bench/save.json.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "checkpoint"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402  (date, load, machine, commit, PSS: what this run measured)


def raw_write(path, arrays):
    """Write every array's bytes into one file and fsync it; returns seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for a in arrays:
            view = memoryview(a.reshape(-1).view("uint8"))
            while len(view):
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def evict_files(monitors):
    """posix_fadvise(DONTNEED) every file of the monitors' checkpoint folders (after `sync`, so
    no page is dirty); returns {"files", "resident_after" (bytes, by mincore), "achieved"}."""
    os.sync()
    paths = [os.path.join(root, name) for mon in monitors
             for root, _, names in os.walk(mon.directory) for name in names]
    resident = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:   # pruned meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            resident += _resident_bytes(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return {"files": len(paths), "resident_after": resident, "achieved": resident == 0}


def _resident_bytes(fd, size):
    """Bytes of the open file `fd` in the page cache (mincore over a read-only mapping)."""
    import ctypes
    import mmap
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return min(size, sum(v & 1 for v in vec) * mmap.PAGESIZE)
    finally:
        libc.munmap(addr, size)


def git_commit():
    """{"commit", "dirty"} of the checkout this script runs from."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no",
                              "--", "mindformers_st", "benchmarks"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "save.json"))
    args = ap.parse_args()

    import numpy as np
    from monitor_worker import build_run, _Cfg
    from mindformers_st.checkpoint.monitor import CheckpointMonitor
    from mindformers_st.checkpoint.network import ModelState
    from mindformers_st.checkpoint.state import snapshot_rank, HYPER_DTYPES
    from mindformers_st.trainer.callbacks import TrainState, run_context_of

    scratch = tempfile.mkdtemp(prefix="bench_save_", dir=args.dir)
    prov = provenance.Run(scratch, [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    memory = provenance.TreePss(interval=0.1).start()    # this process (and any child), whole run
    model, opt, step, ctx = build_run(model_kwargs=dict(hidden_size=args.hidden, vocab_size=args.vocab,
                                                        intermediate_size=2 * args.hidden, num_heads=8,
                                                        n_kv_heads=8, seq_length=32))
    rng = np.random.default_rng(0)

    def new_state():
        return TrainState(config=_Cfg(scratch), model=model, optimizer=opt, ctx=ctx, train_step=step,
                          steps_per_epoch=1000, total_steps=1000, global_batch_size=2)

    def train_step(state):
        ids = rng.integers(1, args.vocab, size=(2, 33))
        t0 = time.perf_counter()
        state.loss = step(ids)
        # PyNative queues the optimizer's updates (ms.runtime.synchronize is not supported on
        # CPU): read one updated tensor so the step's own work is not billed to the save.
        opt.adam_v[-1].asnumpy()
        state.global_step += 1
        state.epoch, state.step_in_epoch = 0, state.global_step
        state.lr = step.last_lr
        return time.perf_counter() - t0

    # ---- synchronous saves against raw writes of the same bytes -------------------------------
    sync = CheckpointMonitor(checkpoint_format="safetensors", directory=os.path.join(scratch, "sync"),
                             keep_checkpoint_max=1, save_checkpoint_steps=10 ** 9, output_dir=scratch)
    state = new_state()
    sync.on_train_begin(run_context_of(state))
    train_step(state)                                   # warm-up (compilation, allocation)
    raw_times, sync_times, plain_steps = [], [], []
    nbytes = 0
    for i in range(args.rounds):
        plain_steps.append(train_step(state))
        snap = snapshot_rank(ModelState(model, opt, ctx), ctx, epoch=1, step=state.global_step,
                             hyper={n: 0 for n in HYPER_DTYPES})
        nbytes = snap.nbytes
        raw_path = os.path.join(scratch, "raw.bin")
        order = ("raw", "sync") if i % 2 == 0 else ("sync", "raw")
        for what in order:
            # Start each timed write with no dirty pages left by the previous one: otherwise the
            # first write of a round pays for the writeback of the one before.
            os.sync()
            if what == "raw":
                raw_times.append(raw_write(raw_path, list(snap.arrays.values())))
                os.remove(raw_path)
            else:
                sync.save(run_context_of(state))
                sync_times.append(sync.stats[-1].total_blocked)
        del snap
        print(f"round {i}: raw {raw_times[-1]:.3f} s, sync save blocked {sync_times[-1]:.3f} s", flush=True)
    sync.on_train_end(run_context_of(state))

    # ---- async against sync: training-loop time inside the callback, alternating rounds ---------
    # Two monitors of the same training (same state, same bytes per save), keep_checkpoint_max 1
    # so every save also prunes the previous one. Per round each mode runs three training steps
    # and saves at the second, in alternating order; its blocking time is the main-thread time
    # inside its callback over those three step ends (async: views and hand-off, the per-step
    # agreement, any wait for its writer; sync: snapshot, write, fsync, commit, pruning) plus,
    # async, the time the third step's optimizer update waited for the snapshot copy (taken on
    # the writer during that step's forward/backward: SaveStats.copy_wait).
    # Between modes (untimed): the async writer is drained so its disk traffic never overlaps
    # a timed sync save, `sync`, and the files just written are evicted from the page cache.
    mons = {mode: CheckpointMonitor(checkpoint_format="safetensors", keep_checkpoint_max=1,
                                    directory=os.path.join(scratch, f"cb_{mode}"),
                                    save_checkpoint_steps=10 ** 9, async_save=mode == "async",
                                    output_dir=scratch)
            for mode in ("sync", "async")}
    state = new_state()
    state.global_step = 0
    load_start, code = os.getloadavg(), git_commit()
    begin_s = {}
    for mode, mon in mons.items():
        t0 = time.perf_counter()
        mon.on_train_begin(run_context_of(state))   # async: the snapshot buffers are allocated here
        begin_s[mode] = time.perf_counter() - t0
    blocked = {"sync": [], "async": []}
    steps_s = {"sync": [], "async": []}
    evictions = []

    def timed(mon, save):
        t0 = time.perf_counter()
        mon.on_train_step_end(run_context_of(state))
        if save:   # the loop's save step (save_checkpoint_steps is set out of reach above)
            mon.save(run_context_of(state))
        return time.perf_counter() - t0

    for i in range(args.rounds + 1):                 # round 0 warms both up, not counted
        for mode in (("sync", "async") if i % 2 == 0 else ("async", "sync")):
            mon = mons[mode]
            os.sync()
            cost = 0.0
            for k in range(3):
                steps_s[mode].append(train_step(state))
                cost += timed(mon, save=k == 1)
            if mon._writer is not None:
                mon._writer.drain()                  # untimed: its write runs during training
            evictions.append(evict_files(mons.values()))
            if i:
                blocked[mode].append(cost)
        if i:
            print(f"round {i}: sync blocked {blocked['sync'][-1] * 1e3:.0f} ms, async blocked "
                  f"{blocked['async'][-1] * 1e3:.0f} ms", flush=True)
    t0 = time.perf_counter()
    for mon in mons.values():
        mon.on_train_end(run_context_of(state))
    end_s = time.perf_counter() - t0
    asy = mons["async"]
    assert len(asy.stats) == args.rounds + 1, "one async save per round"
    for i, s in enumerate(asy.stats[1:]):   # the update's wait for the copy is blocking time too
        blocked["async"][i] += s.copy_wait
    async_blocked = blocked["async"]
    print("async saves: " + ", ".join(f"hand-off {s.blocked * 1e3:.0f} ms + commit {s.commit_time * 1e3:.1f} ms"
                                      f" + wait {s.wait_time * 1e3:.0f} ms + copy wait "
                                      f"{s.copy_wait * 1e3:.0f} ms (write {s.write_time:.2f} s)"
                                      for s in asy.stats), flush=True)
    ratios = [a / s for a, s in zip(blocked["async"], blocked["sync"])]
    stats = {mode: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
             for mode, v in blocked.items()}
    async_vs_sync = {
        "what": "training-loop (main-thread) time inside the monitor's callback over the two step "
                "ends of a save cycle (3 steps, save at the 2nd, keep_checkpoint_max 1) plus, async, "
                "the next update's wait for the snapshot copy; same state; rounds alternate the "
                "order; round 0 (warm-up) not counted",
        "sync_blocked_s": blocked["sync"], "async_blocked_s": blocked["async"],
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_of_medians": stats["async"]["median_s"] / stats["sync"]["median_s"],
        "sync": stats["sync"], "async": stats["async"],
        "async_stats_ms": [{"global_step": s.global_step, "snapshot_and_handoff": s.blocked * 1e3,
                            "commit_agreement": s.commit_time * 1e3, "wait": s.wait_time * 1e3,
                            "update_waited_for_copy": s.copy_wait * 1e3,
                            "write_on_writer_thread": s.write_time * 1e3} for s in asy.stats],
        "on_train_begin_s": begin_s, "on_train_end_s_both": end_s,
        "train_step_s": steps_s,
        "page_cache": {"method": "posix_fadvise(DONTNEED) on every file of both checkpoint folders "
                                 "after each mode's save (sync first); resident bytes counted with mincore",
                       "evictions": len(evictions),
                       "achieved": sum(1 for e in evictions if e["achieved"]),
                       "max_resident_after": max(e["resident_after"] for e in evictions)},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "git": code,   # read when this part started
        "goal_ratio": 0.1,
    }
    print(f"async / sync blocked: median of per-round ratios {async_vs_sync['ratio_median']:.3f} "
          f"(min {async_vs_sync['ratio_min']:.3f}, max {async_vs_sync['ratio_max']:.3f}); "
          f"sync {stats['sync']['median_s'] * 1e3:.0f} ms median, async "
          f"{stats['async']['median_s'] * 1e3:.1f} ms median (goal <= 0.1); load "
          f"{load_start[0]:.1f} -> {async_vs_sync['loadavg_end'][0]:.1f}", flush=True)

    med = statistics.median
    result = {
        "bytes_per_save": nbytes,
        "rounds": args.rounds,
        "model": {"hidden_size": args.hidden, "vocab_size": args.vocab, "num_layers": 2},
        "raw_write_s": raw_times, "sync_blocked_s": sync_times,
        "train_step_s_without_saving": plain_steps,
        "median_raw_s": med(raw_times), "median_sync_s": med(sync_times),
        "median_async_s": med(async_blocked),
        "raw_MBps": nbytes / med(raw_times) / 1e6,
        "sync_over_raw": med(sync_times) / med(raw_times),
        "async_vs_sync": async_vs_sync,
        "async_over_sync": async_vs_sync["ratio_median"],
        # without the first counted save of the async monitor (as the earlier runs reported)
        "async_steady_over_sync": med(async_blocked[1:] or async_blocked) / med(blocked["sync"]),
        "goals": {"sync_over_raw": 1.2, "async_over_sync": 0.1},
        "memory": memory.stop(),
        # Part 1 only writes (`sync` before each timed write); part 2 evicts between modes.
        "provenance": prov.finish(cache={
            "raw_vs_sync": "not evicted (writes only; sync before each timed write)",
            "async_vs_sync": async_vs_sync["page_cache"]}),
    }
    print(f"\n{nbytes / 1e6:.0f} MB per save; medians: raw write {result['median_raw_s']:.3f} s "
          f"({result['raw_MBps']:.0f} MB/s), sync save blocked {result['median_sync_s']:.3f} s, "
          f"async save blocked {result['median_async_s']:.3f} s")
    print(f"sync / raw   = {result['sync_over_raw']:.2f}  (goal <= 1.2)")
    print(f"async / sync = {result['async_over_sync']:.3f} (goal < 0.1); steady state (no first "
          f"save, no train-end wait) {result['async_steady_over_sync']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
