"""Hugging Face `config.json` <-> MindSpore Transformers `model_config`, and family detection.

`hf_config_to_model_config` gives the runtime and the load hook the model_config fields of an
HF folder; `model_config_to_hf_config` writes the `config.json` of an exported folder so that
`transformers.AutoModelForCausalLM.from_pretrained` loads it. Pure Python.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterable, Mapping, Optional

from ..errors import ConversionError
from .rules import FAMILIES, get_family

logger = logging.getLogger(__name__)

HF_CONFIG = "config.json"

# HF dtype names (config "dtype"/"torch_dtype") <-> YAML dtype names <-> safetensors names
HF_DTYPE_TO_YAML = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
                    "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ST_TO_YAML_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_ARCH_TO_FAMILY = {f.hf_architecture: f.name for f in FAMILIES.values()}
_TYPE_TO_FAMILY = {f.hf_model_type: f.name for f in FAMILIES.values()}


def read_hf_config(folder: str) -> Optional[Dict[str, Any]]:
    """The parsed `config.json` of an HF folder, or None when there is none."""
    path = os.path.join(folder, HF_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc}); restore the model's config.json")
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return cfg


def detect_family(hf_config: Optional[Mapping[str, Any]], names: Iterable[str] = ()) -> str:
    """The family of an HF model: from `architectures`, else `model_type`, else from tensor
    names (q/k/v biases mean qwen2). ConversionError when config.json names another model."""
    if hf_config:
        for arch in hf_config.get("architectures") or []:
            if arch in _ARCH_TO_FAMILY:
                return _ARCH_TO_FAMILY[arch]
        mtype = hf_config.get("model_type")
        if mtype in _TYPE_TO_FAMILY:
            return _TYPE_TO_FAMILY[mtype]
        if hf_config.get("architectures") or mtype:
            raise ConversionError(
                f"config.json describes {hf_config.get('architectures')} (model_type {mtype!r}); "
                f"supported: {sorted(_ARCH_TO_FAMILY)}. Pass --family to force one if the model "
                f"is a Llama variant")
    names = list(names)
    if not names:
        raise ConversionError("cannot detect the model family without config.json or tensors; "
                              "pass --family")
    if any(n.endswith("self_attn.q_proj.bias") for n in names):
        return "qwen2"
    return "llama"


def _hf_dtype(cfg: Mapping[str, Any]) -> Optional[str]:
    raw = cfg.get("dtype") or cfg.get("torch_dtype")
    if raw is None:
        return None
    raw = str(raw).replace("torch.", "")
    if raw not in HF_DTYPE_TO_YAML:
        raise ConversionError(f"config.json dtype {raw!r} is not supported; use float32, "
                              f"float16 or bfloat16")
    return HF_DTYPE_TO_YAML[raw]


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    # transformers < 5 writes rope_theta at the top; 5.x nests it in rope_parameters
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        logger.warning("config.json uses RoPE scaling %r, which MindSpore Transformers' Llama "
                       "does not model here; only rope_theta is carried over", rope_type)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def hf_config_to_model_config(hf_config: Mapping[str, Any], family: Optional[str] = None,
                              ) -> Dict[str, Any]:
    """The MindSpore Transformers `model_config` fields of an HF Llama/Qwen2 config.json.

    Returns vocab_size, hidden_size, num_layers, num_heads, n_kv_heads, intermediate_size,
    rms_norm_eps, theta, qkv_has_bias, tie_word_embeddings, seq_length and
    max_position_embedding (both max_position_embeddings), param_init_type and compute_dtype
    (the checkpoint dtype, when config.json says it), and the token ids it names.
    ConversionError for features the Llama model here cannot represent (head_dim other than
    hidden/heads, an activation other than silu, o_proj or MLP biases).
    """
    family = family or detect_family(hf_config)
    fam = get_family(family)

    def need(key):
        if key not in hf_config or hf_config[key] is None:
            raise ConversionError(f"config.json has no {key!r}; it is needed for family {family}")
        return hf_config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise ConversionError(f"config.json: hidden_size {hidden} is not divisible by "
                              f"num_attention_heads {heads}")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ConversionError(f"config.json: head_dim {head_dim} != hidden_size/num_attention_heads "
                              f"= {hidden // heads}; this Llama model needs head_dim = hidden/heads")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r}; the Llama family here uses silu")
    if hf_config.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias is true; MLP biases have no MindSpore "
                              "Transformers Llama parameter")
    qkv_bias = fam.qkv_bias
    if family == "llama" and hf_config.get("attention_bias"):
        raise ConversionError("config.json: attention_bias is true (o_proj bias too); the llama "
                              "family maps no attention biases. A Qwen2 model? pass --family qwen2")
    max_pos = int(hf_config.get("max_position_embeddings") or 4096)
    out: Dict[str, Any] = {
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(need("num_hidden_layers")),
        "num_heads": heads,
        "n_kv_heads": kv_heads,
        "intermediate_size": int(need("intermediate_size")),
        "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "theta": _rope_theta(hf_config),
        "qkv_has_bias": qkv_bias,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "seq_length": max_pos,
        "max_position_embedding": max_pos,
    }
    dtype = _hf_dtype(hf_config)
    if dtype:
        out["param_init_type"] = dtype
        out["compute_dtype"] = dtype
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf_config.get(key), int):
            out[key] = hf_config[key]
    return out


def model_config_to_hf_config(model_config: Mapping[str, Any], family: str,
                              dtype: Optional[str] = None) -> Dict[str, Any]:
    """An HF `config.json` (as a dict) for a MindSpore Transformers `model_config`.

    `dtype` is the YAML dtype name of the exported tensors ("float32", "bfloat16", ...);
    defaults to param_init_type. Needs vocab_size, hidden_size, num_layers, num_heads and
    intermediate_size; n_kv_heads defaults to num_heads. Both `rope_theta` (transformers 4) and
    `rope_parameters` (transformers 5) are written so either version loads it.
    """
    fam = get_family(family)

    def need(key):
        if model_config.get(key) is None:
            raise ConversionError(f"model_config has no {key!r}; add it to the YAML "
                                  f"model.model_config (needed to write config.json)")
        return model_config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_heads"))
    kv_heads = int(model_config.get("n_kv_heads") or heads)
    layers = int(need("num_layers"))
    theta = float(model_config.get("theta", 10000.0))
    max_pos = int(model_config.get("max_position_embedding") or model_config.get("seq_length")
                  or 4096)
    dtype = dtype or model_config.get("param_init_type") or "float32"
    cfg: Dict[str, Any] = {
        "architectures": [fam.hf_architecture],
        "model_type": fam.hf_model_type,
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(need("intermediate_size")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": float(model_config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": bool(model_config.get("tie_word_embeddings", False)),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(model_config.get(key), int):
            cfg[key] = model_config[key]
    if family == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    else:   # qwen2
        cfg.update({"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": layers})
    return cfg
