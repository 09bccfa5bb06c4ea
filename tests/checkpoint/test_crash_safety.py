"""A training process killed with SIGKILL at random moments while it saves never leaves a
committed save (committed.json) or a meta.json pointer that fails to load.

Each trial trains a ~250 MB-per-save model saving every step (sync or async, keep 2) and is
killed at a random delay after its first step, when most of the wall time is spent saving.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mindformers_st.records import commit as cm
from mindformers_st.storage.checksum import verify_checksums
from mindformers_st.storage.reader import open_safetensors

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "monitor_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRIALS = 4          # at least this many trials...
MAX_TRIALS = 12     # ...and more, until one kill lands inside a write


def _loads(path):
    """Every tensor readable and matching its checksum."""
    with open_safetensors(path) as f:
        assert verify_checksums(f) == [], path
        for name in f.tensors:
            f.read(name)


def _run_and_kill(out, async_save, delay, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", OMP_NUM_THREADS="1")
    mon = f"save_checkpoint_steps=1,keep_checkpoint_max=2,async_save={int(async_save)}"
    proc = subprocess.Popen([sys.executable, WORKER, out, "--steps", "1000", "--hidden", "512",
                             "--vocab", "16000", "--print-steps", "--monitor", mon],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:                 # wait until the first step (and save) began
            if line.startswith("step 1") or time.time() > deadline:
                break
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_sigkill_during_saves_never_leaves_a_bad_committed_save(tmp_path):
    rng = random.Random(1234)
    killed_mid_write = 0
    committed_seen = 0
    trial = 0
    while trial < TRIALS or (killed_mid_write == 0 and trial < MAX_TRIALS):
        out = str(tmp_path / f"t{trial}")
        _run_and_kill(out, async_save=trial % 2 == 1, delay=rng.uniform(0.0, 4.0))
        d = os.path.join(out, "checkpoint")
        rank_dir = os.path.join(d, "rank_0")
        names = os.listdir(rank_dir) if os.path.isdir(rank_dir) else []
        killed_mid_write += any(n.startswith(".") and ".tmp" in n for n in names)

        entries = cm.load_committed_entries(d)          # the raw record, not the filtered view
        for e in entries:
            assert cm.validate_save(e) == [], (trial, e)
            _loads(e.path(0))
        assert [e.key for e in cm.committed_saves(d)] == [e.key for e in entries]
        committed_seen += len(entries)
        meta = cm.read_rank_meta(rank_dir) if os.path.isdir(rank_dir) else None
        if meta is not None:
            _loads(os.path.join(rank_dir, meta.last_ckpt_file))
            for name in meta.committed:
                _loads(os.path.join(rank_dir, name))
        for n in names:                                   # nothing partial under a final name
            if n.endswith(".safetensors") and not n.startswith("."):
                _loads(os.path.join(rank_dir, n))
        shutil.rmtree(out)
        trial += 1
    print(f"{trial} trials: {killed_mid_write} killed mid-write, {committed_seen} committed saves checked")
    assert killed_mid_write >= 1, "no trial was killed during a write; the test did not test"
    assert committed_seen >= 1, "no trial committed a save before the kill"
