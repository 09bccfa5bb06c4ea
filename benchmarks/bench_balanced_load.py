"""Benchmark: `balanced_load` against each rank reading on its own, under msrun.

Writes complete fp32 weights (with checksums) of a Llama of about --size bytes, then launches
one msrun job per layout (2 workers dp2; with --four also 4 workers dp2 x mp2). Every worker
builds the model once, then for --reps rounds loads the weights (complete weights cut online,
`auto_trans_ckpt`) with `balanced_load` False and True in turn. Before every load rank 0 evicts
the weight files from the page cache (posix_fadvise DONTNEED, between two barriers), so each
load starts cold. Measured per rank and load:
- `engine_bytes`: the bytes the rank asked storage for (its read plan: what a job whose ranks sit
  on different nodes reads from a shared file system);
- `io_read_bytes`: /proc/self/io read_bytes, the bytes this process made the disk serve. On ONE
  machine the ranks share one page cache, so alone a page read by one rank is often a cache hit
  for the other: this machine's disk already serves about 1x either way;
- seconds from the load call to the parameters set (the slowest rank is the job's), and the
  exchange's own account (received bytes, collectives, seconds).
The parameters set must be bit-identical in both modes (a digest per rank is compared).
Results: --json (default docs/bench/balanced_load.json), with the provenance header of
benchmarks/provenance.py (load average, commit, machine, the evictions achieved). Usage:

    .venv/bin/python benchmarks/bench_balanced_load.py [--size 128MiB] [--reps 3] [--four]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402  (date, load, machine, commit, cache eviction: what this run measured)


def model_config(size: int) -> dict:
    """A Llama of about `size` bytes in fp32 (hidden 512: small layers, many tensors)."""
    hidden, inter, vocab = 512, 1408, 4096
    layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
    layers = max(2, round((size - 2 * vocab * hidden * 4) / layer))
    layers -= layers % 2
    return {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": 8,
            "n_kv_heads": 8, "intermediate_size": inter, "seq_length": 64}


def prepare(work: str, size: int) -> dict:
    """Complete weights under `work/weights` (reused when the model is unchanged)."""
    from mindformers_st.models.config import LlamaConfig
    from mindformers_st.models.param_table import llama_param_table
    from mindformers_st.storage.index import write_index
    from mindformers_st.storage.writer import save_tensors
    mc = model_config(size)
    stamp = os.path.join(work, "model.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == mc:
        return mc
    shutil.rmtree(work, ignore_errors=True)
    folder = os.path.join(work, "weights")
    os.makedirs(folder)
    params = list(llama_param_table(LlamaConfig.from_dict(dict(mc))))
    rng = np.random.default_rng(0)
    per_shard = 16
    n = (len(params) + per_shard - 1) // per_shard
    weight_map, total = {}, 0
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        values = {p.name: rng.standard_normal(p.shape, dtype=np.float32) * 0.02
                  for p in params[k * per_shard:(k + 1) * per_shard]}
        path = save_tensors(os.path.join(folder, name), values)
        total += os.path.getsize(path)
        weight_map.update((p, name) for p in values)
    write_index(folder, "ms", weight_map, total)
    json.dump(mc, open(stamp, "w"))
    return mc


def evict(folder: str) -> dict:
    """Drop the weight files from the page cache (a cold read); provenance.evict's record of
    what was attempted and what stayed resident."""
    return provenance.evict(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def io_read_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return -1


# --------------------------------------------------------------------------- the msrun worker
def worker(work: str, dp: int, mp: int, reps: int, out: str) -> None:
    from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
    from mindformers_st.checkpoint.network import ModelState
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.models.config import LlamaConfig
    from mindformers_st.models.llama import LlamaForCausalLM
    from mindformers_st.parallel.context import init_parallel
    ctx = init_parallel(ParallelConfig(data_parallel=dp, model_parallel=mp), True, "CPU", seed=0)
    mc = json.load(open(os.path.join(work, "model.json")))
    model = LlamaForCausalLM(LlamaConfig.from_dict(dict(mc)), ctx)
    # loaded as for training (copied once into the parameters): a load to predict would leave
    # the parameters on the files' pages, which no eviction can drop while they are mapped
    state = ModelState(model, None, ctx)
    state.map_pages = False
    weights = os.path.join(work, "weights")
    runs = []
    for rep in range(reps):
        for balanced in (False, True):
            ctx.barrier()
            eviction = evict(weights) if ctx.rank == 0 else None
            ctx.barrier()
            opts = LoadOptions(load_checkpoint=weights, load_ckpt_format="safetensors",
                               use_parallel=True, auto_trans_ckpt=True,
                               output_dir=os.path.join(work, "out"), balanced_load=balanced)
            io0, t0 = io_read_bytes(), time.perf_counter()
            report = load_checkpoint(opts, state, None, ctx)
            seconds = time.perf_counter() - t0
            io1 = io_read_bytes()
            digest = hashlib.sha256()
            for name, value in sorted(model.get_local_params().items()):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            runs.append({"rep": rep, "balanced": balanced, "seconds": round(seconds, 3),
                         "engine_bytes": report.read_bytes, "io_read_bytes": io1 - io0,
                         "exchange": report.exchange, "digest": digest.hexdigest(),
                         "eviction": eviction})
    ctx.barrier()
    with open(os.path.join(out, f"rank_{ctx.rank}.json"), "w") as fh:
        json.dump(runs, fh)


# --------------------------------------------------------------------------- the driver
def launch(work: str, dp: int, mp: int, reps: int, timeout: float) -> dict:
    from tests.conftest import free_port
    out = os.path.join(work, f"runs_dp{dp}_mp{mp}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    world = dp * mp
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
               OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [os.path.join(bindir, "msrun"), "--worker_num", str(world), "--local_worker_num",
           str(world), "--master_port", str(free_port()), "--log_dir", os.path.join(out, "logs"),
           "--join", "True", "--cluster_time_out", str(int(timeout)), os.path.abspath(__file__),
           "msrun-worker", work, str(dp), str(mp), str(reps), out]   # positional: msrun
    # takes any --option abbreviating one of its own (--work would be --worker_num)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"msrun dp{dp} mp{mp} failed ({proc.returncode}); see {out}/logs")
    ranks = [json.load(open(os.path.join(out, f"rank_{r}.json"))) for r in range(world)]
    rows = []
    for i in range(len(ranks[0])):
        per = [ranks[r][i] for r in range(world)]
        rows.append({"rep": per[0]["rep"], "balanced": per[0]["balanced"],
                     "job_seconds": max(p["seconds"] for p in per),
                     "engine_bytes": [p["engine_bytes"] for p in per],
                     "io_read_bytes": [p["io_read_bytes"] for p in per],
                     "exchange_seconds": [p["exchange"]["seconds"] if p["exchange"] else 0.0
                                          for p in per],
                     "collectives": [p["exchange"]["collectives"] if p["exchange"] else 0
                                     for p in per],
                     "digests": [p["digest"] for p in per]})
    summary = {}
    for balanced in (False, True):
        sel = [r for r in rows if r["balanced"] == balanced]
        summary["balanced" if balanced else "alone"] = {
            "job_seconds_median": statistics.median(r["job_seconds"] for r in sel),
            "job_seconds": [r["job_seconds"] for r in sel],
            "engine_bytes_per_job": sum(sel[0]["engine_bytes"]),
            "engine_bytes_per_rank": sel[0]["engine_bytes"],
            "io_read_bytes_per_job": [sum(x["io_read_bytes"]) for x in sel],
            "exchange_seconds_max": [max(r["exchange_seconds"]) for r in sel],
            "collectives": sel[0]["collectives"]}
    same = all(a["digests"] == b["digests"] for a in rows for b in rows)
    evictions = [ranks[0][i]["eviction"] for i in range(len(ranks[0]))]
    return {"dp": dp, "mp": mp, "launch_seconds": round(time.perf_counter() - t0, 1),
            "cache": provenance.summarize_evictions(evictions), "rows": rows, "summary": summary, "identical_parameters": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="128MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--four", action="store_true", help="also 4 workers, dp2 x mp2")
    ap.add_argument("--work", default="/tmp/mindformers_st_bench_balanced")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "balanced_load.json"))
    ap.add_argument("--timeout", type=float, default=1500.0)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["msrun-worker"]:
        work, dp, mp, reps, out = argv[1:6]
        worker(work, int(dp), int(mp), int(reps), out)
        return 0
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work)
    prov = provenance.Run(work, [os.path.relpath(__file__, ROOT)] + list(argv))
    from mindformers_st.commands.reshard import parse_size
    mc = prepare(work, parse_size(args.size))
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(work, "weights")) for f in fs]
    size = sum(os.path.getsize(f) for f in files if f.endswith(".safetensors"))
    print(f"model {mc}: {size / 2 ** 20:.1f} MiB of safetensors", flush=True)
    layouts = [(2, 1)] + ([(2, 2)] if args.four else [])
    results = []
    for dp, mp in layouts:
        res = launch(work, dp, mp, args.reps, args.timeout)
        print(json.dumps({k: res[k] for k in ("dp", "mp", "summary", "identical_parameters")},
                         indent=1), flush=True)
        results.append(res)
        prov.note_load()
    # one record per layout (rank 0 evicts before every load of its job)
    result = {"model": mc, "checkpoint_bytes": size, "reps": args.reps, "results": results,
              "provenance": prov.finish(cache={f"dp{r['dp']}_mp{r['mp']}": r["cache"]
                                               for r in results})}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
