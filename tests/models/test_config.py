"""LlamaConfig (pure) and the model registry: validation messages and derived sizes."""
import pytest

from mindformers_st.errors import ConfigError
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table


def test_from_dict_reads_mindformers_keys_and_ignores_ascend_only_ones():
    cfg = LlamaConfig.from_dict({"type": "LlamaConfig", "vocab_size": 256, "hidden_size": 64,
                                 "num_layers": 2, "num_heads": 4, "n_kv_heads": 2,
                                 "use_flash_attention": True, "eos_token_id": [2, 7]})
    assert cfg.n_kv_heads == 2 and cfg.head_dim == 16
    assert cfg.eos_token_ids == [2, 7]
    # MindSpore Transformers' derivation: 4h*2/3 rounded up to multiple_of
    assert cfg.intermediate_size == 256
    assert LlamaConfig().intermediate_size == 11008      # Llama 2 7B
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_n_kv_heads_defaults_to_num_heads():
    assert LlamaConfig.from_dict({"num_heads": 8, "hidden_size": 64}).n_kv_heads == 8


@pytest.mark.parametrize("bad, words", [
    ({"hiden_size": 64}, ["hiden_size", "unknown"]),
    ({"num_layers": "2"}, ["num_layers", "int"]),
    ({"top_p": True}, ["top_p"]),
    ({"qkv_has_bias": 1}, ["qkv_has_bias", "bool"]),
    ({"compute_dtype": "fp16"}, ["compute_dtype", "bfloat16"]),
    ({"hidden_size": 65, "num_heads": 4}, ["divisible"]),
    ({"num_heads": 4, "n_kv_heads": 3, "hidden_size": 64}, ["n_kv_heads"]),
    ({"eos_token_id": [2, "x"]}, ["eos_token_id"]),
])
def test_from_dict_rejects_with_a_message_naming_the_key(bad, words):
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_dict(bad)
    for w in words:
        assert w in str(err.value)


def test_param_table_accepts_the_config():
    cfg = LlamaConfig.from_dict({"vocab_size": 256, "hidden_size": 64, "num_layers": 2,
                                 "num_heads": 4, "n_kv_heads": 2, "tie_word_embeddings": True,
                                 "param_init_type": "bfloat16"})
    table = llama_param_table(cfg)
    names = [p.name for p in table]
    assert "lm_head.weight" not in names
    assert table.by_name()["model.layers.1.attention.wk.weight"].shape == (32, 64)
    assert {p.dtype for p in table} == {"BF16"}


def test_registry_knows_llama_and_rejects_unknown_names():
    from mindformers_st.models.registry import get_config_class, get_model, register_model
    model_cls, config_cls = get_model("LlamaForCausalLM")
    assert model_cls.__name__ == "LlamaForCausalLM" and config_cls is LlamaConfig
    assert get_config_class("LlamaConfig") is LlamaConfig
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        get_model("NoSuchModel")

    @register_model("TinyQwen2ForCausalLM")
    class TinyQwen2(model_cls):
        pass
    assert get_model("TinyQwen2ForCausalLM")[0] is TinyQwen2
