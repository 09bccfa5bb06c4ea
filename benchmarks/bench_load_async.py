"""Benchmark: time from launch to the first training step, with and without `load_ckpt_async`.

Builds the tiny tokenizer and dataset, writes complete weights (with checksums) for a Llama of
about --size bytes in fp32, then launches `run_mindformer.py` on one card (`--use_parallel
False`) finetuning one step from them, alternating `load_ckpt_async: False` and `True` for
--reps rounds. Before every launch the weight files are evicted from the page cache
(posix_fadvise DONTNEED), so the read is a cold read, as after a fresh copy to the node.
Measured per launch: seconds from `Popen` to the `[load_checkpoint]` line and to the first
`global step:[1/...]` line, and with async the run's own account of the read (its seconds, how
many of them overlapped building the network, how long the main thread waited); the first step's loss must be the same string in both modes (the
same parameters). Results: --json (default docs/bench/load_async.json). Usage:

    .venv/bin/python benchmarks/bench_load_async.py [--size 400MiB] [--reps 3] [--until load]
"""
from __future__ import annotations

import argparse
import json
import os
import re
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

import provenance  # noqa: E402

from mindformers_st.commands.reshard import parse_size  # noqa: E402
from mindformers_st.models.config import LlamaConfig  # noqa: E402
from mindformers_st.models.param_table import llama_param_table  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
LOSS = re.compile(r"global step:\[1/\d+\], loss: ([0-9.]+)")
OVERLAP = re.compile(r"read and checked in ([0-9.]+) s on a background thread, ([0-9.]+) s of it "
                     r"while the network was built \(waited ([0-9.]+) s\)")


def model_overrides(size: int) -> dict:
    """model_config keys for a Llama of about `size` bytes in fp32 (vocab 512: the tiny
    tokenizer's)."""
    hidden, inter = 1024, 2816
    layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
    layers = max(1, round(size / layer))
    return {"vocab_size": 512, "hidden_size": hidden, "num_layers": layers, "num_heads": 16,
            "intermediate_size": inter, "seq_length": 64}


def prepare(work: str, size: int) -> dict:
    """Tokenizer, dataset and complete weights under `work` (reused when present)."""
    from mindformers_st.storage.index import write_index
    from mindformers_st.storage.writer import save_tensors
    mc = model_overrides(size)
    stamp = os.path.join(work, "model.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == mc:
        return mc
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    assets = os.path.join(ROOT, "mindformers_st", "data", "assets")
    tok = os.path.join(work, "tokenizer.json")
    for args in (["train-tokenizer", "--input", f"{assets}/tiny_corpus.txt", "--vocab_size", "512",
                  "--output", tok],
                 ["pretrain", "--input", f"{assets}/tiny_corpus.txt", "--tokenizer", tok,
                  "--seq_length", "64", "--output", os.path.join(work, "wiki.mindrecord")]):
        subprocess.run([sys.executable, "-m", "mindformers_st.data", *args], check=True,
                       cwd=ROOT, capture_output=True, timeout=300)
    table = llama_param_table(LlamaConfig.from_dict(dict(mc)))
    rng = np.random.default_rng(0)
    folder = os.path.join(work, "weights")
    os.makedirs(folder)
    weight_map, total = {}, 0
    per_shard = 8
    params = list(table)
    for k in range(0, len(params), per_shard):
        name = f"model-{k // per_shard + 1:05d}-of-{(len(params) + per_shard - 1) // per_shard:05d}.safetensors"
        values = {p.name: (rng.standard_normal(p.shape, dtype=np.float32) * 0.02)
                  for p in params[k:k + per_shard]}
        path = save_tensors(os.path.join(folder, name), values)
        total += os.path.getsize(path)
        weight_map.update((n, name) for n in values)
    write_index(folder, "ms", weight_map, total)
    json.dump(mc, open(stamp, "w"))
    return mc


def evict(folder: str) -> dict:
    """Drop the weight files from the page cache (a cold read, as after a fresh copy); returns
    what was attempted and how many bytes stayed resident (provenance.evict)."""
    return provenance.evict([os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs])


def launch(work: str, mc: dict, async_load: bool, timeout: float, until: str = "step") -> dict:
    """One run to its first step (`until` "step") or until its weights are set ("load": the
    `[load_checkpoint]` line, after which the first step runs the same work in both modes);
    returns the seconds to the load line and to the first step."""
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config", CONFIG,
           "--run_mode", "finetune", "--use_parallel", "False",
           "--train_dataset_dir", os.path.join(work, "wiki.mindrecord"),
           "--processor.tokenizer.tokenizer_file", os.path.join(work, "tokenizer.json"),
           "--load_checkpoint", os.path.join(work, "weights"), "--output_dir", out,
           "--parallel_config.data_parallel", "1", "--runner_config.train_steps", "1",
           "--callbacks.0.per_print_times", "1", "--callbacks.1.save_checkpoint_steps", "1000",
           "--load_ckpt_async", str(async_load)]
    for k, v in mc.items():
        cmd += [f"--model.model_config.{k}", str(v)]
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    memory = provenance.TreePss(proc.pid).start()     # PSS of the job's process tree
    res = {"async": async_load}
    tail = []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-30:]
            now = time.perf_counter() - t0
            m = OVERLAP.search(line)
            if m:
                res["read_seconds"], res["hidden_seconds"], res["waited_seconds"] = (
                    float(x) for x in m.groups())
            if "[load_checkpoint] loaded" in line and "load_seconds" not in res:
                res["load_seconds"] = round(now, 3)
                if until == "load":
                    break
            m = LOSS.search(line)
            if m:
                res["first_step_seconds"] = round(now, 3)
                res["loss"] = m.group(1)
                res["step_line"] = line.strip()[-200:]
                break
            if now > timeout:
                break
    finally:
        res.update(memory.stop())
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the step is all we time
        except ProcessLookupError:
            pass
        proc.wait()
    if ("first_step_seconds" if until == "step" else "load_seconds") not in res:
        res["error"] = "".join(tail)[-2000:]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="400MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mindformers_st_bench_async")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "bench", "load_async.json"))
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--until", choices=["step", "load"], default="step",
                    help="time to the first step's loss line (default), or only until the "
                         "weights are set (the first step is the same work in both modes)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    work = os.path.abspath(args.work)
    prov = provenance.Run(os.path.dirname(work), [os.path.relpath(__file__, ROOT)] +
                          (sys.argv[1:] if argv is None else list(argv)))
    mc = prepare(work, size)
    params = sum(p.numel for p in llama_param_table(LlamaConfig.from_dict(dict(mc))))
    print(f"model {mc} ({params / 1e6:.1f} M parameters, {params * 4 / 2 ** 20:.0f} MiB fp32)",
          flush=True)
    runs, evictions = [], []
    for rep in range(args.reps):
        for mode in (False, True):   # interleaved: both modes see the same machine state
            evictions.append(evict(os.path.join(work, "weights")))
            load1 = prov.note_load()
            res = launch(work, mc, mode, args.timeout, args.until)
            res.update(load1_at_start=load1, resident_at_start=evictions[-1]["resident_after"])
            runs.append(res)
            print(f"rep {rep} load_ckpt_async={mode}: {res}", flush=True)
    summary = {}
    for mode in (False, True):
        good = [r for r in runs if r["async"] == mode and "error" not in r]
        steps = [r["first_step_seconds"] for r in good if "first_step_seconds" in r]
        summary[str(mode)] = {
            "first_step_median": statistics.median(steps) if steps else None,
            "load_line_median": statistics.median([r["load_seconds"] for r in good])
            if good else None,
            "load_line": [r["load_seconds"] for r in good],
            "read_seconds": [r["read_seconds"] for r in good if "read_seconds" in r],
            "hidden_seconds": [r["hidden_seconds"] for r in good if "hidden_seconds" in r],
            "first_step": steps,
            "peak_pss_mib": max((r["peak_pss_mib"] for r in good), default=None),
            "losses": sorted({r["loss"] for r in good if "loss" in r})}
    same = summary["True"]["losses"] == summary["False"]["losses"] and \
        len(summary["True"]["losses"]) <= 1
    result = {"model": mc, "parameters": params, "reps": args.reps, "until": args.until,
              "runs": runs,
              "summary": summary, "same_first_loss": same,
              "provenance": prov.finish(cache=provenance.summarize_evictions(evictions))}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({"summary": summary, "same_first_loss": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
