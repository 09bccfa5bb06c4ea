"""RoPE scaling, Llama biases and explicit head_dim: our frequencies and logits against
transformers' own, and the config refusals (names of the offending keys)."""
import numpy as np
import pytest

from mindspore import Tensor

from mindformers_st.convert.hf_config import hf_config_to_model_config
from mindformers_st.convert.rules import ms_to_hf_name
from mindformers_st.errors import ConfigError
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.models.rope import inv_freq

from .test_llama import ids_batch, make, randomize_biases

torch = pytest.importorskip("torch", reason="torch not installed")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

MAX_POS = 16
# config.json rotary settings, in transformers 4 (rope_theta + rope_scaling) and 5 forms
ROPES = {
    "default": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                    "factor": 4.0}},
    "llama3": {"rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
}


def hf_cfg(rope="default", head_dim=None, attention_bias=False, mlp_bias=False, hidden=32):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
           "hidden_size": hidden, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "max_position_embeddings": MAX_POS, "tie_word_embeddings": False,
           "hidden_act": "silu", "attention_bias": attention_bias, "mlp_bias": mlp_bias}
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in ROPES[rope].items()})
    return cfg


def hf_inv_freq(cfg, seq_len=None):
    conf = transformers.LlamaConfig(**cfg)
    kind = conf.rope_parameters["rope_type"]
    if kind == "default":
        base, dim = conf.rope_parameters["rope_theta"], conf.head_dim
        return (1.0 / base ** (torch.arange(0, dim, 2).float() / dim)).numpy()
    fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind]
    return fn(conf, "cpu", seq_len=seq_len)[0].numpy()


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("head_dim", [None, 12])
def test_inverse_frequencies_are_transformers_own(rope, head_dim):
    cfg = hf_cfg(rope, head_dim)
    mc = LlamaConfig.from_dict(hf_config_to_model_config(cfg))
    for seq_len in (None, MAX_POS, 3 * MAX_POS + 5):
        want = hf_inv_freq(cfg, seq_len)
        got = inv_freq(mc.head_dim, mc.theta, mc.extend_method, mc.scaling_factor, seq_len)
        np.testing.assert_allclose(got, want, rtol=2e-6)
    plain = inv_freq(mc.head_dim, mc.theta)
    if rope != "default":   # the scaling is really there
        assert np.abs(inv_freq(mc.head_dim, mc.theta, mc.extend_method, mc.scaling_factor,
                               3 * MAX_POS) - plain).max() > 1e-3


def sharpen_attention(model, params, scale=25.0):
    """Scale q/k weights so attention is peaked and positions visibly matter."""
    for name in params:
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            params[name] = params[name] * np.asarray(scale, params[name].dtype)
    model.set_local_params(params)
    return params


def _load_into_hf(model, cfg):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    state = {ms_to_hf_name(n, "llama"): torch.tensor(v) for n, v in model.get_local_params().items()}
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("rope,head_dim,biases", [
    ("default", None, True), ("linear", None, False), ("dynamic", 12, False),
    ("llama3", None, True), ("llama3", 12, True)])
def test_logits_equal_transformers_past_the_original_length(rope, head_dim, biases):
    """A sequence longer than max_position_embeddings (where dynamic NTK kicks in)."""
    cfg = hf_cfg(rope, head_dim, attention_bias=biases, mlp_bias=biases)
    mc = hf_config_to_model_config(cfg)
    mc.pop("max_position_embedding")
    _, model = make(**{**mc, "seq_length": 3 * MAX_POS})
    sharpen_attention(model, randomize_biases(model, seed=1))
    hf = _load_into_hf(model, cfg)
    ids = ids_batch(model.cfg, s=2 * MAX_POS + 3)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = model.forward_logits(Tensor(ids))[0].asnumpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    if rope != "default":   # dropping the scaling would be 20x the tolerance away
        plain = dict(mc, extend_method="None", scaling_factor=1.0, seq_length=3 * MAX_POS)
        _, unscaled = make(**plain)
        unscaled.set_local_params(model.get_local_params())
        assert np.abs(unscaled.forward_logits(Tensor(ids))[0].asnumpy() - want).max() > 4e-3


def test_llama_biases_are_parameters_with_mindspore_transformers_names():
    cfg, model = make(qkv_has_bias=True, attn_proj_has_bias=True, mlp_has_bias=True)
    names = {p.name for p in model.get_parameters()}
    for n in ("attention.wq.bias", "attention.wo.bias", "feed_forward.w1.bias",
              "feed_forward.w2.bias", "feed_forward.w3.bias"):
        assert f"model.layers.1.{n}" in names
    table = llama_param_table(cfg).by_name()
    assert table["model.layers.0.attention.wo.bias"].split_dim is None     # added after g
    assert table["model.layers.0.feed_forward.w2.bias"].split_dim is None
    assert table["model.layers.0.feed_forward.w1.bias"].split_dim == 0
    fused = llama_param_table(LlamaConfig.from_dict(dict(cfg.to_dict(), qkv_concat=True)))
    assert fused.by_name()["model.layers.0.feed_forward.w_gate_hidden.bias"].shape == \
        (2 * cfg.intermediate_size,)


def test_explicit_head_dim_shapes_the_projections():
    cfg = LlamaConfig.from_dict({"hidden_size": 30, "num_heads": 4, "n_kv_heads": 2,
                                 "head_dim": 12, "vocab_size": 64, "num_layers": 1,
                                 "intermediate_size": 40})
    t = llama_param_table(cfg).by_name()
    assert t["model.layers.0.attention.wq.weight"].shape == (48, 30)
    assert t["model.layers.0.attention.wk.weight"].shape == (24, 30)
    assert t["model.layers.0.attention.wo.weight"].shape == (30, 48)


@pytest.mark.parametrize("over,words", [
    ({"extend_method": "YARN", "scaling_factor": {"factor": 4.0}}, ["extend_method", "YARN"]),
    ({"extend_method": "ROPE2"}, ["extend_method", "ROPE2"]),
    ({"extend_method": "LLAMA3", "scaling_factor": {"factor": 8.0}},
     ["scaling_factor", "low_freq_factor"]),
    ({"extend_method": "linear", "scaling_factor": {"factor": 2.0, "beta": 1.0}},
     ["scaling_factor", "beta"]),
    ({"extend_method": "linear", "scaling_factor": 2.0}, ["scaling_factor", "mapping"]),
    ({"extend_method": "NTK", "scaling_factor": {"factor": 2.0}}, ["scaling_factor", "number"]),
    ({"head_dim": 7}, ["head dim 7", "even"]),
])
def test_rope_settings_not_implemented_are_refused_by_name(over, words):
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_dict({"hidden_size": 32, "num_heads": 4, **over})
    for w in words:
        assert w in str(err.value)
