"""Offline tools end cleanly on signals and closed pipes: SIGTERM exits 143 and SIGINT 130 with
one line and nothing at the destination; a staging folder left by a killed run (SIGKILL) is
removed by the next run; `inspect | head` ends quietly."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.transform.helpers import make_globals, save_distributed, tiny_table
from mindformers_st.layout.parallel_config import ParallelConfig

BIN = os.path.join(os.path.dirname(sys.executable), "mindformers-st")


@pytest.fixture
def src(tmp_path):
    table = tiny_table(layers=4)
    save_distributed(str(tmp_path / "src"), make_globals(table), table,
                     ParallelConfig(model_parallel=2))
    return tmp_path


def _start_merge(tmp_path, pause="2", processes=1):
    env = dict(os.environ, MFST_FAULT_PAUSE_AFTER_FILE=pause)
    proc = subprocess.Popen([BIN, "merge", str(tmp_path / "src"), str(tmp_path / "out"),
                             "--no-progress", "--max-shard-size", "1KB", "--workers", "1",
                             "--processes", str(processes)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:   # wait until the first output file is committed
        staging = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
        if staging and any(f.endswith(".safetensors")
                           for f in os.listdir(tmp_path / staging[0])):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the merge never wrote its first file")


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_merge_leaves_nothing_and_one_line(src, sig, code, word, processes):
    proc = _start_merge(src, processes=processes)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    lines = [l for l in err.splitlines() if l.startswith("error:") or "Traceback" in l]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in err
    assert not (src / "out").exists()
    assert not [n for n in os.listdir(src) if n.startswith(".out.tmp-")]


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(src):
    proc = _start_merge(src)
    proc.kill()                     # SIGKILL: no handler runs, the staging folder stays
    proc.wait(timeout=30)
    assert [n for n in os.listdir(src) if n.startswith(".out.tmp-")]
    done = subprocess.run([BIN, "merge", str(src / "src"), str(src / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "did not finish" in done.stderr
    assert not [n for n in os.listdir(src) if n.startswith(".out.tmp-")]


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    table = tiny_table(layers=300)     # a listing far larger than the pipe's buffer
    save_distributed(str(tmp_path / "big"), make_globals(table), table,
                     ParallelConfig(model_parallel=2))
    shell = subprocess.run(f"'{BIN}' inspect '{tmp_path / 'big'}' | head -n 2", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and len(shell.stdout.splitlines()) == 2
    assert "error" not in shell.stderr and "Broken" not in shell.stderr, shell.stderr
    assert "Traceback" not in shell.stderr
