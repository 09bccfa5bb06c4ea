"""`balanced_load` on 2 msrun workers (dp2): complete weights cut online, rank files re-cut
straight (`direct_reshard`), a Hugging Face folder read through its conversion plan and a
resume with optimizer state load bit-identical parameters with
and without it, each rank reading about half of what it reads alone; a corrupt tensor fails the
load on both ranks (the reader's checksum, checked before anything is shared) instead of
hanging the other."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.storage.reader import read_header

from .test_loader import (_hf_folder, expected_local, global_values, tiny_cfg, write_complete,
                          write_distributed)

HERE = os.path.dirname(os.path.abspath(__file__))


def _flip(path, name):
    tensors, _, start = read_header(path)
    with open(path, "r+b") as fh:
        fh.seek(start + tensors[name].begin + 3)
        b = fh.read(1)
        fh.seek(start + tensors[name].begin + 3)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_balanced_load_sets_the_same_parameters_and_reads_each_byte_once(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "models"))
    from msrun_util import run_msrun
    cfg = tiny_cfg()
    weights = global_values(cfg, optimizer=False)
    values = global_values(cfg)
    complete = write_complete(tmp_path / "complete", weights)
    corrupt = shutil.copytree(complete, tmp_path / "corrupt")
    _flip(os.path.join(corrupt, "model-00001-of-00001.safetensors"), "lm_head.weight")
    mp2 = write_distributed(tmp_path / "mp2", cfg, weights, ParallelConfig(model_parallel=2),
                            remove_redundancy=True)
    dp2 = write_distributed(tmp_path / "dp2", cfg, values, ParallelConfig(data_parallel=2))
    hf = _hf_folder(tmp_path, cfg, weights)
    cases = [dict(name="cut", path=str(complete), auto_trans_ckpt=True, direct_reshard=False,
                  resume=False),
             dict(name="direct", path=str(mp2), auto_trans_ckpt=True, direct_reshard=True,
                  resume=False),
             dict(name="resume", path=str(dp2), auto_trans_ckpt=False, direct_reshard=False,
                  resume=True),
             # read through the conversion plan while ms_safetensors is written meanwhile
             dict(name="hf", path=hf, auto_trans_ckpt=True, direct_reshard=False, resume=False),
             dict(name="corrupt", path=str(corrupt), auto_trans_ckpt=True, direct_reshard=False,
                  resume=False)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases.json").write_text(json.dumps(cases))
    rc, logs = run_msrun(os.path.join(HERE, "balanced_worker.py"), [out], 2, tmp_path / "logs",
                         timeout=240)
    assert rc == 0, logs
    rec = {r: json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)}
    pc = ParallelConfig(data_parallel=2)
    for r in (0, 1):
        for name, mode in (("cut", "cut"), ("direct", "direct_reshard"), ("resume", "same_layout"),
                           ("hf", "cut")):
            off, on = rec[r][f"{name}_off"], rec[r][f"{name}_on"]
            assert off["mode"] == on["mode"] == mode
            if name == "hf":   # both read through the conversion plan, not ms_safetensors
                assert off["background"] and on["background"]
            assert off["exchange"] is None and on["exchange"]["collectives"] >= 1
            # the world group's AllGather, and (forced for "direct") the sub-groups' AllReduce
            gathers = on["exchange"]["gathers"]
            assert gathers == 0 if name == "direct" else gathers == on["exchange"]["collectives"]
            a = np.load(out / f"{name}_off_rank{r}.npz")
            b = np.load(out / f"{name}_on_rank{r}.npz")
            assert sorted(a.files) == sorted(b.files)
            for n in a.files:   # bit for bit, NaN payloads and -0.0 included
                assert a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes(), (name, n)
            want = expected_local(values, cfg, pc, r, [n for n in b.files if n in values])
            for n, v in want.items():
                np.testing.assert_array_equal(b[n], v, err_msg=f"{name} {n}")
        # a corrupt tensor: both ranks fail with a checksum error, with and without balancing
        for key in ("corrupt_off", "corrupt_on"):
            assert rec[r][key]["error"].startswith("ChecksumError"), rec[r][key]
    # ... and the same line, naming the tensor, though only one of them read it when balanced
    for key in ("corrupt_off", "corrupt_on"):
        assert " ".join(rec[0][key]["error"].split()) == " ".join(rec[1][key]["error"].split())
        assert "lm_head.weight" in rec[0][key]["error"], rec[0][key]
    # bytes read from storage: dp2 replicas read everything twice alone, once balanced
    biggest = max(v.nbytes for v in values.values())
    for name in ("cut", "direct", "resume", "hf"):
        off = [rec[r][f"{name}_off"]["read_bytes"] for r in (0, 1)]
        on = [rec[r][f"{name}_on"]["read_bytes"] for r in (0, 1)]
        assert off[0] == off[1] and sum(on) == off[0], (name, off, on)
        assert all(abs(x - off[0] / 2) <= biggest for x in on), (name, off, on)
    assert rec[0]["default_on_one_host"] is False and rec[1]["default_on_one_host"] is False
    resume_on = rec[0]["resume_on"]["exchange"]
    assert resume_on["received_bytes"] == rec[1]["resume_on"]["read_bytes"]
