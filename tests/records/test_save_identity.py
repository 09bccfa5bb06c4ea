"""Save identity: every rank file of a training save names its run and its save, and every read
path (the scanner, merge, reshard, inspect, verify, export-hf, the load hook, resume) refuses a
set of rank files that mixes runs or steps, naming the odd file."""
import os
import shutil

import numpy as np
import pytest
import yaml

from mindformers_st.cli import main
from mindformers_st.errors import CheckpointError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.records import names
from mindformers_st.records.commit import (CommittedSave, RankMeta, add_committed,
                                           load_committed_entries, read_rank_meta, write_rank_meta)
from mindformers_st.records.rank_meta import RankFileMeta, new_run_id, save_id_of
from mindformers_st.records.scan import select_save
from mindformers_st.storage.reader import read_header
from mindformers_st.storage.writer import save_tensors
from tests.transform.helpers import make_globals, save_distributed

MODEL = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             seq_length=16)
RUN_A, RUN_B = "a" * 32, "b" * 32


def _save(folder, run_id, seed, step=4, pc=ParallelConfig(model_parallel=2), commit=True):
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    save_distributed(str(folder), make_globals(table, seed), table, pc, prefix="llama",
                     suffix=f"1_{step}", run_id=run_id)
    if commit:
        files = {r: f"rank_{r}/{names.ckpt_file_name('llama', r, 1, step)}"
                 for r in range(pc.world_size)}
        add_committed(str(folder), pc.world_size,
                      CommittedSave(1, step, step, files, run_id=run_id,
                                    save_id=save_id_of(run_id, 1, step)))


def _swap(src_folder, dst_folder, rank, src_step=4, dst_step=4):
    """Put rank `rank`'s file of step `src_step` from `src_folder` under the name of step
    `dst_step` in `dst_folder`; returns its path."""
    src = os.path.join(src_folder, f"rank_{rank}", names.ckpt_file_name("llama", rank, 1, src_step))
    dst = os.path.join(dst_folder, f"rank_{rank}", names.ckpt_file_name("llama", rank, 1, dst_step))
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def mixed(tmp_path):
    """A committed save of run A whose rank 1 file was replaced by run B's file of the same step
    (another seed: other bytes, valid checksums)."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"model_config": MODEL}}))
    _save(tmp_path / "ckpt", RUN_A, seed=1)
    _save(tmp_path / "other", RUN_B, seed=2)
    return tmp_path, _swap(tmp_path / "other", tmp_path / "ckpt", 1)


def test_ids_round_trip_and_files_without_them_still_read(tmp_path):
    sl = TensorSlice((8, 4), (4, 0), (4, 4))
    meta = RankFileMeta(1, 2, {"w": sl}, None, False, 1, 20, run_id=RUN_A,
                        save_id=save_id_of(RUN_A, 1, 20))
    path = save_tensors(tmp_path / "f.safetensors", {"w": np.zeros((4, 4), np.float32)},
                        meta.to_metadata())
    assert RankFileMeta.from_metadata(read_header(str(path))[1]) == meta
    old = RankFileMeta(1, 2, {"w": sl}, None, False, 1, 20)       # written before identities
    assert "run_id" not in old.to_json()
    assert RankFileMeta.from_json(old.to_json()).run_id is None
    with pytest.raises(CheckpointError, match="'run_id' must be a non-empty string"):
        RankFileMeta.from_json(dict(old.to_json(), run_id=7), "f")
    assert new_run_id() != new_run_id() and len(new_run_id()) == 32
    entry = CommittedSave(1, 4, 4, {0: "rank_0/x"}, run_id=RUN_A, save_id="1_4@" + RUN_A)
    add_committed(str(tmp_path), 1, entry)
    assert load_committed_entries(str(tmp_path))[0].save_id == "1_4@" + RUN_A
    write_rank_meta(str(tmp_path), RankMeta(1, 4, "x", ("x",), RUN_A, "1_4@" + RUN_A))
    assert read_rank_meta(str(tmp_path)).run_id == RUN_A


def test_the_scanner_names_the_file_of_another_run(mixed):
    tmp, odd = mixed
    with pytest.raises(CheckpointError) as err:
        select_save(str(tmp / "ckpt"))
    assert err.value.args[0].startswith(str(tmp / "ckpt")) and odd in str(err.value)
    assert "another run" in str(err.value) and RUN_B in str(err.value)


def test_without_a_record_the_odd_file_is_named_too(tmp_path):
    pc = ParallelConfig(model_parallel=2, data_parallel=2)
    _save(tmp_path / "ckpt", RUN_A, seed=1, pc=pc, commit=False)
    _save(tmp_path / "other", RUN_B, seed=2, pc=pc, commit=False)
    odd = _swap(tmp_path / "other", tmp_path / "ckpt", 2)
    with pytest.raises(CheckpointError, match="another run") as err:
        select_save(str(tmp_path / "ckpt"))
    assert str(err.value).startswith(odd)


@pytest.mark.parametrize("cmd", ["merge", "reshard", "inspect", "verify", "export-hf"])
def test_every_command_refuses_the_mixed_set_by_name(mixed, cmd, capsys):
    tmp, odd = mixed
    args = {"merge": [str(tmp / "out"), "--no-progress"],
            "reshard": [str(tmp / "out"), "--no-progress", "--config", str(tmp / "cfg.yaml"),
                        "--dp", "2"],
            "inspect": [], "verify": [],
            "export-hf": [str(tmp / "out"), "--no-progress", "--config", str(tmp / "cfg.yaml")]}
    assert main([cmd, str(tmp / "ckpt")] + args[cmd]) == 1
    out = capsys.readouterr()
    assert odd in out.err + out.out
    assert not (tmp / "out").exists()


def test_the_load_hook_and_resume_refuse_the_mixed_set(mixed):
    from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
    from mindformers_st.checkpoint.resume import resume_checkpoint
    from tests.checkpoint.test_loader import make_ctx, make_model, make_optimizer
    tmp, odd = mixed
    pc = ParallelConfig(model_parallel=2)
    ctx = make_ctx(pc, 0)
    model = make_model(LlamaConfig.from_dict(dict(MODEL)), ctx)
    opts = LoadOptions(str(tmp / "ckpt"), "safetensors", use_parallel=True,
                       output_dir=str(tmp / "o"))
    with pytest.raises(CheckpointError, match="another run") as err:
        load_checkpoint(opts, model, None, ctx)
    assert odd in str(err.value)
    # resume falls back to an older committed save, never to the mixed one
    with pytest.raises(CheckpointError, match="no committed save can be read") as err:
        resume_checkpoint(opts, True, model, make_optimizer(model), ctx)
    assert odd in str(err.value)


def test_a_file_whose_header_names_another_step_than_its_name_is_refused(tmp_path, capsys):
    _save(tmp_path / "ckpt", RUN_A, seed=1, step=2, commit=False)
    _save(tmp_path / "ckpt", RUN_A, seed=2, step=4, commit=False)
    odd = _swap(tmp_path / "ckpt", tmp_path / "ckpt", 1, src_step=2, dst_step=4)
    with pytest.raises(CheckpointError, match="header says epoch 1 step 2 but its name says 1_4") as err:
        select_save(str(tmp_path / "ckpt"))
    assert str(err.value).startswith(odd)
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert odd in capsys.readouterr().err
    # with a commit record the header is checked against the record too
    files = {r: f"rank_{r}/{names.ckpt_file_name('llama', r, 1, 4)}" for r in range(2)}
    add_committed(str(tmp_path / "ckpt"), 2, CommittedSave(1, 4, 4, files))
    with pytest.raises(CheckpointError, match="header says rank 1 epoch 1 step 2") as err:
        select_save(str(tmp_path / "ckpt"))
    assert odd in str(err.value)
