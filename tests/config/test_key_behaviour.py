"""Keys this runtime honours that no other test set: each test sets the key in a run config and
checks what it does (the key walk, tests/config/test_key_walk.py, points here)."""
import os

import numpy as np
import pytest

from mindformers_st.config import load_config
from mindformers_st.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 40-document corpus: its tokenizer (vocab 320) and a MindRecord of 33-token rows."""
    from mindformers_st.data.builders import pack_pretrain, read_documents
    from mindformers_st.data.mindrecord import write_mindrecord
    from mindformers_st.data.tiny_corpus import CORPUS_FILE
    from mindformers_st.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    base = tmp_path_factory.mktemp("keys")
    docs = read_documents([CORPUS_FILE])[:40]
    (base / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    tok = str(base / "tokenizer.json")
    train_bpe_tokenizer([str(base / "corpus.txt")], 320, tok)
    rows = pack_pretrain(docs, load_tokenizer(tok), 32)[:22]     # 22 rows: batches of 4 leave 2
    data = write_mindrecord(str(base / "wiki.mindrecord"), {"input_ids": rows})
    return base, tok, data


def _config(base, tok, data, *overrides):
    return load_config(TINY, [
        ("use_parallel", "False"), ("train_dataset.data_loader.dataset_dir", data),
        ("output_dir", str(base / "out")), ("model.model_config.seq_length", "32"),
        ("model.model_config.vocab_size", "320"), ("processor.tokenizer.tokenizer_file", tok),
        ("callbacks", [{"type": "MFLossMonitor"}])] + list(overrides))


def _train(cfg):
    from mindformers_st.parallel.context import init_parallel
    from mindformers_st.trainer.resolve import parallel_config_of, resolve_model
    from mindformers_st.trainer.train import run_train
    ctx = init_parallel(parallel_config_of(cfg), False, "CPU", cfg.seed)
    return run_train(cfg, resolve_model(cfg), ctx)


@pytest.mark.slow
def test_clipping_keys_reach_the_train_step(tiny_run):
    clipped = _train(_config(*tiny_run, ("runner_config.train_steps", "2"),
                             ("runner_wrapper.max_grad_norm", "0.01")))
    free = _train(_config(*tiny_run, ("runner_config.train_steps", "2"),
                          ("runner_wrapper.use_clip_grad", "False")))
    assert clipped.train_step.clip_norm == 0.01 and free.train_step.clip_norm is None
    assert clipped.losses[0] == free.losses[0] and clipped.losses[1] != free.losses[1]


def test_data_keys_drop_remainder_workers_and_input_columns(tiny_run):
    from mindformers_st.data.mindrecord import TrainData
    from mindformers_st.trainer.train import _columns

    base, tok, data = tiny_run
    dropped = TrainData(data, ["input_ids"], 4, 1, 0, 0, drop_remainder=True)
    assert dropped.steps_per_epoch == 5                        # 22 rows: the last 2 are dropped
    with pytest.raises(ConfigError, match="drop_remainder"):   # a partial batch is refused
        TrainData(data, ["input_ids"], 4, 1, 0, 0, drop_remainder=False)
    two = TrainData(data, ["input_ids"], 4, 1, 0, 0, num_parallel_workers=2)
    for a, b in zip(dropped.batches(0), two.batches(0)):       # more readers, same batches
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    cfg = _config(*tiny_run, ("train_dataset.input_columns", ["input_ids", "attention_mask"]))
    with pytest.raises(ConfigError, match="input_columns.*attention_mask"):
        _columns(cfg, data)


def test_predict_batch_size_and_max_decode_length(tiny_run, capsys):
    from mindformers_st.parallel.context import init_parallel
    from mindformers_st.trainer.predict import run_predict
    from mindformers_st.trainer.resolve import parallel_config_of, resolve_model

    texts = []
    for batch in ("1", "2"):
        cfg = _config(*tiny_run, ("run_mode", "predict"), ("predict_data", ["the cat", "a dog ran"]),
                      ("predict_batch_size", batch), ("model.model_config.max_decode_length", "12"))
        ctx = init_parallel(parallel_config_of(cfg), False, "CPU", cfg.seed)
        texts.append(run_predict(cfg, resolve_model(cfg), ctx))
    assert [r["output_ids"] for r in texts[0]] == [r["output_ids"] for r in texts[1]]  # greedy
    for r in texts[0]:     # max_decode_length bounds prompt + generated tokens
        new = len(r["output_ids"]) - len(r["input_ids"])
        assert 1 <= new <= 12 - max(len(x["input_ids"]) for x in texts[0])


def test_warmup_lr_init_and_num_cycles_shape_the_schedule():
    from mindformers_st.trainer.lr import build_lr_schedule

    sched = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": 1.0, "warmup_steps": 2,
                               "warmup_lr_init": 0.5, "num_cycles": 1.0}, 10)
    assert sched.lr_at(0) == 0.5                      # warmup starts at warmup_lr_init
    assert sched.lr_at(9) > sched.lr_at(6)            # one whole cosine cycle comes back up


def test_beta1_beta2_are_betas():
    from mindformers_st.trainer.optim import build_optimizer

    class Net:
        def trainable_params(self):
            import mindspore as ms
            return [ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")]
    opt = build_optimizer(Net(), {"type": "AdamW", "beta1": 0.8, "beta2": 0.9}, 1e-3)
    assert (opt.beta1, opt.beta2) == (0.8, 0.9)


def test_ffn_dim_multiplier_scales_the_derived_intermediate_size():
    from mindformers_st.models.config import LlamaConfig

    base = dict(vocab_size=64, hidden_size=96, num_layers=1, num_heads=4, multiple_of=16)
    scaled = LlamaConfig.from_dict(dict(base, ffn_dim_multiplier=1.5))
    unscaled = LlamaConfig.from_dict(dict(base))
    # 4h*2/3 = 256, times 1.5 = 384, rounded up to multiple_of 16 (as MindSpore Transformers)
    assert (unscaled.intermediate_size, scaled.intermediate_size) == (256, 384)


def test_initializer_range_is_the_std_of_initial_weights():
    from mindformers_st.models.llama import global_init
    w = global_init("model.layers.0.attention.wq.weight", (256, 256), 0, 0.5)
    assert abs(float(w.std()) - 0.5) < 0.01
    from mindformers_st.models.config import LlamaConfig
    assert LlamaConfig.from_dict({"initializer_range": 0.5}).initializer_range == 0.5


def test_temperature_sharpens_or_flattens_sampling():
    from mindformers_st.trainer.generate import _choose
    logits = np.array([[0.0, 1.0, 0.5, -1.0]])
    rng = np.random.default_rng(0)
    assert {int(_choose(logits, rng, True, 0, 1.0, 0.01)[0]) for _ in range(30)} == {1}
    assert len({int(_choose(logits, rng, True, 0, 1.0, 100.0)[0]) for _ in range(60)}) == 4


def test_vocab_file_names_a_tokenizer_json_or_is_refused(tiny_run):
    from mindformers_st.trainer.resolve import tokenizer_file
    base, tok, data = tiny_run
    cfg = _config(base, "", data, ("processor.tokenizer.vocab_file", tok))
    assert tokenizer_file(cfg) == tok
    cfg = _config(base, "", data, ("processor.tokenizer.vocab_file", str(base / "tokenizer.model")))
    with pytest.raises(ConfigError, match="vocab_file"):
        tokenizer_file(cfg)


def test_embedding_init_type_other_than_param_init_type_is_refused():
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.models.config import LlamaConfig
    from mindformers_st.models.llama import LlamaForCausalLM
    from mindformers_st.parallel.context import init_parallel
    cfg = LlamaConfig.from_dict(dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=4,
                                     embedding_init_type="float16"))
    with pytest.raises(ConfigError, match="embedding_init_type"):
        LlamaForCausalLM(cfg, init_parallel(ParallelConfig(), False))
