"""A training run killed (SIGKILL) in each window of a save — deterministic through the
fault-injection hook MFST_FAULT_KILL_AT — leaves a folder whose resume takes only committed
saves, and the next start's CheckpointMonitor removes every file no committed save names,
logging each, without touching other prefixes' files or folders without our record."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers_st.checkpoint.monitor import CheckpointMonitor
from mindformers_st.checkpoint.resume import select_resume_save
from mindformers_st.errors import CheckpointError
from mindformers_st.records import commit as cm
from mindformers_st.records.scan import files_of
from mindformers_st.storage.writer import save_tensors

from .monitor_worker import build_run, train

pytestmark = pytest.mark.slow      # five killed training processes (run side by side) and restarts

WORKER = os.path.join(os.path.dirname(__file__), "monitor_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (kill point, async_save, committed saves left (global steps), files left that no save names)
CASES = {
    "before_first_commit": ("written@1", 0, [], ["CKP_rank_0-1_1.safetensors"]),
    "after_rename": ("written@3", 0, [1, 2], ["CKP_rank_0-1_3.safetensors"]),
    "prune": ("committed@3", 0, [2, 3], ["CKP_rank_0-1_1.safetensors"]),
    "async_writing": ("write@3", 1, [1, 2], []),
    "async_written": ("written@3", 1, [1, 2], ["CKP_rank_0-1_3.safetensors"]),
    # async: the record, pruning and meta.json run on the background writer
    "async_committed": ("committed@3", 1, [2, 3], ["CKP_rank_0-1_1.safetensors"]),
    "async_pruned": ("pruned@3", 1, [2, 3], []),
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every case's run, started side by side and killed at its point: {case: out_dir}."""
    root = tmp_path_factory.mktemp("kills")
    procs = {}
    for case, (point, async_save, _, _) in CASES.items():
        out = str(root / case)
        env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", OMP_NUM_THREADS="1",
                   MFST_FAULT_KILL_AT=point)
        mon = f"save_checkpoint_steps=1,keep_checkpoint_max=2,async_save={async_save}"
        procs[case] = (out, subprocess.Popen([sys.executable, WORKER, out, "--steps", "4",
                                              "--monitor", mon], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for case, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, (case, err.decode()[-2000:])   # killed, not finished
    return {case: out for case, (out, _) in procs.items()}


def _restart(out):
    """A new run's start in the same folder (no step: only the monitor's start-up runs)."""
    model, opt, step, ctx = build_run()
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=100,
                            keep_checkpoint_max=2, output_dir=out)
    train(model, opt, step, ctx, [mon], 0, out)
    return mon


def _unnamed(ckpt):
    named = {os.path.basename(e.path(0)) for e in cm.load_committed_entries(ckpt)}
    rank_dir = os.path.join(ckpt, "rank_0")
    return sorted(n for n in os.listdir(rank_dir)
                  if n not in named and n != cm.META_FILE)


@pytest.mark.parametrize("case", list(CASES))
def test_a_kill_in_each_window_resumes_a_committed_save_and_leaves_no_orphan(killed, case, caplog):
    _, _, committed, leftovers = CASES[case]
    out = killed[case]
    ckpt = os.path.join(out, "checkpoint")
    assert [e.global_step for e in cm.load_committed_entries(ckpt)] == committed
    assert _unnamed(ckpt) == leftovers
    if committed:
        chosen = select_resume_save(ckpt, True)
        assert chosen.record.global_step == committed[-1]
    else:   # the empty record written at the run's start: nothing was committed
        with pytest.raises(CheckpointError, match="nothing was committed"):
            select_resume_save(ckpt, True)
    # a file of another prefix (another job sharing the folder) is never touched
    other = os.path.join(ckpt, "rank_0", "other_rank_0-1_1.safetensors")
    save_tensors(other, {"w": np.zeros(2, np.float32)})
    with caplog.at_level(logging.WARNING, logger="mindformers_st.checkpoint.monitor"):
        _restart(out)
    assert _unnamed(ckpt) == ["other_rank_0-1_1.safetensors"]
    for name in leftovers:
        assert f"removing {os.path.join(ckpt, 'rank_0', name)}" in caplog.text
    assert [e.global_step for e in cm.load_committed_entries(ckpt)] == committed


def test_a_folder_without_our_record_is_never_cleaned(tmp_path):
    """A MindSpore Transformers folder (files, no committed.json): nothing removed, no record
    written at the start."""
    rank_dir = tmp_path / "checkpoint" / "rank_0"
    rank_dir.mkdir(parents=True)
    for step in (1, 2):
        save_tensors(rank_dir / f"CKP_rank_0-1_{step}.safetensors", {"w": np.zeros(2, np.float32)})
    _restart(str(tmp_path))
    assert len(files_of(str(rank_dir))) == 2
    assert not (tmp_path / "checkpoint" / cm.COMMITTED_FILE).exists()
