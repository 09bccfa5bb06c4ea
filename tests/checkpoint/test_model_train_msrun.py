"""`Model.train` under msrun with DATA_PARALLEL (2 workers) and our CheckpointMonitor, through the
example script a user would copy: de-duplicated and plain saves, async and sync; our merge of a
dp2 save equals MindSpore's `unified_safetensors` of it; kill -9 mid-run and resume through
Model.train continues the uninterrupted run's losses bit for bit."""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mindformers_st.cli import main as cli
from mindformers_st.records.commit import load_committed_entries
from mindformers_st.storage.index import read_index
from mindformers_st.storage.reader import open_safetensors
from tests.conftest import free_port, kill_once_committed
from tests.models.msrun_util import run_msrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "model_train_checkpoint.py")
LOSS = re.compile(r"^step (\d+) loss ([0-9.]+)$", re.M)
PER_EPOCH = 8   # 256 rows / 2 ranks / batch 16


def _losses(log_dir):
    with open(os.path.join(log_dir, "worker_0.log"), errors="replace") as fh:
        return {int(s): v for s, v in LOSS.findall(fh.read())}


def _train(out, *args, epochs=3):
    code, logs = run_msrun(EXAMPLE, ["--output_dir", out, "--epochs", epochs, *args], 2,
                           os.path.join(out, "logs"))
    assert code == 0, logs
    return _losses(os.path.join(out, "logs"))


def _complete(folder):
    index = read_index(folder)
    out = {}
    for name in index.weight_map:
        with open_safetensors(index.path_of(name)) as f:
            out[name] = f.read(name)
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One uninterrupted 5-epoch run without flags: (output folder, losses). The plain case of
    the merge test and the reference of the kill test (one msrun job instead of two)."""
    out = str(tmp_path_factory.mktemp("plain") / "run")
    return out, _train(out, epochs=5)


@pytest.mark.parametrize("flags", [["--remove_redundancy", "--async_save"], []])
def test_dp2_saves_merge_as_mindspore_unified_safetensors_does(tmp_path, flags, request):
    if flags:
        out, epochs = str(tmp_path / "run"), 2
        _train(out, *flags, epochs=epochs)
    else:
        (out, _), epochs = request.getfixturevalue("plain_run"), 5
    ckpt = os.path.join(out, "checkpoint")
    entries = load_committed_entries(ckpt)
    assert [e.global_step for e in entries] == [k * PER_EPOCH for k in range(1, epochs + 1)]
    with open_safetensors(entries[-1].path(0)) as a, open_safetensors(entries[-1].path(1)) as b:
        weights_a = {n for n in a.tensors if "." in n}
        weights_b = {n for n in b.tensors if "." in n}
        if flags:   # each distinct tensor written once, balanced over the two replicas
            assert weights_a and weights_b and not weights_a & weights_b
        else:       # data parallel: both ranks hold the same weights
            assert weights_a == weights_b
            for n in weights_a:
                np.testing.assert_array_equal(a.read(n), b.read(n), err_msg=n)
    assert cli(["verify", ckpt]) == 0
    assert cli(["merge", ckpt, str(tmp_path / "ours"), "--no-progress"]) == 0
    code = subprocess.run([sys.executable, "-c", (
        "import mindspore as ms; ms.unified_safetensors(%r, %r, %r, max_process_num=1)"
        % (ckpt, os.path.join(out, "strategy", "ckpt_strategy_rank_0.ckpt"),
           str(tmp_path / "theirs")))],
        capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-3000:]
    ours, theirs = _complete(str(tmp_path / "ours")), _complete(str(tmp_path / "theirs"))
    shared = [n for n in theirs if "." in n]   # the network and optimizer tensors
    assert shared and set(shared) <= set(ours)
    for n in shared:
        np.testing.assert_array_equal(ours[n], theirs[n], err_msg=n)


def test_kill_9_and_resume_through_model_train_continue_bit_for_bit(tmp_path, plain_run):
    straight = plain_run[1]
    out = str(tmp_path / "killed")
    os.makedirs(out)
    bindir = os.path.dirname(sys.executable)
    tag = f"{os.getpid()}-{time.time_ns()}"   # msrun's workers inherit it: kill them all by it
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
               OMP_NUM_THREADS="1", E2E_KILL_TAG=tag)
    proc = subprocess.Popen(
        [os.path.join(bindir, "msrun"), "--worker_num", "2", "--local_worker_num", "2",
         "--master_port", str(free_port()), "--log_dir", os.path.join(out, "logs"),
         "--join", "True", EXAMPLE, "--output_dir", out, "--epochs", "5"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = os.path.join(out, "checkpoint")
    kill_once_committed(proc, tag, ckpt, lambda steps: any(s >= 2 * PER_EPOCH for s in steps), 300)
    done = load_committed_entries(ckpt)[-1].global_step
    assert PER_EPOCH * 2 <= done < PER_EPOCH * 5, "the kill came too late"
    shutil.rmtree(os.path.join(out, "logs"))
    resumed = _train(out, "--resume", epochs=5)
    # Model.train numbers the resumed run's steps from 1
    assert sorted(resumed) == list(range(1, 5 * PER_EPOCH - done + 1))
    assert all(resumed[i] == straight[done + i] for i in resumed), (done, straight, resumed)
    assert load_committed_entries(ckpt)[-1].global_step == 5 * PER_EPOCH
