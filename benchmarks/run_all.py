"""Run every benchmark in turn, write docs/bench/, and regenerate docs/bench/README.md from the JSONs.

Each entry of BENCHES is one command whose JSON (and chart) the docs quote. The README lists
every JSON with the command that wrote it, its date, commit, load average and cache eviction,
read from the JSON's own provenance header (benchmarks/provenance.py), so it cannot drift from
the data; tests/test_bench_docs.py checks it is what this script would write.

    .venv/bin/python benchmarks/run_all.py                 # everything, full size (hours on 2 cores)
    .venv/bin/python benchmarks/run_all.py --only reshard-2GiB,save
    .venv/bin/python benchmarks/run_all.py --only reshard-2GiB --reps 1   # fewer rounds
    .venv/bin/python benchmarks/run_all.py --quick         # tiny sizes into /tmp/mindformers_st_bench_quick
    .venv/bin/python benchmarks/run_all.py --readme-only   # just README.md (and the chart) from the JSONs

--quick checks that every benchmark runs end to end in a few minutes; its figures mean nothing,
so it writes to a scratch folder, never to docs/bench/ (unless --out says so).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_BENCH = os.path.join(ROOT, "docs", "bench")
QUICK_OUT = "/tmp/mindformers_st_bench_quick"
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """One benchmark command: its script, the JSON it writes (a file name in the output folder),
    the flag that names that JSON, its full-size and --quick arguments, the docs that quote it."""
    name: str
    script: str
    json: str
    json_flag: str
    args: Tuple[str, ...]
    quick: Optional[Tuple[str, ...]]     # None: not part of --quick (too slow even when small)
    docs: str

    def key(self, quick: bool = False) -> Optional[str]:
        """The run's key inside bench_reshard's multi-run JSON ("runs": {key: ...}), else None."""
        if self.script != "bench_reshard.py":
            return None
        args = self.quick if quick else self.args
        return args[args.index("--size") + 1] + ("-many-tensors" if "--many-tensors" in args else "")

    def command(self, out_dir: str, quick: bool, reps: Optional[int] = None) -> List[str]:
        """The command line; `reps` replaces the value of its --reps/--rounds/--trials (a loaded
        machine's shorter run: the JSON's provenance records the command as run)."""
        args = list(self.quick if quick else self.args)
        if reps is not None:
            flags = [i for i, a in enumerate(args) if a in REPS_FLAGS]
            if not flags:
                raise SystemExit(f"--reps: {self.name} has no {'/'.join(REPS_FLAGS)} argument")
            args[flags[0] + 1] = str(reps)
        return [sys.executable, os.path.join(ROOT, "benchmarks", self.script), *args,
                self.json_flag, os.path.join(out_dir, self.json)]


REPS_FLAGS = ("--reps", "--rounds", "--trials")
# The ops the docs quote at 2 GiB (the sharded / --processes ops are measured by "processes").
OPS_2GIB = "floor,merge,merge_noverify,merge_dedup,reshard,ms_unified,ms_transform"
BENCHES = [
    Bench("reshard-2GiB", "bench_reshard.py", "reshard.json", "--json",
          ("--size", "2GiB", "--reps", "3", "--ops", OPS_2GIB), ("--size", "64MiB", "--reps", "1"),
          "docs/transform.md"),
    # Output folders stay until the outputs are checked: 2 sources + 4 outputs of 8.6 GB here.
    Bench("reshard-8GiB", "bench_reshard.py", "reshard.json", "--json",
          ("--size", "8GiB", "--reps", "3", "--ops", "floor,merge,merge_dedup,reshard,ms_unified"),
          None, "docs/transform.md"),
    Bench("processes", "bench_reshard.py", "processes.json", "--json",
          ("--size", "1GiB", "--many-tensors", "--skip-mindspore", "--reps", "3", "--ops",
           "floor,merge_sharded,merge_sharded_p2,reshard,reshard_p2"),
          ("--size", "64MiB", "--many-tensors", "--skip-mindspore", "--reps", "1", "--ops",
           "floor,merge_sharded,merge_sharded_p2"),
          "docs/transform.md"),
    Bench("save", "bench_save.py", "save.json", "--out", ("--rounds", "5"),
          ("--rounds", "2", "--hidden", "64", "--vocab", "1000"), "docs/checkpoint-saving.md"),
    Bench("load_async", "bench_load_async.py", "load_async.json", "--json",
          ("--size", "400MiB", "--reps", "3"), ("--size", "16MiB", "--reps", "1"),
          "docs/checkpoint-loading.md"),
    Bench("load_async_until_load", "bench_load_async.py", "load_async_until_load.json", "--json",
          ("--size", "400MiB", "--reps", "4", "--until", "load"),
          ("--size", "16MiB", "--reps", "1", "--until", "load"), "docs/checkpoint-loading.md"),
    Bench("startup", "bench_startup.py", "startup.json", "--json",
          ("--size", "1.35GB", "--rounds", "3"),
          ("--size", "16MiB", "--rounds", "1", "--work", "/tmp/mfst_bench_startup_quick"),
          "docs/checkpoint-loading.md"),
    Bench("convert", "bench_convert.py", "convert.json", "--json",
          ("--size", "1.35GB", "--rounds", "5"),
          ("--size", "16MiB", "--rounds", "1", "--work", "/tmp/mfst_bench_startup_quick"),
          "docs/checkpoint-loading.md"),
    # against 2ba7c0a, the code before the planning work of the 2026-12-02 sessions, measured
    # round for round in the same run (the machine's speed drifts between runs), and both
    # codes' planning instructions counted under valgrind (a measure the drift cannot move)
    Bench("many_tensors", "bench_many_tensors.py", "many_tensors.json", "--json",
          ("--rounds", "9", "--against", "2ba7c0a", "--instructions"),
          ("--tensors", "200", "--few", "10", "--rounds", "1", "--work",
           "/tmp/mfst_bench_many_quick"), "docs/checkpoint-loading.md"),
    # the same in a process that imported MindSpore, as the load hook's (the cyclic collector)
    Bench("many_tensors_mindspore", "bench_many_tensors.py", "many_tensors_mindspore.json",
          "--json", ("--rounds", "9", "--mindspore", "--against", "2ba7c0a"),
          ("--tensors", "200", "--few", "10", "--rounds", "1", "--mindspore", "--work",
           "/tmp/mfst_bench_many_quick"), "docs/checkpoint-loading.md"),
    # msrun with 2 workers (dp2) and 4 (dp2 x mp2): minutes of launch each, even when small.
    Bench("balanced_load", "bench_balanced_load.py", "balanced_load.json", "--json",
          ("--size", "128MiB", "--reps", "3", "--four"), ("--size", "8MiB", "--reps", "1"),
          "docs/checkpoint-loading.md"),
    Bench("crash_stress", "crash_stress.py", "crash_stress.json", "--out",
          ("--trials", "50", "--budget", "2700", "--dir", "/tmp"),
          ("--trials", "1", "--modes", "sync1"), "docs/checkpoint-saving.md"),
    # the second crash stress run (after the async-save rework), with its own seed and folder
    Bench("crash_stress_run2", "crash_stress.py", "crash_stress_run2.json", "--out",
          ("--trials", "50", "--parallel", "5", "--budget", "2700", "--seed", "2", "--dir",
           "/tmp/cs2"), None, "docs/checkpoint-saving.md"),
]


def runs_of(data: dict, bench: Bench, quick: bool = False) -> Optional[dict]:
    """The part of a benchmark JSON that one command wrote (the keyed run, or the whole file)."""
    key = bench.key(quick)
    return data if key is None else (data.get("runs") or {}).get(key)


def _fmt_load(prov: dict) -> str:
    start, end = prov.get("loadavg_start") or {}, prov.get("loadavg_end") or {}
    return f"{start.get('1min')} → {end.get('1min')}"


def _fmt_cache(cache) -> str:
    if isinstance(cache, dict) and "evictions" in cache:
        how = "+".join(cache["method"]) if isinstance(cache.get("method"), list) else "evicted"
        return (f"{how}: {cache['achieved']}/{cache['evictions']} evictions left 0 bytes resident"
                f"{'' if cache['achieved'] == cache['evictions'] else ' (others did not)'}")
    if isinstance(cache, dict):       # one record per part of the run
        return "; ".join(f"{part}: {_fmt_cache(c)}" for part, c in cache.items())
    return str(cache)


def readme_text(out_dir: str = DOCS_BENCH, quick: bool = False) -> str:
    """docs/bench/README.md as read from the JSONs in `out_dir` (deterministic: no clock)."""
    lines = ["# Benchmark results", "",
             "Generated by `benchmarks/run_all.py` from the JSONs' own provenance headers "
             "(`benchmarks/provenance.py`); do not edit by hand — re-run",
             "`.venv/bin/python benchmarks/run_all.py --readme-only` after any benchmark.", "",
             "| JSON (run) | figure | written by | date (UTC) | commit | load 1 min start → end "
             "| cache | quoted in |",
             "|---|---|---|---|---|---|---|---|"]
    for b in BENCHES:
        if quick and b.quick is None:
            continue
        path = os.path.join(out_dir, b.json)
        label = b.json + (f" (`{b.key(quick)}`)" if b.key(quick) else "")
        png = b.json[:-len(".json")] + ".png"
        figure = png if os.path.exists(os.path.join(out_dir, png)) else "–"
        data = json.load(open(path)) if os.path.exists(path) else None
        run = runs_of(data, b, quick) if data is not None else None
        prov = (run or {}).get("provenance")
        if run is None:
            row = [label, figure, f"`{' '.join(['benchmarks/' + b.script, *b.args])}`",
                   "**missing** (not run)", "–", "–", "–", b.docs]
        elif not prov:
            row = [label, figure, f"`{' '.join(['benchmarks/' + b.script, *b.args])}`",
                   "**no provenance** (an older script; re-run this command)", "–", "–", "–",
                   b.docs]
        else:
            # (runs recorded before provenance made paths relative named them absolutely)
            cmd = " ".join(a[a.index("docs/bench/"):] if "/docs/bench/" in a else a
                           for a in prov.get("command") or [])
            script = prov.get("script") or {}
            commit = (script.get("commit") or "?")[:10] + (" (dirty)" if script.get("dirty") else "")
            row = [label, figure, f"`{cmd}`", prov["date_start"].replace("+00:00", ""), commit,
                   _fmt_load(prov), _fmt_cache(prov.get("cache")), b.docs]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Machine of each run: the `machine` field of its provenance (CPU count and "
              "model, memory, kernel, the filesystem of the bench folder), read at run time.", ""]
    return "\n".join(lines)


def write_readme(out_dir: str, quick: bool = False) -> str:
    """Write README.md (and the reshard and startup charts, when matplotlib is there) into `out_dir`."""
    reshard = os.path.join(out_dir, "reshard.json")
    if os.path.exists(reshard):
        from chart_reshard import chart
        chart(reshard, os.path.join(out_dir, "reshard.png"))
    startup = os.path.join(out_dir, "startup.json")
    if os.path.exists(startup):
        import chart_startup
        chart_startup.chart(startup, os.path.join(out_dir, "startup.png"))
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as fh:
        fh.write(readme_text(out_dir, quick))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run of every script")
    ap.add_argument("--only", default=None,
                    help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--out", default=None,
                    help=f"output folder (default {os.path.relpath(DOCS_BENCH, ROOT)}; "
                         f"with --quick {QUICK_OUT})")
    ap.add_argument("--reps", type=int, default=None,
                    help="replace each command's --reps/--rounds/--trials (fewer on a loaded machine)")
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out or (QUICK_OUT if args.quick else DOCS_BENCH))
    os.makedirs(out, exist_ok=True)
    names = args.only.split(",") if args.only else [b.name for b in BENCHES]
    unknown = set(names) - {b.name for b in BENCHES}
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {sorted(unknown)}")
    failed = []
    if not args.readme_only:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for b in BENCHES:
            if b.name not in names or (args.quick and b.quick is None):
                continue
            cmd = b.command(out, args.quick, args.reps)
            print(f"== {b.name}: {' '.join(cmd[1:])} (load {provenance.loadavg()['1min']})",
                  flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            print(f"== {b.name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc != 0:
                failed.append(b.name)
    print(f"README: {write_readme(out, args.quick)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
