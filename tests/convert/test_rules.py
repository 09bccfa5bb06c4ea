"""The name tables: every row goes both ways, families differ only where they should."""
import pytest

from mindformers_st.convert import rules
from mindformers_st.convert.rules import hf_to_ms_name, ms_to_hf_name, ms_to_hf_names
from mindformers_st.errors import ConversionError
from mindformers_st.models.param_table import llama_param_table


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=4,
                                  n_kv_heads=2, intermediate_size=24, qkv_has_bias=False,
                                  tie_word_embeddings=False, param_init_type="float32"), **kw)


@pytest.mark.parametrize("hf,ms", [
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.attention.wq.weight"),
    ("model.layers.17.self_attn.o_proj.weight", "model.layers.17.attention.wo.weight"),
    ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.feed_forward.w1.weight"),
    ("model.layers.3.mlp.down_proj.weight", "model.layers.3.feed_forward.w2.weight"),
    ("model.layers.3.mlp.up_proj.weight", "model.layers.3.feed_forward.w3.weight"),
    ("model.layers.1.input_layernorm.weight", "model.layers.1.attention_norm.weight"),
    ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.ffn_norm.weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_llama_names_map_both_ways(hf, ms):
    assert hf_to_ms_name(hf, "llama") == ms
    assert ms_to_hf_name(ms, "llama") == hf


def test_qwen2_maps_qkv_biases_and_refuses_llama_only_biases_naming_llama():
    assert hf_to_ms_name("model.layers.2.self_attn.k_proj.bias", "qwen2") == \
        "model.layers.2.attention.wk.bias"
    for name in ("model.layers.2.self_attn.o_proj.bias", "model.layers.2.mlp.down_proj.bias"):
        with pytest.raises(ConversionError, match="--family llama"):
            hf_to_ms_name(name, "qwen2")


@pytest.mark.parametrize("hf,ms", [
    ("model.layers.2.self_attn.q_proj.bias", "model.layers.2.attention.wq.bias"),
    ("model.layers.2.self_attn.o_proj.bias", "model.layers.2.attention.wo.bias"),
    ("model.layers.0.mlp.gate_proj.bias", "model.layers.0.feed_forward.w1.bias"),
    ("model.layers.0.mlp.down_proj.bias", "model.layers.0.feed_forward.w2.bias"),
    ("model.layers.0.mlp.up_proj.bias", "model.layers.0.feed_forward.w3.bias"),
])
def test_llama_attention_and_mlp_biases_map_both_ways(hf, ms):
    assert hf_to_ms_name(hf, "llama") == ms
    assert ms_to_hf_name(ms, "llama") == hf


def test_unknown_name_is_listed_in_the_error():
    with pytest.raises(ConversionError, match="rotary_emb.inv_freq"):
        hf_to_ms_name("model.layers.0.self_attn.rotary_emb.inv_freq", "llama")
    with pytest.raises(ConversionError, match="unknown model family"):
        hf_to_ms_name("model.norm.weight", "gpt2")


def test_qkv_concat_maps_parts_to_the_fused_name_and_back():
    assert hf_to_ms_name("model.layers.0.mlp.up_proj.weight", "llama", qkv_concat=True) == \
        "model.layers.0.feed_forward.w_gate_hidden.weight"
    assert ms_to_hf_names("model.layers.0.attention.w_qkv.bias", "qwen2") == (
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.bias")
    with pytest.raises(ConversionError, match="fused"):
        ms_to_hf_name("model.layers.0.attention.w_qkv.weight", "qwen2")
    assert ms_to_hf_names("model.layers.0.feed_forward.w_gate_hidden.bias", "llama") == (
        "model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.up_proj.bias")
    with pytest.raises(ConversionError):   # qwen2 has no MLP biases, fused or not
        ms_to_hf_names("model.layers.0.feed_forward.w_gate_hidden.bias", "qwen2")


@pytest.mark.parametrize("family,bias,fused,tied,llama_bias", [
    ("llama", False, False, False, False), ("llama", False, True, False, False),
    ("llama", True, False, True, True), ("llama", True, True, False, True),
    ("qwen2", True, False, True, False), ("qwen2", True, True, False, False)])
def test_every_param_table_name_has_hf_names(family, bias, fused, tied, llama_bias):
    """The rules cover exactly the MindSpore parameter table, fused or not, biases or not."""
    table = llama_param_table(_Cfg(qkv_has_bias=bias, qkv_concat=fused, tie_word_embeddings=tied,
                                   attn_proj_has_bias=llama_bias, mlp_has_bias=llama_bias))
    hf = [h for p in table for h in ms_to_hf_names(p.name, family)]
    assert len(hf) == len(set(hf))
    back = {hf_to_ms_name(h, family, qkv_concat=fused) for h in hf}
    assert back == {p.name for p in table}


def test_rows_are_unique_and_templates_round_trip():
    for fam in rules.FAMILIES.values():
        hf_side = [h for h, _ in fam.renames]
        ms_side = [m for _, m in fam.renames]
        assert len(set(hf_side)) == len(hf_side) and len(set(ms_side)) == len(ms_side)
    assert rules.match_template("model.layers.{i}.x", "model.layers.12.x") == 12
    assert rules.match_template("model.layers.{i}.x", "model.layers.1a.x") is None
    assert rules.match_template("model.norm.weight", "model.norm.weight") == -1
