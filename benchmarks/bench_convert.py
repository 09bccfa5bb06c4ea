"""Benchmark: writing `{output_dir}/ms_safetensors` first (`derived_write: first`) against a copy.

Issue 10's goal for a run that needs the converted Hugging Face folder written before its first
step: the conversion takes at most 1.2x a durable copy of the same folder. Both sides start from
the same HF folder (the one bench_startup.py generates, 1.15 GiB fp32 by default) and end with
their output durable on disk:

  copy     `cp -r HF OUT && sync` (the issue's baseline: read, write, one sync for all files)
  convert  the load hook's conversion (`loader.convert_hf_online` with derived_write: first):
           plan, read, check the source checksums where recorded, rename, hash, write, fsync
           each file, commit the folder by rename, fsync the parent

Rounds alternate the sides (copy first in even rounds) after a warm-up of each; "warm": the HF
files in the page cache, "cold": evicted before each run (provenance.evict, achieved checked).
Outputs are removed (and synced away) before every run, and every run starts on a quiet disk
(provenance.settle_disk: nothing in flight and no I/O completed for a second; the time it took
is recorded): on ext4 mounted with `discard`, as here, removing the previous output leaves
trims the disk finishes later, and a run timed meanwhile paid for its predecessor. Prints ratio (convert / copy) of
medians, median/min/max, the load average, and writes docs/bench/convert.json with the
provenance header.

    .venv/bin/python benchmarks/bench_convert.py [--work /tmp/mfst_bench_startup] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from bench_startup import generate, read_all  # noqa: E402
from mindformers_st.commands.reshard import parse_size  # noqa: E402

SIDES = ["copy", "convert"]


def _hf_files(hf: str):
    return sorted(os.path.join(hf, f) for f in os.listdir(hf))


def copy_once(hf: str, out: str) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "-r", hf, out], check=True)
    os.sync()
    return time.perf_counter() - t


def convert_once(hf: str, out: str) -> float:
    from mindformers_st.checkpoint.detect import detect_checkpoint
    from mindformers_st.checkpoint.loader import LoadOptions, convert_hf_online
    opts = LoadOptions(hf, "safetensors", output_dir=out, derived_write="first")
    t = time.perf_counter()
    convert_hf_online(detect_checkpoint(hf, "safetensors"), opts, None)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1.35GB")
    ap.add_argument("--work", default="/tmp/mfst_bench_startup")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--caches", default="warm,cold")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "convert.json"))
    args = ap.parse_args(argv)
    prov = provenance.Run(args.work, [os.path.relpath(__file__, ROOT)] + list(
        sys.argv[1:] if argv is None else argv))
    info = generate(args.work, parse_size(args.size))
    hf = os.path.join(args.work, "hf")
    out = os.path.join(args.work, "convert_out")
    run = {"copy": lambda: copy_once(hf, out),
           "convert": lambda: convert_once(hf, out)}
    evictions, results = [], {}

    def fresh() -> float:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        return provenance.settle_disk(args.work)
    for side in SIDES:   # warm-up
        fresh()
        run[side]()
    caches = args.caches.split(",")
    for rnd in range(args.rounds):
        for cache in caches:
            for side in (SIDES if rnd % 2 == 0 else SIDES[::-1]):
                fresh()
                if cache == "cold":
                    evictions.append(provenance.evict(_hf_files(hf)))
                else:
                    read_all(_hf_files(hf))
                settled = provenance.settle_disk(args.work)   # the eviction's and reads' I/O too
                load = prov.note_load()
                seconds = run[side]()
                results.setdefault(f"{cache}/{side}", []).append(
                    {"seconds": seconds, "loadavg": load, "settle_s": settled})
                print(f"round {rnd} {cache} {side:8s} {seconds:6.2f} s (load {load:.2f}, "
                      f"disk settled in {settled:.1f} s)", flush=True)
    fresh()
    summary = {}
    for cache in caches:
        row = {}
        for side in SIDES:
            xs = [r["seconds"] for r in results[f"{cache}/{side}"]]
            row[side] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
                         "all": xs}
        row["ratio"] = row["convert"]["median"] / row["copy"]["median"]
        summary[cache] = row
        print(f"{cache}: copy {row['copy']['median']:.2f} s, convert "
              f"{row['convert']['median']:.2f} s (min {row['convert']['min']:.2f} max "
              f"{row['convert']['max']:.2f}): ratio {row['ratio']:.2f}")
    provenance.write_result(args.json, {"model": info, "rounds": args.rounds,
                                        "results": summary}, prov, evictions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
