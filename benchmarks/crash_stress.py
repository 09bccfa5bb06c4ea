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
3. restarts the job for one more step (train_steps = newest committed global step + 1): with
   `--resume_training True` when a save was committed — the restart must succeed and continue
   from the newest committed global step (its first logged step is that step + 1) — else
   without (a crash before the first commit: nothing to resume);
4. counts orphans: files in the rank folders that no committed save names after the restart
   (whose CheckpointMonitor removes the leftovers of the crash at start-up).
A trial is bad when verify or the restart disagrees with the commit record, or it resumed
another step. Each kill is classed by when it landed: before the first commit, among the saves
(`mid_save` when it left files no commit names: a save was being written), after the last
commit (the job shutting down), or after the job had ended — that last one tests nothing, is not
counted as a trial and is retried (the count of retries is reported). The wait after commit k is
a random fraction of the time between this job's own last two commits (until the job has made
two: the latest such time another trial of the mode saw, or the uninterrupted run's), so kills
follow the job's pace whatever the load.
Prints trials, bad resumes and orphans per mode, and writes docs/bench/crash_stress.json.

    .venv/bin/python benchmarks/crash_stress.py [--trials 50] [--modes sync1,async1,sync2,async2]
                                                [--parallel K] [--budget SECONDS]
Trials are queued round-robin over the modes and run K at a time (each in its own folder, port
and kill tag); with --budget no new trial starts once it is spent.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402

BIN = os.path.dirname(sys.executable)
CONFIG = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
STEP = re.compile(r"global step:\[(\d+)/(\d+)\]")
MODES = {"sync1": (False, 1), "async1": (True, 1), "sync2": (False, 2), "async2": (True, 2)}


def _env(tag):
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
                OMP_NUM_THREADS="1", PYTHONPATH=ROOT, E2E_KILL_TAG=tag, MF_LAUNCH_TIMEOUT="600")


_PORTS = set()
_PORT_LOCK = threading.Lock()


def _free_port():
    """A free port pair not handed to another concurrent trial of this run."""
    from tests.conftest import free_port
    with _PORT_LOCK:
        for _ in range(50):
            port = free_port()
            if not {port, port + 1} & _PORTS:
                _PORTS.update((port, port + 1))
                return port
    raise RuntimeError("no free port pair found")


def _kill_tagged(tag):
    from tests.conftest import kill_tagged
    return kill_tagged(tag)


class Job:
    """One run_mindformer.py launch of a mode, its logs in `log_dir`."""

    def __init__(self, base, data, tokenizer, async_save, workers, steps):
        self.base, self.data, self.tokenizer = base, data, tokenizer
        self.async_save, self.workers, self.steps = async_save, workers, steps

    def start(self, out, log_dir, resume=False, steps=None):
        args = [os.path.join(ROOT, "run_mindformer.py"), "--config", CONFIG,
                "--use_parallel", str(self.workers > 1),
                "--parallel_config.data_parallel", str(self.workers),
                "--processor.tokenizer.tokenizer_file", self.tokenizer,
                "--run_mode", "train", "--train_dataset_dir", self.data, "--output_dir", out,
                "--runner_config.train_steps", str(steps or self.steps),
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

    def run(self, out, log_dir, resume=False, steps=None):
        """Run to the end: (exit code, worker 0's log)."""
        proc, tag = self.start(out, log_dir, resume, steps)
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
    t_trial = time.perf_counter()
    out = os.path.join(work, "out")
    ckpt = os.path.join(out, "checkpoint")
    # Kill once the save of global step k is committed (k random; 0: once the monitor has begun:
    # it writes an empty record first) plus a random fraction of the time between two commits:
    # the kills land among the saves whatever the start-up costs on a busy machine.
    k = rng.randrange(job.steps)
    frac = rng.random()
    proc, tag = job.start(out, os.path.join(work, "killed"))
    t0 = time.perf_counter()
    seen = {}   # newest committed global step -> when first seen
    while proc.poll() is None and time.perf_counter() - t0 < 900:
        try:
            newest = (max([e.global_step for e in cm.load_committed_entries(ckpt)], default=0)
                      if os.path.exists(os.path.join(ckpt, cm.COMMITTED_FILE)) else None)
        except Exception:   # the record appears atomically; unreadable means not yet
            newest = None
        if newest is not None:
            if newest >= 1:
                seen.setdefault(newest, time.perf_counter())
            if newest >= k:   # (the record keeps only keep_checkpoint_max saves: compare steps)
                break
        time.sleep(0.02)
    # This job's own pace once it has made two commits, else the latest pace another trial of
    # this mode saw (the load changes during a run).
    steps_seen = sorted(seen)
    own = ((seen[steps_seen[-1]] - seen[steps_seen[-2]]) / (steps_seen[-1] - steps_seen[-2])
           if len(steps_seen) >= 2 else None)
    gap = own or step_s
    extra = frac * gap
    time.sleep(extra)
    delay = time.perf_counter() - t0
    ended_before = proc.poll() is not None
    _kill_tagged(tag)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    entries = cm.load_committed_entries(ckpt) if os.path.isdir(ckpt) else []
    left = orphans(ckpt) if os.path.isdir(ckpt) else []
    newest = entries[-1].global_step if entries else None
    if ended_before or proc.returncode == 0:
        phase = "after_end"
    elif newest is None:
        phase = "before_first_commit"
    elif newest >= job.steps:
        phase = "after_last_commit"
    else:
        phase = "among_saves"
    res = {"phase": phase, "mid_save": bool(left), "delay_s": round(delay, 2), "after_commits": k,
           "extra_s": round(extra, 3), "gap_s": round(gap, 3), "own_gap": own is not None,
           "committed": [e.global_step for e in entries],
           "left_by_kill": len(left), "problems": []}
    if phase == "after_end":   # not a crash: the caller retries it
        res["trial_s"] = round(time.perf_counter() - t_trial, 1)
        return res
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        v = subprocess.run([os.path.join(BIN, "mindformers-st"), "verify", ckpt],
                           capture_output=True, text=True, env=_env(tag), timeout=300)
        if entries and v.returncode != 0:
            res["problems"].append(f"verify failed on a committed save: {v.stderr.strip()[-300:]}")
        if not entries and v.returncode == 0 and any(f.endswith(".safetensors") for f in left):
            res["problems"].append("verify accepted a folder with no committed save")
    # The restart trains one step: enough to see where it resumed and that it saves again.
    want = (newest or 0) + 1
    code, log = job.run(out, os.path.join(work, "restart"), resume=bool(entries), steps=want)
    steps = [int(m.group(1)) for m in STEP.finditer(log)]
    if code != 0:
        res["problems"].append(f"restart exited {code}: {log.strip()[-400:]}")
    elif entries:
        first = steps[0] if steps else None
        if first != want:
            res["problems"].append(f"resumed at global step {first}, the newest committed save "
                                   f"is global step {want - 1}")
    res["orphans"] = orphans(ckpt) if os.path.isdir(ckpt) else []
    res["trial_s"] = round(time.perf_counter() - t_trial, 1)
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


PHASES = ("before_first_commit", "among_saves", "after_last_commit")


_RUN = []   # the provenance.Run main() opened: date, load, machine, commit of this run


def _write(result, path, t_all):
    """Add the totals to `result` and write it to `path`; returns the totals."""
    total = {k: sum(m[k] for m in result["modes"].values())
             for k in ("trials", "bad_resumes", "orphans", "retried_after_end")}
    result.update(total, wall_s=round(time.perf_counter() - t_all), loadavg_at_end=os.getloadavg(),
                  date_end=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  provenance=_RUN[0].finish(cache="not evicted (kills and restarts)") if _RUN else None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)
    return total


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per mode")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=4, help="train_steps of every killed job (a save "
                                                         "each, keep 2)")
    ap.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    ap.add_argument("--retries", type=int, default=5,
                    help="new attempts of a trial whose kill came after the job had ended")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: start no new trial after this (0: no limit); the trials done "
                         "are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "crash_stress.json"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="crash_stress_", dir=args.dir)
    _RUN.append(provenance.Run(scratch, [os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    data, tokenizer = prepare(scratch)
    modes = args.modes.split(",")
    result = {"trials_per_mode_asked": args.trials, "steps": args.steps, "parallel": args.parallel,
              "seed": args.seed, "git_commit": _git_commit(),
              "date_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "loadavg_at_start": os.getloadavg(), "cpus": os.cpu_count(), "modes": {}}
    jobs = {m: Job(scratch, data, tokenizer, MODES[m][0], MODES[m][1], args.steps) for m in modes}
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        calib = {m: pool.submit(calibrate, jobs[m], os.path.join(scratch, m)) for m in modes}
        step_s = {}
        for mode in modes:
            code, log, step_s[mode], duration = calib[mode].result()
            if code != 0:
                raise SystemExit(f"{mode}: the uninterrupted run failed (exit {code}):\n"
                                 f"{log[-3000:]}")
            async_save, workers = MODES[mode]
            result["modes"][mode] = {"async_save": async_save, "workers": workers,
                                     "job_s": round(duration, 1), "step_s": round(step_s[mode], 3),
                                     "trials": 0, "bad_resumes": 0, "orphans": 0,
                                     "retried_after_end": 0, "mid_save_kills": 0,
                                     **{f"kills_{p}": 0 for p in PHASES},
                                     "mean_trial_s": None, "trial_rows": []}
        print("uninterrupted runs: " + ", ".join(
            f"{m} {result['modes'][m]['job_s']} s ({step_s[m]:.2f} s between commits)"
            for m in modes), flush=True)
        t_trials = time.perf_counter()
        lock = threading.Lock()

        def one(i, mode):
            """Trial i of `mode`, retried while its kill comes after the job's end."""
            if args.budget and time.perf_counter() - t_all > args.budget:
                return
            m = result["modes"][mode]
            for attempt in range(args.retries + 1):
                if attempt and args.budget and time.perf_counter() - t_all > args.budget:
                    return
                rng = random.Random(f"{args.seed}-{mode}-{i}-{attempt}")
                work = os.path.join(scratch, mode, f"t{i}a{attempt}")
                r = trial(jobs[mode], work, rng, step_s[mode])
                shutil.rmtree(work, ignore_errors=True)
                r.update(trial=i, attempt=attempt)
                if r["own_gap"]:
                    step_s[mode] = r["gap_s"]   # the pace under the present load
                if r["phase"] != "after_end":
                    break
                with lock:
                    m["retried_after_end"] += 1
                print(f"{mode} trial {i}: kill at {r['delay_s']:.1f} s came after the job had "
                      f"ended: retried", flush=True)
            else:
                return
            with lock:
                m["trial_rows"].append(r)
                m["trials"] += 1
                m["bad_resumes"] += bool(r["problems"])
                m["orphans"] += len(r["orphans"])
                m[f"kills_{r['phase']}"] += 1
                m["mid_save_kills"] += r["mid_save"]
                m["mean_trial_s"] = round(sum(x["trial_s"] for x in m["trial_rows"])
                                          / m["trials"], 1)
                done = sum(x["trials"] for x in result["modes"].values())
                result["trials_wall_s"] = round(time.perf_counter() - t_trials)
                result["wall_s_per_trial"] = round(result["trials_wall_s"] / done, 1)
                flag = "BAD " + "; ".join(r["problems"]) if r["problems"] else "ok"
                print(f"{mode} trial {i}: {r['phase']}{' mid-save' if r['mid_save'] else ''} "
                      f"kill at {r['delay_s']:.1f} s (after commit {r['after_commits']} + "
                      f"{r['extra_s']:.2f} s), committed {r['committed']}, {r['left_by_kill']} "
                      f"file(s) left by the kill, {len(r['orphans'])} orphan(s) after restart, "
                      f"{r['trial_s']:.0f} s: {flag}", flush=True)
                _write(result, args.out, t_all)   # after every trial: figures survive a stop

        futures = [pool.submit(one, i, mode) for i in range(args.trials) for mode in modes]
        for f in futures:
            f.result()
    if args.budget and any(m["trials"] < args.trials for m in result["modes"].values()):
        print(f"budget of {args.budget:.0f} s spent: trials stopped early", flush=True)
    for mode, m in result["modes"].items():
        print(f"{mode}: {m['trials']} trials, {m['bad_resumes']} bad resumes, {m['orphans']} "
              f"orphans; kills: {m['kills_before_first_commit']} before the first commit, "
              f"{m['kills_among_saves']} among saves ({m['mid_save_kills']} mid-save: uncommitted "
              f"files left), {m['kills_after_last_commit']} after the last commit; "
              f"{m['retried_after_end']} retried (after the job's end)")
    total = _write(result, args.out, t_all)
    print(f"\ntotal: {total['trials']} trials, {total['bad_resumes']} bad resumes, "
          f"{total['orphans']} orphans, {total['retried_after_end']} retried kills "
          f"({result['wall_s']} s)")
    print(f"wrote {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if total["bad_resumes"] or total["orphans"] else 0


if __name__ == "__main__":
    sys.exit(main())
