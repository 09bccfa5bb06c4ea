"""Draw docs/bench/startup.png from docs/bench/startup.json (nothing but the JSON goes in).

One panel per cache state (warm, cold): for each load source, the median seconds after the
network is built, stacked as the load itself and the first step's touches (first read + first
write: where a mapped load pays its page faults), for ours as a load to predict (mapped pages),
ours as a load for training (copied once) and MindSpore's nearest equivalent. The title gives
the run's date, commit, load average and the cache evictions achieved. Needs matplotlib (the
`bench` extra); without it prints why and draws nothing.

    .venv/bin/python benchmarks/chart_startup.py [docs/bench/startup.json] [--png PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from chart_reshard import pyplot  # noqa: E402

SIDES = [("ours", "ours: load to predict (file pages)", "#1f77b4"),
         ("ours_copy", "ours: load for training (one copy)", "#6baed6"),
         ("mindspore", "MindSpore", "#ff7f0e")]


def chart(json_path: str, png_path: str) -> Optional[str]:
    """Write the chart of `json_path` to `png_path`; returns the path, or None without matplotlib
    or when the JSON predates the two-sided format."""
    plt = pyplot()
    if plt is None:
        return None
    with open(json_path) as fh:
        doc = json.load(fh)
    results = doc.get("results") or {}
    if not results or any(side not in row for row in results.values() for side, _, _ in SIDES):
        print(f"{json_path}: not written by the current bench_startup.py; no chart",
              file=sys.stderr)
        return None
    caches = [c for c in ("warm", "cold") if any(k.endswith("/" + c) for k in results)]
    sources = [k.split("/")[0] for k in results if k.endswith("/" + caches[0])]
    fig, axes = plt.subplots(1, len(caches), figsize=(6.5 * len(caches), 5.2), squeeze=False)
    width = 0.8 / len(SIDES)
    for ax, cache in zip(axes[0], caches):
        for i, (side, label, color) in enumerate(SIDES):
            xs = [k + (i - 1) * width for k in range(len(sources))]
            load = [results[f"{s}/{cache}"][side]["load_s"]["median"] for s in sources]
            touch = [results[f"{s}/{cache}"][side]["ready_s"]["median"] - ld
                     for s, ld in zip(sources, load)]
            ax.bar(xs, load, width, color=color, label=f"{label}: load")
            ax.bar(xs, touch, width, bottom=load, color=color, alpha=0.35,
                   label=f"{label}: first read + write")
            for x, ld, t in zip(xs, load, touch):
                ax.text(x, ld + t, f"{ld + t:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sources)))
        ax.set_xticklabels(sources)
        ax.set_ylabel("seconds after the network is built (median)")
        ax.set_title(f"{cache} page cache", fontsize=10)
    prov = doc.get("provenance") or {}
    cache_rec = prov.get("cache") or {}
    evicted = (f"evictions achieved {cache_rec['achieved']}/{cache_rec['evictions']}"
               if isinstance(cache_rec, dict) and "evictions" in cache_rec else str(cache_rec))
    script = prov.get("script") or {}
    commit = (script.get("commit") or "?")[:7] + ("+dirty" if script.get("dirty") else "")
    start, end = prov.get("loadavg_start", {}), prov.get("loadavg_end", {})
    model = doc.get("model", {})
    fig.suptitle(f"time to parameters set and first touched: {model.get('tensors')} tensors, "
                 f"{model.get('bytes', 0) / 2 ** 30:.2f} GiB fp32, {doc.get('rounds')} rounds; "
                 f"commit {commit}, {prov.get('date_start', '?')[:16]}, load "
                 f"{start.get('1min')}→{end.get('1min')}, {evicted}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="?", default=os.path.join(ROOT, "docs", "bench", "startup.json"))
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    out = chart(args.json, png)
    if out:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
