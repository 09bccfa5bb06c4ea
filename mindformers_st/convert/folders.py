"""Whole-folder conversions: an HF model folder to complete MindSpore weights and back.

These put together the pieces of this layer (config reading, family detection, plans) and
hand the plan to `transform.execute`, so the commands and the load hook share one path. The
output folder appears atomically (the engine builds it in a staging folder and renames it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..errors import ConversionError, ConfigError
from ..transform.plan import Plan
from ..transform.sources import SourceCheckpoint, describe_complete, describe_source
from .hf_config import (ST_TO_YAML_DTYPE, detect_family, hf_config_to_model_config,
                        model_config_to_hf_config, read_hf_config)
from .planner import EMBEDDING, LM_HEAD, plan_convert_hf, plan_export_hf

logger = logging.getLogger(__name__)


@dataclass
class ConversionResult:
    """What a folder conversion did: the plan, the family, the model_config it used, and the
    files written (empty for a dry run)."""

    plan: Plan
    family: str
    model_config: Dict[str, Any]
    written: List[str] = field(default_factory=list)


def plan_hf_folder(src_dir: str, family: Optional[str] = None, qkv_concat: bool = False,
                   ) -> ConversionResult:
    """Plan the conversion of HF folder `src_dir` (safetensors + config.json) to MindSpore
    Transformers names. The family comes from `family`, else config.json, else tensor names.
    config.json is read and checked first (a model this package cannot run is refused before
    any safetensors file is opened); head counts, head_dim, biases and tied embeddings come
    from it when present."""
    hf_cfg = read_hf_config(src_dir) if os.path.isdir(src_dir) else None
    model_config: Dict[str, Any] = {}
    fam = family
    if hf_cfg:
        fam = family or detect_family(hf_cfg)
        model_config = hf_config_to_model_config(hf_cfg, fam)
    src = describe_complete(src_dir)
    fam = fam or detect_family(None, src.names)
    if qkv_concat and not model_config:
        raise ConversionError(f"{src_dir}: --qkv-concat needs config.json (num_attention_heads, "
                              f"num_key_value_heads) to lay out w_qkv; copy it next to the weights")
    flags = None
    if model_config and fam == "llama":
        flags = {"attention_bias": model_config["attn_proj_has_bias"],
                 "mlp_bias": model_config["mlp_has_bias"]}
    plan = plan_convert_hf(src, fam, qkv_concat=qkv_concat,
                           num_heads=model_config.get("num_heads"),
                           n_kv_heads=model_config.get("n_kv_heads"),
                           tie_word_embeddings=model_config.get("tie_word_embeddings"),
                           head_dim=model_config.get("head_dim"), bias_flags=flags)
    if model_config:
        model_config["qkv_concat"] = qkv_concat
    return ConversionResult(plan, fam, model_config)


def convert_hf_folder(src_dir: str, dst_dir: str, family: Optional[str] = None,
                      qkv_concat: bool = False, dry_run: bool = False, overwrite: bool = False,
                      workers: int = 2, progress: bool = True) -> ConversionResult:
    """Convert HF folder `src_dir` into a complete MindSpore folder `dst_dir` (same shard names
    plus `param_name_map.json`). A dry run plans and checks everything but writes nothing."""
    return _write(plan_hf_folder(src_dir, family, qkv_concat), dst_dir, dry_run, overwrite,
                  workers, progress)


def _write(result: ConversionResult, dst_dir: str, dry_run: bool, overwrite: bool, workers: int,
           progress: bool) -> ConversionResult:
    """Run a conversion's plan into `dst_dir` (the engine: atomic folder, checksums checked)
    unless `dry_run`; returns `result` with `.written` set."""
    if not dry_run:
        from ..transform.execute import execute
        result.written = execute(result.plan, dst_dir, workers=workers, progress=progress,
                                 overwrite=overwrite)
    return result


def _tensor_dims(src: SourceCheckpoint) -> Dict[str, Any]:
    """Sizes the weights themselves fix: vocab, hidden, layers, intermediate, tied lm_head."""
    shapes = src.global_shapes
    if EMBEDDING not in shapes:
        raise ConversionError(f"{src.root}: {EMBEDDING} is missing; not complete MindSpore "
                              f"Transformers Llama-family weights")
    vocab, hidden = shapes[EMBEDDING]
    layers = 1 + max((int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")),
                     default=-1)
    inter = None
    if "model.layers.0.feed_forward.w2.weight" in shapes:
        inter = shapes["model.layers.0.feed_forward.w2.weight"][1]
    return {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers,
            "intermediate_size": inter, "tie_word_embeddings": LM_HEAD not in shapes}


def plan_ms_folder(src_dir: str, model_config: Mapping[str, Any], family: Optional[str] = None,
                   strategy=None, step=None) -> ConversionResult:
    """Plan the export of MindSpore weights `src_dir` — complete, or a `rank_x/` folder (the
    save the scanner picks, or `step`; described by the files or `strategy`) exported in one
    pass without a merged copy — to HF with the YAML
    `model_config` (num_heads, n_kv_heads, rms_norm_eps, theta...). Sizes the weights fix
    (vocab, hidden, layers, intermediate, tied embeddings) are taken from the tensors; a YAML
    value that contradicts them is a ConversionError."""
    src = describe_source(src_dir, strategy, step)
    fam = family or _ms_family(src.names, model_config)
    merged = dict(model_config)
    for key, value in _tensor_dims(src).items():
        if value is None:
            continue
        given = model_config.get(key)
        if given is not None and key != "tie_word_embeddings" and int(given) != int(value):
            raise ConversionError(f"{src_dir}: the YAML says {key}={given} but the weights have "
                                  f"{value}; pass the config these weights were trained with")
        merged[key] = value
    if merged.get("intermediate_size") is None:
        fused = src.global_shapes.get("model.layers.0.feed_forward.w_gate_hidden.weight")
        if fused:
            merged["intermediate_size"] = fused[0] // 2
    dtype = ST_TO_YAML_DTYPE.get(src.dtypes[EMBEDDING])
    hf_cfg = model_config_to_hf_config(merged, fam, dtype)
    plan = plan_export_hf(src, fam, num_heads=merged.get("num_heads"),
                          n_kv_heads=merged.get("n_kv_heads"), hf_config=hf_cfg,
                          head_dim=merged.get("head_dim"))
    return ConversionResult(plan, fam, merged)


def _ms_family(names, model_config: Mapping[str, Any]) -> str:
    """qwen2 for q/k/v biases alone; llama otherwise (o_proj or MLP biases are Llama's
    attention_bias / mlp_bias)."""
    names = list(names)
    llama_bias = model_config.get("attn_proj_has_bias") or model_config.get("mlp_has_bias") or \
        any(n.endswith(("attention.wo.bias", "feed_forward.w2.bias")) for n in names)
    if llama_bias:
        return "llama"
    qkv_bias = model_config.get("qkv_has_bias") or \
        any(n.endswith(("attention.wq.bias", "attention.w_qkv.bias")) for n in names)
    return "qwen2" if qkv_bias else "llama"


def export_hf_folder(src_dir: str, dst_dir: str, model_config: Mapping[str, Any],
                     family: Optional[str] = None, dry_run: bool = False,
                     overwrite: bool = False, workers: int = 2,
                     progress: bool = True) -> ConversionResult:
    """Export complete MindSpore weights `src_dir` to an HF folder `dst_dir` (weights,
    `model.safetensors.index.json`, `config.json`) that `transformers` loads."""
    return _write(plan_ms_folder(src_dir, model_config, family), dst_dir, dry_run, overwrite,
                  workers, progress)


def read_yaml_model_config(path: str) -> Dict[str, Any]:
    """`model.model_config` of a MindSpore Transformers YAML run config (or a YAML that is the
    model_config itself). ConfigError when the file has neither."""
    from ..config.load import read_yaml
    doc = read_yaml(path)
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict) and \
            isinstance(doc["model"].get("model_config"), dict):
        return dict(doc["model"]["model_config"])
    if isinstance(doc, dict) and "hidden_size" in doc:
        return dict(doc)
    raise ConfigError(f"{path}: no model.model_config section; pass the YAML the model was "
                      f"trained with")
