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
    """The family of an HF model: from `model_type` and `architectures` (they must agree),
    else from tensor names (q/k/v biases mean qwen2). ConversionError naming the key when
    config.json describes a model_type or architecture this package does not run."""
    if hf_config:
        archs = list(hf_config.get("architectures") or [])
        mtype = hf_config.get("model_type")
        by_arch = sorted({_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY})
        if mtype is not None and mtype not in _TYPE_TO_FAMILY:
            raise ConversionError(
                f"config.json: model_type {mtype!r} (architectures {archs}) is not supported; "
                f"supported model_type: {sorted(_TYPE_TO_FAMILY)} ({sorted(_ARCH_TO_FAMILY)}). "
                f"Nothing was read. If the model really is a Llama variant, convert it "
                f"explicitly with --family")
        if mtype is not None:
            if by_arch and by_arch != [_TYPE_TO_FAMILY[mtype]]:
                raise ConversionError(f"config.json: architectures {archs} and model_type "
                                      f"{mtype!r} name different families; fix config.json")
            return _TYPE_TO_FAMILY[mtype]
        if by_arch:
            return by_arch[0]
        if archs:
            raise ConversionError(
                f"config.json describes {archs} (model_type {mtype!r}); supported: "
                f"{sorted(_ARCH_TO_FAMILY)}. Pass --family to force one if the model is a "
                f"Llama variant")
    names = list(names)
    if not names:
        raise ConversionError("cannot detect the model family without config.json or tensors; "
                              "pass --family")
    if any(n.endswith("self_attn.o_proj.bias") or n.endswith("mlp.gate_proj.bias")
           for n in names):
        return "llama"
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


# ---------------------------------------------------------------------------- RoPE
# HF rope_type -> (MindSpore Transformers extend_method, the HF keys its parameters need)
HF_ROPE_TYPES = {
    "default": ("None", ()),
    "linear": ("linear", ("factor",)),
    "dynamic": ("DYNAMIC_NTK", ("factor",)),
    "llama3": ("LLAMA3", ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings")),
}
# rope types transformers has and this model does not compute
REFUSED_ROPE_TYPES = ("yarn", "longrope", "proportional", "mrope", "3d", "ntk")
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
# MindSpore Transformers extend_method -> HF rope_type written by export-hf
_EXTEND_TO_HF = {"linear": "linear", "DYNAMIC_NTK": "dynamic", "LLAMA3": "llama3"}


def _rope_dict(hf_config: Mapping[str, Any], key: str) -> Dict[str, Any]:
    value = hf_config.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConversionError(f"config.json: {key} must be an object, got {value!r}")
    out = {k: v for k, v in value.items() if v is not None}
    nested = [k for k, v in out.items() if isinstance(v, Mapping)]
    if nested:
        raise ConversionError(f"config.json: {key} holds per-layer-type settings {nested}; "
                              f"this Llama model has one RoPE for every layer")
    if "type" in out:   # transformers 4 wrote `type`, later `rope_type`
        kind = out.pop("type")
        if out.setdefault("rope_type", kind) != kind:
            raise ConversionError(f"config.json: {key}.type {kind!r} and {key}.rope_type "
                                  f"{out['rope_type']!r} disagree")
    return out


def hf_rope_to_model_config(hf_config: Mapping[str, Any]) -> Dict[str, Any]:
    """`theta`, `extend_method` and `scaling_factor` (MindSpore Transformers' keys) of an HF
    config.json's rotary settings, read from transformers 4 (`rope_theta`, `rope_scaling`) and
    5 (`rope_parameters`) forms alike.

    Supported rope types: default, linear, dynamic, llama3. ConversionError naming the key for
    anything else: yarn/longrope and unknown types, a parameter the type does not use, a
    `partial_rotary_factor` other than 1, or the two forms contradicting each other. Nothing
    is ignored."""
    params = _rope_dict(hf_config, "rope_parameters")
    scaling = _rope_dict(hf_config, "rope_scaling")
    for k, v in scaling.items():
        if k in params and params[k] != v:
            raise ConversionError(f"config.json: rope_scaling.{k}={v!r} contradicts "
                                  f"rope_parameters.{k}={params[k]!r}")
    rope = {**params, **scaling}
    where = "rope_scaling" if scaling else "rope_parameters"
    top_theta = hf_config.get("rope_theta")
    if top_theta is not None and "rope_theta" in rope and float(rope["rope_theta"]) != \
            float(top_theta):
        raise ConversionError(f"config.json: rope_theta {top_theta} contradicts "
                              f"rope_parameters.rope_theta {rope['rope_theta']}")
    theta = float(rope.get("rope_theta", top_theta if top_theta is not None else 10000.0))
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor {partial}: rotary embedding "
                              f"of part of each head is not implemented (only 1.0)")
    rope_type = rope.get("rope_type", "default")
    if rope_type in REFUSED_ROPE_TYPES:
        raise ConversionError(f"config.json: {where}.rope_type {rope_type!r} is not implemented "
                              f"(supported: {sorted(HF_ROPE_TYPES)}); refusing rather than "
                              f"running with different positions than transformers")
    if rope_type not in HF_ROPE_TYPES:
        raise ConversionError(f"config.json: {where}.rope_type {rope_type!r} is unknown "
                              f"(supported: {sorted(HF_ROPE_TYPES)})")
    method, needed = HF_ROPE_TYPES[rope_type]
    max_pos = int(hf_config.get("max_position_embeddings") or 4096)
    if rope_type == "llama3":   # transformers falls back to max_position_embeddings
        rope.setdefault("original_max_position_embeddings", max_pos)
    allowed = set(_ROPE_COMMON_KEYS) | set(needed)
    if rope_type == "dynamic":
        # transformers' dynamic NTK scales against max_position_embeddings, never this key
        orig = rope.get("original_max_position_embeddings")
        if orig is not None and int(orig) != max_pos:
            raise ConversionError(f"config.json: {where}.original_max_position_embeddings {orig} "
                                  f"differs from max_position_embeddings {max_pos}; transformers' "
                                  f"dynamic RoPE uses max_position_embeddings, so this key would "
                                  f"be ignored: remove it or make them equal")
        allowed.add("original_max_position_embeddings")
    extra = sorted(k for k in rope if k not in allowed)
    if extra:
        raise ConversionError(f"config.json: {where} key(s) {extra} are not used by rope_type "
                              f"{rope_type!r} here (it takes {list(needed)}); refusing to "
                              f"ignore them")
    missing = [k for k in needed if k not in rope]
    if missing:
        raise ConversionError(f"config.json: {where} with rope_type {rope_type!r} lacks {missing}")
    if method == "None":
        return {"theta": theta, "extend_method": "None", "scaling_factor": 1.0}
    sf: Dict[str, Any] = {k: float(rope[k]) for k in needed}
    if "original_max_position_embeddings" in sf:
        sf["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if rope_type == "dynamic":
        sf["original_max_position_embeddings"] = max_pos
    return {"theta": theta, "extend_method": method, "scaling_factor": sf}


def model_config_rope_to_hf(model_config: Mapping[str, Any]) -> Dict[str, Any]:
    """config.json rotary keys for a model_config's theta / extend_method / scaling_factor:
    `rope_theta`, `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5), and
    for DYNAMIC_NTK `max_position_embeddings` (the length transformers scales against).
    "PI" is written as `linear`, "NTK" as a default rope with theta × scaling_factor.
    ConversionError naming `model_config.extend_method` for a method with no HF form here."""
    theta = float(model_config.get("theta", 10000.0))
    method = model_config.get("extend_method") or "None"
    sf = model_config.get("scaling_factor", 1.0)
    if method == "NTK":
        theta *= float(sf)
        method = "None"
    if method == "PI":
        method, sf = "linear", {"factor": float(sf)}
    if method == "None":
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    if method not in _EXTEND_TO_HF:
        raise ConversionError(f"model_config.extend_method {method!r} has no Hugging Face form "
                              f"here (supported: None, linear, PI, NTK, DYNAMIC_NTK, LLAMA3)")
    if not isinstance(sf, Mapping):
        raise ConversionError(f"model_config.scaling_factor {sf!r}: extend_method {method!r} "
                              f"needs a mapping")
    rope_type = _EXTEND_TO_HF[method]
    keys = HF_ROPE_TYPES[rope_type][1]
    missing = [k for k in keys if k not in sf]
    if missing:
        raise ConversionError(f"model_config.scaling_factor lacks {missing} for extend_method "
                              f"{method!r}")
    scaling = {"rope_type": rope_type, **{k: sf[k] for k in keys}}
    out: Dict[str, Any] = {"rope_theta": theta, "rope_scaling": dict(scaling),
                           "rope_parameters": {**scaling, "rope_theta": theta}}
    if method == "DYNAMIC_NTK":
        out["max_position_embeddings"] = int(sf["original_max_position_embeddings"])
    return out


# ---------------------------------------------------------------------------- refusals
# config.json keys that mean a model this Llama does not compute (MoE, sliding windows)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _refuse_unsupported(hf_config: Mapping[str, Any], family: str) -> None:
    for key in MOE_KEYS:
        if hf_config.get(key):
            raise ConversionError(f"config.json: {key}={hf_config[key]!r} describes a "
                                  f"mixture-of-experts model; only dense Llama/Qwen2 models "
                                  f"are supported")
    layer_types = hf_config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ConversionError(f"config.json: layer_types {sorted(set(layer_types))}: only "
                              f"full attention is implemented (no sliding-window layers)")
    if family == "qwen2":
        layers = int(hf_config.get("num_hidden_layers") or 0)
        window_layers = hf_config.get("max_window_layers")
        if hf_config.get("use_sliding_window") and hf_config.get("sliding_window") and \
                (window_layers is None or int(window_layers) < layers):
            raise ConversionError(f"config.json: use_sliding_window is true (sliding_window "
                                  f"{hf_config.get('sliding_window')}, max_window_layers "
                                  f"{window_layers}); sliding-window attention is not "
                                  f"implemented")
    elif hf_config.get("sliding_window") is not None:
        raise ConversionError(f"config.json: sliding_window {hf_config['sliding_window']} "
                              f"(Mistral-style local attention) on a {family} config; only full "
                              f"attention is implemented")


def hf_config_to_model_config(hf_config: Mapping[str, Any], family: Optional[str] = None,
                              ) -> Dict[str, Any]:
    """The MindSpore Transformers `model_config` fields of an HF Llama/Qwen2 config.json.

    Returns vocab_size, hidden_size, num_layers, num_heads, n_kv_heads, head_dim,
    intermediate_size, rms_norm_eps, theta, extend_method and scaling_factor (RoPE scaling, see
    `hf_rope_to_model_config`), qkv_has_bias, attn_proj_has_bias, mlp_has_bias,
    tie_word_embeddings, seq_length and max_position_embedding (both max_position_embeddings),
    param_init_type and compute_dtype (the checkpoint dtype, when config.json says it), and the
    token ids it names. ConversionError, naming the key, for what this Llama cannot compute: an
    unknown model_type, mixture-of-experts keys, sliding windows, an activation other than
    silu, a RoPE setting it does not implement.
    """
    family = family or detect_family(hf_config)
    fam = get_family(family)
    _refuse_unsupported(hf_config, family)

    def need(key):
        if key not in hf_config or hf_config[key] is None:
            raise ConversionError(f"config.json has no {key!r}; it is needed for family {family}")
        return hf_config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = hf_config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConversionError(f"config.json: hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads} and no head_dim is given")
        head_dim = hidden // heads
    head_dim = int(head_dim)
    if head_dim <= 0 or head_dim % 2:
        raise ConversionError(f"config.json: head_dim {head_dim} must be positive and even "
                              f"(rotary embeddings rotate pairs)")
    if heads % kv_heads:
        raise ConversionError(f"config.json: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r}; the Llama family here uses silu")
    if family == "llama":
        attn_bias = bool(hf_config.get("attention_bias", False))
        qkv_bias, o_bias = attn_bias, attn_bias
        mlp_bias = bool(hf_config.get("mlp_bias", False))
    else:   # qwen2: q/k/v biases always, none on o_proj or the MLP
        qkv_bias, o_bias, mlp_bias = fam.qkv_bias, False, False
        for key in ("attention_bias", "mlp_bias"):
            if hf_config.get(key):
                raise ConversionError(f"config.json: {key} is true on a {family} config; "
                                      f"transformers' Qwen2 has q/k/v biases only (a Llama "
                                      f"with biases? pass --family llama)")
    max_pos = int(hf_config.get("max_position_embeddings") or 4096)
    out: Dict[str, Any] = {
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(need("num_hidden_layers")),
        "num_heads": heads,
        "n_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": int(need("intermediate_size")),
        "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        **hf_rope_to_model_config(hf_config),
        "qkv_has_bias": qkv_bias,
        "attn_proj_has_bias": o_bias,
        "mlp_has_bias": mlp_bias,
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
    intermediate_size; n_kv_heads defaults to num_heads, head_dim to hidden/heads. RoPE scaling
    is written back (`model_config_rope_to_hf`: `rope_theta` + `rope_scaling` for transformers 4,
    `rope_parameters` for 5, so either version loads it); biases become `attention_bias` /
    `mlp_bias` (llama). ConversionError for a model_config the family cannot express (q/k/v
    biases without an o_proj bias is qwen2; qwen2 has no o_proj or MLP biases).
    """
    fam = get_family(family)

    def need(key):
        if model_config.get(key) is None:
            raise ConversionError(f"model_config has no {key!r}; add it to the YAML "
                                  f"model.model_config (needed to write config.json)")
        return model_config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_heads"))
    kv_heads = int(model_config.get("n_kv_heads") or heads)
    head_dim = int(model_config.get("head_dim") or hidden // heads)
    layers = int(need("num_layers"))
    max_pos = int(model_config.get("max_position_embedding") or model_config.get("seq_length")
                  or 4096)
    rope = model_config_rope_to_hf(model_config)
    if "max_position_embeddings" in rope:
        dyn = rope.pop("max_position_embeddings")
        given = model_config.get("max_position_embedding")
        if given is not None and int(given) != dyn:
            raise ConversionError(f"model_config.max_position_embedding {given} differs from "
                                  f"scaling_factor.original_max_position_embeddings {dyn}; "
                                  f"transformers' dynamic RoPE scales against one length")
        max_pos = dyn
    dtype = dtype or model_config.get("param_init_type") or "float32"
    qkv_bias = bool(model_config.get("qkv_has_bias", False))
    o_bias = bool(model_config.get("attn_proj_has_bias", False))
    mlp_bias = bool(model_config.get("mlp_has_bias", False))
    cfg: Dict[str, Any] = {
        "architectures": [fam.hf_architecture],
        "model_type": fam.hf_model_type,
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(need("intermediate_size")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": float(model_config.get("rms_norm_eps", 1e-6)),
        **rope,
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
        if qkv_bias != o_bias:
            raise ConversionError(
                f"model_config: qkv_has_bias={qkv_bias} but attn_proj_has_bias={o_bias}; "
                f"transformers' Llama has one attention_bias for q/k/v/o (q/k/v biases alone "
                f"are Qwen2: export with --family qwen2)")
        cfg.update({"attention_bias": qkv_bias, "mlp_bias": mlp_bias, "pretraining_tp": 1})
    else:   # qwen2
        if o_bias or mlp_bias:
            raise ConversionError(f"model_config: attn_proj_has_bias={o_bias}, mlp_has_bias="
                                  f"{mlp_bias}; transformers' Qwen2 has q/k/v biases only "
                                  f"(export with --family llama)")
        cfg.update({"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": layers})
    return cfg
