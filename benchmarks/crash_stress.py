"""Crash stress: SIGKILL a real training job at random moments while it saves, then verify and resume.

Four modes: sync and async saves (`callbacks.1.async_save`), on 1 and 2 msrun workers, with
the tiny Llama of configs/llama2/pretrain_llama2_tiny.yaml saving every step (keep 2), launched
through run_mindformer.py and scripts/msrun_launcher.sh as a user would. Per mode, one
uninterrupted run measures the time between two commits; then each trial:
1. starts the job (train_steps --steps) and kills every process of it (SIGKILL) once its save
   of global step k is committed (k random in [0, steps); 0: once its monitor has begun) plus a random
   fraction of the time between two commits in that run: the kills land among the step saves, whatever
   MindSpore's start-up costs on a busy machine;
2. runs `mindformers-st verify` on the checkpoint folder: it must pass when a save is
   committed, and refuse (nothing committed) otherwise;
3. restarts the job: with `--resume_training True` when a save was committed — the restart must
   succeed and continue from the newest committed global step (its first logged step is that
   step + 1) — else without (a crash before the first commit: nothing to resume);
4. counts orphans: files in the rank folders that no committed save names after the restart
   (whose CheckpointMonitor removes the leftovers of the crash at start-up).
A trial is bad when verify or the restart disagrees with the commit record, or it resumed
another step. Prints trials, bad resumes and orphans per mode, and writes docs/bench/crash_stress.json.

    .venv/bin/python benchmarks/crash_stress.py [--trials 50] [--modes sync1,async1,sync2,async2]
                                                [--budget SECONDS]
Trials go round-robin over the modes; with --budget no new round starts once it is spent.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402

BIN = os.path.dirname(sys.executable)
CONFIG = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
STEP = re.compile(r"global step:\[(\d+)/(\d+)\]")
MODES = {"sync1": (False, 1), "async1": (True, 1), "sync2": (False, 2), "async2": (True, 2)}


def _env(tag):
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
                OMP_NUM_THREADS="1", PYTHONPATH=ROOT, E2E_KILL_TAG=tag, MF_LAUNCH_TIMEOUT="600")


def _free_port():
    from tests.conftest import free_port
    return free_port()


def _kill_tagged(tag):
    from tests.conftest import kill_tagged
    return kill_tagged(tag)


class Job:
    """One run_mindformer.py launch of a mode, its logs in `log_dir`."""

    def __init__(self, base, data, tokenizer, async_save, workers, steps):
        self.base, self.data, self.tokenizer = base, data, tokenizer
        self.async_save, self.workers, self.steps = async_save, workers, steps

    def start(self, out, log_dir, resume=False):
        args = [os.path.join(ROOT, "run_mindformer.py"), "--config", CONFIG,
                "--use_parallel", str(self.workers > 1),
                "--parallel_config.data_parallel", str(self.workers),
                "--processor.tokenizer.tokenizer_file", self.tokenizer,
                "--run_mode", "train", "--train_dataset_dir", self.data, "--output_dir", out,
                "--runner_config.train_steps", str(self.steps),
                "--callbacks.0.per_print_times", "1",
                "--callbacks.1.save_checkpoint_steps", "1",
                "--callbacks.1.keep_checkpoint_max", "2",
                "--callbacks.1.async_save", str(self.async_save)]
        if resume:
            args += ["--load_checkpoint", os.path.join(out, "checkpoint"),
                     "--resume_training", "True"]
        os.makedirs(log_dir, exist_ok=True)
        tag = f"crash-{os.getpid()}-{time.time_ns()}"
        with open(os.path.join(log_dir, "launcher.out"), "wb") as fh:
            if self.workers == 1:
                cmd = [sys.executable] + args
            else:
                cmd = ["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), " ".join(args),
                       str(self.workers), str(_free_port()), log_dir, "True", "600"]
            proc = subprocess.Popen(cmd, cwd=self.base, env=_env(tag), stdout=fh,
                                    stderr=subprocess.STDOUT)
        return proc, tag

    def run(self, out, log_dir, resume=False):
        """Run to the end: (exit code, worker 0's log)."""
        proc, tag = self.start(out, log_dir, resume)
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            _kill_tagged(tag)
        return proc.returncode, self.log(log_dir)

    def log(self, log_dir):
        name = "launcher.out" if self.workers == 1 else "worker_0.log"
        path = os.path.join(log_dir, name)
        return open(path, errors="replace").read() if os.path.exists(path) else ""


def orphans(ckpt):
    """Files (hidden temporaries included) in ckpt/rank_*/ that no committed save names."""
    from mindformers_st.records import commit as cm
    from mindformers_st.records.names import rank_folders
    named = set()
    for e in cm.load_committed_entries(ckpt):
        named |= {os.path.abspath(e.path(r)) for r in e.files}
    found = []
    for folder in rank_folders(ckpt).values():
        for n in os.listdir(folder):
            path = os.path.abspath(os.path.join(folder, n))
            if n != cm.META_FILE and path not in named:
                found.append(path)
    return sorted(found)


def calibrate(job, work):
    """An uninterrupted run: (exit code, log, seconds between two commits, seconds in all)."""
    from mindformers_st.records import commit as cm
    out = os.path.join(work, "clean")
    proc, tag = job.start(out, os.path.join(work, "clean_log"))
    t0 = time.perf_counter()
    seen = {}   # number of commits -> when first seen
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 900:
            try:
                seen.setdefault(len(cm.load_committed_entries(os.path.join(out, "checkpoint"))),
                                time.perf_counter() - t0)
            except Exception:   # not written yet
                pass
            time.sleep(0.02)
    finally:
        _kill_tagged(tag)
        proc.wait()
    duration = time.perf_counter() - t0
    counts = sorted(n for n in seen if n >= 1)
    step = ((seen[counts[-1]] - seen[counts[0]]) / (counts[-1] - counts[0])
            if len(counts) >= 2 and counts[-1] > counts[0] else 0.2)
    return proc.returncode, job.log(os.path.join(work, "clean_log")), step, duration


def trial(job, work, rng, step_s):
    """One kill + verify + restart; returns a dict describing what happened."""
    from mindformers_st.records import commit as cm
    out = os.path.join(work, "out")
    ckpt = os.path.join(out, "checkpoint")
    # Kill once the save of global step k is committed (k random; 0: once the monitor has begun) plus a
    # random fraction of a step: the kills land among the saves whatever the start-up costs.
    k = rng.randrange(job.steps)
    extra = rng.uniform(0.0, step_s)
    proc, tag = job.start(out, os.path.join(work, "killed"))
    t0 = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < 900:
        try:
            if os.path.exists(os.path.join(ckpt, cm.COMMITTED_FILE)) and \
                    max([e.global_step for e in cm.load_committed_entries(ckpt)], default=0) >= k:
                break   # (the record keeps only keep_checkpoint_max saves: compare steps)
        except Exception:   # the record appears atomically; unreadable means not yet
            pass
        time.sleep(0.02)
    time.sleep(extra)
    delay = time.perf_counter() - t0
    _kill_tagged(tag)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    entries = cm.load_committed_entries(ckpt) if os.path.isdir(ckpt) else []
    left = orphans(ckpt) if os.path.isdir(ckpt) else []
    res = {"delay_s": round(delay, 2), "after_commits": k, "extra_s": round(extra, 3),
           "committed": [e.global_step for e in entries],
           "left_by_kill": len(left), "problems": []}
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        v = subprocess.run([os.path.join(BIN, "mindformers-st"), "verify", ckpt],
                           capture_output=True, text=True, env=_env(tag), timeout=300)
        if entries and v.returncode != 0:
            res["problems"].append(f"verify failed on a committed save: {v.stderr.strip()[-300:]}")
        if not entries and v.returncode == 0 and any(f.endswith(".safetensors") for f in left):
            res["problems"].append("verify accepted a folder with no committed save")
    code, log = job.run(out, os.path.join(work, "restart"), resume=bool(entries))
    steps = [int(m.group(1)) for m in STEP.finditer(log)]
    if code != 0:
        res["problems"].append(f"restart exited {code}: {log.strip()[-400:]}")
    elif entries:
        want = entries[-1].global_step + 1
        first = steps[0] if steps else None
        if want <= job.steps and first != want:
            res["problems"].append(f"resumed at global step {first}, the newest committed save "
                                   f"is global step {want - 1}")
    res["orphans"] = orphans(ckpt) if os.path.isdir(ckpt) else []
    return res


def prepare(base):
    """The tiny tokenizer and MindRecord data (as tests/test_e2e_flows.py builds them)."""
    tokenizer = os.path.join(base, "tiny", "tokenizer.json")
    data = os.path.join(base, "tiny", "wiki.mindrecord")
    assets = os.path.join(ROOT, "mindformers_st", "data", "assets")
    for cmd in (["train-tokenizer", "--input", os.path.join(assets, "tiny_corpus.txt"),
                 "--vocab_size", "512", "--output", tokenizer],
                ["pretrain", "--input", os.path.join(assets, "tiny_corpus.txt"), "--tokenizer",
                 tokenizer, "--seq_length", "64", "--output", data]):
        subprocess.run([sys.executable, "-m", "mindformers_st.data"] + cmd, check=True, cwd=base,
                       env=_env("prep"), stdout=subprocess.DEVNULL, timeout=300)
    return data, tokenizer


_RUN = []   # the provenance.Run main() opened: date, load, machine, commit of this run


def _write(result, path, t_all):
    """Add the totals and provenance to `result` and write it to `path`; returns the totals."""
    total = {k: sum(m[k] for m in result["modes"].values())
             for k in ("trials", "bad_resumes", "orphans")}
    result.update(total, wall_s=round(time.perf_counter() - t_all), loadavg_at_end=os.getloadavg(),
                  provenance=_RUN[0].finish(cache="not evicted (kills and restarts)") if _RUN else None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per mode")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=6, help="train_steps of every job (a save each)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: start no new round of trials after this (0: no limit); the "
                         "rounds done are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "crash_stress.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_all = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="crash_stress_", dir=args.dir)
    _RUN.append(provenance.Run(scratch, [os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    data, tokenizer = prepare(scratch)
    result = {"trials_per_mode_asked": args.trials, "steps": args.steps, "modes": {}}
    jobs = {}
    for mode in args.modes.split(","):
        async_save, workers = MODES[mode]
        job = Job(scratch, data, tokenizer, async_save, workers, args.steps)
        code, log, step_s, duration = calibrate(job, os.path.join(scratch, mode))
        if code != 0:
            raise SystemExit(f"{mode}: the uninterrupted run failed (exit {code}):\n{log[-3000:]}")
        jobs[mode] = (job, step_s)
        result["modes"][mode] = {"async_save": async_save, "workers": workers,
                                 "job_s": round(duration, 1), "step_s": round(step_s, 3),
                                 "trials": 0, "bad_resumes": 0, "orphans": 0,
                                 "kills_before_first_commit": 0,
                                 "kills_leaving_uncommitted_files": 0, "trial_rows": []}
    # Round-robin over the modes: a run cut short by --budget still covers every mode alike.
    for i in range(args.trials):
        if args.budget and time.perf_counter() - t_all > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping after {i} round(s)", flush=True)
            break
        for mode, (job, step_s) in jobs.items():
            work = os.path.join(scratch, mode, f"t{i}")
            r = trial(job, work, rng, step_s)
            shutil.rmtree(work, ignore_errors=True)
            m = result["modes"][mode]
            m["trial_rows"].append(r)
            m["trials"] += 1
            m["bad_resumes"] += bool(r["problems"])
            m["orphans"] += len(r["orphans"])
            m["kills_before_first_commit"] += not r["committed"]
            m["kills_leaving_uncommitted_files"] += bool(r["left_by_kill"])
            flag = "BAD " + "; ".join(r["problems"]) if r["problems"] else "ok"
            print(f"{mode} trial {i}: kill at {r['delay_s']:.1f} s (after {r['after_commits']} "
                  f"commits + {r['extra_s']:.2f} s), committed "
                  f"{r['committed']}, {r['left_by_kill']} file(s) left by the kill, "
                  f"{len(r['orphans'])} orphan(s) after restart: {flag}", flush=True)
            total = _write(result, args.out, t_all)   # after every trial: figures survive a stop
    for mode, m in result["modes"].items():
        print(f"{mode}: {m['trials']} trials, {m['bad_resumes']} bad resumes, {m['orphans']} "
              f"orphans ({m['kills_leaving_uncommitted_files']} kills left uncommitted files, "
              f"{m['kills_before_first_commit']} came before the first commit)")
    total = _write(result, args.out, t_all)
    print(f"\ntotal: {total['trials']} trials, {total['bad_resumes']} bad resumes, "
          f"{total['orphans']} orphans ({result['wall_s']} s)")
    print(f"wrote {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if total["bad_resumes"] or total["orphans"] else 0


if __name__ == "__main__":
    sys.exit(main())
