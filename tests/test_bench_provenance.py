"""benchmarks/provenance.py measures what it says: eviction checked by mincore, PSS not double-counted."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, mincore: Linux")


def test_eviction_is_reported_as_achieved_only_when_mincore_finds_no_page(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4 << 20))
    path.read_bytes()
    if provenance.resident_bytes(str(path)) == 0:
        pytest.skip("written pages are not resident here; nothing to evict")
    rec = provenance.evict([str(path)])
    if rec["resident_after"]:
        pytest.skip("this filesystem keeps file pages resident (tmpfs?)")
    assert rec["achieved"] and rec["attempted"] == ["fadvise_dontneed"] and rec["bytes"] == 4 << 20
    path.read_bytes()
    assert provenance.resident_bytes(str(path)) == 4 << 20
    # A run's summary counts the evictions that left pages behind, not just those attempted.
    summary = provenance.summarize_evictions([rec, dict(rec, resident_after=4096, achieved=False)])
    assert summary["achieved"] == 1 and summary["evictions"] == 2
    assert summary["max_resident_after"] == 4096


def test_pss_of_a_forked_tree_counts_shared_pages_once():
    code = textwrap.dedent("""
        import os, sys, time
        block = b"x" * (64 << 20)          # touched, then shared copy-on-write by the fork
        pid = os.fork()
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        time.sleep(1.5)
        if pid:
            os.waitpid(pid, 0)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    with provenance.TreePss(proc.pid, interval=0.05) as mem:
        proc.wait()
    got = mem.result()
    assert got["max_processes"] == 2
    assert got["peak_rss_anon_sum_mib"] >= 2 * 64          # the old measure: counted twice
    assert 64 <= got["peak_pss_anon_mib"] < 0.75 * got["peak_rss_anon_sum_mib"]


def test_a_run_header_carries_every_provenance_field(tmp_path):
    run = provenance.Run(str(tmp_path), ["bench.py", "--x"])
    header = run.finish(cache="not evicted")
    assert set(provenance.FIELDS) <= set(header)
    assert header["machine"]["cpus"] == os.cpu_count()
    assert header["machine"]["bench_dir"]["fstype"]
    assert len(header["script"]["commit"] or "") in (0, 40)
    assert header["date_start"] <= header["date_end"]
