"""`load_ckpt_async: True`: the load is prepared and its bytes read and checked on a background
thread before the network exists; finishing it sets exactly what a synchronous load sets, and
a read error surfaces as the same error before anything is set (never a silent random start)."""
import threading

import numpy as np
import pytest

from mindformers_st.checkpoint.hook import load_weights, start_load_weights
from mindformers_st.errors import ChecksumError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.records.commit import CommittedSave, add_committed
from mindformers_st.storage.reader import read_header

from .test_loader import (global_values, make_ctx, make_model, make_optimizer, tiny_cfg,
                          write_complete, write_distributed)
from .test_resume import _run_config


def _params(model, optimizer=None):
    out = {n: np.array(v) for n, v in model.get_local_params().items()}
    if optimizer is not None:
        out.update((p.name, p.asnumpy().copy()) for p in list(optimizer.adam_m) +
                   list(optimizer.adam_v))
        out["global_step"] = optimizer.global_step.asnumpy().copy()
    return out


def _flip(path, name):
    tensors, _, start = read_header(path)
    with open(path, "r+b") as fh:
        fh.seek(start + tensors[name].begin + 3)
        b = fh.read(1)
        fh.seek(start + tensors[name].begin + 3)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("resume", [False, True])
def test_async_load_sets_exactly_what_a_synchronous_load_sets(tmp_path, resume, monkeypatch,
                                                              capsys):
    cfg = tiny_cfg()
    ctx = make_ctx()
    folder = write_distributed(tmp_path / "ckpt", cfg, global_values(cfg), ParallelConfig(),
                               suffix="1_6")
    add_committed(str(folder), 1, CommittedSave(1, 6, 6, {0: "rank_0/llama_rank_0-1_6.safetensors"}))
    config = _run_config(load_checkpoint=str(folder), output_dir=str(tmp_path / "out"),
                         resume_training=resume)
    sync_model = make_model(cfg, ctx)
    sync_opt = make_optimizer(sync_model)
    load_weights(sync_model, ctx, config, sync_opt)

    import mindformers_st.checkpoint.loader as loader
    readers = []

    def reading(*args, **kw):   # on which thread the bytes are read
        readers.append(threading.current_thread().name)
        return real(*args, **kw)
    real = loader.prepare_read
    monkeypatch.setattr(loader, "prepare_read", reading)
    pending = start_load_weights(ctx, config, llama_param_table(cfg), with_optimizer=True)
    model = make_model(cfg, ctx)                     # built while the read runs
    opt = make_optimizer(model)
    report = load_weights(model, ctx, config, opt, pending=pending)
    assert readers == ["load_ckpt_async"]
    assert "load_ckpt_async: read and checked in" in capsys.readouterr().out
    assert report.optimizer_loaded == resume and (report.resume is not None) == resume
    want, got = _params(sync_model, sync_opt), _params(model, opt)
    assert sorted(want) == sorted(got)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    if not resume:   # the optimizer was left as built
        fresh = _params(make_model(cfg, ctx), make_optimizer(make_model(cfg, ctx)))
        assert int(got["global_step"].reshape(-1)[0]) == int(fresh["global_step"].reshape(-1)[0])


def test_a_corrupt_file_read_in_the_background_raises_before_anything_is_set(tmp_path):
    cfg = tiny_cfg()
    ctx = make_ctx()
    values = global_values(cfg, optimizer=False)
    folder = write_complete(tmp_path / "complete", values)
    # a file we wrote, with checksums: flip one byte of one weight
    import glob
    shard = glob.glob(str(folder / "model-*.safetensors"))[0]
    _flip(shard, "model.layers.0.attention.wq.weight")
    config = _run_config(load_checkpoint=str(folder), output_dir=str(tmp_path / "out"))
    pending = start_load_weights(ctx, config, llama_param_table(cfg), with_optimizer=False)
    model = make_model(cfg, ctx)
    before = _params(model)
    with pytest.raises(ChecksumError, match="model.layers.0.attention.wq.weight.*is corrupt"):
        load_weights(model, ctx, config, pending=pending)
    after = _params(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    # the synchronous load raises the very same error
    with pytest.raises(ChecksumError) as sync:
        load_weights(make_model(cfg, ctx), ctx, config)
    with pytest.raises(ChecksumError) as again:
        load_weights(model, ctx, config, pending=start_load_weights(
            ctx, config, llama_param_table(cfg), with_optimizer=False))
    assert str(sync.value) == str(again.value)
