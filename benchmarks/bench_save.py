"""How long a checkpoint save blocks training: CheckpointMonitor against a raw write of the same bytes.

One process, a real Llama (default: hidden 768, vocab 16000, 2 layers: ~440 MB per save with
the AdamW moments), trained with TrainStep. Per round, interleaved so disk noise hits both alike:
- raw:  the same arrays written back to back into one file, then fsync (the floor for a durable save);
- sync: CheckpointMonitor.save (snapshot, streaming safetensors write with xxh3 checksums,
        fsync + rename, meta.json, committed.json) — time the training loop is blocked.
Then an async run (async_save, a save every other step): blocked time = snapshot copy + thread
start + commit + any wait for an unfinished writer.

    .venv/bin/python benchmarks/bench_save.py [--rounds 5] [--hidden 768] [--vocab 16000]

Prints the ratios (goals: sync/raw <= 1.2, async/sync < 0.1) and writes docs/bench/save.json.
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

    # ---- asynchronous saves -----------------------------------------------------------------------
    asy = CheckpointMonitor(checkpoint_format="safetensors", directory=os.path.join(scratch, "async"),
                            keep_checkpoint_max=1, save_checkpoint_steps=2, async_save=True,
                            output_dir=scratch)
    state = new_state()
    asy.on_train_begin(run_context_of(state))
    async_steps = []
    t_loop = time.perf_counter()
    for _ in range(2 * args.rounds):
        async_steps.append(train_step(state))
        asy.on_train_step_end(run_context_of(state))
    asy.on_train_end(run_context_of(state))
    loop_time = time.perf_counter() - t_loop
    async_blocked = [s.total_blocked for s in asy.stats]
    print("async saves: " + ", ".join(f"blocked {s.blocked * 1e3:.0f} ms + commit {s.commit_time * 1e3:.0f} ms"
                                      f" + wait {s.wait_time * 1e3:.0f} ms (write {s.write_time:.2f} s)"
                                      for s in asy.stats), flush=True)

    med = statistics.median
    result = {
        "bytes_per_save": nbytes,
        "rounds": args.rounds,
        "model": {"hidden_size": args.hidden, "vocab_size": args.vocab, "num_layers": 2},
        "raw_write_s": raw_times, "sync_blocked_s": sync_times, "async_blocked_s": async_blocked,
        "async_write_s": [s.write_time for s in asy.stats],
        "async_detail_ms": [{"snapshot_and_start": s.blocked * 1e3, "commit": s.commit_time * 1e3,
                             "wait": s.wait_time * 1e3} for s in asy.stats],
        "train_step_s_without_saving": plain_steps, "train_step_s_during_async": async_steps,
        "async_loop_s": loop_time,
        "median_raw_s": med(raw_times), "median_sync_s": med(sync_times), "median_async_s": med(async_blocked),
        "raw_MBps": nbytes / med(raw_times) / 1e6,
        "sync_over_raw": med(sync_times) / med(raw_times),
        "async_over_sync": med(async_blocked) / med(sync_times),
        # after the first save (buffer allocation) and without the train-end wait for the last writer
        "async_steady_over_sync": med([s.blocked + s.commit_time for s in asy.stats[1:]]) / med(sync_times),
        "goals": {"sync_over_raw": 1.2, "async_over_sync": 0.1},
        "memory": memory.stop(),
        # No page cache eviction: a save only writes; `sync` before each timed write (above).
        "provenance": prov.finish(cache="not evicted (writes only; sync before each timed write)"),
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
