"""Two-rank saves through msrun (dp2 and mp2, tiny Llama): the folders verify, hold what the
contract says, de-duplicate exactly, and `mindformers-st merge` gives the global weights."""
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mindformers_st.records import commit as cm
from mindformers_st.cli import main as cli_main
from mindformers_st.commands.verify import verify_path
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.storage.index import read_index
from mindformers_st.storage.reader import open_safetensors
from tests.conftest import free_port as _free_port

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "monitor_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _msrun(out, args, workers=2, timeout=420):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    log_dir = os.path.join(out, "logs")
    cmd = [os.path.join(bindir, "msrun"), "--worker_num", str(workers), "--local_worker_num", str(workers),
           "--master_port", str(_free_port()), "--log_dir", log_dir, "--join", "True",
           "--cluster_time_out", str(timeout), WORKER, out] + args
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:       # a hung worker must not hang the suite
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
    logs = text.decode(errors="replace")[-2000:]
    for name in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
        with open(name, errors="replace") as fh:
            logs += f"\n--- {name}\n" + "".join(l for l in fh if "WARNING" not in l)[-3000:]
    assert proc.returncode == 0, logs


def _global_truth(out, world=2):
    """Global tensors rebuilt from each rank's plain-numpy dump of its trained slices."""
    full = {}
    for r in range(world):
        arrays = np.load(os.path.join(out, "truth", f"rank_{r}.npz"))
        with open(os.path.join(out, "truth", f"rank_{r}.json")) as fh:
            slices = {n: TensorSlice.from_json(j) for n, j in json.load(fh).items()}
        for name, sl in slices.items():
            g = full.setdefault(name, np.zeros(sl.global_shape, arrays[name].dtype))
            g[sl.index()] = arrays[name]
    return full


def _rank_files(folder):
    saves = cm.committed_saves(folder)
    assert [s.global_step for s in saves] == [2, 4]
    assert all(set(s.files) == {0, 1} for s in saves)
    return {r: saves[-1].path(r) for r in (0, 1)}


def _check_merge(folder, truth, tmp):
    dst = os.path.join(tmp, "merged_" + os.path.basename(folder))
    assert cli_main(["merge", folder, dst, "--no-progress"]) == 0
    index = read_index(dst)
    merged = {}
    for name, rel in index.weight_map.items():
        with open_safetensors(os.path.join(dst, rel)) as f:
            merged[name] = f.read(name)
    assert set(truth) <= set(merged)
    for name, value in truth.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)


def _check_dedup(plain, dedup):
    """Each distinct block once across the ranks, and the same bytes as the full save."""
    plain_files, dedup_files = _rank_files(plain), _rank_files(dedup)
    blocks = {}
    for r, path in dedup_files.items():
        with open_safetensors(path) as f:
            assert f.metadata["remove_redundancy"] == "True"
            ours = json.loads(f.metadata["mindformers_st"])
            assert ours["remove_redundancy"] is True and ours["rank"] == r and ours["world_size"] == 2
            for name, j in ours["slices"].items():
                key = (name, TensorSlice.from_json(j))
                assert key not in blocks, f"{key} written by ranks {blocks[key]} and {r}"
                blocks[key] = r
                with open_safetensors(plain_files[r]) as p:
                    np.testing.assert_array_equal(f.read(name), p.read(name), err_msg=name)
            assert f.read("global_step").tolist() == [4]     # scalars: every rank
    sizes = [sum(os.path.getsize(p) for p in files.values()) for files in (plain_files, dedup_files)]
    return blocks, sizes


def test_dp2_saves_verify_dedup_and_merge(tmp_path):
    out = str(tmp_path)
    _msrun(out, ["--dp", "2", "--steps", "4",
                 "--monitor", "directory=plain,save_checkpoint_steps=2",
                 "--monitor", "directory=dedup,save_checkpoint_steps=2,remove_redundancy=1,async_save=1"])
    plain, dedup = os.path.join(out, "plain"), os.path.join(out, "dedup")
    for folder in (plain, dedup):
        assert verify_path(folder)[0] == []
    blocks, (plain_bytes, dedup_bytes) = _check_dedup(plain, dedup)
    assert set(blocks.values()) == {0, 1}                    # both replicas write a share
    assert dedup_bytes < 0.6 * plain_bytes                   # dp2: about half
    for r in (0, 1):                                         # dp: each rank holds everything
        meta = cm.read_rank_meta(os.path.join(plain, f"rank_{r}"))
        assert meta.last_ckpt_file == f"CKP_rank_{r}-2_1.safetensors"
    truth = _global_truth(out)
    _check_merge(dedup, truth, out)


def test_mp2_saves_verify_dedup_merge_and_ckpt(tmp_path):
    import mindspore as ms
    out = str(tmp_path)
    _msrun(out, ["--mp", "2", "--steps", "4",
                 "--monitor", "directory=plain,save_checkpoint_steps=2,async_save=1",
                 "--monitor", "directory=dedup,save_checkpoint_steps=2,remove_redundancy=1",
                 "--monitor", "directory=ck,save_checkpoint_steps=2,checkpoint_format=ckpt"])
    plain, dedup = os.path.join(out, "plain"), os.path.join(out, "dedup")
    for folder in (plain, dedup):
        assert verify_path(folder)[0] == []
    truth = _global_truth(out)
    for r, path in _rank_files(plain).items():              # each rank: exactly its trained slices
        local = np.load(os.path.join(out, "truth", f"rank_{r}.npz"))
        with open_safetensors(path) as f:
            for name in local.files:
                np.testing.assert_array_equal(f.read(name), local[name], err_msg=name)
        ck = ms.load_checkpoint(os.path.join(out, "ck", f"rank_{r}", f"CKP_rank_{r}-2_1.ckpt"))
        for name in local.files:
            np.testing.assert_array_equal(ck[name].asnumpy(), local[name], err_msg=name)
    blocks, (plain_bytes, dedup_bytes) = _check_dedup(plain, dedup)
    # mp2: split tensors are distinct per rank; only the replicated ones (norms) are shared
    split = [n for (n, b), r in blocks.items() if not b.is_whole]
    assert split and dedup_bytes < plain_bytes
    _check_merge(dedup, truth, out)
    _check_merge(plain, truth, out)
