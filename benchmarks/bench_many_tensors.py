"""Benchmark: per-tensor overhead of planning and validation in merge and load.

The same bytes as many small tensors (default 4000 x 64 KiB, as issue 10 measured) and as few
large ones (50 tensors), saved as mp2 rank files with our slice metadata; each phase timed in
this process, alternating the two shapes over --rounds rounds (warm page cache):

  describe   describe_distributed (headers and slice metadata of every rank file)
  plan_merge plan_merge of the description
  merge      execute(plan_merge) into a fresh folder (checksums verified, the default)
  plan_load  plan_rank_slices for one card (every tensor whole)
  prepare    prepare_read of that plan (open the files, validate the plan, choose the checksums)
  load       verify + fill into preallocated arrays (the load hook's engine path, after prepare)

Every round starts with nothing parsed (the package's caches of headers and descriptions
emptied), as the first command of a process. Per-tensor overhead = (many - few) /
(n_many - n_few) per phase, printed in microseconds with the
load average; beside each phase, the time CPython's cyclic collector ran in it (`gc_s`).
`--mindspore` imports MindSpore first, as the load hook runs in a training process (the
collector then has MindSpore's objects to walk). "Planning and validation" (issue 10's ≤ 50 µs
per tensor) are describe, plan_merge, plan_load and prepare; merge and load also copy, hash and write. Results (with the provenance
header of benchmarks/provenance.py) go to docs/bench/many_tensors.json.

`--against COMMIT` measures the package of COMMIT in the same run (its `mindformers_st/`
extracted with `git archive`): every round runs once per code in a fresh process, the order
alternating, and the JSON carries the baseline's figures and the ratios to them — the machine's
speed drifts between runs (here by 1.6x within a day), a baseline measured beside the figures
does not.

`--instructions` also counts the planning phases' instructions under valgrind (cachegrind), for
this code and COMMIT's, each stop of a phase in a fresh process with a fixed hash seed: the
same code gives the same count on every run, so its ratio is the one this machine's drift
cannot move (wall time still decides the 50 µs).

    .venv/bin/python benchmarks/bench_many_tensors.py [--tensors 4000] [--kib 64] [--rounds 3]
                                                      [--mindspore] [--against COMMIT]
                                                      [--instructions]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from typing import Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --against runs rounds of this script on another commit's package (a child process each):
# which mindformers_st it imports comes from the environment, before any import of it
CODE = os.environ.get("MFST_BENCH_CODE", ROOT)
sys.path.insert(0, CODE)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from mindformers_st.layout.tensor_layout import TensorLayout  # noqa: E402
from mindformers_st.storage.writer import SafetensorsWriter  # noqa: E402

PHASES = ["describe", "plan_merge", "merge", "plan_load", "prepare", "load"]


def generate(folder: str, count: int, nbytes: int) -> dict:
    """`count` fp32 tensors of `nbytes` each, split in two along dim 0 over mp2 rank files."""
    cols = 256
    rows = max(2, nbytes // 4 // cols)
    rows -= rows % 2
    stamp = os.path.join(folder, "model.json")
    info = {"count": count, "rows": rows, "cols": cols}
    if os.path.exists(stamp) and json.load(open(stamp)) == info:
        return info
    shutil.rmtree(folder, ignore_errors=True)
    names = [f"model.block{i:05d}.weight" for i in range(count)]
    layout = TensorLayout((rows, cols), (2,), (0, -1))
    rng = np.random.default_rng(0)
    for r in range(2):
        sl = layout.slice_for(r)
        os.makedirs(os.path.join(folder, f"rank_{r}"))
        meta = {"version": 1, "rank": r, "world_size": 2, "remove_redundancy": False,
                "epoch": 1, "step": 1, "slices": {n: sl.to_json() for n in names}}
        w = SafetensorsWriter(os.path.join(folder, f"rank_{r}", f"ckpt_rank_{r}-1_1.safetensors"),
                              [(n, "F32", sl.sizes) for n in names],
                              {"format": "ms", "mindformers_st": json.dumps(meta)})
        for n in names:
            w.write(n, rng.standard_normal(sl.sizes, dtype=np.float32))
        w.commit()
    json.dump(info, open(stamp, "w"))
    return info


class GcClock:
    """Seconds CPython's cyclic collector ran, summed from gc.callbacks."""

    def __init__(self):
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase, info) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


GC = GcClock()


def forget_parsed_files() -> None:
    """Empty the package's process-wide caches of what it read and worked out, so a round
    costs what the first command of a process costs: every header parsed and validated once
    (issue 10 counts that as per-tensor overhead). `mindformers_st.caches.forget_all` knows
    them all; a commit's package from before it (--against) has its caches emptied by name."""
    import importlib
    import mindformers_st
    # only the package's own registry: importing mindformers_st.caches where the package has
    # none would find this checkout's module through the editable install (an empty registry)
    if os.path.exists(os.path.join(os.path.dirname(mindformers_st.__file__), "caches.py")):
        importlib.import_module("mindformers_st.caches").forget_all()
        return
    for module, name, how in (("mindformers_st.storage.reader", "_HEADER_CACHE", "clear"),
                              ("mindformers_st.records.rank_meta", "_parse_described", "cache_clear"),
                              ("mindformers_st.layout.tensor_layout", "_slice_for", "cache_clear")):
        cache = getattr(importlib.import_module(module), name, None)
        if cache is not None:
            getattr(cache, how)()


def run_once(folder: str, out: str) -> Tuple[dict, dict]:
    """({phase: wall seconds}, {phase: seconds the cyclic collector ran in it}) of one round,
    begun with nothing parsed (`forget_parsed_files`)."""
    from mindformers_st.transform import describe_distributed, execute, plan_merge, plan_rank_slices
    from mindformers_st.transform.execute import prepare_read
    times, gc_times = {}, {}
    forget_parsed_files()

    def timed(phase, fn):
        g, t = GC.total, time.perf_counter()
        result = fn()
        times[phase] = time.perf_counter() - t
        gc_times[phase] = GC.total - g
        return result
    src = timed("describe", lambda: describe_distributed(folder))
    plan = timed("plan_merge", lambda: plan_merge(src))
    shutil.rmtree(out, ignore_errors=True)
    timed("merge", lambda: execute(plan, out, workers=2, progress=False))
    layouts = {n: TensorLayout(src.global_shapes[n], (1,), (-1,) * len(src.global_shapes[n]))
               for n in src.chunks}
    lplan = timed("plan_load", lambda: plan_rank_slices(src, layouts, 0))
    dest = {tt.name: np.empty(tt.shape, np.float32) for f in lplan.files for tt in f.tensors}
    for a in dest.values():
        a.fill(0)   # fault the pages in: the parameters exist before a load
    prepared = timed("prepare", lambda: prepare_read(lplan))

    def load():
        try:
            prepared.verify(2)
            prepared.fill(dest, 2)
        finally:
            prepared.close()
    timed("load", load)
    shutil.rmtree(out, ignore_errors=True)
    return times, gc_times


def measure(args, rounds: int) -> Tuple[dict, dict]:
    """({shape: {phase: [seconds per round]}}, the same for the collector's time): a warm-up
    round, then `rounds` rounds in this process, alternating which shape goes first."""
    total = args.tensors * args.kib * 1024
    shapes = {"many": (args.tensors, args.kib * 1024), "few": (args.few, total // args.few)}
    for tag, (n, b) in shapes.items():
        generate(os.path.join(args.work, tag), n, b)
    res = {tag: {p: [] for p in PHASES} for tag in shapes}
    gc_res = {tag: {p: [] for p in PHASES} for tag in shapes}
    for rnd in range(rounds + 1):   # round 0 warms up
        for tag in (("many", "few") if rnd % 2 == 0 else ("few", "many")):
            t, g = run_once(os.path.join(args.work, tag), os.path.join(args.work, f"out_{tag}"))
            if rnd:
                for p in PHASES:
                    res[tag][p].append(t[p])
                    gc_res[tag][p].append(g[p])
    return res, gc_res


def summarize(res: dict, gc_res: dict, args, label: str) -> dict:
    """Per phase: the rounds, medians and per-tensor overhead; planning and merge totals."""
    n = args.tensors - args.few
    summary = {}
    print(f"  [{label}]")
    for p in PHASES:
        m = {tag: statistics.median(res[tag][p]) for tag in res}
        per = (m["many"] - m["few"]) / n * 1e6
        gc_many = statistics.median(gc_res["many"][p])
        summary[p] = {"many_s": res["many"][p], "few_s": res["few"][p], "many_median_s": m["many"],
                      "few_median_s": m["few"], "per_tensor_us": per,
                      "gc_many_s": gc_res["many"][p], "gc_many_median_s": gc_many}
        print(f"  {p:10s} many {m['many']:7.3f} s (min {min(res['many'][p]):.3f} max "
              f"{max(res['many'][p]):.3f}; collector {gc_many:.3f})  few {m['few']:7.3f} s  "
              f"-> {per:7.1f} us/tensor")
    tot = {tag: sum(summary[p][f"{tag}_median_s"] for p in ("describe", "plan_merge", "merge"))
           for tag in ("many", "few")}
    merge_total = (tot["many"] - tot["few"]) / n * 1e6
    planning = {"merge": summary["describe"]["per_tensor_us"] + summary["plan_merge"]["per_tensor_us"],
                "load": sum(summary[p]["per_tensor_us"] for p in ("describe", "plan_load", "prepare"))}
    print(f"  merge total (describe+plan+execute): {merge_total:.1f} us/tensor")
    print(f"  planning and validation: merge {planning['merge']:.1f} us/tensor "
          f"(describe + plan_merge), load {planning['load']:.1f} us/tensor "
          f"(describe + plan_load + prepare)")
    return {"phases": summary, "planning_per_tensor_us": planning,
            "merge_total_per_tensor_us": merge_total}


def extract_commit(commit: str, work: str) -> Tuple[str, str]:
    """(full commit id, a folder holding that commit's `mindformers_st/`), extracted once."""
    import subprocess
    full = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", commit + "^{commit}"],
                          check=True, capture_output=True, text=True).stdout.strip()
    folder = os.path.join(work, f"code_{full[:12]}")
    if not os.path.isdir(os.path.join(folder, "mindformers_st")):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        archive = subprocess.run(["git", "-C", ROOT, "archive", full, "mindformers_st"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return full, folder


def _child_rounds(args, code: str) -> Tuple[dict, dict]:
    """One round (after a warm-up) of this script in a fresh process importing `code`."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json", dir=args.work) as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--tensors", str(args.tensors), "--few",
               str(args.few), "--kib", str(args.kib), "--work", args.work, "--raw", out.name]
        if args.mindspore:
            cmd.append("--mindspore")
        subprocess.run(cmd, check=True, env=dict(os.environ, MFST_BENCH_CODE=code))
        raw = json.load(open(out.name))
    return raw["res"], raw["gc"]


# Where a child stops (--stop-after): each planning phase's instructions are the difference
# between two stops of the same chain (describe -> plan_merge; describe -> layouts -> plan_load
# -> prepare). "layouts" builds the benchmark's own target layouts, outside every phase.
STOPS = {"describe": "start", "plan_merge": "describe", "plan_load": "layouts",
         "prepare": "plan_load"}
PLANNING = list(STOPS)


def run_until(folder: str, stop: str) -> None:
    """Describe `folder` and plan it, stopping after `stop` (a child of --instructions)."""
    from mindformers_st.transform import describe_distributed, plan_merge, plan_rank_slices
    from mindformers_st.transform.execute import prepare_read
    if stop == "start":
        return
    src = describe_distributed(folder)
    if stop == "plan_merge":
        plan_merge(src)
    if stop in ("describe", "plan_merge"):
        return
    layouts = {n: TensorLayout(src.global_shapes[n], (1,), (-1,) * len(src.global_shapes[n]))
               for n in src.chunks}
    if stop == "layouts":
        return
    plan = plan_rank_slices(src, layouts, 0)
    if stop == "prepare":
        prepare_read(plan).close()


def count_instructions(args, code: str) -> dict:
    """{phase: instructions per extra tensor} of the planning phases of `code`'s package, each
    counted by valgrind (cachegrind, no cache simulation) in a fresh process with a fixed hash
    seed: the same code gives the same count on any run, where this machine's wall time drifts."""
    import re
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    stops = sorted(set(STOPS) | set(STOPS.values()))
    jobs = [(tag, stop) for tag in ("many", "few") for stop in stops]

    def one(job):
        tag, stop = job
        cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, os.path.abspath(__file__), "--work", args.work,
               "--stop-after", stop, "--stop-tag", tag] + (["--mindspore"] if args.mindspore else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=dict(os.environ, MFST_BENCH_CODE=code, PYTHONHASHSEED="0"))
        return int(re.search(r"I\s+refs:\s+([\d,]+)", out.stderr).group(1).replace(",", ""))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(one, jobs)))
    n = args.tensors - args.few
    return {p: ((counts[("many", p)] - counts[("many", before)])
                - (counts[("few", p)] - counts[("few", before)])) / n
            for p, before in STOPS.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=4000)
    ap.add_argument("--few", type=int, default=50)
    ap.add_argument("--kib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mfst_bench_many")
    ap.add_argument("--label", default="")
    ap.add_argument("--mindspore", action="store_true",
                    help="import MindSpore first, as in the training process a load runs in")
    ap.add_argument("--against", default=None, metavar="COMMIT",
                    help="also measure COMMIT's package in the same run, round for round")
    ap.add_argument("--instructions", action="store_true",
                    help="also count the planning phases' instructions under valgrind (this "
                         "code, and COMMIT's with --against): a measure the machine's drift "
                         "does not move")
    ap.add_argument("--raw", default=None, help=argparse.SUPPRESS)   # a child of --against
    ap.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)   # --instructions
    ap.add_argument("--stop-tag", default="many", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "many_tensors.json"))
    args = ap.parse_args(argv)
    if args.mindspore:
        import mindspore  # noqa: F401  (its objects are what the collector walks in training)
    os.makedirs(args.work, exist_ok=True)
    if args.stop_after:
        run_until(os.path.join(args.work, args.stop_tag), args.stop_after)
        return 0
    if args.raw:
        res, gc_res = measure(args, 1)
        json.dump({"res": res, "gc": gc_res}, open(args.raw, "w"))
        return 0
    prov = provenance.Run(args.work, [os.path.relpath(__file__, ROOT)] + list(
        sys.argv[1:] if argv is None else argv))
    load_start = os.getloadavg()
    total = args.tensors * args.kib * 1024
    print(f"{args.tensors} x {args.kib} KiB against {args.few} tensors of the same "
          f"{total / 2 ** 20:.0f} MiB")
    baseline = None
    if args.against:
        full, base_code = extract_commit(args.against, args.work)
        measure(args, 0)   # the data, written by this checkout's writer
        runs = {"current": ({}, {}), "baseline": ({}, {})}
        for rnd in range(args.rounds):
            for which in (("current", "baseline") if rnd % 2 == 0 else ("baseline", "current")):
                res, gc_res = _child_rounds(args, ROOT if which == "current" else base_code)
                acc, gc_acc = runs[which]
                for tag in res:
                    for p in PHASES:
                        acc.setdefault(tag, {}).setdefault(p, []).extend(res[tag][p])
                        gc_acc.setdefault(tag, {}).setdefault(p, []).extend(gc_res[tag][p])
        current = summarize(*runs["current"], args, "this checkout")
        base = summarize(*runs["baseline"], args, f"baseline {full[:7]}")
        ratio = {f"planning_{k}": current["planning_per_tensor_us"][k] / v
                 for k, v in base["planning_per_tensor_us"].items()}
        ratio.update({p: current["phases"][p]["per_tensor_us"] / base["phases"][p]["per_tensor_us"]
                      for p in PHASES})
        print("  ratio to the baseline (per tensor): " +
              ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
        baseline = {"commit": full, **base, "ratio_to_baseline": ratio}
    else:
        current = summarize(*measure(args, args.rounds), args, "this checkout")
    instructions = None
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("  --instructions: valgrind is not installed; not counted")
        else:
            total = args.tensors * args.kib * 1024
            generate(os.path.join(args.work, "many"), args.tensors, args.kib * 1024)
            generate(os.path.join(args.work, "few"), args.few, total // args.few)
            codes = {"current": ROOT}
            if args.against:
                codes["baseline"] = base_code
            instructions = {k: count_instructions(args, c) for k, c in codes.items()}
            for k, per in instructions.items():
                per["planning_merge"] = per["describe"] + per["plan_merge"]
                per["planning_load"] = per["describe"] + per["plan_load"] + per["prepare"]
            if args.against:
                instructions["ratio"] = {p: instructions["current"][p] / v
                                         for p, v in instructions["baseline"].items()}
            for k, per in instructions.items():
                print(f"  instructions per tensor, {k}: " +
                      ", ".join(f"{p} {v:.0f}" if k != "ratio" else f"{p} {v:.2f}"
                                for p, v in per.items()))
    load_end = os.getloadavg()
    print(f"  load average {load_start} -> {load_end}")
    doc = {"label": args.label, "mindspore_imported": args.mindspore, "tensors": args.tensors,
           "few": args.few, "kib": args.kib, "rounds": args.rounds,
           "loadavg_start": load_start, "loadavg_end": load_end, **current,
           "baseline": baseline, "instructions": instructions,
           "provenance": prov.finish(cache="warm (page cache not evicted: overhead, not I/O)")}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    json.dump(doc, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
