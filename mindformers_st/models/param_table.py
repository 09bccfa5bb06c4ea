"""The Llama-family parameter table (Llama 2, Llama 3, Qwen2) without allocating the model.

Names are exactly MindSpore Transformers' Llama names; shapes are the global (unsplit) ones in
MindSpore's `[out, in]` convention for linear weights. Pure Python: planning a 7B model costs
nothing.
"""
from __future__ import annotations

from typing import Any, List

from ..layout.param_table import ParamSpec, ParamTable

# MindSpore dtype names used in YAML (param_init_type) -> safetensors dtype names
YAML_DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def llama_param_table(cfg: Any) -> ParamTable:
    """The parameter table of a Llama-family causal LM described by `cfg`.

    `cfg` needs: vocab_size, hidden_size, num_layers, num_heads, n_kv_heads (None = num_heads),
    intermediate_size, qkv_has_bias, tie_word_embeddings, param_init_type ("float32",
    "float16", "bfloat16"), and optionally head_dim (None = hidden/heads), attn_proj_has_bias
    (`attention.wo.bias`), mlp_has_bias (`feed_forward.w{1,2,3}.bias`) and qkv_concat (fused
    `w_qkv` and `w_gate_hidden`, biases fused the same way). Column-parallel weights and their
    biases split dim 0, row-parallel weights dim 1; row-parallel biases (wo, w2) and norms are
    replicated, as they are added once after the model-parallel sum.
    """
    dtype = YAML_DTYPE_TO_ST[getattr(cfg, "param_init_type", "float32")]
    hidden, layers = cfg.hidden_size, cfg.num_layers
    heads = cfg.num_heads
    kv_heads = getattr(cfg, "n_kv_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    inter = cfg.intermediate_size
    fused = bool(getattr(cfg, "qkv_concat", False))
    bias = bool(getattr(cfg, "qkv_has_bias", False))
    o_bias = bool(getattr(cfg, "attn_proj_has_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_has_bias", False))

    params: List[ParamSpec] = [
        ParamSpec("model.tok_embeddings.embedding_weight", (cfg.vocab_size, hidden), dtype,
                  split_dim=0, vocab_parallel=True, layer=-1)]
    for i in range(layers):
        p = f"model.layers.{i}."
        if fused:
            params.append(ParamSpec(p + "attention.w_qkv.weight", (q_out + 2 * kv_out, hidden),
                                    dtype, split_dim=0, layer=i))
            if bias:
                params.append(ParamSpec(p + "attention.w_qkv.bias", (q_out + 2 * kv_out,),
                                        dtype, split_dim=0, layer=i))
        else:
            for name, out in (("wq", q_out), ("wk", kv_out), ("wv", kv_out)):
                params.append(ParamSpec(p + f"attention.{name}.weight", (out, hidden), dtype,
                                        split_dim=0, layer=i))
                if bias:
                    params.append(ParamSpec(p + f"attention.{name}.bias", (out,), dtype,
                                            split_dim=0, layer=i))
        params.append(ParamSpec(p + "attention.wo.weight", (hidden, q_out), dtype,
                                split_dim=1, layer=i))
        if o_bias:
            params.append(ParamSpec(p + "attention.wo.bias", (hidden,), dtype, layer=i))
        if fused:
            params.append(ParamSpec(p + "feed_forward.w_gate_hidden.weight", (2 * inter, hidden),
                                    dtype, split_dim=0, layer=i))
            if mlp_bias:
                params.append(ParamSpec(p + "feed_forward.w_gate_hidden.bias", (2 * inter,),
                                        dtype, split_dim=0, layer=i))
        else:
            params.append(ParamSpec(p + "feed_forward.w1.weight", (inter, hidden), dtype,
                                    split_dim=0, layer=i))
            if mlp_bias:
                params.append(ParamSpec(p + "feed_forward.w1.bias", (inter,), dtype,
                                        split_dim=0, layer=i))
        params.append(ParamSpec(p + "feed_forward.w2.weight", (hidden, inter), dtype,
                                split_dim=1, layer=i))
        if mlp_bias:
            params.append(ParamSpec(p + "feed_forward.w2.bias", (hidden,), dtype, layer=i))
        if not fused:
            params.append(ParamSpec(p + "feed_forward.w3.weight", (inter, hidden), dtype,
                                    split_dim=0, layer=i))
            if mlp_bias:
                params.append(ParamSpec(p + "feed_forward.w3.bias", (inter,), dtype,
                                        split_dim=0, layer=i))
        params.append(ParamSpec(p + "attention_norm.weight", (hidden,), dtype, layer=i))
        params.append(ParamSpec(p + "ffn_norm.weight", (hidden,), dtype, layer=i))
    params.append(ParamSpec("model.norm_out.weight", (hidden,), dtype, layer=layers))
    if not getattr(cfg, "tie_word_embeddings", False):
        params.append(ParamSpec("lm_head.weight", (cfg.vocab_size, hidden), dtype,
                                split_dim=0, vocab_parallel=True, layer=layers))
    return ParamTable(tuple(params), layers)
