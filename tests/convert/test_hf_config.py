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
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
