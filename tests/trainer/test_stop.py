"""Stopping a training run through run_mindformer.py: SIGTERM with use_graceful_exit finishes the
step, saves and commits it and exits 0, and a resume continues from it; without it SIGTERM is
exit 143 with one line; exception_save saves the last completed step before an exception in the
next one propagates (fault injected with MFST_FAULT_RAISE_AT_STEP)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mindformers_st.records.commit import load_committed_entries
from tests.test_run_failures import ROOT, _env, one_error_line, run_job, train_args

pytestmark = pytest.mark.slow
STEP = re.compile(r"global step:\[(\d+)/")


def start(data, out, *args, env=None):
    """run_mindformer.py in the background, output to out.log; returns (Popen, log path)."""
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "run.log")
    cmd = [sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config",
           os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml"),
           "--use_parallel", "False", "--output_dir", str(out),
           "--processor.tokenizer.tokenizer_file", str(data / "tokenizer.json")] + list(args)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=str(out), stdout=fh, stderr=subprocess.STDOUT,
                                env=_env(**(env or {})))
    return proc, log


def wait_for_step(proc, log, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log):   # msrun creates its worker logs a moment after starting
            with open(log, errors="replace") as fh:
                if any(int(s) >= step for s in STEP.findall(fh.read())):
                    return
        time.sleep(0.1)
    proc.kill()
    text = open(log, errors="replace").read() if os.path.exists(log) else "(no log)"
    raise AssertionError(f"step {step} never came:\n" + text[-3000:])


def test_sigterm_with_use_graceful_exit_saves_the_step_exits_0_and_resume_continues(
        tiny_run_data, tmp_path):
    out = tmp_path / "run"
    proc, log = start(tiny_run_data, out, *train_args(tiny_run_data, 200, 50),
                      "--use_graceful_exit", "True")
    wait_for_step(proc, log, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
    text = open(log).read()
    reached = max(int(s) for s in STEP.findall(text))
    assert reached >= 2 and f"stopped after global step {reached}, which is saved and committed" in text
    assert reached < 50   # stopped by the signal, not by a scheduled save
    assert [e.global_step for e in load_committed_entries(str(out / "checkpoint"))] == [reached]
    # the resume continues from that very step
    code, stdout, err = run_job(tiny_run_data, tmp_path / "resumed",
                                *train_args(tiny_run_data, reached + 2, 50), "--resume_training", "True",
                                "--load_checkpoint", str(out / "checkpoint"))
    assert code == 0, err[-3000:]
    assert sorted(int(s) for s in STEP.findall(stdout)) == [reached + 1, reached + 2]


def test_sigterm_without_graceful_exit_is_143_and_one_line(tiny_run_data, tmp_path):
    proc, log = start(tiny_run_data, tmp_path / "run", *train_args(tiny_run_data, 200, 50))
    wait_for_step(proc, log, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    line = one_error_line(open(log).read())
    assert "terminated (SIGTERM)" in line and "use_graceful_exit" in line


def test_exception_save_commits_the_last_completed_step_before_the_error(tiny_run_data, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_job(tiny_run_data, out, *train_args(tiny_run_data, 6, 2),
                                "--callbacks.1.exception_save", "True",
                                env={"MFST_FAULT_RAISE_AT_STEP": "4"})
    assert code == 1 and "fault injected at global step 4" in err
    assert "exception_save: RuntimeError stopped the run; saved and committed global step 3" in stdout
    # step 2 by the schedule, step 3 (the state before the failing step) by exception_save
    entries = load_committed_entries(str(out / "checkpoint"))
    assert [e.global_step for e in entries] == [2, 3]
    assert "exception_save' = True has no effect" not in err   # a key with effect now


def test_sigterm_to_the_msrun_launcher_stops_both_workers_after_the_same_saved_step(
        tiny_run_data, tmp_path):
    from tests.conftest import free_port, kill_tagged
    out, logs = tmp_path / "out", tmp_path / "log"
    cmd = " ".join([os.path.join(ROOT, "run_mindformer.py"), "--config",
                    os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml"),
                    "--use_parallel", "True", "--output_dir", str(out),
                    "--processor.tokenizer.tokenizer_file", str(tiny_run_data / "tokenizer.json"),
                    "--use_graceful_exit", "True"] + train_args(tiny_run_data, 300, 100))
    tag = f"{os.getpid()}-{time.time_ns()}"
    env = dict(_env(E2E_KILL_TAG=tag), PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    with open(tmp_path / "launcher.out", "wb") as fh:
        proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), cmd,
                                 "2", str(free_port()), str(logs), "True", "300"],
                                cwd=str(tmp_path), env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for_step(proc, str(logs / "worker_0.log"), 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, open(tmp_path / "launcher.out").read()[-3000:]
    finally:
        kill_tagged(tag)
    assert "every worker saved and stopped" in open(tmp_path / "launcher.out").read()
    stopped = [re.findall(r"stopped after global step (\d+)", open(logs / f"worker_{w}.log").read())
               for w in (0, 1)]
    reached = int(stopped[0][0])
    assert stopped[1] == [] or stopped[1] == [str(reached)]   # rank 1 prints nothing (not main)
    assert [e.global_step for e in load_committed_entries(str(out / "checkpoint"))] == [reached]
