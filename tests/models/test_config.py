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


def _hf_run(tmp_path, config_json, yaml_text="model:\n  model_config:\n    seq_length: 32\n"):
    """A run config whose load_checkpoint is an HF folder holding only config.json (no weights:
    whatever is refused here was refused before any weight could be read)."""
    import json
    from mindformers_st.config import load_config
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_json))
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    return load_config(str(path), [("load_checkpoint", str(folder))])


QWEN2_JSON = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 64,
              "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 128, "sliding_window": 131072,
              "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True}


def test_qwen2_folder_without_register_path_names_the_flag(tmp_path, monkeypatch):
    from mindformers_st.trainer.resolve import resolve_model
    from mindformers_st.models import registry
    monkeypatch.delitem(registry._MODELS, "Qwen2ForCausalLM", raising=False)
    with pytest.raises(ConfigError, match="--register_path research/qwen2"):
        resolve_model(_hf_run(tmp_path, QWEN2_JSON))


def test_qwen2_5_folder_resolves_as_qwen2_once_registered(tmp_path, monkeypatch):
    from mindformers_st.trainer.resolve import resolve_model
    from mindformers_st.models import registry
    monkeypatch.setitem(registry._MODELS, "Qwen2ForCausalLM", (object, LlamaConfig))
    resolved = resolve_model(_hf_run(tmp_path, QWEN2_JSON))
    assert resolved.arch == "Qwen2ForCausalLM" and resolved.family == "qwen2"
    assert resolved.config.qkv_has_bias and not resolved.config.attn_proj_has_bias


@pytest.mark.parametrize("change,word", [
    ({"num_local_experts": 8}, "num_local_experts"), ({"sliding_window": 4096}, "sliding_window"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "mixtral"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")])
def test_unsupported_hf_configs_are_refused_at_resolve_time(tmp_path, change, word):
    from mindformers_st.trainer.resolve import resolve_model
    cfg = dict(QWEN2_JSON, architectures=["LlamaForCausalLM"], model_type="llama",
               sliding_window=None)
    cfg.update(change)
    with pytest.raises(ConfigError, match=word):
        resolve_model(_hf_run(tmp_path, cfg))


def test_yaml_rope_scaling_contradicting_config_json_is_an_error(tmp_path):
    """An old YAML saying extend_method "None" must not silently drop config.json's llama3."""
    from mindformers_st.trainer.resolve import resolve_model
    cfg = dict(QWEN2_JSON, architectures=["LlamaForCausalLM"], model_type="llama",
               sliding_window=None, rope_scaling={
                   "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="extend_method"):
        resolve_model(_hf_run(tmp_path, cfg, "model:\n  model_config:\n    extend_method: 'None'\n"))
    (tmp_path / "ok").mkdir()
    resolved = resolve_model(_hf_run(tmp_path / "ok", cfg))
    assert resolved.config.extend_method == "LLAMA3"
    assert resolved.config.scaling_factor["original_max_position_embeddings"] == 64
