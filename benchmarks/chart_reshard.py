"""Draw docs/bench/reshard.png from docs/bench/reshard.json (nothing but the JSON goes in).

One panel per model size: median in-process seconds per op (floor grey, ours blue, MindSpore's
orange), each bar labelled with its median and the peak PSS of the process tree (anonymous / total); the panel title
gives the run's date, commit, load average at start/end and whether the cache eviction was achieved.
Needs matplotlib (the `bench` extra); without it prints why and draws nothing.

    .venv/bin/python benchmarks/chart_reshard.py [docs/bench/reshard.json] [--png PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_reshard import MS_OPS, OPS  # noqa: E402


def _title(key: str, run: dict) -> str:
    prov = run.get("provenance") or {}
    cache = prov.get("cache") or {}
    evicted = (f"cache evicted {cache['achieved']}/{cache['evictions']}" if cache
               else "cache: not recorded")
    start, end = prov.get("loadavg_start", {}), prov.get("loadavg_end", {})
    load = (f"load {start.get('1min')}→{end.get('1min')}" if start else "load: not recorded")
    script = prov.get("script") or {}
    commit = (script.get("commit") or "?")[:7] + ("+dirty" if script.get("dirty") else "")
    return (f"{key} fp32, {run['reps']} round(s), {evicted}, commit {commit}\n"
            f"{prov.get('date_start', '?')[:16]}, {load}; labels: peak PSS anonymous / total")


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None (and why, on stderr) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]); no chart", file=sys.stderr)
        return None
    return plt


def chart(json_path: str, png_path: str) -> Optional[str]:
    """Write the chart of `json_path` to `png_path`; returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    with open(json_path) as fh:
        results = json.load(fh)
    sizes = sorted(results["runs"], key=lambda k: results["runs"][k]["model"]["bytes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.6), squeeze=False)
    for ax, key in zip(axes[0], sizes):
        run = results["runs"][key]
        ops = [o for o in OPS if o in run["ops"] and run["ops"][o].get("median") is not None]
        meds = [run["ops"][o]["median"] for o in ops]
        colors = ["grey" if o == "floor" else ("tab:orange" if o in MS_OPS else "tab:blue")
                  for o in ops]
        ax.bar(ops, meds, color=colors)
        for i, o in enumerate(ops):
            pss, anon = run["ops"][o].get("peak_pss_mib"), run["ops"][o].get("peak_pss_anon_mib")
            label = f"{meds[i]:.2f}s" + (f"\n{anon:.0f} / {pss:.0f} MiB" if pss is not None else "")
            ax.text(i, meds[i], label, ha="center", va="bottom", fontsize=7)
        ax.set_title(_title(key, run), fontsize=9)
        ax.set_ylabel("seconds (median, in-process)")
        ax.set_ylim(0, max(meds) * 1.25 if meds else 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default=os.path.join(ROOT, "docs", "bench", "reshard.json"))
    ap.add_argument("--png", default=None, help="default: the JSON's path with .png")
    args = ap.parse_args(argv)
    png = chart(args.json, args.png or os.path.splitext(args.json)[0] + ".png")
    if png:
        print(f"chart: {png}")
    return 0 if png else 1


if __name__ == "__main__":
    sys.exit(main())
