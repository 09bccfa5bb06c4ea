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
            peaks[(size, op)] = res["peak_anon_mib"]
        checks = bench.verify(work, {"reshard": os.path.join(work, "out_reshard"),
                                     "merge": os.path.join(work, "out_merge")})
        assert all(c["ok"] for c in checks.values()), checks
    for op in ("reshard", "merge"):
        small, big = peaks[(48 << 20, op)], peaks[(192 << 20, op)]
        # 144 MiB more model must not show up as memory: allow the staging buffers' growth only
        assert big - small < 48, (op, small, big)
        assert big < 256, (op, big)
