"""CheckpointMonitor's MindSpore (Transformers) options, in MindSpore's own Model.train: the
append_info scalars stored beside the resume values (and in hyper_param.safetensors after a
merge), saved_network, .ckpt encryption (refused for safetensors), the health record."""
import json
import os

import numpy as np
import pytest

from mindformers_st import CheckpointMonitor, load_checkpoint
from mindformers_st.errors import ConfigError
from mindformers_st.records.commit import load_committed_entries
from mindformers_st.storage.reader import open_safetensors
from tests.checkpoint.test_model_train import _net_and_data

EXTRA = {"run_id": 7, "tag": 0.5, "warm": True}


def _train(tmp_path, monitor, theirs=None, epochs=1):
    from mindspore import nn
    from mindspore.train import Model

    net, data = _net_and_data()
    opt = nn.AdamWeightDecay(net.trainable_params(), 1e-3)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt)
    mon = monitor(net)
    model.train(epochs, data, callbacks=[mon] + ([theirs(net)] if theirs else []),
                dataset_sink_mode=False)
    return net, opt, mon


def test_append_info_is_stored_as_mindspore_stores_it_and_merged_into_hyper_param(tmp_path):
    from mindspore.train import CheckpointConfig, ModelCheckpoint

    info = ["epoch_num", dict(EXTRA)]
    _train(tmp_path, lambda net: CheckpointMonitor(
        prefix="net", checkpoint_format="safetensors", save_checkpoint_steps=3,
        output_dir=str(tmp_path), append_info=info),
        lambda net: ModelCheckpoint(prefix="net", directory=str(tmp_path / "ms"), config=CheckpointConfig(
            save_checkpoint_steps=3, format="safetensors", append_info=info)))
    mine = load_committed_entries(str(tmp_path / "checkpoint"))[-1].path(0)
    with open_safetensors(mine) as f, open_safetensors(str(tmp_path / "ms" / "net-1_6.safetensors")) as g:
        for name in EXTRA:   # same value and dtype as MindSpore's own ModelCheckpoint
            np.testing.assert_array_equal(f.read(name), g.read(name), err_msg=name)
            assert f.tensors[name].dtype == g.tensors[name].dtype, name
    from mindformers_st.cli import main
    assert main(["merge", str(tmp_path / "checkpoint"), str(tmp_path / "merged")]) == 0
    with open_safetensors(str(tmp_path / "merged" / "hyper_param.safetensors")) as h:
        assert {n: h.read(n).item() for n in EXTRA} == EXTRA
    from mindformers_st.commands.inspect import scan, summarize
    hyper = summarize(scan(str(tmp_path / "merged")))["hyper"]
    assert {n: hyper[n][0] for n in EXTRA} == EXTRA
    # a resume reads its own values and leaves the extra ones alone (as MindSpore Transformers)
    net, _ = _net_and_data()
    from mindspore import nn
    report = load_checkpoint(net, str(tmp_path / "checkpoint"),
                             optimizer=nn.AdamWeightDecay(net.trainable_params(), 1e-3),
                             resume=True, steps_per_epoch=6)
    assert report.resume_point is not None


@pytest.mark.parametrize("info, why", [
    ({"a": 1}, "must be a list"), (["loss"], "is not one of"), ([{"a": "x"}], "int, float or bool"),
    ([{"a": 1}, {"b": 2}], "more than one mapping"), ([{"step_num": 3}], "training state")])
def test_bad_append_info_is_refused_by_name(info, why):
    with pytest.raises(ConfigError, match=why):
        CheckpointMonitor(append_info=info)


def test_saved_network_saves_that_cell_only(tmp_path):
    from mindspore.train import CheckpointConfig, ModelCheckpoint

    holder = {}

    def ours(net):
        holder["net"] = net
        return CheckpointMonitor(prefix="net", checkpoint_format="safetensors",
                                 save_checkpoint_steps=6, output_dir=str(tmp_path), saved_network=net)
    _train(tmp_path, ours, lambda net: ModelCheckpoint(
        prefix="net", directory=str(tmp_path / "ms"),
        config=CheckpointConfig(save_checkpoint_steps=6, format="safetensors", saved_network=net)))
    mine = load_committed_entries(str(tmp_path / "checkpoint"))[-1].path(0)
    with open_safetensors(mine) as f, open_safetensors(str(tmp_path / "ms" / "net-1_6.safetensors")) as g:
        weights = {n for n in f.tensors if not n.startswith("adam_")}
        assert not any(n.startswith("adam_") for n in f.tensors)       # no optimizer state
        assert set(g.tensors) <= weights
        for name in g.tensors:
            np.testing.assert_array_equal(f.read(name), g.read(name), err_msg=name)
        assert int(f.read("step_num")) == 6      # the train network's step, not the cell's
    with pytest.raises(ConfigError, match="saved_network"):
        CheckpointMonitor(saved_network="net")


def test_enc_key_encrypts_ckpt_saves_and_is_refused_for_safetensors(tmp_path):
    import mindspore as ms

    key = b"0123456789abcdef"
    net, _, _ = _train(tmp_path, lambda net: CheckpointMonitor(
        prefix="net", checkpoint_format="ckpt", save_checkpoint_steps=6, output_dir=str(tmp_path),
        enc_key=key, enc_mode="AES-CBC"))
    path = load_committed_entries(str(tmp_path / "checkpoint"))[-1].path(0)
    with pytest.raises(ValueError):
        ms.load_checkpoint(path)                                         # unreadable without the key
    params = ms.load_checkpoint(path, dec_key=key, dec_mode="AES-CBC")
    np.testing.assert_array_equal(params["fc1.weight"].asnumpy(), net.fc1.weight.asnumpy())
    for kw in ({"enc_key": key}, {"enc_mode": "AES-CBC"}):
        with pytest.raises(ConfigError, match="safetensors files are never encrypted"):
            CheckpointMonitor(checkpoint_format="safetensors", **kw)
    with pytest.raises(ConfigError, match="16, 24 or 32"):
        CheckpointMonitor(enc_key=b"short")
    with pytest.raises(ConfigError, match="enc_mode"):
        CheckpointMonitor(enc_key=key, enc_mode="ROT13")


def test_health_monitor_records_every_committed_save(tmp_path):
    _train(tmp_path, lambda net: CheckpointMonitor(
        prefix="net", checkpoint_format="safetensors", save_checkpoint_steps=3,
        output_dir=str(tmp_path), use_checkpoint_health_monitor=True, keep_checkpoint_max=1), epochs=2)
    with open(tmp_path / "health_ckpts.json", encoding="utf-8") as fh:
        record = json.load(fh)
    # one pipeline stage: the embedding norm is never compared, every save is healthy (as
    # MindSpore Transformers); pruned saves stay listed, as there
    assert record == [{"is_health": 0, "ckpt_name": f"net_rank_0-{e}_{s}.safetensors"}
                      for e, s in ((1, 3), (1, 6), (2, 3), (2, 6))]
    with pytest.raises(ConfigError, match="must be a float"):
        CheckpointMonitor(use_checkpoint_health_monitor=True, embedding_local_norm_threshold=1)
    assert not os.path.exists(tmp_path / "other" / "health_ckpts.json")


TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "configs", "llama2", "pretrain_llama2_tiny.yaml")


@pytest.mark.parametrize("fmt, key, value, why", [
    ("ckpt", "enc_key", "abc", "bytes key, which a YAML value cannot be"),
    ("safetensors", "enc_key", "abc", "safetensors files are never encrypted"),
    ("safetensors", "saved_network", "net", "nn.Cell"),
])
def test_yaml_cannot_set_what_mindspore_takes_as_an_object(fmt, key, value, why):
    from mindformers_st.config import load_config
    with pytest.raises(ConfigError, match=f"callbacks.1.{key}'.*{why}"):
        load_config(TINY, [("callbacks.1.checkpoint_format", fmt), ("callbacks.1.remove_redundancy", "False"),
                           (f"callbacks.1.{key}", value)])


def test_health_monitor_without_a_checkpoint_monitor_is_warned_about(caplog):
    import logging
    from mindformers_st.config import load_config
    with caplog.at_level(logging.WARNING):
        cfg = load_config(TINY, [("use_checkpoint_health_monitor", "True"),
                                 ("callbacks", [{"type": "MFLossMonitor"}])])
    assert cfg.use_checkpoint_health_monitor
    assert "'use_checkpoint_health_monitor' = True has no effect here" in caplog.text


@pytest.mark.slow
def test_run_mindformer_stores_append_info_and_records_health(tmp_path):
    """Our own loop, through run_mindformer.py: the YAML's append_info lands in every save and in
    hyper_param.safetensors after a merge; the top-level use_checkpoint_health_monitor writes
    output_dir/health_ckpts.json (as MindSpore Transformers' trainer wires it)."""
    import subprocess
    import sys
    from mindformers_st.data.builders import pack_pretrain, read_documents
    from mindformers_st.data.mindrecord import write_mindrecord
    from mindformers_st.data.tiny_corpus import CORPUS_FILE
    from mindformers_st.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    docs = read_documents([CORPUS_FILE])[:40]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    tok = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer([str(corpus)], 320, tok)
    data = write_mindrecord(str(tmp_path / "wiki.mindrecord"),
                            {"input_ids": pack_pretrain(docs, load_tokenizer(tok), 32)})
    out = tmp_path / "out"
    root = os.path.dirname(TINY).rsplit(os.sep + "configs", 1)[0]
    res = subprocess.run(
        [sys.executable, "run_mindformer.py", "--config", TINY, "--use_parallel", "False",
         "--train_dataset_dir", data, "--output_dir", str(out), "--model.model_config.seq_length", "32",
         "--model.model_config.vocab_size", "320", "--runner_config.train_steps", "2",
         "--processor.tokenizer.tokenizer_file", tok, "--callbacks.1.save_checkpoint_steps", "2",
         "--callbacks.1.append_info", "[epoch_num, {run_id: 7, tag: 0.5}]",
         "--use_checkpoint_health_monitor", "True"],
        cwd=root, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ckpt = str(out / "checkpoint")
    with open_safetensors(load_committed_entries(ckpt)[-1].path(0)) as f:
        assert (f.read("run_id").item(), f.tensors["run_id"].dtype) == (7, "I64")
        assert (f.read("tag").item(), f.tensors["tag"].dtype) == (0.5, "F32")
    with open(out / "health_ckpts.json", encoding="utf-8") as fh:
        assert json.load(fh) == [{"is_health": 0, "ckpt_name": "llama2_tiny_rank_0-1_2.safetensors"}]
    from mindformers_st.cli import main
    assert main(["merge", ckpt, str(tmp_path / "merged")]) == 0
    with open_safetensors(str(tmp_path / "merged" / "hyper_param.safetensors")) as h:
        assert (h.read("run_id").item(), h.read("tag").item()) == (7, 0.5)


def test_verify_accepts_a_save_with_append_info(tmp_path):
    _train(tmp_path, lambda net: CheckpointMonitor(
        prefix="net", checkpoint_format="safetensors", save_checkpoint_steps=6,
        output_dir=str(tmp_path), append_info=[dict(EXTRA)]))
    from mindformers_st.cli import main
    assert main(["verify", str(tmp_path / "checkpoint")]) == 0
