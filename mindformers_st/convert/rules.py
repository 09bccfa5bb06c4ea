"""Hugging Face <-> MindSpore Transformers parameter names, kept as data.

Two tables drive every conversion (as MaxText's `param_mapping` does):
- `RENAME_RULES`: one row per tensor kind, an HF name template and its MindSpore Transformers
  template; `{i}` stands for the layer index. A rename is a whole-tensor copy.
- `FUSE_RULES`: the optional `qkv_concat` tensors, each a MindSpore name made of several
  unfused MindSpore tensors laid out by a named row layout (see `convert.fuse`).
A family (`FAMILIES`) is a choice of rows from those tables plus how to recognise it.
Pure Python; no numpy, no MindSpore.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Pattern, Tuple

from ..caches import on_forget
from ..errors import ConversionError

logger = logging.getLogger(__name__)

# (Hugging Face template, MindSpore Transformers template); `{i}` = layer index.
LLAMA_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
# Qwen2 adds biases to q/k/v (not to o_proj).
QKV_BIAS_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.attention.wq.bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.attention.wk.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.attention.wv.bias"),
)
# Llama's `attention_bias` puts a bias on q/k/v and o_proj; `mlp_bias` on gate/up/down.
O_BIAS_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("model.layers.{i}.self_attn.o_proj.bias", "model.layers.{i}.attention.wo.bias"),
)
MLP_BIAS_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("model.layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.feed_forward.w1.bias"),
    ("model.layers.{i}.mlp.down_proj.bias", "model.layers.{i}.feed_forward.w2.bias"),
    ("model.layers.{i}.mlp.up_proj.bias", "model.layers.{i}.feed_forward.w3.bias"),
)


@dataclass(frozen=True)
class FuseRule:
    """MindSpore tensor `fused` is made of the unfused MindSpore tensors `parts` (in this
    order) by the row layout `layout` ("qkv" or "ffn", see convert.fuse)."""

    fused: str
    parts: Tuple[str, ...]
    layout: str


FUSE_RULES: Tuple[FuseRule, ...] = (
    FuseRule("model.layers.{i}.attention.w_qkv.weight",
             ("model.layers.{i}.attention.wq.weight", "model.layers.{i}.attention.wk.weight",
              "model.layers.{i}.attention.wv.weight"), "qkv"),
    FuseRule("model.layers.{i}.attention.w_qkv.bias",
             ("model.layers.{i}.attention.wq.bias", "model.layers.{i}.attention.wk.bias",
              "model.layers.{i}.attention.wv.bias"), "qkv"),
    FuseRule("model.layers.{i}.feed_forward.w_gate_hidden.weight",
             ("model.layers.{i}.feed_forward.w1.weight", "model.layers.{i}.feed_forward.w3.weight"),
             "ffn"),
    FuseRule("model.layers.{i}.feed_forward.w_gate_hidden.bias",
             ("model.layers.{i}.feed_forward.w1.bias", "model.layers.{i}.feed_forward.w3.bias"),
             "ffn"),
)


@dataclass(frozen=True)
class Family:
    """A model family: its required rename rows, its optional row groups (each present in every
    layer or in none, named by the HF config key that switches it on), whether q/k/v always
    carry biases, and its HF identity."""

    name: str
    renames: Tuple[Tuple[str, str], ...]
    qkv_bias: bool
    hf_architecture: str
    hf_model_type: str
    optional: Tuple[Tuple[str, Tuple[Tuple[str, str], ...]], ...] = ()

    @property
    def rows(self) -> Tuple[Tuple[str, str], ...]:
        """Every rename row of the family, required and optional."""
        return self.renames + tuple(r for _, group in self.optional for r in group)


FAMILIES: Dict[str, Family] = {
    "llama": Family("llama", LLAMA_RENAMES, False, "LlamaForCausalLM", "llama",
                    (("attention_bias", QKV_BIAS_RENAMES + O_BIAS_RENAMES),
                     ("mlp_bias", MLP_BIAS_RENAMES))),
    "qwen2": Family("qwen2", LLAMA_RENAMES + QKV_BIAS_RENAMES, True, "Qwen2ForCausalLM", "qwen2"),
}

# Every HF row any family knows, to tell "wrong family" from "unknown tensor".
ALL_RENAMES: Tuple[Tuple[str, str], ...] = (LLAMA_RENAMES + QKV_BIAS_RENAMES + O_BIAS_RENAMES
                                            + MLP_BIAS_RENAMES)


def get_family(name: str) -> Family:
    """The family called `name`; ConversionError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConversionError(f"unknown model family {name!r}; known families: "
                              f"{', '.join(sorted(FAMILIES))}") from None


# ----------------------------------------------------------------------------- templates
def _compile(template: str) -> Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_PATTERN_CACHE: Dict[str, Pattern] = {}
on_forget(_PATTERN_CACHE.clear)


def match_template(template: str, name: str) -> Optional[int]:
    """The layer index when `name` fits `template` (-1 for a template without `{i}`), else None."""
    pat = _PATTERN_CACHE.get(template)
    if pat is None:
        pat = _PATTERN_CACHE[template] = _compile(template)
    m = pat.match(name)
    if m is None:
        return None
    return int(m.group("i")) if "i" in pat.groupindex else -1


def fill(template: str, layer: int) -> str:
    """`template` with `{i}` replaced by `layer`."""
    return template.replace("{i}", str(layer))


def translate(name: str, rows: Iterable[Tuple[str, str]], src_col: int) -> Optional[str]:
    """`name` translated by rename `rows` (src_col 0: HF -> MS, 1: MS -> HF), or None."""
    for row in rows:
        layer = match_template(row[src_col], name)
        if layer is not None:
            return fill(row[1 - src_col], layer)
    return None


# ----------------------------------------------------------------------------- names
def fused_name_of(ms_name: str) -> Optional[Tuple[str, int]]:
    """(fused MindSpore name, index among its parts) when `ms_name` is a part of a fuse rule."""
    for rule in FUSE_RULES:
        for k, part in enumerate(rule.parts):
            layer = match_template(part, ms_name)
            if layer is not None:
                return fill(rule.fused, layer), k
    return None


def fuse_rule_of(ms_name: str) -> Optional[Tuple[FuseRule, int]]:
    """(rule, layer) when `ms_name` is a fused MindSpore tensor (w_qkv, w_gate_hidden)."""
    for rule in FUSE_RULES:
        layer = match_template(rule.fused, ms_name)
        if layer is not None:
            return rule, layer
    return None


def hf_to_ms_name(name: str, family: str, qkv_concat: bool = False) -> str:
    """The MindSpore Transformers name of Hugging Face tensor `name` in `family`.

    With `qkv_concat` the q/k/v and gate/up tensors map to their fused tensor (several HF
    names give one MindSpore name). ConversionError when the family has no such tensor,
    naming the family that does when another one knows it.
    """
    fam = get_family(family)
    ms = translate(name, fam.rows, 0)
    if ms is None:
        raise ConversionError(_unknown_message([name], fam, "Hugging Face"))
    if qkv_concat:
        fused = fused_name_of(ms)
        if fused is not None:
            return fused[0]
    return ms


def ms_to_hf_names(name: str, family: str) -> Tuple[str, ...]:
    """The Hugging Face tensor(s) MindSpore tensor `name` becomes: one for a plain tensor, the
    parts (q, k, v / gate, up) for a fused one. ConversionError for names the family lacks."""
    fam = get_family(family)
    fused = fuse_rule_of(name)
    parts = [fill(p, fused[1]) for p in fused[0].parts] if fused else [name]
    out = []
    for part in parts:
        hf = translate(part, fam.rows, 1)
        if hf is None:
            raise ConversionError(_unknown_message([name], fam, "MindSpore"))
        out.append(hf)
    return tuple(out)


def ms_to_hf_name(name: str, family: str) -> str:
    """The Hugging Face name of unfused MindSpore tensor `name`. A fused tensor (w_qkv,
    w_gate_hidden) has several; use `ms_to_hf_names` or `plan_export_hf` for those."""
    names = ms_to_hf_names(name, family)
    if len(names) != 1:
        raise ConversionError(f"{name!r} is a fused tensor that becomes {list(names)} in Hugging "
                              f"Face; use ms_to_hf_names (or export-hf, which splits it)")
    return names[0]


def unknown_names(names: Iterable[str], family: str, side: str) -> List[str]:
    """The names in `names` that `family` cannot convert; `side` is "hf" or "ms"."""
    fam = get_family(family)
    col = 0 if side == "hf" else 1
    out = []
    for n in names:
        if side == "ms" and fuse_rule_of(n) is not None:
            try:
                ms_to_hf_names(n, family)
                continue
            except ConversionError:
                pass
        if translate(n, fam.rows, col) is None:
            out.append(n)
    return out


def _unknown_message(names: List[str], fam: Family, side: str) -> str:
    col = 0 if side == "Hugging Face" else 1
    others = sorted({f.name for f in FAMILIES.values() if f.name != fam.name
                     for n in names if translate(n, f.rows, col) is not None})
    shown = ", ".join(repr(n) for n in names[:10])
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    hint = (f"; these belong to family {', '.join(others)}: pass --family {others[0]}"
            if others else "; they are not part of any known family (known: "
            f"{', '.join(sorted(FAMILIES))}), remove them or add a rule to convert/rules.py")
    return f"{len(names)} {side} tensor name(s) unknown to family {fam.name!r}: {shown}{more}{hint}"


def unknown_error(names: List[str], family: str, side: str) -> ConversionError:
    """The ConversionError listing `names` that `family` cannot convert ("hf" or "ms" side)."""
    return ConversionError(_unknown_message(
        names, get_family(family), "Hugging Face" if side == "hf" else "MindSpore"))
