"""scripts/msrun_launcher.sh: the 1/2/6/9-argument forms, failures, timeouts, multi-node on one machine.

Workers are tiny scripts; only the collective tests import MindSpore in the workers. Every run
uses a free port and a timeout, so a hung job never hangs the suite.
"""
import os
import subprocess
import textwrap
import time

import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "scripts", "msrun_launcher.sh")
PLAIN_WORKER = """
import os, sys
out = sys.argv[1]
with open(os.path.join(out, "rank_%s.txt" % os.environ.get("RANK_ID", "?")), "w") as fh:
    fh.write(" ".join(sys.argv[2:]))
if "--fail" in sys.argv and os.environ.get("RANK_ID") == "1":
    raise RuntimeError("worker 1 fails on purpose")
if "--fail" in sys.argv:   # the other worker would run on: the launcher ends the job
    print("[INFO] DISTRIBUTED(1,2,python): Event base dispatch success!", flush=True)
    import time
    time.sleep(120)
if "--hang" in sys.argv:
    with open(os.path.join(out, "pid_%s.txt" % os.environ.get("RANK_ID")), "w") as fh:
        fh.write(str(os.getpid()))
    import time
    time.sleep(3600)
"""
COLLECTIVE_WORKER = """
import os, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.communication import init, get_rank, get_group_size
ms.set_device("CPU")
init()
total = ops.AllReduce()(Tensor(np.array([get_rank() + 1.0], np.float32))).asnumpy()[0]
with open(os.path.join(sys.argv[1], "rank_%d.txt" % get_rank()), "w") as fh:
    fh.write("%d %d %g" % (get_rank(), get_group_size(), total))
"""


def launch(args, cwd, timeout=240, env_extra=None):
    env = dict(os.environ)
    env["PATH"] = os.path.join(ROOT, ".venv", "bin") + os.pathsep + env["PATH"]
    env.update(env_extra or {})
    return subprocess.run(["bash", LAUNCHER, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "plain.py").write_text(textwrap.dedent(PLAIN_WORKER))
    (tmp_path / "coll.py").write_text(textwrap.dedent(COLLECTIVE_WORKER))
    (tmp_path / "out").mkdir()
    return tmp_path


def ranks_written(out):
    return sorted(f for f in os.listdir(out) if f.startswith("rank_"))


@pytest.mark.parametrize("args", [[], ["a", "2", "3"], ["a", "2", "3", "4", "5", "6", "7"]])
def test_wrong_argument_count_prints_usage(work, args):
    res = launch(args, work, timeout=30)
    assert res.returncode == 2
    assert "expected 1, 2, 6 or 9 arguments" in res.stderr and "Usage" in res.stderr


def test_a_tail_worker_that_does_not_exist_is_refused(work):
    res = launch(["plain.py out", "2"], work, timeout=30, env_extra={"MF_TAIL_WORKER_LOG": "2"})
    assert res.returncode == 2 and "MF_TAIL_WORKER_LOG=2 must be 'all' or a local worker 0..1" in res.stderr


def test_non_numeric_worker_num_is_refused(work):
    res = launch(["plain.py out", "two"], work, timeout=30)
    assert res.returncode == 2 and "WORKER_NUM=two" in res.stderr


@pytest.mark.slow
def test_one_argument_form_runs_default_8_workers(work):
    res = launch(["python plain.py out"], work, env_extra={"MF_MASTER_PORT": str(free_port())})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "default 8 workers" in res.stdout
    assert ranks_written(work / "out") == [f"rank_{r}.txt" for r in range(8)]
    assert os.path.isdir(work / "output" / "msrun_log")       # MindSpore Transformers' default


@pytest.mark.slow
def test_two_argument_form_keeps_quoted_prompts_whole(work):
    res = launch(["plain.py out --predict_data 'I love Beijing, because'", "2"], work,
                 env_extra={"MF_MASTER_PORT": str(free_port())})
    assert res.returncode == 0, res.stdout + res.stderr
    for r in (0, 1):
        assert (work / "out" / f"rank_{r}.txt").read_text() == "--predict_data I love Beijing, because"


@pytest.mark.slow
def test_six_argument_form_runs_a_real_collective(work):
    res = launch(["coll.py out", "2", str(free_port()), "logs6", "True", "120"], work)
    assert res.returncode == 0, res.stdout + res.stderr
    texts = sorted((work / "out" / f).read_text() for f in ranks_written(work / "out"))
    assert texts == ["0 2 3", "1 2 3"]                 # 1 + 2 summed over both ranks
    assert os.path.isfile(work / "logs6" / "worker_1.log")


@pytest.mark.slow
def test_failing_worker_fails_the_launch_promptly_with_one_line(work):
    t0 = time.time()
    res = launch(["plain.py out --fail", "2", str(free_port()), "logsf", "True", "300"], work)
    took = time.time() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if "fails on purpose" in l]
    assert lines == ["error: rank 1 failed: RuntimeError: worker 1 fails on purpose "
                     "(log logsf/worker_1.log)"], res.stderr
    # no msrun traceback, no MindSpore INFO line, the other worker's sleep not waited for
    assert "Traceback" not in res.stderr and "Distributed job exited" not in res.stderr
    assert "Event base dispatch" not in res.stdout + res.stderr
    assert took < 60, took
    assert "Event base dispatch" in (work / "logsf" / "worker_0.log").read_text()   # kept in its log


@pytest.mark.slow
def test_hung_worker_is_killed_by_the_timeout(work):
    t0 = time.time()
    res = launch(["plain.py out --hang", "2", str(free_port()), "logsh", "True", "60"], work,
                 env_extra={"MF_LAUNCH_TIMEOUT": "15"}, timeout=120)
    assert res.returncode == 124, res.stdout + res.stderr
    assert "MF_LAUNCH_TIMEOUT=15s" in res.stderr
    assert time.time() - t0 < 90
    time.sleep(1)
    for r in (0, 1):
        pid = int((work / "out" / f"pid_{r}.txt").read_text())
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"worker {r} ({pid}) still alive"


@pytest.mark.slow
def test_nine_argument_form_two_nodes_on_one_machine_form_one_job(work):
    port = str(free_port())
    env = dict(os.environ)
    env["PATH"] = os.path.join(ROOT, ".venv", "bin") + os.pathsep + env["PATH"]
    procs = [subprocess.Popen(["bash", LAUNCHER, "coll.py out", "2", "1", "127.0.0.1", port,
                               str(node), f"logs_node{node}", "True", "120"],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o + e
    texts = sorted((work / "out" / f).read_text() for f in ranks_written(work / "out"))
    assert texts == ["0 2 3", "1 2 3"]
    assert os.path.isfile(work / "logs_node1" / "worker_1.log")
    assert not os.path.exists(work / "logs_node1" / "scheduler.log")   # only node 0 schedules
