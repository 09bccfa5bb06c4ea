"""config.json <-> model_config, and family detection."""
import pytest

from mindformers_st.convert.hf_config import (detect_family, hf_config_to_model_config,
                                              model_config_to_hf_config)
from mindformers_st.errors import ConversionError

from .helpers import hf_config


def test_llama3_config_becomes_model_config_fields():
    mc = hf_config_to_model_config(hf_config("llama", heads=4, kv_heads=2, dtype="bfloat16"))
    assert mc == {"vocab_size": 32, "hidden_size": 16, "num_layers": 2, "num_heads": 4,
                  "n_kv_heads": 2, "head_dim": 4, "intermediate_size": 24, "rms_norm_eps": 1e-5,
                  "theta": 500000.0, "extend_method": "None", "scaling_factor": 1.0,
                  "qkv_has_bias": False, "attn_proj_has_bias": False, "mlp_has_bias": False,
                  "tie_word_embeddings": False,
                  "seq_length": 128, "max_position_embedding": 128,
                  "param_init_type": "bfloat16", "compute_dtype": "bfloat16"}


def test_transformers4_style_rope_theta_and_torch_dtype_are_read():
    cfg = hf_config("qwen2", tied=True)
    del cfg["rope_parameters"], cfg["dtype"]
    cfg.update(rope_theta=1000000.0, torch_dtype="float16", num_key_value_heads=None)
    mc = hf_config_to_model_config(cfg)
    assert mc["theta"] == 1000000.0 and mc["param_init_type"] == "float16"
    assert mc["qkv_has_bias"] is True and mc["tie_word_embeddings"] is True
    assert mc["n_kv_heads"] == mc["num_heads"] == 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_config_round_trips_through_config_json(family):
    cfg = hf_config(family, kv_heads=1, tied=family == "qwen2")
    back = hf_config_to_model_config(model_config_to_hf_config(
        hf_config_to_model_config(cfg), family))
    assert back == hf_config_to_model_config(cfg)


@pytest.mark.parametrize("change,match", [
    ({"head_dim": 7}, "head_dim"), ({"hidden_act": "gelu"}, "silu"),
    ({"hidden_size": 18}, "divisible")])
def test_configs_the_model_cannot_represent_are_refused(change, match):
    cfg = dict(hf_config("llama"), **change)
    with pytest.raises(ConversionError, match=match):
        hf_config_to_model_config(cfg)


def test_family_detection():
    assert detect_family({"architectures": ["Qwen2ForCausalLM"]}) == "qwen2"
    assert detect_family({"model_type": "llama"}) == "llama"
    assert detect_family(None, ["model.layers.0.self_attn.q_proj.bias"]) == "qwen2"
    assert detect_family(None, ["model.norm.weight"]) == "llama"
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):  # named with its model_type
        detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


# ---- RoPE scaling, both transformers forms ------------------------------------------------
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope,method,sf", [
    ({"rope_type": "default"}, "None", 1.0),
    ({"rope_type": "linear", "factor": 2.0}, "linear", {"factor": 2.0}),
    ({"rope_type": "dynamic", "factor": 4}, "DYNAMIC_NTK",
     {"factor": 4.0, "original_max_position_embeddings": 128}),
    (dict(LLAMA3, rope_type="llama3"), "LLAMA3", LLAMA3),
])
@pytest.mark.parametrize("form", ["transformers4", "transformers4_type", "transformers5"])
def test_rope_scaling_is_read_from_either_form_and_written_back(rope, method, sf, form):
    cfg = hf_config("llama")
    del cfg["rope_parameters"]
    if form == "transformers5":
        cfg["rope_parameters"] = dict(rope, rope_theta=500000.0)
    else:
        cfg["rope_theta"] = 500000.0
        scaling = dict(rope)
        if form == "transformers4_type":
            scaling["type"] = scaling.pop("rope_type")
        cfg["rope_scaling"] = None if rope["rope_type"] == "default" else scaling
    mc = hf_config_to_model_config(cfg)
    assert (mc["theta"], mc["extend_method"], mc["scaling_factor"]) == (500000.0, method, sf)
    back = model_config_to_hf_config(mc, "llama")
    assert back["rope_parameters"] == dict(rope, rope_theta=500000.0, **(
        {"factor": float(rope["factor"])} if "factor" in rope else {}))
    if method != "None":
        assert back["rope_scaling"]["rope_type"] == rope["rope_type"]
    assert hf_config_to_model_config(back) == hf_config_to_model_config(cfg)


def test_exported_rope_loads_in_transformers_as_the_original():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    for rope in ({"rope_type": "linear", "factor": 2.0}, dict(LLAMA3, rope_type="llama3"),
                 {"rope_type": "dynamic", "factor": 4.0}):
        cfg = dict(hf_config("llama"), rope_parameters=dict(rope, rope_theta=5e5))
        back = model_config_to_hf_config(hf_config_to_model_config(cfg), "llama")
        want = transformers.LlamaConfig(**cfg).rope_parameters
        assert transformers.LlamaConfig(**back).rope_parameters == want


@pytest.mark.parametrize("change,words", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                          "original_max_position_embeddings": 32}}, ["rope_type", "yarn"]),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     ["rope_scaling.rope_type", "longrope"]),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, ["rope_type", "'su'"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "attention_factor": 1.2}},
     ["attention_factor"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
    ({"rope_scaling": {"rope_type": "linear"}}, ["factor"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
     ["rope_scaling.factor", "rope_parameters.factor"]),
    ({"rope_theta": 1e6}, ["rope_theta", "500000"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                       "original_max_position_embeddings": 64}},
     ["original_max_position_embeddings"]),
])
def test_rope_settings_not_implemented_are_refused_naming_the_key(change, words):
    cfg = hf_config("llama")
    if "rope_scaling" in change:   # a transformers 4 config.json has no rope_parameters
        cfg["rope_parameters"] = {}
    cfg.update(change)
    with pytest.raises(ConversionError) as err:
        hf_config_to_model_config(cfg)
    for w in words:
        assert w in str(err.value)


# ---- biases, head_dim -----------------------------------------------------------------------
def test_llama_attention_and_mlp_bias_and_head_dim_map_both_ways():
    cfg = dict(hf_config("llama"), attention_bias=True, mlp_bias=True, head_dim=8)
    mc = hf_config_to_model_config(cfg)
    assert (mc["qkv_has_bias"], mc["attn_proj_has_bias"], mc["mlp_has_bias"], mc["head_dim"]) \
        == (True, True, True, 8)
    back = model_config_to_hf_config(mc, "llama")
    assert (back["attention_bias"], back["mlp_bias"], back["head_dim"]) == (True, True, 8)
    with pytest.raises(ConversionError, match="qwen2"):   # q/k/v biases alone are Qwen2's
        model_config_to_hf_config(dict(mc, attn_proj_has_bias=False), "llama")
    with pytest.raises(ConversionError, match="mlp_has_bias"):
        model_config_to_hf_config(dict(mc, qkv_has_bias=True), "qwen2")


# ---- families a user would try next -----------------------------------------------------------
QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16,
          "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 32, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 32768,
          "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 21,
          "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu",
          "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
          "attention_dropout": 0.0, "initializer_range": 0.02, "use_mrope": False}


def test_a_qwen2_5_config_reads_as_qwen2():
    mc = hf_config_to_model_config(QWEN25)
    assert mc["qkv_has_bias"] and not mc["attn_proj_has_bias"] and mc["tie_word_embeddings"]
    assert (mc["theta"], mc["extend_method"]) == (1000000.0, "None")


@pytest.mark.parametrize("cfg,words", [
    (dict(hf_config("llama"), sliding_window=4096), ["sliding_window", "4096"]),
    (dict(QWEN25, use_sliding_window=True, max_window_layers=1), ["use_sliding_window"]),
    (dict(hf_config("llama"), num_local_experts=8, num_experts_per_tok=2),
     ["num_local_experts"]),
    (dict(QWEN25, num_experts=60), ["num_experts"]),
    (dict(hf_config("llama"), layer_types=["full_attention", "sliding_attention"]),
     ["layer_types", "sliding_attention"]),
    (dict(hf_config("llama"), model_type="mistral", architectures=["MistralForCausalLM"]),
     ["model_type", "mistral"]),
    (dict(hf_config("llama"), model_type="qwen2_moe"), ["model_type", "qwen2_moe"]),
])
def test_models_this_llama_does_not_compute_are_refused_by_name(cfg, words):
    with pytest.raises(ConversionError) as err:
        hf_config_to_model_config(cfg)
    for w in words:
        assert w in str(err.value)
