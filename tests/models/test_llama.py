"""Single-card LlamaForCausalLM: names, init, forward against a numpy reference, KV cache,
GQA, biases, tied embeddings, bf16 parameters, loss masking, and clear refusals."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mindformers_st.errors import CheckpointError, LayoutError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM, global_init
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.parallel.context import init_parallel

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=64, seq_length=16, theta=10000.0)


def make(**over):
    cfg = LlamaConfig.from_dict({**TINY, **over})
    ctx = init_parallel(ParallelConfig(), False, "CPU", seed=3)
    return cfg, LlamaForCausalLM(cfg, ctx)


def randomize_biases(model, seed=0):
    params = model.get_local_params()
    rng = np.random.default_rng(seed)
    for name in params:
        if name.endswith(".bias") or "norm" in name:
            params[name] = rng.normal(1.0 if "norm" in name else 0.0, 0.2,
                                      params[name].shape).astype(np.float32)
    model.set_local_params(params)
    return model.get_local_params()


# ---- an independent numpy Llama (HF conventions) ---------------------------------------
def ref_logits(p, cfg, ids):
    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    b, s = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.n_kv_heads
    inv = 1.0 / cfg.theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(s)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    def lin(x, name):
        y = x @ p[name + ".weight"].T
        return y + p[name + ".bias"] if name + ".bias" in p else y

    h = p["model.tok_embeddings.embedding_weight"][ids].astype(np.float64)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        x = rms(h, p[pre + "attention_norm.weight"])
        q = rope(lin(x, pre + "attention.wq").reshape(b, s, nh, hd).transpose(0, 2, 1, 3))
        k = rope(lin(x, pre + "attention.wk").reshape(b, s, nkv, hd).transpose(0, 2, 1, 3))
        v = lin(x, pre + "attention.wv").reshape(b, s, nkv, hd).transpose(0, 2, 1, 3)
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.triu(np.full((s, s), -1e30), 1)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        h = h + lin((pr @ v).transpose(0, 2, 1, 3).reshape(b, s, -1), pre + "attention.wo")
        x = rms(h, p[pre + "ffn_norm.weight"])
        g = lin(x, pre + "feed_forward.w1")
        h = h + lin(g / (1 + np.exp(-g)) * lin(x, pre + "feed_forward.w3"), pre + "feed_forward.w2")
    h = rms(h, p["model.norm_out.weight"])
    w = p.get("lm_head.weight", p["model.tok_embeddings.embedding_weight"])
    return h @ w.T


def ids_batch(cfg, b=2, s=9, seed=0):
    return np.random.default_rng(seed).integers(1, cfg.vocab_size, (b, s)).astype(np.int32)


# ---- tests -----------------------------------------------------------------------------
def test_parameter_names_are_mindspore_transformers_names_and_init_is_layout_free():
    cfg, model = make()
    names = [p.name for p in model.get_parameters()]
    assert sorted(names) == sorted(p.name for p in llama_param_table(cfg))
    assert "model.layers.0.attention.wq.weight" in names
    assert "model.tok_embeddings.embedding_weight" in names and "lm_head.weight" in names
    params = model.get_local_params()
    wq = params["model.layers.1.attention.wq.weight"]
    np.testing.assert_array_equal(wq, global_init("model.layers.1.attention.wq.weight", (32, 32), 3, 0.02))
    assert abs(wq.std() - 0.02) < 0.005
    np.testing.assert_array_equal(params["model.norm_out.weight"], np.ones(32, np.float32))


@pytest.mark.parametrize("over", [{}, {"qkv_has_bias": True}, {"tie_word_embeddings": True},
                                  {"n_kv_heads": 4}, {"n_kv_heads": 1, "theta": 500000.0},
                                  {"qkv_has_bias": True, "attn_proj_has_bias": True,
                                   "mlp_has_bias": True}, {"head_dim": 12}])
def test_logits_match_an_independent_numpy_llama(over):
    cfg, model = make(**over)
    params = randomize_biases(model)
    ids = ids_batch(cfg)
    got, _ = model.forward_logits(Tensor(ids))
    want = ref_logits({k: v.astype(np.float64) for k, v in params.items()}, cfg, ids)
    np.testing.assert_allclose(got.asnumpy(), want, atol=2e-5, rtol=1e-4)


def test_biases_change_the_output():
    cfg, model = make(qkv_has_bias=True)
    ids = Tensor(ids_batch(cfg))
    before = model.forward_logits(ids)[0].asnumpy()
    randomize_biases(model)
    assert np.abs(model.forward_logits(ids)[0].asnumpy() - before).max() > 1e-3


def test_tied_embeddings_have_no_lm_head_and_share_the_table():
    cfg, model = make(tie_word_embeddings=True)
    names = [p.name for p in model.get_parameters()]
    assert "lm_head.weight" not in names
    loss = model(Tensor(ids_batch(cfg, s=cfg.seq_length + 1)))
    grads = ms.grad(model, None, model.trainable_params())(Tensor(ids_batch(cfg, s=17)))
    emb_grad = grads[names.index("model.tok_embeddings.embedding_weight")].asnumpy()
    assert np.isfinite(float(loss)) and np.abs(emb_grad).sum() > 0


def test_kv_cache_decoding_equals_the_full_forward():
    cfg, model = make(qkv_has_bias=True)
    randomize_biases(model)
    ids = ids_batch(cfg, b=2, s=8)
    full = model.forward_logits(Tensor(ids))[0].asnumpy()
    logits, cache = model.forward_logits(Tensor(ids[:, :5]))
    steps = [logits.asnumpy()]
    for t in range(5, 8):
        logits, cache = model.forward_logits(Tensor(ids[:, t:t + 1]), cache=cache)
        steps.append(logits.asnumpy())
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)
    assert cache[0][0].shape == (2, cfg.n_kv_heads, 8, cfg.head_dim)


def test_left_padding_gives_the_same_logits_as_no_padding():
    cfg, model = make()
    ids = ids_batch(cfg, b=1, s=6)
    alone = model.forward_logits(Tensor(ids))[0].asnumpy()[0, -1]
    padded = np.concatenate([np.zeros((1, 3), np.int32), ids], 1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 6))], 1)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int64)
    got = model.forward_logits(Tensor(padded), mask, pos)[0].asnumpy()[0, -1]
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_loss_is_cross_entropy_of_shifted_tokens_and_masks_pad_and_ignored_labels():
    cfg, model = make()
    params = model.get_local_params()
    ids = ids_batch(cfg, b=2, s=9)
    logits = ref_logits({k: v.astype(np.float64) for k, v in params.items()}, cfg, ids[:, :-1])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(model(Tensor(ids))), nll.mean(), rtol=1e-5)
    labels = ids.copy()
    labels[0, 1:5] = cfg.ignore_token_id
    keep = np.ones_like(nll, bool)
    keep[0, :4] = False
    np.testing.assert_allclose(float(model(Tensor(ids), Tensor(labels))), nll[keep].mean(), rtol=1e-5)
    padded = ids.copy()
    padded[1, 3] = cfg.pad_token_id       # the token read at position 3 is pad: not counted
    keep = np.ones_like(nll, bool)
    keep[1, 3] = False
    logits = ref_logits({k: v.astype(np.float64) for k, v in params.items()}, cfg, padded[:, :-1])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, padded[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(model(Tensor(padded))), nll[keep].mean(), rtol=1e-5)


def test_gradient_matches_finite_differences():
    cfg, model = make(qkv_has_bias=True)
    ids = Tensor(ids_batch(cfg, b=1, s=7))
    names = [p.name for p in model.trainable_params()]
    grads = ms.grad(model, None, model.trainable_params())(ids)
    params = model.get_local_params()
    for name, idx in (("model.layers.0.attention.wk.weight", (3, 5)),
                      ("model.layers.1.feed_forward.w2.weight", (7, 11)),
                      ("model.layers.0.attention.wq.bias", (2,)),
                      ("model.norm_out.weight", (4,))):
        eps = 1e-2
        vals = []
        for sign in (1, -1):
            p = dict(params)
            p[name] = params[name].copy()
            p[name][idx] += sign * eps
            model.set_local_params(p)
            vals.append(float(model(ids)))
        model.set_local_params(params)
        numeric = (vals[0] - vals[1]) / (2 * eps)
        analytic = grads[names.index(name)].asnumpy()[idx]
        assert abs(numeric - analytic) < 2e-3 + 2e-2 * abs(analytic), name


def test_bf16_parameters_train_and_keep_their_dtype():
    from mindformers_st.trainer.lr import build_lr_schedule
    from mindformers_st.trainer.optim import build_optimizer
    from mindformers_st.trainer.step import TrainStep
    cfg, model = make(param_init_type="bfloat16", compute_dtype="bfloat16")
    assert {p.dtype for p in model.get_parameters()} == {ms.bfloat16}
    opt = build_optimizer(model, {"type": "AdamW"}, build_lr_schedule(
        {"type": "ConstantWarmUpLR", "learning_rate": 1e-2, "warmup_steps": 0}, 10))
    step = TrainStep(model, opt, model.ctx)
    ids = ids_batch(cfg, s=17)
    losses = [step(ids) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {p.dtype for p in model.get_parameters()} == {ms.bfloat16}
    state = opt.get_state_arrays()
    assert state["adam_m.lm_head.weight"].dtype == np.float32 and state["global_step"][0] == 3


def test_set_local_params_rejects_wrong_shapes_and_names():
    _, model = make()
    params = model.get_local_params()
    with pytest.raises(CheckpointError, match="wq"):
        model.set_local_params({**params, "model.layers.0.attention.wq.weight": np.zeros((3, 3))})
    with pytest.raises(CheckpointError, match="missing"):
        model.set_local_params({"model.norm_out.weight": params["model.norm_out.weight"]})


def _stage_model(cfg, pc, rank):
    ctx = init_parallel(ParallelConfig(), False, "CPU")
    ctx.config, ctx.rank = pc, rank
    return LlamaForCausalLM(cfg, ctx)


def test_pipeline_stages_hold_the_layouts_share_under_global_names():
    cfg = LlamaConfig.from_dict(dict(TINY, num_layers=4))
    pc = ParallelConfig(pipeline_stage=2, micro_batch_num=2)
    first, last = _stage_model(cfg, pc, 0), _stage_model(cfg, pc, 1)
    table = llama_param_table(cfg)
    for stage, model in enumerate((first, last)):
        expected = {n for n, lay in model.layouts().items() if lay.stage == stage}
        assert set(model.get_local_params()) == expected
    assert "model.tok_embeddings.embedding_weight" in first.get_local_params()
    assert {"model.layers.2.attention.wq.weight", "model.layers.3.ffn_norm.weight",
            "model.norm_out.weight", "lm_head.weight"} <= set(last.get_local_params())
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.", "lm_head"))
                   for n in first.get_local_params())
    specs = table.by_name()
    for model in (first, last):     # every stage starts from the same global weights
        for name, value in model.get_local_params().items():
            np.testing.assert_array_equal(value, global_init(name, specs[name].shape, 0,
                                                             cfg.initializer_range))
    with pytest.raises(LayoutError, match="pipeline stage"):
        first(Tensor(np.ones((1, 5), np.int32)))


def test_unsupported_setups_fail_with_clear_errors():
    cfg = LlamaConfig.from_dict(TINY)
    ctx = init_parallel(ParallelConfig(), False, "CPU")
    ctx.config = ParallelConfig(model_parallel=4)      # n_kv_heads 2 cannot split over 4
    with pytest.raises(LayoutError, match="n_kv_heads"):
        LlamaForCausalLM(cfg, ctx)


def fuse_params(params, cfg):
    """Unfused MindSpore Transformers weights -> qkv_concat ones, with convert/fuse.py layouts."""
    from mindformers_st.convert.fuse import ffn_blocks, fuse_rows, qkv_blocks
    out = dict(params)
    for i in range(cfg.num_layers):
        a, f = f"model.layers.{i}.attention.", f"model.layers.{i}.feed_forward."
        for kind in ("weight", "bias"):
            if a + "wq." + kind in params:
                out[a + "w_qkv." + kind] = fuse_rows(
                    [out.pop(a + w + "." + kind) for w in ("wq", "wk", "wv")],
                    qkv_blocks(cfg.num_heads, cfg.n_kv_heads, cfg.head_dim))
        out[f + "w_gate_hidden.weight"] = fuse_rows(
            [out.pop(f + "w1.weight"), out.pop(f + "w3.weight")], ffn_blocks(cfg.intermediate_size))
    return out


def test_qkv_concat_model_with_fused_weights_equals_the_unfused_model():
    cfg, model = make(qkv_has_bias=True)
    params = randomize_biases(model)
    fcfg, fused = make(qkv_has_bias=True, qkv_concat=True)
    names = {p.name for p in fused.get_parameters()}
    assert "model.layers.0.attention.w_qkv.bias" in names
    assert "model.layers.1.feed_forward.w_gate_hidden.weight" in names
    assert names == {p.name for p in llama_param_table(fcfg)}
    fused.set_local_params(fuse_params(params, cfg))
    ids = ids_batch(cfg)
    np.testing.assert_allclose(fused.forward_logits(Tensor(ids))[0].asnumpy(),
                               model.forward_logits(Tensor(ids))[0].asnumpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_model_gives_the_same_logits(family):
    """Our weights under HF names in transformers' Llama / Qwen2 (q/k/v biases) give our logits."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    cfg, model = make(qkv_has_bias=(family == "qwen2"))
    params = randomize_biases(model)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.n_kv_heads,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.theta, tie_word_embeddings=False)
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=False, **common))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    hf = hf.eval()
    rename = {"tok_embeddings.embedding_weight": "embed_tokens.weight", "attention.wq": "self_attn.q_proj",
              "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
              "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
              "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
              "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "norm_out": "norm"}
    state = {}
    for name, value in params.items():
        for a, b in rename.items():
            name = name.replace(a, b)
        state[name] = torch.tensor(value)
    hf.load_state_dict(state, strict=True)
    ids = ids_batch(cfg)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(model.forward_logits(Tensor(ids))[0].asnumpy(), want, atol=1e-4)


def test_pipeline_batch_rules_follow_mindspore_transformers(caplog):
    from types import SimpleNamespace
    from mindformers_st.errors import ConfigError
    from mindformers_st.trainer.lr import build_lr_schedule
    from mindformers_st.trainer.optim import build_optimizer
    from mindformers_st.trainer.step import TrainStep
    from mindformers_st.trainer.train import pipeline_rows
    pc = ParallelConfig(pipeline_stage=2, micro_batch_num=3)
    # global batch = batch_size x dp x micro_batch_num; gradient accumulation is named and unused
    assert pipeline_rows(SimpleNamespace(batch_size=4, gradient_accumulation_steps=1), pc) == 12
    with caplog.at_level("WARNING"):
        assert pipeline_rows(SimpleNamespace(batch_size=4, gradient_accumulation_steps=2), pc) == 12
    assert "gradient_accumulation_steps" in caplog.text
    model = _stage_model(LlamaConfig.from_dict(TINY), pc, 0)
    opt = build_optimizer(model, None, build_lr_schedule(None, 4))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        TrainStep(model, opt, model.ctx, accumulation_steps=2)
    with pytest.raises(ConfigError, match="micro_batch_num=3"):
        TrainStep(model, opt, model.ctx)(np.ones((4, 9), np.int32))
