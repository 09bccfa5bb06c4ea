"""Benchmark: our merge / reshard against the disk floor and MindSpore's built-ins.

Generates a synthetic Llama-like fp32 model (default 2 GiB) saved as mp=4 rank files (and as
dp=2 x mp=2 with remove_redundancy), then times, each op in its own child process, medians of
--reps interleaved rounds, with the source files evicted from the page cache before every run
(`sync`, posix_fadvise(DONTNEED) on every file, then mincore counts what is still resident;
`--drop-caches` also tries `echo 3 > /proc/sys/vm/drop_caches`, which empties every other job's
cache too, and records whether it was allowed):

  floor          read the source bytes + write as many with fsync (the physical floor)
  merge          mindformers-st merge (mp4 -> complete), checksums verified (the default)
  merge_noverify the same merge with --verify off (the cost of verification is merge/this)
  merge_dedup    mindformers-st merge of the de-duplicated dp2 x mp2 save
  reshard        mindformers-st reshard mp4 -> mp2 (rank files to rank files)
  merge_sharded  the merge into ~8 output shards (--max-shard-size), one process
  merge_sharded_p2  the same plan over 2 worker processes (--processes 2 / transform_process_num)
  reshard_p2     the reshard over 2 worker processes (one output rank file each)
  ms_unified     mindspore.unified_safetensors on the same mp4 input
  ms_transform   mindspore.transform_checkpoints mp4 -> mp2 (output checked bit for bit)

Memory: PSS (/proc/PID/smaps_rollup) summed over the child's process tree, sampled every 50 ms,
the same for our ops and MindSpore's (benchmarks/provenance.py); its peak, anonymous part and the
older measure (RssAnon summed over the processes, which counts a forked worker's shared pages once
per process) are recorded. Each run records its provenance (date, load average at start and end,
machine facts, git commit) next to its results in docs/bench/reshard.json (keyed by size, so
2 GiB and 8 GiB runs sit side by side); benchmarks/chart_reshard.py draws the PNG next to it. `--many-tensors` makes the model of many small layers (hidden 256:
thousands of tensors) instead of a few large ones. Usage:

    .venv/bin/python benchmarks/bench_reshard.py [--size 2GiB] [--reps 3] [--skip-mindspore]
    .venv/bin/python benchmarks/bench_reshard.py --size 1GiB --many-tensors --skip-mindspore \
        --ops floor,merge_sharded,merge_sharded_p2,reshard,reshard_p2 --json docs/bench/processes.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402

from mindformers_st.records.rank_meta import RankFileMeta  # noqa: E402
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts  # noqa: E402
from mindformers_st.layout.owners import assign_owners  # noqa: E402
from mindformers_st.layout.strategy import write_strategy_file  # noqa: E402
from mindformers_st.models.config import LlamaConfig  # noqa: E402
from mindformers_st.models.param_table import llama_param_table  # noqa: E402
from mindformers_st.commands.reshard import parse_size  # noqa: E402

OPS = ["floor", "merge", "merge_noverify", "merge_dedup", "merge_sharded", "merge_sharded_p2",
       "reshard", "reshard_p2", "ms_unified", "ms_transform"]
PROCESSES = {"merge_sharded_p2": 2, "reshard_p2": 2}
MS_OPS = {"ms_unified", "ms_transform"}
SRC_PC = ParallelConfig(model_parallel=4, vocab_emb_dp=False)
DEDUP_PC = ParallelConfig(data_parallel=2, model_parallel=2, vocab_emb_dp=False)
DST_PC = ParallelConfig(model_parallel=2, vocab_emb_dp=False)


# --------------------------------------------------------------------------- the model
def model_config(size: int, many: bool = False) -> LlamaConfig:
    """A Llama-like config of about `size` bytes in fp32 (big: 2048 hidden as a 1B-class model;
    `many`: hidden 256, so the bytes are spread over thousands of small tensors)."""
    if many:
        vocab, hidden, inter, heads = 8192, 256, 768, 8
    elif size >= 2 ** 30:
        vocab, hidden, inter, heads = 32000, 2048, 6912, 16
    else:
        vocab, hidden, inter, heads = 4096, 512, 1536, 8
    emb = 2 * vocab * hidden * 4
    layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
    layers = max(1, round((size - emb) / layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=inter, seq_length=128)


def global_value(name: str, shape) -> np.ndarray:
    """The reproducible value of one global tensor (regenerated to check outputs)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(shape, dtype=np.float32)


def write_rank_files(folder: str, table, pc, dedup: bool, stem: str,
                     global_step: bool = False) -> None:
    """Training's rank files of `table` under `pc`: `folder/rank_{r}/{stem}.safetensors` (stem
    formatted with r) with our slice metadata, every value from `global_value`, each slice in
    its owner's file only with `dedup` (remove_redundancy), plus `global_step` when asked.
    One global tensor is in memory at a time."""
    from mindformers_st.storage.writer import SafetensorsWriter
    layouts = plan_layouts(table, pc)
    owners = assign_owners(layouts, {p.name: p.dtype for p in table}) if dedup else None
    per_rank = {r: [] for r in range(pc.world_size)}
    for name, lay in layouts.items():
        for r in lay.ranks():
            sl = lay.slice_for(r)
            if owners is None or owners[(name, sl)] == r:
                per_rank[r].append((name, sl))
    writers = {}
    for r, items in per_rank.items():
        os.makedirs(os.path.join(folder, f"rank_{r}"))
        # the one definition of a rank file's description (records.rank_meta)
        meta = RankFileMeta(r, pc.world_size, dict(items), pc.to_json(), dedup, 1, 1)
        specs = [(n, "F32", sl.sizes) for n, sl in items]
        if global_step:
            specs.append(("global_step", "I32", (1,)))
        writers[r] = SafetensorsWriter(
            os.path.join(folder, f"rank_{r}", stem.format(r=r) + ".safetensors"), specs,
            meta.to_metadata())
        if global_step:
            writers[r].write("global_step", np.array([1], dtype=np.int32))
    for name, lay in layouts.items():
        value = global_value(name, lay.global_shape)
        for r, items in per_rank.items():
            for n, sl in items:
                if n == name:
                    writers[r].write(n, value[sl.index()])
        del value
    for w in writers.values():
        w.commit()


def generate(work: str, size: int, many: bool = False) -> dict:
    """Write the mp4 and dedup dp2xmp2 sources and the strategy files MindSpore needs."""
    cfg = model_config(size, many)
    table = llama_param_table(cfg)
    info = {"vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "layers": cfg.num_layers,
            "intermediate": cfg.intermediate_size, "tensors": len(table),
            "bytes": table.total_bytes}
    stamp = os.path.join(work, "model.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == info:
        return info
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    for tag, pc, dedup in (("src_mp4", SRC_PC, False), ("src_dedup", DEDUP_PC, True)):
        write_rank_files(os.path.join(work, tag), table, pc, dedup, "checkpoint_rank_{r}",
                         global_step=True)
        write_strategy_file(os.path.join(work, f"strategy_{tag}.ckpt"), plan_layouts(table, pc))
    write_strategy_file(os.path.join(work, "strategy_dst_mp2.ckpt"), plan_layouts(table, DST_PC))
    json.dump(info, open(stamp, "w"))
    return info


# --------------------------------------------------------------------------- the ops (child side)
def _files(folder: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if f.endswith(".safetensors"))


def _anon_kib(pid="self") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_op(op: str, work: str, out: str, workers: int) -> dict:
    """Run one op in this (child) process; returns its in-process seconds."""
    before = _anon_kib()
    if op in MS_OPS:
        import mindspore as ms   # imported before the clock starts, as the other ops' imports
    from mindformers_st.transform import (describe_distributed, execute, plan_distributed,
                                          plan_merge)
    src = os.path.join(work, "src_dedup" if op == "merge_dedup" else "src_mp4")
    verify = "off" if op == "merge_noverify" else "read"
    t0 = time.perf_counter()
    if op == "floor":
        buf = bytearray(16 << 20)
        total = 0
        for f in _files(src):
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    total += n
        os.makedirs(out)
        with open(os.path.join(out, "floor.bin"), "wb", buffering=0) as fh:
            left = total
            while left:
                n = fh.write(memoryview(buf)[:min(left, len(buf))])
                left -= n
            os.fsync(fh.fileno())
    elif op in ("merge", "merge_noverify", "merge_dedup"):
        execute(plan_merge(describe_distributed(src)), out, workers=workers, progress=False,
                verify=verify)
    elif op in ("merge_sharded", "merge_sharded_p2"):
        shard = json.load(open(os.path.join(work, "model.json")))["bytes"] // 8 + 1
        execute(plan_merge(describe_distributed(src), max_shard_size=shard), out,
                workers=workers, progress=False, processes=PROCESSES.get(op, 1))
    elif op in ("reshard", "reshard_p2"):
        table = llama_param_table(model_config_from(work))
        execute(plan_distributed(describe_distributed(src), plan_layouts(table, DST_PC), DST_PC),
                out, workers=workers, progress=False, processes=PROCESSES.get(op, 1))
    elif op == "ms_unified":
        ms.unified_safetensors(src, os.path.join(work, "strategy_src_mp4.ckpt"), out)
    elif op == "ms_transform":
        ms.transform_checkpoints(src, out, "checkpoint_",
                                 os.path.join(work, "strategy_src_mp4.ckpt"),
                                 os.path.join(work, "strategy_dst_mp2.ckpt"),
                                 output_format="safetensors")
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - t0
    # Our writers fsync every file; MindSpore's return with their bytes still in the page cache.
    # Time until the output is on disk too, so the comparison is of durable results.
    os.sync()
    return {"seconds": seconds, "durable_seconds": time.perf_counter() - t0,
            "anon_before_kib": before}


def model_config_from(work: str) -> LlamaConfig:
    info = json.load(open(os.path.join(work, "model.json")))
    return LlamaConfig(vocab_size=info["vocab"], hidden_size=info["hidden"],
                       num_layers=info["layers"], num_heads=16 if info["hidden"] >= 2048 else 8,
                       intermediate_size=info["intermediate"], seq_length=128)


# --------------------------------------------------------------------------- the parent side
def run_child(op: str, work: str, out: str, workers: int, timeout: float) -> dict:
    """Run `op` in a child process, sampling the PSS of its process tree."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", op, "--work", work,
           "--out", out, "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = provenance.TreePss(proc.pid).start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in reversed(provenance.descendants(proc.pid)):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s (killed)", **mem.stop()}
    finally:
        memory = mem.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (stderr or "")[-800:], **memory}
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(wall=wall, **memory)
    return res


def verify(work: str, outs: Dict[str, str]) -> Dict[str, dict]:
    """Compare every output tensor with the regenerated global value: {op: {checked, wrong}}."""
    from mindformers_st.storage.reader import open_safetensors
    table = llama_param_table(model_config_from(work))
    dst = plan_layouts(table, DST_PC)
    opened = {op: [open_safetensors(f) for f in _files(d)] for op, d in outs.items()
              if d and os.path.isdir(d)}
    result = {op: {"checked": 0, "wrong": [], "missing": []} for op in opened}
    for p in table:
        value = global_value(p.name, p.shape)
        for op, files in opened.items():
            held = [f for f in files if p.name in f.tensors]
            if not held:
                result[op]["missing"].append(p.name)
                continue
            for f in held:
                if op in ("reshard", "reshard_p2", "ms_transform"):
                    rank = int(os.path.basename(os.path.dirname(f.path)).split("_")[1])
                    want = value[dst[p.name].slice_for(rank).index()]
                else:
                    want = value
                got = f.read(p.name)
                result[op]["checked"] += 1
                if got.shape != want.shape or not np.array_equal(got, want):
                    result[op]["wrong"].append(f"{os.path.relpath(f.path, outs[op])}:{p.name}")
        del value
    for files in opened.values():
        for f in files:
            f.close()
    for r in result.values():
        r["ok"] = not r["wrong"] and not r["missing"]
        r["wrong_count"] = len(r["wrong"])
        r["wrong"] = r["wrong"][:10]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB", help="model size, e.g. 2GiB, 8GiB, 64MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--work", default="/tmp/mindformers_st_bench",
                    help="scratch folder (on the disk being measured)")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "reshard.json"))
    ap.add_argument("--skip-mindspore", action="store_true")
    ap.add_argument("--many-tensors", action="store_true",
                    help="a model of many small tensors (hidden 256) of --size bytes")
    ap.add_argument("--ops", default=None, help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--timeout", type=float, default=600.0, help="per op run (unified can hang)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sources")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also try echo 3 > /proc/sys/vm/drop_caches before every run (root; "
                         "empties the page cache of every other job on the machine)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_op(args.child, args.work, args.out, args.workers)))
        return 0

    size = parse_size(args.size)
    key = args.size + ("-many-tensors" if args.many_tensors else "")
    work = os.path.join(os.path.abspath(args.work), key)
    prov = provenance.Run(os.path.abspath(args.work), [os.path.relpath(__file__, ROOT)] +
                          (sys.argv[1:] if argv is None else list(argv)))
    t = time.perf_counter()
    info = generate(work, size, args.many_tensors)
    print(f"model {key}: {info} (generated/found in {time.perf_counter() - t:.1f} s)", flush=True)
    ops = args.ops.split(",") if args.ops else list(OPS)
    if args.skip_mindspore:
        ops = [o for o in ops if o not in MS_OPS]
    import psutil
    avail = psutil.virtual_memory().available
    if "ms_transform" in ops and 3.5 * info["bytes"] > 0.45 * avail:
        print("ms_transform skipped: it needs ~3.2x the model in RAM", flush=True)
        ops.remove("ms_transform")
    samples: Dict[str, List[dict]] = {o: [] for o in ops}
    evictions: List[dict] = []
    for rep in range(args.reps):
        for op in ops:       # interleaved rounds: each op sees the same machine state
            out = os.path.join(work, f"out_{op}")
            shutil.rmtree(out, ignore_errors=True)
            evictions.append(provenance.evict(_files(work), args.drop_caches))
            load1 = prov.note_load()
            res = run_child(op, work, out, args.workers, args.timeout)
            res.update(load1_at_start=load1, resident_at_start=evictions[-1]["resident_after"])
            samples[op].append(res)
            print(f"rep {rep} {op}: " + (f"{res['seconds']:.2f} s (wall {res['wall']:.2f}), "
                                         f"peak PSS {res['peak_pss_mib']:.0f} MiB, load {load1}"
                                         if "error" not in res else f"FAILED {res['error'][-300:]}"),
                  flush=True)
    outs = {op: os.path.join(work, f"out_{op}") for op in ops if op != "floor"}
    checks = verify(work, outs)
    run = {"model": info, "reps": args.reps, "workers": args.workers, "ops": {}}
    for op in ops:
        good = [s for s in samples[op] if "error" not in s]
        run["ops"][op] = {
            "seconds": [round(s["seconds"], 3) for s in good],
            "wall": [round(s["wall"], 3) for s in good],
            "median": round(statistics.median([s["seconds"] for s in good]), 3) if good else None,
            "durable_median": (round(statistics.median([s["durable_seconds"] for s in good]), 3)
                               if good and all("durable_seconds" in s for s in good) else None),
            "peak_pss_mib": max(s["peak_pss_mib"] for s in samples[op]),
            "peak_pss_anon_mib": max(s["peak_pss_anon_mib"] for s in samples[op]),
            "peak_pss_file_mib": max(s["peak_pss_file_mib"] for s in samples[op]),
            "peak_rss_anon_sum_mib": max(s["peak_rss_anon_sum_mib"] for s in samples[op]),
            "max_processes": max(s["max_processes"] for s in samples[op]),
            "load1_at_start": [s["load1_at_start"] for s in samples[op]],
            "errors": [s["error"][-300:] for s in samples[op] if "error" in s],
            "check": checks.get(op)}
    med = {op: r["median"] for op, r in run["ops"].items()}

    def ratio(a, b):
        return round(med[a] / med[b], 2) if med.get(a) and med.get(b) else None
    run["ratios"] = {"merge/floor": ratio("merge", "floor"),
                     "merge/merge_noverify": ratio("merge", "merge_noverify"),
                     "merge_dedup/floor": ratio("merge_dedup", "floor"),
                     "reshard/floor": ratio("reshard", "floor"),
                     "merge_sharded_p2/merge_sharded": ratio("merge_sharded_p2", "merge_sharded"),
                     "reshard_p2/reshard": ratio("reshard_p2", "reshard"),
                     "ms_unified/merge": ratio("ms_unified", "merge"),
                     "ms_transform/reshard": ratio("ms_transform", "reshard")}
    dmed = {op: r["durable_median"] for op, r in run["ops"].items()}
    run["durable_ratios"] = {
        f"{a}/{b}": round(dmed[a] / dmed[b], 2)
        for a, b in (("merge", "floor"), ("reshard", "floor"), ("ms_unified", "merge"),
                     ("ms_transform", "reshard")) if dmed.get(a) and dmed.get(b)}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    results = json.load(open(args.json)) if os.path.exists(args.json) else {"runs": {}}
    results.pop("machine", None)     # the old shared header: provenance is now per run
    run["provenance"] = prov.finish(cache=provenance.summarize_evictions(evictions))
    results["runs"][key] = run
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    from chart_reshard import chart
    png = chart(args.json, os.path.splitext(args.json)[0] + ".png")   # next to its JSON
    print(json.dumps({"ratios": run["ratios"], "durable_ratios": run["durable_ratios"],
                      "peak_pss_mib": {o: r["peak_pss_mib"] for o, r in run["ops"].items()},
                      "checks": {o: (c or {}).get("ok") for o, c in checks.items()}}, indent=1))
    print(f"results: {args.json}" + (f", chart: {png}" if png else ""))
    for op in ops:
        shutil.rmtree(os.path.join(work, f"out_{op}"), ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
