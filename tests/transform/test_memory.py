"""The engine's memory does not grow with the model: peak anonymous memory (RssAnon of a child
process running the op) of a 48 MiB and a 192 MiB reshard differ by far less than the model."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks", "bench_reshard.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_reshard", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peak_anonymous_memory_is_flat_in_model_size(tmp_path):
    bench = _bench()
    peaks = {}
    for size in (48 << 20, 192 << 20):
        work = str(tmp_path / str(size))
        bench.generate(work, size)
        for op in ("reshard", "merge"):
            res = bench.run_child(op, work, os.path.join(work, f"out_{op}"), workers=4, timeout=240)
            assert "error" not in res, res
            peaks[(size, op)] = res["peak_pss_anon_mib"]
        checks = bench.verify(work, {"reshard": os.path.join(work, "out_reshard"),
                                     "merge": os.path.join(work, "out_merge")})
        assert all(c["ok"] for c in checks.values()), checks
    for op in ("reshard", "merge"):
        small, big = peaks[(48 << 20, op)], peaks[(192 << 20, op)]
        # 144 MiB more model must not show up as memory: allow the staging buffers' growth only
        assert big - small < 48, (op, small, big)
        assert big < 256, (op, big)


# Runs in a fresh interpreter: a warm-up merge (imports, thread arenas), then RssAnon sampled
# every millisecond from a thread while the real plan runs; prints baseline, peak and estimate.
_MEASURE = r"""
import json, sys, threading, time
from mindformers_st.transform import describe_source, execute, plan_merge, plan_stats

def anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10

src, warm, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
execute(plan_merge(describe_source(warm)), out + "_warm", workers=workers, progress=False)
plan = plan_merge(describe_source(src))
estimate = plan_stats(plan, workers=workers)["peak_buffer"]
samples, stop = [], threading.Event()

def sample():
    while not stop.is_set():
        samples.append(anon())
        time.sleep(0.001)

th = threading.Thread(target=sample)
th.start()
time.sleep(0.05)
base = min(samples)
try:
    execute(plan, out, workers=workers, progress=False)
finally:
    stop.set()
    th.join()
print(json.dumps({"baseline": base, "peak": max(samples), "estimate": estimate}))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dry_run_peak_is_the_measured_peak_with_threads_on_one_file(tmp_path, capsys):
    """8 column-split tensors merged into one shard with 4 threads: the 4 threads stage 4
    tensors of the same file at once (16 MiB each). The dry run's peak buffer must match the
    anonymous memory the run really adds, within 10 %."""
    import json
    import subprocess
    import sys

    from mindformers_st.cli import main
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.layout.param_table import ParamSpec, ParamTable
    from .helpers import make_globals, save_distributed

    def model(folder, rows, cols, n=8):
        table = ParamTable(tuple(ParamSpec(f"layer{i}.w", (rows, cols), "F32", 1)
                                 for i in range(n)), 1)
        save_distributed(str(folder), make_globals(table), table, ParallelConfig(model_parallel=4))

    model(tmp_path / "src", 1024, 4096)      # 16 MiB per tensor: staged whole (one chunk)
    model(tmp_path / "warm", 16, 64)
    root = os.path.dirname(os.path.dirname(HERE))
    workers = 4
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "src"),
                           str(tmp_path / "warm"), str(tmp_path / "out"), str(workers)],
                          capture_output=True, text=True, timeout=200, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    grown, est = res["peak"] - res["baseline"], res["estimate"]
    assert est == workers * 1024 * 4096 * 4
    assert abs(grown - est) <= 0.10 * est, (
        f"measured {grown / 2**20:.1f} MiB of anonymous memory, the dry run says "
        f"{est / 2**20:.1f} MiB")
    # the command prints that same figure
    assert main(["merge", str(tmp_path / "src"), str(tmp_path / "dry"), "--dry-run",
                 "--workers", str(workers)]) == 0
    assert f"peak buffer {est / 2**20:,.1f} MiB" in capsys.readouterr().out


def test_dry_run_peak_counts_every_thread_of_every_process(tmp_path):
    """The estimate is one staging buffer per thread even when the threads share one output file,
    never more buffers than tensors, and is summed over the processes of `--processes`."""
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.layout.param_table import ParamSpec, ParamTable
    from mindformers_st.transform import describe_source, plan_merge, plan_stats
    from .helpers import make_globals, save_distributed

    table = ParamTable(tuple(ParamSpec(f"layer{i}.w", (64, 256), "F32", 1) for i in range(8)), 1)
    save_distributed(str(tmp_path / "src"), make_globals(table), table,
                     ParallelConfig(model_parallel=4))
    one = 64 * 256 * 4                     # a column-merged tensor is staged whole
    plan = plan_merge(describe_source(str(tmp_path / "src")))
    assert len([f for f in plan.files if f.path.startswith("model-")]) == 1
    assert plan_stats(plan, workers=3)["peak_buffer"] == 3 * one
    # 16 threads, 8 weights + global_step ([30], int32: a 4-byte row range, staged) to run
    assert plan_stats(plan, workers=16)["peak_buffer"] == 8 * one + 4
    sharded = plan_merge(describe_source(str(tmp_path / "src")), max_shard_size=one)
    stats = plan_stats(sharded, workers=2, processes=2)
    assert stats["processes"] == 2 and stats["peak_buffer"] == 2 * 2 * one
