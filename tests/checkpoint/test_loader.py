"""The load hook on a tiny real Llama: complete weights (one card, cut for mp2), distributed
weights (same layout, remove_redundancy, other layout refused, merged online, direct reshard),
Hugging Face folders converted online and reused, .ckpt files, and the missing/unexpected
report. Checkpoint files are made with our own storage and transform engine."""
import json
import logging
import os
import threading

import numpy as np
import pytest

from mindformers_st.checkpoint.derived import (FINGERPRINT_FILE, build_shared_folder, fingerprint,
                                               transform_ranks)
from mindformers_st.checkpoint.derived import wait_background_builds
from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
from mindformers_st.errors import CheckpointError, ConfigError
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.parallel.context import ParallelContext, init_parallel
from mindformers_st.storage.index import write_index
from mindformers_st.storage.writer import save_tensors
from mindformers_st.transform import describe_complete, execute, plan_distributed, plan_merge
from tests.conftest import TINY_LLAMA

TINY = TINY_LLAMA


# --------------------------------------------------------------------------- helpers
def tiny_cfg(**over):
    return LlamaConfig.from_dict({**TINY, **over})


def make_ctx(pc=ParallelConfig(), rank=0, use_parallel=None):
    """A ParallelContext for `rank` of `pc` without communication (loading needs none)."""
    init_parallel(ParallelConfig(), False, "CPU", seed=0)   # sets the MindSpore context
    return ParallelContext(rank=rank, world_size=pc.world_size, config=pc,
                           use_parallel=pc.world_size > 1 if use_parallel is None else use_parallel)


def make_model(cfg, ctx):
    return LlamaForCausalLM(cfg, ctx)


def make_optimizer(model):
    from mindformers_st.trainer.lr import build_lr_schedule
    from mindformers_st.trainer.optim import build_optimizer
    return build_optimizer(model, {"type": "AdamW"}, build_lr_schedule({"type": "ConstantWarmUpLR",
                                                                        "learning_rate": 1e-3}, 10))


def global_values(cfg, seed=0, optimizer=True):
    """Distinct random global tensors for every parameter (and AdamW moments)."""
    table = llama_param_table(cfg)
    if optimizer:
        table = table.with_optimizer_states()
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in table}


HYPER = {"global_step": np.array([6], np.int32), "epoch_num": np.array([1], np.int32),
         "step_num": np.array([6], np.int32)}


def write_complete(folder, values, hyper=HYPER):
    """Complete MindSpore weights: one shard, param_name_map.json, hyper_param.safetensors."""
    os.makedirs(folder, exist_ok=True)
    shard = "model-00001-of-00001.safetensors"
    path = save_tensors(os.path.join(folder, shard), values)
    write_index(folder, "ms", {n: shard for n in values}, os.path.getsize(path))
    if hyper:
        save_tensors(os.path.join(folder, "hyper_param.safetensors"), hyper)
    return folder


def write_distributed(folder, cfg, values, pc, remove_redundancy=False, suffix="1_6",
                      prefix="llama"):
    """rank_x/ weights as training under `pc` saves them (through the transform engine)."""
    complete = write_complete(str(folder) + "_complete_src", values)
    table = llama_param_table(cfg)
    if any(n.startswith("adam_") for n in values):
        table = table.with_optimizer_states()
    src = describe_complete(complete)
    if suffix:   # the step goes into every rank file's metadata, as training writes it
        src.epoch, src.step = (int(x) for x in suffix.split("_"))
    plan = plan_distributed(src, plan_layouts(table, pc), pc,
                            remove_redundancy=remove_redundancy, prefix=prefix)
    execute(plan, folder, workers=1, progress=False)
    if suffix:
        for r in range(pc.world_size):
            d = os.path.join(folder, f"rank_{r}")
            os.rename(os.path.join(d, f"{prefix}_rank_{r}.safetensors"),
                      os.path.join(d, f"{prefix}_rank_{r}-{suffix}.safetensors"))
    return folder


def expected_local(values, cfg, pc, rank, names):
    layouts = plan_layouts(llama_param_table(cfg).with_optimizer_states(), pc)
    return {n: values[n][layouts[n].slice_for(rank).index()] for n in names}


def assert_weights(model, values, cfg, pc, rank):
    got = model.get_local_params()
    want = expected_local(values, cfg, pc, rank, got)
    for n in got:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def opts(path, tmp_path, **kw):
    return LoadOptions(load_checkpoint=str(path), load_ckpt_format=kw.pop("fmt", "safetensors"),
                       output_dir=str(tmp_path / "output"), **kw)


# --------------------------------------------------------------------------- complete weights
def test_complete_weights_load_whole_on_one_card(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    folder = write_complete(tmp_path / "complete", values)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(folder, tmp_path), model, None, ctx)
    assert report.mode == "whole" and not report.missing and not report.unexpected
    assert sorted(report.loaded) == sorted(model.get_local_params())
    assert int(report.hyper["global_step"][0]) == 6
    assert_weights(model, values, cfg, ParallelConfig(), 0)


def test_complete_weights_are_cut_for_each_rank_of_mp2(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    folder = write_complete(tmp_path / "complete", values)
    pc = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
    for rank in (0, 1):
        ctx = make_ctx(pc, rank)
        model = make_model(cfg, ctx)
        report = load_checkpoint(opts(folder, tmp_path, use_parallel=True, auto_trans_ckpt=True),
                                 model, None, ctx)
        assert report.mode == "cut"
        assert_weights(model, values, cfg, pc, rank)


def test_complete_weights_refuse_the_wrong_auto_trans_combination(tmp_path):
    cfg = tiny_cfg()
    folder = write_complete(tmp_path / "complete", global_values(cfg, optimizer=False))
    pc = ParallelConfig(model_parallel=2)
    ctx = make_ctx(pc, 0)
    with pytest.raises(ConfigError, match="auto_trans_ckpt: True"):
        load_checkpoint(opts(folder, tmp_path, use_parallel=True), make_model(cfg, ctx), None, ctx)
    ctx1 = make_ctx()
    with pytest.raises(ConfigError, match="auto_trans_ckpt: False"):
        load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx1),
                        None, ctx1)


def test_one_complete_file_loads(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    path = save_tensors(str(tmp_path / "model.safetensors"), values)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    load_checkpoint(opts(path, tmp_path), model, None, ctx)
    assert_weights(model, values, cfg, ParallelConfig(), 0)


def test_missing_weight_is_an_error_and_unexpected_names_are_reported(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    del values["model.norm_out.weight"]
    values["model.extra.weight"] = np.ones((2,), np.float32)
    folder = write_complete(tmp_path / "complete", values)
    ctx = make_ctx()
    with pytest.raises(CheckpointError, match=r"model\.norm_out\.weight.*model\.extra\.weight"):
        load_checkpoint(opts(folder, tmp_path), make_model(cfg, ctx), None, ctx)
    values["model.norm_out.weight"] = np.ones((cfg.hidden_size,), np.float32)
    folder2 = write_complete(tmp_path / "complete2", values)
    report = load_checkpoint(opts(folder2, tmp_path), make_model(cfg, ctx), None, ctx)
    assert report.unexpected == ["model.extra.weight"] and not report.missing


def test_missing_optimizer_state_is_fine_to_finetune_but_not_to_resume(tmp_path):
    cfg = tiny_cfg()
    folder = write_complete(tmp_path / "complete", global_values(cfg, optimizer=False))
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(folder, tmp_path), model, make_optimizer(model), ctx)
    assert not report.optimizer_loaded
    with pytest.raises(CheckpointError, match="resume_training needs the optimizer state"):
        load_checkpoint(opts(folder, tmp_path), model, make_optimizer(model), ctx, resume=True)


def test_finetune_ignores_optimizer_state_resume_restores_it(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_complete(tmp_path / "complete", values)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    report = load_checkpoint(opts(folder, tmp_path), model, optimizer, ctx)
    assert report.optimizer_ignored and not report.unexpected and optimizer.step_count == 0
    report = load_checkpoint(opts(folder, tmp_path), model, optimizer, ctx, resume=True)
    assert report.optimizer_loaded and optimizer.step_count == 6
    state = optimizer.get_state_arrays()
    np.testing.assert_array_equal(state["adam_m.lm_head.weight"], values["adam_m.lm_head.weight"])


# --------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("remove_redundancy", [False, True])
def test_distributed_same_layout_loads_each_rank(tmp_path, remove_redundancy):
    cfg = tiny_cfg()
    values = global_values(cfg)
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    folder = write_distributed(tmp_path / "dist", cfg, values, pc, remove_redundancy)
    for rank in range(4):
        ctx = make_ctx(pc, rank)
        model = make_model(cfg, ctx)
        optimizer = make_optimizer(model)
        report = load_checkpoint(opts(folder, tmp_path, use_parallel=True), model, optimizer,
                                 ctx, resume=True)
        assert report.mode == "same_layout" and not report.missing
        assert (report.epoch, report.step) == (1, 6)
        assert_weights(model, values, cfg, pc, rank)
        want = expected_local(values, cfg, pc, rank, ["adam_v.model.layers.1.attention.wo.weight"])
        got = optimizer.get_state_arrays()["adam_v.model.layers.1.attention.wo.weight"]
        np.testing.assert_array_equal(got, want["adam_v.model.layers.1.attention.wo.weight"])


def test_distributed_other_layout_without_auto_trans_names_both_layouts(tmp_path):
    cfg = tiny_cfg()
    folder = write_distributed(tmp_path / "dist", cfg, global_values(cfg),
                               ParallelConfig(data_parallel=2))
    pc = ParallelConfig(model_parallel=2)
    ctx = make_ctx(pc, 1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(opts(folder, tmp_path, use_parallel=True), make_model(cfg, ctx), None, ctx)
    msg = str(err.value)
    assert "data_parallel=2 model_parallel=1" in msg and "data_parallel=1 model_parallel=2" in msg
    assert "auto_trans_ckpt: True" in msg and "src_strategy_path_or_dir" in msg


@pytest.mark.parametrize("remove_redundancy", [False, True])
def test_distributed_auto_trans_merges_online_then_loads(tmp_path, remove_redundancy):
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "dist", cfg, values,
                               ParallelConfig(data_parallel=2, model_parallel=2), remove_redundancy)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    report = load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), model, optimizer, ctx,
                             resume=True)
    # the load cuts from the rank files; the merged copy is written meanwhile (derived_write)
    unified = tmp_path / "output" / "unified_checkpoint"
    assert report.mode == "direct_reshard" and report.background == str(unified)
    assert_weights(model, values, cfg, ParallelConfig(), 0)
    assert optimizer.step_count == 6
    [build] = [b for b in wait_background_builds() if b.out_dir == str(unified)]
    assert build.committed and build.error is None
    assert (unified / "param_name_map.json").is_file() and (unified / "hyper_param.safetensors").is_file()
    assert not (tmp_path / "output" / "unified_checkpoint.building").exists()
    # the same source again: the merged copy is read and reused, not rebuilt
    before = os.stat(unified / FINGERPRINT_FILE).st_mtime_ns
    model2, opt2 = make_model(cfg, ctx), None
    opt2 = make_optimizer(model2)
    again = load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), model2, opt2, ctx,
                            resume=True)
    assert again.mode == "merge_and_cut" and again.background is None
    assert os.stat(unified / FINGERPRINT_FILE).st_mtime_ns == before
    assert_weights(model2, values, cfg, ParallelConfig(), 0)
    assert opt2.step_count == 6
    assert not [b for b in wait_background_builds() if b.out_dir == str(unified)]
    # derived_write: first merges before the load, as MindSpore Transformers does
    first = load_checkpoint(opts(folder, tmp_path / "o2", auto_trans_ckpt=True,
                                 derived_write="first"), make_model(cfg, ctx), None, ctx)
    assert first.mode == "merge_and_cut" and first.background is None
    assert (tmp_path / "o2" / "output" / "unified_checkpoint" / "param_name_map.json").is_file()


def test_the_background_merge_writes_only_after_the_load_has_read_its_sources(tmp_path,
                                                                               monkeypatch):
    """The merged copy shares the disk with nothing the load needs: its writing starts once
    this rank's sources are read and checked; a load that fails before reading still lets the
    build go (nothing waits forever)."""
    from mindformers_st.checkpoint import derived, loader as loader_mod
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "dist", cfg, values,
                               ParallelConfig(data_parallel=2, model_parallel=2), False)
    events = []
    read_slices, write_share = loader_mod._read_slices, derived._write_share

    def reading(*args, **kwargs):
        out = read_slices(*args, **kwargs)
        events.append("read")
        return out

    def writing(*args, **kwargs):
        events.append("write")
        return write_share(*args, **kwargs)
    monkeypatch.setattr(loader_mod, "_read_slices", reading)
    monkeypatch.setattr(derived, "_write_share", writing)
    ctx = make_ctx()
    report = load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx),
                             None, ctx)
    unified = str(tmp_path / "output" / "unified_checkpoint")
    assert report.background == unified
    [build] = [b for b in wait_background_builds() if b.out_dir == unified]
    assert build.committed and events == ["read", "write"]
    # a load that fails after starting the build but before reading: the build is released
    events.clear()

    def broken(*args, **kwargs):
        raise CheckpointError("balanced_load probe failed")
    monkeypatch.setattr(loader_mod, "balanced_load", broken)
    with pytest.raises(CheckpointError, match="probe failed"):
        load_checkpoint(opts(folder, tmp_path / "o2", auto_trans_ckpt=True),
                        make_model(cfg, ctx), None, ctx)
    built = [b for b in wait_background_builds() if "o2" in b.out_dir]
    assert [b.committed for b in built] == [True] and events == ["write"]


def test_a_background_load_whose_read_thread_cannot_start_releases_the_build(tmp_path,
                                                                             monkeypatch):
    """The merged copy waits for this load's read; when the read thread never starts (the
    system refuses a thread, an interrupt comes first) the error is raised and the build is
    released and committed, not left waiting forever (its thread keeps the process alive)."""
    from mindformers_st.checkpoint import derived, loader as loader_mod
    from mindformers_st.checkpoint.network import ModelState
    cfg = tiny_cfg()
    folder = write_distributed(tmp_path / "dist", cfg, global_values(cfg),
                               ParallelConfig(data_parallel=2, model_parallel=2), False)

    class NoStart(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    class Threading:   # what the loader sees of `threading`
        Event, Thread = threading.Event, NoStart
    monkeypatch.setattr(loader_mod, "threading", Threading)
    ctx = make_ctx()
    state = ModelState(make_model(cfg, ctx), None, ctx, with_optimizer=False)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        loader_mod.PendingLoad(opts(folder, tmp_path, auto_trans_ckpt=True), state, ctx,
                               background=True)
    unified = str(tmp_path / "output" / "unified_checkpoint")
    [build] = [b for b in list(derived._pending) if b.out_dir == unified]
    assert build.wait(60) and build.committed, "the build still waits for the read"
    assert derived.read_fingerprint(unified) is not None
    assert not os.path.exists(unified + ".building")
    wait_background_builds()


def test_an_interrupted_load_does_not_start_the_build_it_was_holding(tmp_path, monkeypatch):
    """Ctrl-C while this rank reads: the merged copy, held until the read, is cancelled — the
    interrupt is not kept waiting for a whole build, and no `.building` folder is left."""
    from mindformers_st.checkpoint import derived, loader as loader_mod
    cfg = tiny_cfg()
    folder = write_distributed(tmp_path / "dist", cfg, global_values(cfg),
                               ParallelConfig(data_parallel=2, model_parallel=2), False)
    writes = []
    write_share = derived._write_share

    def writing(*args, **kwargs):
        writes.append(args)
        return write_share(*args, **kwargs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(derived, "_write_share", writing)
    monkeypatch.setattr(loader_mod, "_read_slices", interrupted)
    ctx = make_ctx()
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx),
                        None, ctx)
    unified = str(tmp_path / "output" / "unified_checkpoint")
    [build] = [b for b in wait_background_builds() if b.out_dir == unified]
    assert writes == [] and "cancelled" in build.error and not build.committed
    assert not os.path.exists(unified) and not os.path.exists(unified + ".building")


def test_direct_reshard_cuts_from_rank_files_without_a_complete_copy(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "dist", cfg, values, ParallelConfig(data_parallel=2),
                               remove_redundancy=True)
    pc = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(folder, tmp_path, use_parallel=True, auto_trans_ckpt=True,
                                  direct_reshard=True), model, None, ctx)
    assert report.mode == "direct_reshard"
    assert not (tmp_path / "output" / "unified_checkpoint").exists()
    assert_weights(model, values, cfg, pc, 1)


def _param_pointers(model, optimizer=None):
    params = list(model.get_parameters())
    if optimizer is not None:
        params += list(optimizer.adam_m) + list(optimizer.adam_v)
    return {p.name: p.asnumpy().ctypes.data for p in params}


def _file_mappings():
    """(start, end, path) of every mapping of a file into this process (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip(), parts[1]))
    return out


def _mapped_from(pointer, folder):
    """The file under `folder` whose private (copy-on-write) mapping holds `pointer`, or None."""
    for lo, hi, path, perms in _file_mappings():
        if lo <= pointer < hi and path.startswith(str(folder)) and perms.endswith("p"):
            return path
    return None


def test_a_mapped_load_never_writes_its_file_and_outlives_it(tmp_path):
    """Parameters on the checkpoint file's copy-on-write pages: training steps change the
    parameters, never the file (its bytes are the same after); the file replaced by a newer
    one (a save renames over it) or removed after the load changes nothing the network holds,
    and the network still computes with what it holds."""
    import hashlib
    from mindformers_st.trainer.step import TrainStep
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_complete(tmp_path / "ckpt", values)
    shard = os.path.join(folder, "model-00001-of-00001.safetensors")

    def digest():
        return hashlib.sha256(open(shard, "rb").read()).hexdigest()
    before = digest()
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    load_checkpoint(opts(folder, tmp_path), model, None, ctx)   # loaded to predict: mapped
    optimizer = make_optimizer(model)   # then trained in the same process
    pointers = _param_pointers(model)
    assert all(_mapped_from(ptr, folder) for ptr in pointers.values())
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    step = TrainStep(model, optimizer, ctx)
    step(ids)
    step(ids)
    trained = model.get_local_params()
    assert any(not np.array_equal(trained[n], values[n]) for n in trained)
    assert digest() == before
    # a newer save takes the file's name, then the old folder goes: the network keeps its values
    newer = {n: np.full_like(v, 7) for n, v in values.items()}
    save_tensors(shard + ".new", newer)
    os.replace(shard + ".new", shard)
    for n, v in model.get_local_params().items():
        np.testing.assert_array_equal(v, trained[n], err_msg=n)
    import shutil
    shutil.rmtree(folder)
    reference = make_model(cfg, ctx)
    reference.set_local_params(trained)
    assert float(model(ms_tensor(ids)).asnumpy()) == float(reference(ms_tensor(ids)).asnumpy())


def test_a_network_a_compiled_graph_already_updated_keeps_training_after_the_load(tmp_path):
    """MindSpore's optimizers update as a compiled graph (their construct is @jit), which keeps
    the memory each parameter had when it first ran: a load giving such a parameter other
    memory (the file's pages; MindSpore's own load_param_into_net does the same) was ignored
    by every later update — the weights stayed the file's (measured on 2.10). The library
    load of any network therefore fills the parameters' own memory; `map_pages=True` maps the
    file's pages for a network no compiled graph has run yet."""
    from mindspore import Tensor, nn
    from mindformers_st.checkpoint.api import load_checkpoint as load_network
    make_ctx()
    net = nn.Dense(8, 4)
    values = {p.name: np.random.default_rng(3).standard_normal(p.shape).astype(np.float32)
              for p in net.get_parameters()}
    path = save_tensors(str(tmp_path / "w.safetensors"), values)
    opt = nn.SGD(net.trainable_params(), 0.5)
    grads = tuple(Tensor(np.ones(p.shape, np.float32)) for p in opt.parameters)
    opt(grads)   # the update graph is compiled and run before the load
    load_network(net, path, output_dir=str(tmp_path / "out"))
    opt(grads)
    for p in net.get_parameters():
        np.testing.assert_allclose(p.asnumpy(), values[p.name] - 0.5, atol=1e-6, err_msg=p.name)
    fresh = nn.Dense(8, 4)   # nothing has run it: its parameters may take the file's pages
    opt = nn.SGD(fresh.trainable_params(), 0.5)
    load_network(fresh, path, output_dir=str(tmp_path / "out"), map_pages=True)
    assert all(_mapped_from(p.asnumpy().ctypes.data, tmp_path) for p in fresh.get_parameters())
    opt(grads)
    for p in fresh.get_parameters():
        np.testing.assert_allclose(p.asnumpy(), values[p.name] - 0.5, atol=1e-6, err_msg=p.name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["whole", "cut", "same_layout", "merge_and_cut",
                                  "direct_reshard"])
def test_every_load_mode_copies_into_the_parameters_own_memory(tmp_path, mode, dtype):
    """Copy-once or no copy: a load for training (with the optimizer; resuming, the moments
    too) fills each parameter where it already lives — no second array handed to MindSpore;
    a load without an optimizer (predict: "whole" and "direct_reshard" here) makes the file's
    own copy-on-write pages the data of each parameter whose stored tensor is its whole value
    in its dtype, as MindSpore's safetensors load does (every fp32 tensor of a whole load; no
    bf16 weight, cast from the fp32 file); also after the parameters were used in a training
    step; the values are the checkpoint's bit for bit and the next step computes with them."""
    import ml_dtypes
    from mindformers_st.trainer.step import TrainStep
    cfg = tiny_cfg(param_init_type=dtype)
    values = global_values(cfg)
    one = ParallelConfig()
    pc = {"whole": one, "cut": ParallelConfig(model_parallel=2), "same_layout":
          ParallelConfig(model_parallel=2), "merge_and_cut": one,
          "direct_reshard": ParallelConfig(model_parallel=2)}[mode]
    rank = pc.world_size - 1
    resume = mode in ("same_layout", "merge_and_cut")
    predict = mode in ("whole", "direct_reshard")
    if mode in ("whole", "cut"):
        folder = write_complete(tmp_path / "ckpt", values)
    else:
        folder = write_distributed(tmp_path / "ckpt", cfg, values, ParallelConfig(
            model_parallel=2) if mode == "same_layout" else ParallelConfig(data_parallel=2))
    ctx = make_ctx(pc, rank)
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    if pc.world_size == 1:   # parameters already used by a step (mp>1 would need a group)
        TrainStep(model, optimizer, ctx)(ids)
    before = _param_pointers(model, optimizer if resume else None)
    report = load_checkpoint(opts(folder, tmp_path, use_parallel=pc.world_size > 1,
                                  auto_trans_ckpt=mode in ("cut", "merge_and_cut", "direct_reshard"),
                                  direct_reshard=mode == "direct_reshard",
                                  derived_write="first" if mode == "merge_and_cut" else
                                  "background"),
                             model, None if predict else optimizer, ctx, resume=resume)
    assert report.mode == mode and report.optimizer_loaded == resume
    after = _param_pointers(model, optimizer if resume else None)
    moved = {n: _mapped_from(ptr, tmp_path) for n, ptr in after.items() if ptr != before[n]}
    assert all(moved.values()), f"moved, but not onto a checkpoint file's pages: {moved}"
    if not predict or dtype == "bfloat16":   # training copies; bf16 is cast from the file
        assert not moved
    elif mode == "whole":   # every tensor stored whole
        assert sorted(moved) == sorted(after)
    else:   # the re-cut maps the tensors a dp2 rank file holds whole (replicated ones)
        assert moved and sorted(moved) != sorted(after)
    got = model.get_local_params()
    want = expected_local(values, cfg, pc, rank, got)
    for n in got:
        if dtype == "bfloat16":
            np.testing.assert_array_equal(got[n].view(np.uint16),
                                          want[n].astype(ml_dtypes.bfloat16).view(np.uint16), n)
        else:
            np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    if resume:
        moments = optimizer.get_state_arrays()
        want = expected_local(values, cfg, pc, rank, [n for n in moments if n != "global_step"])
        for n, v in want.items():
            np.testing.assert_array_equal(moments[n], v, err_msg=n)
        assert optimizer.step_count == 6
    if pc.world_size == 1:   # the step computes with the loaded values
        reference = make_model(cfg, ctx)
        reference.set_local_params(expected_local(values, cfg, pc, rank, got))
        assert float(model(ms_tensor(ids)).asnumpy()) == float(reference(ms_tensor(ids)).asnumpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_parameter_without_a_writable_view_is_given_the_filled_array(tmp_path, monkeypatch,
                                                                       dtype):
    """Where MindSpore hands out no view of a parameter's memory, the engine fills a new array
    and the parameter is given it; the values are the same."""
    import ml_dtypes
    import mindformers_st.checkpoint.network as network
    monkeypatch.setattr(network, "param_view", lambda p: None)
    cfg = tiny_cfg(param_init_type=dtype)
    values = global_values(cfg, optimizer=False)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    load_checkpoint(opts(write_complete(tmp_path / "ckpt", values), tmp_path), model, None, ctx)
    for n, got in model.get_local_params().items():
        want = values[n].astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else values[n]
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=n)


def ms_tensor(a):
    from mindspore import Tensor
    return Tensor(a)


def test_rank_file_path_loads_that_step_on_every_rank(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    pc = ParallelConfig(model_parallel=2)
    folder = write_distributed(tmp_path / "dist", cfg, values, pc, suffix="1_6")
    # another, later step with different values must not be picked
    write_distributed(tmp_path / "later", cfg, global_values(cfg, seed=9, optimizer=False), pc,
                      suffix="1_8")
    for r in range(2):
        os.rename(tmp_path / "later" / f"rank_{r}" / f"llama_rank_{r}-1_8.safetensors",
                  folder / f"rank_{r}" / f"llama_rank_{r}-1_8.safetensors")
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    named = folder / "rank_0" / "llama_rank_0-1_6.safetensors"
    report = load_checkpoint(opts(named, tmp_path, use_parallel=True), model, None, ctx)
    assert report.source.file_suffix == "1_6"
    assert_weights(model, values, cfg, pc, 1)


def test_transform_process_num_picks_ranks_as_mindspore_transformers(caplog):
    assert transform_ranks(1, 8) == [0]
    assert transform_ranks(2, 8) == [0, 4]
    assert transform_ranks(8, 8) == list(range(8))
    with caplog.at_level(logging.WARNING):
        assert transform_ranks(2, 1) == [0]          # more than the world: lowered, said
    assert "'transform_process_num' is 2" in caplog.text
    for bad in (3, 0, True):
        with pytest.raises(ConfigError, match="transform_process_num"):
            transform_ranks(bad, 8 if bad != 3 else 4)


@pytest.mark.parametrize("process_num", [1, 2])
def test_shared_folder_is_built_by_the_transform_process_num_ranks(tmp_path, process_num,
                                                                  monkeypatch):
    """Two ranks (threads with a real barrier) split one merge plan and commit once;
    transform_process_num 1 has rank 0 build it alone, 2 both (MindSpore Transformers)."""
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "dist", cfg, values, ParallelConfig(data_parallel=2))
    from mindformers_st.transform import describe_distributed
    src = describe_distributed(str(folder))
    plan = plan_merge(src, max_shard_size=4096)
    assert len(plan.files) > 2
    barrier = threading.Barrier(2)
    sums = []

    class Ctx:
        def __init__(self, rank):
            self.rank, self.world_size = rank, 2

        def barrier(self):
            barrier.wait(timeout=60)

        def all_reduce_sum(self, values):
            if barrier.wait(timeout=60) == 0:
                sums.clear()
            barrier.wait(timeout=60)
            sums.append(np.asarray(values))
            barrier.wait(timeout=60)
            return sum(sums)

    out = str(tmp_path / "unified")
    fp = fingerprint(src.files, src.root, {"kind": "merge"})
    results, errors, builders = {}, [], []
    import mindformers_st.checkpoint.derived as derived
    real_execute_files = derived.execute_files

    def run(rank):
        try:
            results[rank] = build_shared_folder(out, fp, plan, Ctx(rank), "test merge",
                                                process_num=process_num)
        except Exception as exc:   # surfaced below
            errors.append(exc)
            barrier.abort()

    def counting_execute_files(part, *args, **kw):   # which part each builder wrote
        builders.append(len(part.files))
        return real_execute_files(part, *args, **kw)
    monkeypatch.setattr(derived, "execute_files", counting_execute_files)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == {0: True, 1: True}
    assert len(builders) == process_num and sum(builders) == len(plan.files)
    merged = describe_complete(out)
    from mindformers_st.storage.reader import open_safetensors
    for name in ("model.layers.0.attention.wq.weight", "adam_m.lm_head.weight"):
        chunk = merged.chunks[name][0]
        with open_safetensors(chunk.file) as f:
            np.testing.assert_array_equal(f.read(name), values[name])
    assert json.load(open(os.path.join(out, FINGERPRINT_FILE))) == fp


# --------------------------------------------------------------------------- Hugging Face
def _hf_folder(tmp_path, cfg, values, dtype=np.float32):
    from mindformers_st.convert import export_hf_folder
    weights = {n: v.astype(dtype) for n, v in values.items() if not n.startswith("adam_")}
    ms_dir = write_complete(tmp_path / "ms_for_hf", weights, hyper=None)
    model_config = {**TINY, "rms_norm_eps": 1e-5, "theta": 10000.0}
    hf = str(tmp_path / "hf")
    export_hf_folder(str(ms_dir), hf, model_config, progress=False)
    return hf


@pytest.mark.parametrize("bf16", [False, True])
def test_hf_folder_is_converted_once_reused_and_rebuilt_when_changed(tmp_path, bf16):
    import ml_dtypes
    cfg = tiny_cfg(param_init_type="bfloat16" if bf16 else "float32")
    values = global_values(cfg, optimizer=False)
    dtype = ml_dtypes.bfloat16 if bf16 else np.float32
    hf = _hf_folder(tmp_path, cfg, values, dtype)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(hf, tmp_path), model, None, ctx)
    converted = tmp_path / "output" / "ms_safetensors"
    # read straight from the HF files; ms_safetensors written meanwhile
    assert report.source.kind == "hf" and report.mode == "whole" and report.path == hf
    assert report.background == str(converted)
    assert [b.committed for b in wait_background_builds() if b.out_dir == str(converted)] == [True]
    assert (converted / "param_name_map.json").is_file()
    want = {n: v.astype(dtype) for n, v in values.items()}
    for n, got in model.get_local_params().items():
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(want[n], np.float32), err_msg=n)
    stamp = os.stat(converted / FINGERPRINT_FILE).st_mtime_ns
    again = make_model(cfg, ctx)
    report = load_checkpoint(opts(hf, tmp_path), again, None, ctx)
    assert os.stat(converted / FINGERPRINT_FILE).st_mtime_ns == stamp   # reused
    assert report.path == str(converted) and report.background is None
    for n, got in again.get_local_params().items():   # the written copy holds the same bytes
        assert np.asarray(got).tobytes() == model.get_local_params()[n].tobytes(), n
    shard = [f for f in os.listdir(hf) if f.endswith(".safetensors")][0]
    st = os.stat(os.path.join(hf, shard))
    os.utime(os.path.join(hf, shard), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_checkpoint(opts(hf, tmp_path), make_model(cfg, ctx), None, ctx)
    wait_background_builds()
    assert os.stat(converted / FINGERPRINT_FILE).st_mtime_ns != stamp   # rebuilt


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_folder_cut_for_mp2(tmp_path, family):
    cfg = tiny_cfg(qkv_has_bias=family == "qwen2")
    values = global_values(cfg, optimizer=False)
    hf = _hf_folder(tmp_path, cfg, values)
    arch = json.load(open(os.path.join(hf, "config.json")))["architectures"]
    assert arch == ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"]
    one = make_ctx()   # converts (a lone fake rank of 2 cannot build the shared copy alone)
    load_checkpoint(opts(hf, tmp_path), make_model(cfg, one), None, one)
    pc = ParallelConfig(model_parallel=2)
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    load_checkpoint(opts(hf, tmp_path, use_parallel=True, auto_trans_ckpt=True), model, None, ctx)
    assert_weights(model, values, cfg, pc, 1)


# --------------------------------------------------------------------------- .ckpt
def test_ckpt_files_load_through_a_safetensors_copy(tmp_path):
    import mindspore as ms
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in values.items()],
                       str(folder / "llama.ckpt"))
    ctx = make_ctx()
    with pytest.raises(ConfigError, match="load_ckpt_format: 'ckpt'"):
        load_checkpoint(opts(folder, tmp_path), make_model(cfg, ctx), None, ctx)
    model = make_model(cfg, ctx)
    load_checkpoint(opts(folder, tmp_path, fmt="ckpt"), model, None, ctx)
    assert (tmp_path / "output" / "ckpt_safetensors" / "llama.safetensors").is_file()
    assert_weights(model, values, cfg, ParallelConfig(), 0)


def test_training_folder_loads_its_newest_committed_save_not_a_crashed_one(tmp_path):
    from mindformers_st.records.commit import CommittedSave, add_committed
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    pc = ParallelConfig(model_parallel=2)
    folder = write_distributed(tmp_path / "ckpt", cfg, values, pc, suffix="1_6")
    add_committed(str(folder), 2, CommittedSave(
        1, 6, 6, {r: f"rank_{r}/llama_rank_{r}-1_6.safetensors" for r in range(2)}))
    crashed = write_distributed(tmp_path / "crashed", cfg, global_values(cfg, 3, False), pc,
                                suffix="1_8")
    for r in range(2):   # step 8 was written by both ranks but never committed
        name = f"llama_rank_{r}-1_8.safetensors"
        os.rename(crashed / f"rank_{r}" / name, folder / f"rank_{r}" / name)
    ctx = make_ctx(pc, 0)
    model = make_model(cfg, ctx)
    report = load_checkpoint(opts(folder, tmp_path, use_parallel=True), model, None, ctx)
    assert report.source.file_suffix == "1_6"
    assert_weights(model, values, cfg, pc, 0)


def _strip_metadata(folder, world):
    """Rewrite every rank file as MindSpore saves it: tensors only, no slice metadata."""
    from mindformers_st.storage.writer import load_tensors
    for r in range(world):
        d = os.path.join(folder, f"rank_{r}")
        for name in os.listdir(d):
            path = os.path.join(d, name)
            save_tensors(path, load_tensors(path), metadata={"format": "ms"})


def test_mindspore_rank_files_need_the_source_strategy_to_be_recut(tmp_path):
    from mindformers_st.layout.strategy import write_rank_strategy_files
    cfg = tiny_cfg()
    values = global_values(cfg)
    src_pc = ParallelConfig(data_parallel=2, model_parallel=2)
    folder = write_distributed(tmp_path / "dist", cfg, values, src_pc, remove_redundancy=True)
    _strip_metadata(folder, 4)
    strategy = str(tmp_path / "strategy")
    write_rank_strategy_files(strategy, plan_layouts(
        llama_param_table(cfg).with_optimizer_states(), src_pc), src_pc)
    ctx = make_ctx()
    with pytest.raises(CheckpointError, match="set src_strategy_path_or_dir"):
        load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx), None, ctx)
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True, src_strategy_path_or_dir=strategy),
                    model, optimizer, ctx, resume=True)
    assert_weights(model, values, cfg, ParallelConfig(), 0)
    assert optimizer.step_count == 6


def test_mindspore_rank_files_of_this_layout_load_without_a_strategy(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    pc = ParallelConfig(model_parallel=2)
    folder = write_distributed(tmp_path / "dist", cfg, values, pc)
    _strip_metadata(folder, 2)
    ctx = make_ctx(pc, 1)
    model = make_model(cfg, ctx)
    load_checkpoint(opts(folder, tmp_path, use_parallel=True), model, None, ctx)
    assert_weights(model, values, cfg, pc, 1)
    other = ParallelConfig(model_parallel=2, vocab_emb_dp=False)   # embedding cut differently
    ctx2 = make_ctx(other, 0)
    with pytest.raises(CheckpointError, match="auto_trans_ckpt: True"):
        load_checkpoint(opts(folder, tmp_path, use_parallel=True), make_model(cfg, ctx2), None, ctx2)


def test_hf_folder_is_fused_for_a_qkv_concat_model(tmp_path):
    """A qkv_concat model gets w_qkv / w_gate_hidden built from the HF q/k/v and gate/up
    weights; its logits equal those of the unfused model loaded from the same folder."""
    from mindformers_st.checkpoint.derived import read_fingerprint
    import mindspore as ms
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    hf = _hf_folder(tmp_path, cfg, values)
    ctx = make_ctx()
    plain = make_model(cfg, ctx)
    load_checkpoint(opts(hf, tmp_path), plain, None, ctx)
    fused = make_model(tiny_cfg(qkv_concat=True), ctx)
    report = load_checkpoint(opts(hf, tmp_path), fused, None, ctx)
    assert "model.layers.0.attention.w_qkv.weight" in report.loaded
    wait_background_builds()
    assert read_fingerprint(str(tmp_path / "output" / "ms_safetensors"))["options"]["qkv_concat"]
    ids = ms.Tensor(np.array([[1, 5, 9, 3, 7]], np.int32))
    a = plain.forward_logits(ids)[0].asnumpy()
    b = fused.forward_logits(ids)[0].asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _as_our_ckpt(folder, world):
    """Rewrite every rank file as CheckpointMonitor writes checkpoint_format: ckpt (its own
    description carried in the .ckpt), through the monitor's own writer."""
    from mindformers_st.checkpoint.state import RankSnapshot, write_rank_file
    from mindformers_st.records.rank_meta import RankFileMeta
    from mindformers_st.storage.reader import read_header
    from mindformers_st.storage.writer import load_tensors
    for r in range(world):
        d = os.path.join(folder, f"rank_{r}")
        for name in os.listdir(d):
            path = os.path.join(d, name)
            meta = RankFileMeta.from_metadata(read_header(path)[1], path)
            write_rank_file(path[:-len(".safetensors")] + ".ckpt",
                            RankSnapshot(load_tensors(path), dict(meta.slices), meta), "ckpt")
            os.remove(path)


def test_our_ckpt_rank_files_are_recut_without_a_strategy(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    folder = write_distributed(tmp_path / "dist", cfg, values,
                               ParallelConfig(data_parallel=2, model_parallel=2),
                               remove_redundancy=True)
    _as_our_ckpt(folder, 4)
    ctx = make_ctx()
    model = make_model(cfg, ctx)
    optimizer = make_optimizer(model)
    report = load_checkpoint(opts(folder, tmp_path, fmt="ckpt", auto_trans_ckpt=True), model,
                             optimizer, ctx, resume=True)
    assert report.mode == "direct_reshard", report.summary()   # unified_checkpoint meanwhile
    assert_weights(model, values, cfg, ParallelConfig(), 0)
    assert optimizer.step_count == 6
    # rank files that do not describe themselves: the error says what is missing, not who wrote them
    _strip_metadata(tmp_path / "output" / "ckpt_safetensors", 4)
    import shutil
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "output" / "ckpt_safetensors", folder)
    with pytest.raises(CheckpointError, match="no 'mindformers_st' metadata") as err:
        load_checkpoint(opts(folder, tmp_path / "o2", auto_trans_ckpt=True), make_model(cfg, ctx),
                        None, ctx)
    assert "MindSpore" not in str(err.value)


def test_the_load_report_names_the_source_and_the_copy_it_read(tmp_path, capsys):
    cfg = tiny_cfg()
    values = global_values(cfg, optimizer=False)
    folder = write_distributed(tmp_path / "dist", cfg, values, ParallelConfig(model_parallel=2))
    ctx = make_ctx()
    load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx), None, ctx)
    line = capsys.readouterr().out
    assert f"from distributed safetensors {folder} (mode direct_reshard)" in line
    assert f"writing {tmp_path / 'output' / 'unified_checkpoint'} in the background" in line
    wait_background_builds()
    load_checkpoint(opts(folder, tmp_path, auto_trans_ckpt=True), make_model(cfg, ctx), None, ctx)
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"from distributed safetensors {folder} via " in line
    assert os.path.join("output", "unified_checkpoint") in line and "(mode merge_and_cut)" in line
