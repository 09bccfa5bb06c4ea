"""End to end on 2 msrun workers (tiny Llama, CPU), through scripts/msrun_launcher.sh: pretrain
(dp2, de-redundant safetensors) -> `mindformers-st merge` -> predict from an HF folder, complete
and distributed weights (all three give the same text) -> resume with the same strategy (losses
bit-identical to the uninterrupted run) and with a changed strategy dp2 -> mp2 (fp32 tolerance)
-> the pipeline twin (pp2) trains as dp2, merges (ours and MindSpore's tools) to the dp2
tensors, and resumes on dp2. (Finetune from complete weights cut for mp2 and from distributed
weights with the same strategy, with the same losses: tests/test_guide.py, on the guide's own
section-6 runs of those commands.)

One pretrain (8 steps, saves at 4 and 8) is shared by the module; a second identical run is
killed with SIGKILL (every process of the job) as soon as its step-4 save is committed, and both
resume tests continue from copies of what that kill left behind."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mindformers_st.records.commit import load_committed_entries
from mindformers_st.storage.reader import open_safetensors
from tests.conftest import free_port as _free_port
from tests.conftest import kill_once_committed, kill_tagged as _kill_tagged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PRETRAIN = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
PREDICT = os.path.join(ROOT, "configs", "llama2", "predict_llama2_tiny.yaml")
LAUNCH_TIMEOUT = 420
LOSS = re.compile(r"global step:\[(\d+)/(\d+)\], loss: ([0-9.]+)")
PROMPTS = ["I love Beijing, because", "The red fox lives"]


def _env():
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
                OMP_NUM_THREADS="1", MF_LAUNCH_TIMEOUT=str(LAUNCH_TIMEOUT))


class Flow:
    """The shared files of the module: data, tokenizer, and the pretrain output."""

    def __init__(self, base, data):
        self.base = str(base)
        self.tokenizer = str(data / "tokenizer.json")
        self.data = str(data / "wiki.mindrecord")
        self.out = os.path.join(self.base, "pretrain")
        self.pretrain_log = ""

    def start(self, name, args, config=PRETRAIN, env=None):
        """Start run_mindformer.py on 2 workers through the launcher; returns (Popen, log dir)."""
        log_dir = os.path.join(self.base, "logs", name)
        cmd = " ".join([os.path.join(ROOT, "run_mindformer.py"), "--config", config,
                        "--use_parallel", "True",
                        "--processor.tokenizer.tokenizer_file", self.tokenizer] + list(args))
        os.makedirs(log_dir, exist_ok=True)
        # output to a file, not a pipe: a process left behind must not keep us waiting for EOF
        with open(os.path.join(log_dir, "launcher.out"), "wb") as out:
            proc = subprocess.Popen(
                ["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), cmd, "2",
                 str(_free_port()), log_dir, "True", str(LAUNCH_TIMEOUT)],
                cwd=self.base, env=dict(_env(), **(env or {})), stdout=out,
                stderr=subprocess.STDOUT)
        return proc, log_dir

    def launch(self, name, args, config=PRETRAIN):
        """Run run_mindformer.py on 2 workers; returns worker 0's log (asserts success)."""
        tag = f"{os.getpid()}-{time.time_ns()}"
        proc, log_dir = self.start(name, args, config, env={"E2E_KILL_TAG": tag})
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            _kill_tagged(tag)   # whatever the job left running (e.g. the launcher's watchdog sleep)
        launcher = open(os.path.join(log_dir, "launcher.out"), errors="replace").read()
        logs = {}
        for w in (0, 1):
            path = os.path.join(log_dir, f"worker_{w}.log")
            logs[w] = open(path, errors="replace").read() if os.path.exists(path) else ""
        assert proc.returncode == 0, (f"{name} failed (exit {proc.returncode}):\n"
                                      f"{launcher[-3000:]}\n"
                                      + "\n".join(_tail(t) for t in logs.values()))
        return logs[0]

    def train_args(self, out, steps, *extra):
        return ["--run_mode", "train", "--train_dataset_dir", self.data, "--output_dir", out,
                "--runner_config.train_steps", str(steps), "--callbacks.0.per_print_times", "1",
                "--callbacks.1.save_checkpoint_steps", "4", "--callbacks.1.keep_checkpoint_max",
                "5"] + list(extra)


def _tail(text, n=40):
    return "\n".join(l for l in text.splitlines() if "[WARNING]" not in l and "[INFO]" not in l)[-4000:]


def losses(log):
    """{global step: printed loss string} from an MFLossMonitor log."""
    return {int(m.group(1)): m.group(3) for m in LOSS.finditer(log)}


def load_line(log):
    lines = [l for l in log.splitlines() if "[load_checkpoint]" in l]
    assert lines, "no [load_checkpoint] report in the log"
    return lines[-1]


@pytest.fixture(scope="module")
def killed(flow):
    """The same 8-step pretrain, killed with SIGKILL once the step-4 save is committed."""
    out = os.path.join(flow.base, "killed")
    ckpt = os.path.join(out, "checkpoint")
    tag = f"{os.getpid()}-{time.time_ns()}"
    proc, _ = flow.start("killed", flow.train_args(out, 8), env={"E2E_KILL_TAG": tag})
    kill_once_committed(proc, tag, ckpt, lambda steps: 4 in steps, LAUNCH_TIMEOUT, poll=0.2)
    entries = load_committed_entries(ckpt)
    assert [e.global_step for e in entries] == [4], "the kill came too late or too early"
    shutil.copytree(os.path.join(flow.out, "strategy"), os.path.join(out, "src_strategy"))
    return out


def interrupted_copy(killed, name):
    """A copy of the killed run's output (checkpoint, source strategy) to resume in."""
    out = os.path.join(os.path.dirname(killed), name)
    shutil.copytree(killed, out)
    return out, os.path.join(out, "checkpoint")


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tiny_run_data):
    """The shared pretrain, on the session's tokenizer and dataset (tests/conftest.py)."""
    f = Flow(tmp_path_factory.mktemp("e2e"), tiny_run_data)
    f.pretrain_log = f.launch("pretrain", f.train_args(f.out, 8))
    return f


@pytest.fixture(scope="module")
def merged(flow):
    dst = os.path.join(flow.base, "merged")
    subprocess.run([os.path.join(BIN, "mindformers-st"), "merge",
                    os.path.join(flow.out, "checkpoint"), dst, "--no-progress"],
                   check=True, env=_env(), timeout=300)
    return dst


def test_pretrain_saves_deduplicated_safetensors_and_merges_offline(flow, merged):
    assert sorted(losses(flow.pretrain_log)) == list(range(1, 9))
    entries = load_committed_entries(os.path.join(flow.out, "checkpoint"))
    assert [e.global_step for e in entries] == [4, 8]
    sizes = []
    for r in (0, 1):
        with open_safetensors(entries[-1].path(r)) as f:
            assert f.metadata["remove_redundancy"] == "True"
            sizes.append(len(f.tensors))
    assert sizes[0] != sizes[1] or sizes[0] < 30   # each rank holds only its share
    index = json.load(open(os.path.join(merged, "param_name_map.json")))
    assert "model.tok_embeddings.embedding_weight" in index["weight_map"]
    assert os.path.isfile(os.path.join(merged, "hyper_param.safetensors"))


def test_predict_from_hf_complete_and_distributed_gives_the_same_text(flow, merged):
    hf = os.path.join(flow.base, "hf")
    subprocess.run([os.path.join(BIN, "mindformers-st"), "export-hf", merged, hf, "--config",
                    PRETRAIN, "--no-progress"], check=True, env=_env(), timeout=300)
    texts = {}
    for name, path, extra in (
            ("hf", hf, []), ("complete", merged, []),
            ("distributed", os.path.join(flow.out, "checkpoint"),
             ["--src_strategy_path_or_dir", os.path.join(flow.out, "strategy"),
              "--transform_process_num", "2"])):
        out = os.path.join(flow.base, f"predict_{name}")
        log = flow.launch(f"predict_{name}", [
            "--run_mode", "predict", "--load_checkpoint", path, "--auto_trans_ckpt", "True",
            "--output_dir", out, "--predict_data"] + [f"'{p}'" for p in PROMPTS] + extra,
            config=PREDICT)
        assert "missing 0" in load_line(log)
        if name != "complete":   # read from the sources; the derived folder written meanwhile
            assert "in the background" in load_line(log), load_line(log)
        texts[name] = [r["output_ids"] for r in json.load(open(os.path.join(out, "predict",
                                                                            "results.json")))]
    assert os.path.isfile(os.path.join(flow.base, "predict_hf", "ms_safetensors",
                                       "param_name_map.json"))
    unified = os.path.join(flow.base, "predict_distributed", "unified_checkpoint")
    # transform_process_num 2: both ranks built the online merge, one shard each or more
    assert len([f for f in os.listdir(unified) if f.startswith("model-")]) >= 2
    assert texts["hf"] == texts["complete"] == texts["distributed"]


def _tensors(path):
    with open_safetensors(path) as f:
        return {n: f.read(n) for n in f.tensors}


def test_resume_after_kill_9_with_the_same_strategy_is_bit_identical(flow, killed):
    out, ckpt = interrupted_copy(killed, "resume_same")
    log = flow.launch("resume_same", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True"))
    assert "optimizer state restored" in load_line(log)
    straight, resumed = losses(flow.pretrain_log), losses(log)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)
    # the step-8 save of the resumed run holds exactly the bytes of the uninterrupted one
    new = load_committed_entries(ckpt)[-1]
    old = load_committed_entries(os.path.join(flow.out, "checkpoint"))[-1]
    assert new.global_step == old.global_step == 8
    for r in (0, 1):
        a, b = _tensors(new.path(r)), _tensors(old.path(r))
        assert sorted(a) == sorted(b)
        for n in a:
            np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_resume_after_kill_9_with_changed_strategy_dp2_to_mp2_continues(flow, killed):
    out, ckpt = interrupted_copy(killed, "resume_mp2")
    log = flow.launch("resume_mp2", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True",
        "--auto_trans_ckpt", "True", "--src_strategy_path_or_dir",
        os.path.join(out, "src_strategy"), "--parallel_config.data_parallel", "1",
        "--parallel_config.model_parallel", "2", "--runner_config.batch_size", "8"))
    line = load_line(log)
    # cut straight from the rank files; unified_checkpoint merged in the background meanwhile,
    # there when the job has ended
    assert "mode direct_reshard" in line and "optimizer state restored" in line
    assert "unified_checkpoint in the background" in line, line
    assert os.path.isfile(os.path.join(out, "unified_checkpoint", "param_name_map.json"))
    straight, resumed = losses(flow.pretrain_log), losses(log)
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in resumed:
        assert abs(float(resumed[s]) - float(straight[s])) < 2e-4, (straight, resumed)


def _flip_a_weight(path):
    """Flip one bit of the first weight (not a hyper value) stored in `path`; returns its name."""
    from mindformers_st.records.hyper import is_hyper
    from tests.commands.test_integrity import flip_bit
    with open_safetensors(path) as f:
        name = next(n for n in f.tensors if not is_hyper(n) and f.tensors[n].nbytes > 8)
    flip_bit(path, name)
    return name


def test_resume_skips_a_damaged_newest_save_together_on_every_rank(flow):
    """One flipped bit in rank 1's step-8 file: both ranks resume from step 4 (the newest save
    that passes its checksums) and continue with the uninterrupted run's losses. With
    load_ckpt_async the damage is found by the background read while the network is built and
    surfaces before the first step: the fallback and the losses are the same."""
    out = os.path.join(flow.base, "resume_damaged")
    ckpt = os.path.join(out, "checkpoint")
    shutil.copytree(os.path.join(flow.out, "checkpoint"), ckpt)
    step8 = load_committed_entries(ckpt)[-1]
    assert step8.global_step == 8
    _flip_a_weight(step8.path(1))
    log = flow.launch("resume_damaged", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True",
        "--load_ckpt_async", "True"))
    assert "load_ckpt_async: reading the weights on a background thread" in log
    assert "[resume] WARNING: save" in log and "damaged" in log
    assert "[resume] global step 4" in log
    straight, resumed = losses(flow.pretrain_log), losses(log)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)


def test_loading_a_corrupt_checkpoint_stops_every_rank_with_one_message(flow):
    """Predict from a checkpoint with a flipped bit in rank 0's file: the job exits non-zero on
    both ranks (no rank waits for the other), naming the file, the tensor and the digests."""
    src = os.path.join(flow.base, "corrupt_src")
    shutil.copytree(os.path.join(flow.out, "checkpoint"), src)
    bad = load_committed_entries(src)[-1].path(0)
    name = _flip_a_weight(bad)
    out = os.path.join(flow.base, "predict_corrupt")
    tag = f"{os.getpid()}-{time.time_ns()}"
    proc, log_dir = flow.start("predict_corrupt", [
        "--run_mode", "predict", "--load_checkpoint", src, "--auto_trans_ckpt", "True",
        "--output_dir", out, "--src_strategy_path_or_dir", os.path.join(flow.out, "strategy"),
        "--predict_data", f"'{PROMPTS[0]}'"], config=PREDICT, env={"E2E_KILL_TAG": tag})
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT + 60)
    finally:
        _kill_tagged(tag)
    assert proc.returncode != 0
    logs = [open(os.path.join(log_dir, f"worker_{w}.log"), errors="replace").read() for w in (0, 1)]
    assert any(bad in l and name in l and "computed" in l for l in logs), _tail(logs[0])
    assert all("checksum" in l.lower() or "corrupt" in l for l in logs), [_tail(l) for l in logs]
    assert not os.path.exists(os.path.join(out, "predict", "results.json"))
    assert not os.path.isdir(os.path.join(out, "unified_checkpoint"))


def test_resume_skips_a_save_with_a_missing_rank_file_and_ignores_a_stale_uncommitted_one(flow):
    """The newest committed save lost rank 1's file and a stale, never committed step-99_99 save of
    another run lies beside it: resume takes the newest intact committed save (step 4), names
    the missing file, and never the stale one."""
    out = os.path.join(flow.base, "resume_missing")
    ckpt = os.path.join(out, "checkpoint")
    shutil.copytree(os.path.join(flow.out, "checkpoint"), ckpt)
    step8 = load_committed_entries(ckpt)[-1]
    for r in (0, 1):   # the stale save: same folder, higher step, not in committed.json
        src = step8.path(r)
        shutil.copy(src, re.sub(r"-\d+_\d+\.safetensors$", "-99_99.safetensors", src))
    os.remove(step8.path(1))
    log = flow.launch("resume_missing", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True"))
    assert "[resume] global step 4" in log
    assert sorted(losses(log)) == [5, 6, 7, 8]


def test_resume_with_ignore_data_skip_restarts_the_data_not_the_step(flow, killed):
    """`ignore_data_skip: True` (MindSpore Transformers' key): weights, moments and global step
    come back from step 4, the data starts from its first batch again."""
    out, ckpt = interrupted_copy(killed, "resume_noskip")
    log = flow.launch("resume_noskip", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True",
        "--ignore_data_skip", "True"))
    assert "[resume] global step 4" in log
    assert "[data] starting at epoch 0 step 0 (ignore_data_skip" in log
    straight, resumed = losses(flow.pretrain_log), losses(log)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed[5] != straight[5]     # another batch than the uninterrupted run's step 5


def test_resume_with_a_doubled_global_batch_rescales_the_step(flow, killed):
    """A resume that doubles the global batch (8 -> 16 samples) continues from global step 2,
    as MindSpore Transformers rescales it (samples consumed kept)."""
    out, ckpt = interrupted_copy(killed, "resume_gbs")
    log = flow.launch("resume_gbs", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True",
        "--runner_config.batch_size", "8"))
    assert "[resume] global batch 8 -> 16: global step 4 -> 2" in log
    assert sorted(losses(log)) == [3, 4, 5, 6, 7, 8]


def test_resume_by_last_timestamp_in_a_folder_without_records(flow):
    """A MindSpore Transformers style folder (no committed.json, no meta.json, rank files
    without our description: with one they would be uncommitted saves of ours) with
    `resume_by_last_timestamp_ckpt: True`: the newest files by modification time are resumed,
    not the highest step."""
    out = os.path.join(flow.base, "resume_mtime")
    ckpt = os.path.join(out, "checkpoint")
    shutil.copytree(os.path.join(flow.out, "checkpoint"), ckpt)
    entries = load_committed_entries(ckpt)
    os.remove(os.path.join(ckpt, "committed.json"))
    from mindformers_st.storage.writer import load_tensors, save_tensors
    for r in (0, 1):
        os.remove(os.path.join(ckpt, f"rank_{r}", "meta.json"))
        for e in entries:   # as MindSpore Transformers writes them: no description of ours
            save_tensors(e.path(r), load_tensors(e.path(r)), {"format": "ms"}, checksums=False)
        os.utime(entries[0].path(r))          # step 4's files become the newest
        os.utime(entries[1].path(r), (1, 1))
    log = flow.launch("resume_mtime", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True",
        "--resume_by_last_timestamp_ckpt", "True"))
    assert "[resume] global step 4" in log
    assert sorted(losses(log)) == [5, 6, 7, 8]


def test_resume_at_train_steps_says_there_is_nothing_to_train(flow):
    """Resuming a run whose newest save is at train_steps trains nothing and says so."""
    out = os.path.join(flow.base, "resume_done")
    ckpt = os.path.join(out, "checkpoint")
    shutil.copytree(os.path.join(flow.out, "checkpoint"), ckpt)
    log = flow.launch("resume_done", flow.train_args(
        out, 8, "--load_checkpoint", ckpt, "--resume_training", "True"))
    assert "[train] already at train_steps 8 (global step 8): nothing to train" in log
    assert losses(log) == {}


PIPELINE = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny_pp2.yaml")


def test_pipeline_pp2_trains_as_dp2_saves_per_stage_merges_alike_and_resumes_on_dp2(flow, merged):
    """The pipeline leg: the pp2 twin (same global batch, 2 micro-batches) trains with the dp2
    losses, each stage saves its own tensors and strategy, the merged step-8 save equals the
    merged dp2 one and what MindSpore's merge_pipeline_strategys + unified_safetensors make of
    it, and a resume from its step-4 save on dp2 (load hook, auto_trans_ckpt with
    the pp2 strategy) continues with the uninterrupted losses."""
    from mindformers_st.layout.strategy import read_strategy
    out = os.path.join(flow.base, "pp2")
    log = flow.launch("pp2", flow.train_args(out, 8), config=PIPELINE)
    straight, piped = losses(flow.pretrain_log), losses(log)
    assert sorted(piped) == list(range(1, 9))
    for s in piped:
        assert abs(float(piped[s]) - float(straight[s])) < 2e-4, (straight, piped)
    entries = load_committed_entries(os.path.join(out, "checkpoint"))
    assert [e.global_step for e in entries] == [4, 8]
    held = []
    for r in (0, 1):
        with open_safetensors(entries[-1].path(r)) as f:
            held.append(set(f.tensors))
    assert "model.tok_embeddings.embedding_weight" in held[0] - held[1]
    assert {"lm_head.weight", "adam_m.lm_head.weight", "model.norm_out.weight"} <= held[1] - held[0]
    assert not any(n.startswith("model.layers.1.") for n in held[0])
    strategy = read_strategy(os.path.join(out, "strategy"))
    assert strategy["lm_head.weight"].stage == 1 and strategy["model.layers.0.attention.wq.weight"].stage == 0

    dst = os.path.join(flow.base, "pp2_merged")
    subprocess.run([os.path.join(BIN, "mindformers-st"), "merge",
                    os.path.join(out, "checkpoint"), dst, "--no-progress"],
                   check=True, env=_env(), timeout=300)
    ours, theirs = {}, {}
    for folder, into in ((dst, ours), (merged, theirs)):
        for name in sorted(os.listdir(folder)):
            if name.startswith("model-"):
                into.update(_tensors(os.path.join(folder, name)))
    assert sorted(ours) == sorted(theirs)
    for n in ours:
        np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-4, atol=1e-5, err_msg=n)
    # MindSpore's own tools on the real pp2 save: merge_pipeline_strategys gives our layouts,
    # unified_safetensors our merged tensors (bit for bit)
    from tests.layout.test_interop_mindspore import run_mindspore
    uni = os.path.join(flow.base, "pp2_unified")
    for r in (0, 1):
        os.makedirs(os.path.join(uni, "src", f"rank_{r}"))
        shutil.copy(entries[-1].path(r), os.path.join(uni, "src", f"rank_{r}"))
    run_mindspore(f"""
        import mindspore as ms
        ms.merge_pipeline_strategys({os.path.join(out, 'strategy')!r}, {uni + '/strategy.ckpt'!r})
        ms.unified_safetensors({uni + '/src'!r}, {uni + '/strategy.ckpt'!r}, {uni + '/merged'!r},
                               max_process_num=1)
        """)
    assert read_strategy(os.path.join(uni, "strategy.ckpt")) == strategy
    name_map = json.load(open(os.path.join(uni, "merged", "param_name_map.json")))["weight_map"]
    for n in ours:
        with open_safetensors(os.path.join(uni, "merged", name_map[n])) as f:
            np.testing.assert_array_equal(f.read(n), ours[n], err_msg=n)

    resumed = flow.launch("pp2_to_dp2", flow.train_args(
        os.path.join(flow.base, "pp2_to_dp2"), 8, "--load_checkpoint",
        os.path.join(out, "checkpoint"), "--resume_training",
        os.path.basename(entries[0].path(0)), "--auto_trans_ckpt", "True",
        "--src_strategy_path_or_dir", os.path.join(out, "strategy"),
        "--derived_write", "first"))   # the collective merge before the cut, on msrun
    line = load_line(resumed)
    assert "mode merge_and_cut" in line and "optimizer state restored" in line
    again = losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for s in again:
        assert abs(float(again[s]) - float(straight[s])) < 2e-4, (straight, again)
