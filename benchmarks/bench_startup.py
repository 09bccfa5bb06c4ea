"""Benchmark: time from process start to parameters set, per load source, against MindSpore.

Generates a synthetic Llama-like fp32 model (default 1.35 GB, hidden 2048: a few dozen large
tensors) in four forms, then for each form starts fresh child processes that import MindSpore,
build a network holding this rank's parameters (a plain `nn.Cell`, zero-initialised, the same
for every side) and load the weights — ours through the load hook (`checkpoint.loader`) twice
over: "ours" as a load to predict (a tensor stored whole becomes the parameter's data as the
file's copy-on-write pages), "ours_copy" as a load for training (copied once into the
parameters' own memory) — and MindSpore's through its nearest equivalent:

  source      ours                                         MindSpore
  hf          HF folder read through the conversion plan    load_checkpoint(format=safetensors)
              (shards as transformers writes them: no
              checksum record, so read unchecked)
              (ms_safetensors written in the background)    per shard + rename + load_param_into_net
  complete    complete MS weights, loaded whole             load_checkpoint per shard + load_param_into_net
  rank_same   mp2 rank files, rank 0 of mp2 (same layout)   load_checkpoint(rank_0 file) + load_param_into_net
  rank_new    dp2 (remove_redundancy) rank files, rank 0    unified_safetensors(dp2 -> complete) +
              of mp2 (direct_reshard: nothing written)      load_distributed_checkpoint(mp2 strategy)

Each measurement is a new process; the time is from just before it is started until it has set
every parameter (its own wall-clock stamp), split into import / network / load. A load that
maps the file (MindSpore's, and ours where a tensor is stored whole in its dtype) has read
nothing yet when the parameters are set: the pages come in when the first step touches them.
So the child then times two more phases on both sides, as a first training step meets them:
"first read" (every parameter read once, as the forward pass does) and "first write" (every
parameter written once in place, as the optimizer update does: a copy-on-write mapping copies
each page then). "ready" = load + first read + first write is the comparable time to a
trained step. Cold rounds also time a sequential read of the bytes the rank needs (the files,
evicted first), the floor of a cold load. Peak memory is PSS of the child's process tree (benchmarks/provenance.TreePss,
sampled every 10 ms; PSS counts the mapped source files' pages too); "load anon" is the
anonymous memory (RssAnon) the load added at its peak over the built network, sampled by the
child every 5 ms from the end of the build. Rounds alternate the two sides (ours first in
even rounds); a warm-up run of each precedes them. "warm": source files in the page cache;
"cold": evicted before every run (provenance.evict: sync + posix_fadvise(DONTNEED), then
mincore checks that nothing stayed resident; drop_caches is not used: the machine is shared).
Output folders (our online conversion, MindSpore's unified merge) are removed before every run,
so each run is a first start. Prints ratio (ours / MindSpore) of medians, median/min/max, the
load average at start and end, and writes docs/bench/startup.json with the provenance header
(benchmarks/provenance.py: commit, machine, load average, the evictions achieved).

    .venv/bin/python benchmarks/bench_startup.py [--size 1.35GB] [--rounds 3] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from bench_reshard import global_value, model_config, write_rank_files  # noqa: E402
from mindformers_st.commands.reshard import parse_size  # noqa: E402
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts  # noqa: E402
from mindformers_st.models.param_table import llama_param_table  # noqa: E402

SOURCES = ["hf", "complete", "rank_same", "rank_new"]
# ours: a load to predict (a tensor stored whole becomes the parameter's data as the file's
# pages); ours_copy: a load for training (copied once into the parameters' own memory)
OURS = ["ours", "ours_copy"]
SIDES = OURS + ["mindspore"]
MP2 = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
DP2 = ParallelConfig(data_parallel=2, vocab_emb_dp=False)
SHARD_BYTES = 700 << 20


# --------------------------------------------------------------------------- the sources
def _table(work: str):
    info = json.load(open(os.path.join(work, "model.json")))
    return llama_param_table(model_config(info["size"]))


def generate(work: str, size: int) -> dict:
    """Write the four sources (and the strategy files MindSpore needs) once per size."""
    from mindformers_st.convert.rules import ms_to_hf_name
    from mindformers_st.layout.strategy import write_strategy_file
    from mindformers_st.storage.index import write_index
    from mindformers_st.storage.writer import save_tensors
    cfg = model_config(size)
    table = llama_param_table(cfg)
    info = {"size": size, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
            "layers": cfg.num_layers, "intermediate": cfg.intermediate_size,
            "tensors": len(table), "bytes": table.total_bytes,
            # HF shards as transformers writes them: {"format": "pt"} and no checksum record
            # (a load reads them unchecked; what it writes, ms_safetensors, records checksums)
            "hf_shards": "format pt, no checksums"}
    stamp = os.path.join(work, "model.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == info:
        return info
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    # complete and HF: the same tensors in shards of <= SHARD_BYTES, MS and HF names
    shards: List[List[str]] = [[]]
    used = 0
    for p in table:
        if used and used + p.nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(p.name)
        used += p.nbytes
    for kind in ("complete", "hf"):
        folder = os.path.join(work, kind)
        os.makedirs(folder)
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            out = {(n if kind == "complete" else ms_to_hf_name(n, "llama")):
                   global_value(n, table.by_name()[n].shape) for n in names}
            if kind == "complete":
                save_tensors(os.path.join(folder, fname), out)
            else:
                save_tensors(os.path.join(folder, fname), out, {"format": "pt"}, checksums=False)
            weight_map.update({n: fname for n in out})
            del out
        write_index(folder, "ms" if kind == "complete" else "hf", weight_map, table.total_bytes)
    # rank files: mp2 (the target layout) and dp2 with remove_redundancy
    for tag, pc, dedup in (("rank_mp2", MP2, False), ("rank_dp2", DP2, True)):
        write_rank_files(os.path.join(work, tag), table, pc, dedup, "checkpoint_rank_{r}-1_1")
        write_strategy_file(os.path.join(work, f"strategy_{tag}.ckpt"), plan_layouts(table, pc))
    json.dump(info, open(stamp, "w"))
    return info


def _files(folder: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if f.endswith((".safetensors", ".json", ".ckpt")))


# --------------------------------------------------------------------------- the child
def _anon_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _own_memory_only() -> None:
    """MindSpore's unified_safetensors sleeps while the whole machine's memory use is above
    50 %; on a shared machine report this process's own share (as
    tests/layout/test_interop_mindspore.py does)."""
    import psutil
    real = psutil.virtual_memory

    def own_share():
        m = real()
        rss = psutil.Process(os.getpid()).memory_info().rss
        return m._replace(percent=100.0 * rss / m.total)
    psutil.virtual_memory = own_share


def child(side: str, source: str, work: str, out: str) -> dict:
    """Import, build the network, load; returns wall-clock stamps and memory."""
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn
    t_import = time.time()
    table = _table(work)
    parallel = source in ("rank_same", "rank_new")
    layouts = plan_layouts(table, MP2 if parallel else ParallelConfig())
    shapes = {p.name: tuple(layouts[p.name].slice_for(0).sizes) for p in table}

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weights = ParameterTuple(
                [Parameter(Tensor(np.zeros(s, np.float32)), name=n) for n, s in shapes.items()])
    net = Net()
    # each side's own modules are imported before the load is timed (they count in the total)
    from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
    from mindformers_st.checkpoint.network import CellState
    from mindformers_st.convert.rules import hf_to_ms_name
    from mindformers_st.parallel.context import ParallelContext
    anon_net = _anon_kib()
    peak_anon = [anon_net]
    done = threading.Event()

    def sample() -> None:   # the load's own peak, apart from building the network
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _anon_kib())
            done.wait(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_net = time.time()
    if side in OURS:
        pc = MP2 if parallel else ParallelConfig()
        ctx = ParallelContext(rank=0, world_size=pc.world_size, config=pc,
                              use_parallel=parallel)
        path = {"hf": "hf", "complete": "complete", "rank_same": "rank_mp2",
                "rank_new": "rank_dp2"}[source]
        opts = LoadOptions(os.path.join(work, path), "safetensors", use_parallel=parallel,
                           auto_trans_ckpt=source == "rank_new", direct_reshard=True,
                           output_dir=out)
        # nothing has run this network yet: its parameters may take the files' pages, as the
        # runtime's load to predict gives them (ModelState without an optimizer); a training
        # load copies once
        state = CellState(net, None, pc.world_size, layouts, map_pages=side == "ours")
        load_checkpoint(opts, state, None, ctx)
    elif source in ("hf", "complete"):
        params = {}
        for f in sorted(os.listdir(os.path.join(work, source))):
            if f.endswith(".safetensors"):
                params.update(ms.load_checkpoint(os.path.join(work, source, f),
                                                 format="safetensors"))
        if source == "hf":
            params = {hf_to_ms_name(n, "llama"): p for n, p in params.items()}
        not_loaded, _ = ms.load_param_into_net(net, params)
        assert not not_loaded, not_loaded
    elif source == "rank_same":
        params = ms.load_checkpoint(os.path.join(work, "rank_mp2", "rank_0",
                                                 "checkpoint_rank_0-1_1.safetensors"),
                                    format="safetensors")
        not_loaded, _ = ms.load_param_into_net(net, params)
        assert not not_loaded, not_loaded
    else:
        _own_memory_only()
        unified = os.path.join(out, "unified")
        ms.unified_safetensors(os.path.join(work, "rank_dp2"),
                               os.path.join(work, "strategy_rank_dp2.ckpt"), unified,
                               max_process_num=1)
        not_loaded, _ = ms.load_distributed_checkpoint(
            net, predict_strategy=os.path.join(work, "strategy_rank_mp2.ckpt"),
            unified_safetensors_dir=unified, format="safetensors")
    t_set = time.time()
    done.set()
    sampler.join()
    # the first step's touches: every parameter read once (forward), then written once in place
    # (the update); asnumpy() is the parameter's own memory on CPU (checked below)
    params = list(net.get_parameters())
    total = 0.0
    for q in params:
        total += float(q.asnumpy().sum(dtype=np.float64))
    t_read = time.time()
    for q in params:
        arr = q.asnumpy()
        arr *= 1.0
        assert q.asnumpy().ctypes.data == arr.ctypes.data, "asnumpy() is not the parameter"
    t_write = time.time()
    # the parameters hold the checkpoint's values (a small one and a slice of a big one)
    for name in ("model.norm_out.weight", "model.layers.0.attention.wq.weight"):
        p = [q for q in net.get_parameters() if q.name == name][0]
        want = global_value(name, table.by_name()[name].shape)[layouts[name].slice_for(0).index()]
        assert np.array_equal(p.asnumpy(), want), f"{side} {source}: {name} differs"
    return {"t_import": t_import, "t_net": t_net, "t_set": t_set, "t_read": t_read,
            "t_write": t_write, "checksum": total,
            "anon_net_kib": anon_net, "anon_set_kib": _anon_kib(), "anon_peak_kib": peak_anon[0]}


# --------------------------------------------------------------------------- the parent
def evict(work: str) -> dict:
    """Drop the benchmark's source files from the page cache; provenance.evict's record of what
    was attempted and whether nothing stayed resident."""
    return provenance.evict(_files(work))


def read_all(files) -> float:
    """Read `files` one after another in 64 MiB reads; returns the seconds taken."""
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t


def warm(work: str, source: str) -> float:
    """Read every file of `source` (into the page cache); returns the seconds taken."""
    folder = {"hf": "hf", "complete": "complete", "rank_same": "rank_mp2",
              "rank_new": "rank_dp2"}[source]
    return read_all(_files(os.path.join(work, folder)))


def sequential_read(work: str, source: str) -> float:
    """Seconds to read, cold, the bytes rank 0 of the target needs, one file after another:
    the whole model for one card (hf, complete), the rank's own file for the same layout."""
    files = (_files(os.path.join(work, "rank_mp2", "rank_0")) if source == "rank_same"
             else _files(os.path.join(work, source)))
    provenance.evict(files)
    return read_all(files)


def run(side: str, source: str, work: str, out: str, timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, source, "--work", work,
           "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOG_v="3")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    memory = provenance.TreePss(proc.pid, interval=0.01).start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        peak = memory.stop()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} {source} failed ({proc.returncode}):\n{stderr[-3000:]}")
    r = json.loads(lines[-1])
    return {"seconds": r["t_set"] - t0, "import_s": r["t_import"] - t0,
            "network_s": r["t_net"] - r["t_import"], "load_s": r["t_set"] - r["t_net"],
            "first_read_s": r["t_read"] - r["t_set"], "first_write_s": r["t_write"] - r["t_read"],
            "ready_s": r["t_write"] - r["t_net"], "checksum": r["checksum"],
            "peak_pss_mib": peak["peak_pss_mib"], "peak_pss_anon_mib": peak["peak_pss_anon_mib"],
            "load_anon_mib": max(0, r["anon_peak_kib"] - r["anon_net_kib"]) / 1024,
            "anon_after_load_mib": (r["anon_set_kib"] - r["anon_net_kib"]) / 1024}


def _stats(xs: List[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1.35GB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mfst_bench_startup")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--caches", default="warm,cold")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "startup.json"))
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "SOURCE"))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.work, args.out)), flush=True)
        return 0
    size = parse_size(args.size)
    prov = provenance.Run(args.work, [os.path.relpath(__file__, ROOT)] + list(
        sys.argv[1:] if argv is None else argv))
    load_start = os.getloadavg()
    info = generate(args.work, size)
    print(f"model: {info['tensors']} tensors, {info['bytes'] / 2 ** 30:.2f} GiB fp32; "
          f"load average {load_start}", flush=True)
    evictions: List[dict] = []
    out = os.path.join(args.work, "out")
    results: Dict[str, dict] = {}
    sources = args.sources.split(",")
    caches = args.caches.split(",")
    for source in sources:
        for side in SIDES:   # warm-up (not recorded)
            warm(args.work, source)
            run(side, source, args.work, out, args.timeout)
    for rnd in range(args.rounds):
        for source in sources:
            for cache in caches:
                sides = SIDES if rnd % 2 == 0 else SIDES[::-1]
                if cache == "cold" and source != "rank_new":   # the floor of a cold load
                    seq = sequential_read(args.work, source)
                    results.setdefault(f"{source}/cold/read", []).append(seq)
                    print(f"round {rnd} {source:9s} cold sequential read of the rank's bytes "
                          f"{seq:.2f} s", flush=True)
                for side in sides:
                    if cache == "cold":
                        evictions.append(evict(args.work))
                    else:
                        warm(args.work, source)
                    r = run(side, source, args.work, out, args.timeout)
                    r["loadavg"] = prov.note_load()
                    results.setdefault(f"{source}/{cache}/{side}", []).append(r)
                    print(f"round {rnd} {source:9s} {cache} {side:9s} {r['seconds']:6.2f} s "
                          f"(load {r['load_s']:.2f} s, ready {r['ready_s']:.2f} s) "
                          f"peak PSS {r['peak_pss_mib']:.0f} MiB, "
                          f"load anon +{r['load_anon_mib']:.0f} MiB, loadavg {r['loadavg']:.1f}",
                          flush=True)
    shutil.rmtree(out, ignore_errors=True)
    load_end = os.getloadavg()
    summary = {}
    print(f"\n{'source/cache':18s} {'side':9s} {'total s med (min-max)':24s} "
          f"{'load s med':10s} {'ready s':8s} {'peak PSS':9s} {'load anon':9s}")
    for source in sources:
        for cache in caches:
            row = {}
            for side in SIDES:
                rs = results[f"{source}/{cache}/{side}"]
                row[side] = {k: _stats([r[k] for r in rs]) for k in
                             ("seconds", "load_s", "first_read_s", "first_write_s", "ready_s",
                              "import_s", "network_s", "peak_pss_mib", "peak_pss_anon_mib",
                              "load_anon_mib", "loadavg")}
                s = row[side]
                print(f"{source + '/' + cache:18s} {side:9s} "
                      f"{s['seconds']['median']:6.2f} ({s['seconds']['min']:.2f}-"
                      f"{s['seconds']['max']:.2f}){'':7s} {s['load_s']['median']:6.2f}    "
                      f"{s['ready_s']['median']:6.2f}   {s['peak_pss_mib']['median']:6.0f}    "
                      f"+{s['load_anon_mib']['median']:5.0f}")
            sums = {r["checksum"] for side in SIDES for r in results[f"{source}/{cache}/{side}"]}
            if len(sums) != 1:   # every side must hold the same values
                raise SystemExit(f"{source}/{cache}: the parameters differ between runs: {sums}")
            ms = row["mindspore"]
            for ours in OURS:
                o = row[ours]
                row[f"{ours}_ratio_total"] = o["seconds"]["median"] / ms["seconds"]["median"]
                row[f"{ours}_ratio_load"] = o["load_s"]["median"] / ms["load_s"]["median"]
                row[f"{ours}_ratio_ready"] = o["ready_s"]["median"] / ms["ready_s"]["median"]
                print(f"{'':18s} {ours} / MindSpore: total {row[f'{ours}_ratio_total']:.2f}, "
                      f"load part {row[f'{ours}_ratio_load']:.2f}, ready (load + first read + "
                      f"first write) {row[f'{ours}_ratio_ready']:.2f}")
            if f"{source}/{cache}/read" in results:
                row["sequential_read_s"] = _stats(results[f"{source}/{cache}/read"])
                for ours in OURS:
                    row[f"{ours}_ratio_load_to_read"] = (row[ours]["load_s"]["median"]
                                                         / row["sequential_read_s"]["median"])
                    print(f"{'':18s} {ours}: load / a cold sequential read of the same bytes "
                          f"({row['sequential_read_s']['median']:.2f} s): "
                          f"{row[f'{ours}_ratio_load_to_read']:.2f}")
            summary[f"{source}/{cache}"] = row
    print(f"load average at start {load_start}, at end {load_end}")
    provenance.write_result(args.json, {
        "model": info, "rounds": args.rounds, "loadavg_start": load_start,
        "loadavg_end": load_end, "cpus": os.cpu_count(), "results": summary}, prov, evictions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
