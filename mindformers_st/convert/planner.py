"""Plans that convert complete weights between Hugging Face and MindSpore Transformers.

A rename is one whole-tensor `CopyOp`; a fuse (`qkv_concat`) is one `CopyOp` per row block of
`convert.fuse`; a split is the same blocks read the other way. So a conversion is an ordinary
`Plan` and streams through `transform.execute` with memory near one tensor. Everything is
checked from headers before a byte is written: unknown names, the wrong family, missing tensors,
shapes that do not fit the heads. Pure Python.
"""
from __future__ import annotations

import json
import logging
import os
from math import prod
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..dtypes import ITEMSIZE
from ..errors import ConversionError
from ..layout.param_table import OPTIMIZER_STATE_PREFIXES
from ..storage.index import HF_INDEX, MS_INDEX, index_text, shard_file_name
from ..transform.plan import CopyOp, Plan, TargetFile, TargetTensor
from ..transform.sources import SourceChunk, SourceCheckpoint
from .fuse import RowBlock, check_cover, ffn_blocks, qkv_blocks
from .hf_config import HF_CONFIG
from .rules import (FuseRule, fill, fuse_rule_of, fused_name_of, get_family, match_template,
                    ms_to_hf_names, translate, unknown_error)
from ..transform.gc_pause import without_gc

logger = logging.getLogger(__name__)

EMBEDDING = "model.tok_embeddings.embedding_weight"
LM_HEAD = "lm_head.weight"


# ----------------------------------------------------------------------------- checks
def _whole_chunks(src: SourceCheckpoint) -> Dict[str, SourceChunk]:
    out = {}
    for name, chunks in src.chunks.items():
        chunk = chunks[0]
        if src.kind != "complete" or not chunk.slice.is_whole:
            raise ConversionError(
                f"{src.root}: tensor {name!r} is stored as a slice; conversion needs complete "
                f"weights. Merge the distributed checkpoint first (mindformers-st merge)")
        out[name] = chunk
    return out


def check_structure(ms_names: Sequence[str], family: str, side: str,
                    tie_word_embeddings: Optional[bool] = None,
                    bias_flags: Optional[Mapping[str, bool]] = None) -> int:
    """Check that unfused MindSpore names `ms_names` form a whole `family` model and return the
    number of layers: layers 0..L-1 each with every per-layer tensor of the family, the
    embedding and final norm, and lm_head unless embeddings are tied. An optional group of the
    family (llama's `attention_bias`, `mlp_bias`) is expected in every layer when any of its
    tensors is present or `bias_flags` (config.json's values) switches it on; a group present
    in the weights but switched off by `bias_flags` is an error too. ConversionError listing
    the missing tensors (by their `side` names, "hf" or "ms") otherwise."""
    fam = get_family(family)
    have = set(ms_names)
    layer_templates = [ms for _, ms in fam.renames if "{i}" in ms]
    global_names = [ms for _, ms in fam.renames if "{i}" not in ms and ms != LM_HEAD]
    present_groups = []
    for key, rows in fam.optional:
        present = any(match_template(ms, n) is not None for _, ms in rows for n in have)
        if present or (bias_flags or {}).get(key):
            layer_templates += [ms for _, ms in rows]
        if present:
            present_groups.append(key)
    layers = set()
    for n in have:
        for t in layer_templates:
            i = match_template(t, n)
            if i is not None:
                layers.add(i)
    num_layers = max(layers) + 1 if layers else 0
    expected = [fill(t, i) for i in range(num_layers) for t in layer_templates] + global_names
    if tie_word_embeddings is False:
        expected.append(LM_HEAD)
    missing = [n for n in expected if n not in have]
    if not layers:
        missing = [fill(t, 0) for t in layer_templates] + missing
    if missing:
        shown = [_side_name(n, family, side) for n in missing]
        hint = ""
        if fam.qkv_bias and all(n.endswith(".bias") for n in missing):
            hint = " Only q/k/v biases are missing: a Llama checkpoint? pass --family llama."
        elif all(n.endswith("attention.wo.bias") for n in missing) and \
                any(n.endswith("attention.wq.bias") for n in have):
            hint = (" q_proj.bias/k_proj.bias/v_proj.bias without o_proj.bias is Qwen2's "
                    "layout, not Llama's attention_bias: pass --family qwen2.")
        raise ConversionError(
            f"{len(missing)} tensor(s) of a {family} model are missing: "
            f"{', '.join(repr(s) for s in shown[:10])}"
            f"{' ...' if len(shown) > 10 else ''}.{hint} The checkpoint is incomplete or of "
            f"another family; nothing was written")
    if bias_flags is not None:
        off = [k for k in present_groups if not bias_flags.get(k)]
        if off:
            raise ConversionError(f"the weights hold {family} {', '.join(off)} tensors but "
                                  f"config.json sets {', '.join(off)} false; fix config.json "
                                  f"(nothing was written)")
    return num_layers


def _side_name(ms_name: str, family: str, side: str) -> str:
    return ms_to_hf_names(ms_name, family)[0] if side == "hf" else ms_name


def _dims(shapes: Mapping[str, Tuple[int, ...]], num_heads: Optional[int],
          n_kv_heads: Optional[int], head_dim: Optional[int] = None) -> Tuple[int, int, int]:
    """(num_heads, n_kv_heads, head_dim); head_dim defaults to hidden / num_heads."""
    hidden = shapes[EMBEDDING][1]
    if num_heads is None:
        raise ConversionError("qkv_concat needs num_heads and n_kv_heads: give config.json "
                              "(or --config YAML) with num_attention_heads/num_heads")
    n_kv_heads = n_kv_heads or num_heads
    if head_dim is None:
        if hidden % num_heads:
            raise ConversionError(f"hidden size {hidden} is not divisible by num_heads "
                                  f"{num_heads}; give head_dim")
        head_dim = hidden // num_heads
    return num_heads, n_kv_heads, int(head_dim)


def _check_heads(shapes: Mapping[str, Tuple[int, ...]], num_layers: int,
                 num_heads: int, n_kv_heads: int, head_dim: int) -> None:
    for i in range(num_layers):
        for name, rows in (("wq", num_heads * head_dim), ("wk", n_kv_heads * head_dim),
                           ("wv", n_kv_heads * head_dim)):
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.attention.{name}.{kind}"
                if key in shapes and shapes[key][0] != rows:
                    raise ConversionError(
                        f"{key} has {shapes[key][0]} rows but num_heads={num_heads}, "
                        f"n_kv_heads={n_kv_heads}, head_dim={head_dim} need {rows}; the "
                        f"config does not match the weights")


# ----------------------------------------------------------------------------- building blocks
def _whole_op(chunk: SourceChunk) -> CopyOp:
    shape = tuple(chunk.slice.sizes)
    return CopyOp(chunk.file, chunk.name, (0,) * len(shape), (0,) * len(shape), shape)


def _block_op(chunk: SourceChunk, src_row: int, dst_row: int, rows: int) -> CopyOp:
    rest = tuple(chunk.slice.sizes[1:])
    return CopyOp(chunk.file, chunk.name, (src_row,) + (0,) * len(rest),
                  (dst_row,) + (0,) * len(rest), (rows,) + rest)


def _blocks_for(rule: FuseRule, part_rows: Sequence[int], num_heads, n_kv_heads, head_dim,
                ) -> List[RowBlock]:
    if rule.layout == "qkv":
        blocks = qkv_blocks(num_heads, n_kv_heads, head_dim)
    elif rule.layout == "ffn":
        if part_rows[0] != part_rows[1]:
            raise ConversionError(f"{rule.fused}: w1 has {part_rows[0]} rows, w3 {part_rows[1]}; "
                                  f"they must match to be fused")
        blocks = ffn_blocks(part_rows[0])
    else:   # a rule added to the table without a layout here
        raise ConversionError(f"fuse rule {rule.fused!r}: unknown layout {rule.layout!r}")
    check_cover(blocks, part_rows)
    return blocks


def _files_by_source(assigned: List[Tuple[TargetTensor, str]], kind: str, rename_sources: bool,
                     n_sources: int = 0) -> Tuple[List[TargetFile], Dict[str, str], int]:
    """Group targets by the source file they were assigned to (sorted by basename). Source
    names are kept only when every one of the `n_sources` files still gets a tensor (a shard
    holding only k/v loses them to q's file when fused); otherwise shards are renumbered so
    "-of-0000n" stays true."""
    groups: Dict[str, List[TargetTensor]] = {}
    for t, src_file in assigned:
        groups.setdefault(src_file, []).append(t)
    order = sorted(groups, key=os.path.basename)
    n = len(order)
    rename_sources = rename_sources or n != n_sources
    fmt = (("format", "pt"),) if kind == "hf" else (("format", "ms"),)
    files = []
    for k, path in enumerate(order):
        if rename_sources:
            out = "model.safetensors" if n == 1 else shard_file_name(k + 1, n)
        else:
            out = os.path.basename(path)
        files.append(TargetFile(out, tuple(groups[path]), fmt))
    weight_map = {t.name: f.path for f in files for t in f.tensors}
    return files, weight_map, sum(f.nbytes for f in files)


# ----------------------------------------------------------------------------- HF -> MS
@without_gc
def plan_convert_hf(src: SourceCheckpoint, family: str, qkv_concat: bool = False,
                    num_heads: Optional[int] = None, n_kv_heads: Optional[int] = None,
                    tie_word_embeddings: Optional[bool] = None, head_dim: Optional[int] = None,
                    bias_flags: Optional[Mapping[str, bool]] = None) -> Plan:
    """Plan HF complete weights `src` -> MindSpore Transformers complete weights.

    Output: one file per source file with the same name (`model-0000k-of-0000n.safetensors`),
    each MindSpore tensor in the file of its (first) HF source, and `param_name_map.json`.
    With `qkv_concat`, `w_qkv` and `w_gate_hidden` (weights and biases) are fused in MindSpore
    Transformers' layouts; this needs `num_heads` (and `n_kv_heads` for GQA, `head_dim` when it
    is not hidden/heads). `bias_flags` (config.json's attention_bias / mlp_bias) makes the
    bias tensors required, or forbidden when false. Dtypes are kept.
    ConversionError before anything is written for unknown names, a wrong family, missing
    tensors or head counts that do not fit the shapes.
    """
    fam = get_family(family)
    chunks = _whole_chunks(src)
    if src.hyper:
        logger.warning("%s: ignoring non-weight values %s (Hugging Face weights have none)",
                       src.root, sorted(src.hyper))
    unknown = [n for n in chunks if translate(n, fam.rows, 0) is None]
    if unknown:
        raise unknown_error(unknown, family, "hf")
    ms_of = {hf: translate(hf, fam.rows, 0) for hf in chunks}
    by_ms = {ms: chunks[hf] for hf, ms in ms_of.items()}
    num_layers = check_structure(list(by_ms), family, "hf", tie_word_embeddings, bias_flags)
    shapes = {ms: tuple(c.slice.global_shape) for ms, c in by_ms.items()}
    if tie_word_embeddings and LM_HEAD in by_ms:
        logger.warning("config.json ties embeddings but the weights hold lm_head.weight; it is "
                       "kept as lm_head.weight")
    dims = None
    if qkv_concat or num_heads is not None:
        dims = _dims(shapes, num_heads, n_kv_heads, head_dim)
        _check_heads(shapes, num_layers, *dims)

    assigned: List[Tuple[TargetTensor, str]] = []
    done = set()
    for hf in chunks:   # source order
        ms = ms_of[hf]
        fused = fused_name_of(ms) if qkv_concat else None
        if fused is None:
            c = by_ms[ms]
            assigned.append((TargetTensor(ms, c.dtype, tuple(c.slice.sizes), (_whole_op(c),)),
                             c.file))
            continue
        fused_name = fused[0]
        if fused_name in done:
            continue
        done.add(fused_name)
        rule, layer = fuse_rule_of(fused_name)
        parts = [by_ms[fill(p, layer)] for p in rule.parts]
        _check_parts(fused_name, parts)
        part_rows = [p.slice.sizes[0] for p in parts]
        blocks = _blocks_for(rule, part_rows, *dims)
        ops = tuple(_block_op(parts[b.part], b.part_row, b.fused_row, b.rows) for b in blocks)
        shape = (sum(part_rows),) + tuple(parts[0].slice.sizes[1:])
        assigned.append((TargetTensor(fused_name, parts[0].dtype, shape, ops), parts[0].file))
    files, weight_map, total = _files_by_source(assigned, "ms", rename_sources=False,
                                                n_sources=len({c.file for c in chunks.values()}))
    return Plan("convert_hf", tuple(files), ((MS_INDEX, index_text(weight_map, total)),),
                f"Hugging Face {family} -> MindSpore Transformers ({len(weight_map)} tensors, "
                f"{num_layers} layers{', qkv_concat' if qkv_concat else ''}) from {src.root}")


def _check_parts(fused_name: str, parts: Sequence[SourceChunk]) -> None:
    dtypes = {p.dtype for p in parts}
    tails = {tuple(p.slice.sizes[1:]) for p in parts}
    if len(dtypes) > 1 or len(tails) > 1:
        raise ConversionError(
            f"cannot fuse {fused_name}: its parts {[p.name for p in parts]} have dtypes "
            f"{[p.dtype for p in parts]} and shapes {[p.slice.sizes for p in parts]}; they must "
            f"share a dtype and column count")


# ----------------------------------------------------------------------------- MS -> HF
def _global_ops(src: SourceCheckpoint, name: str, offsets, sizes, dst_offsets) -> Tuple[CopyOp, ...]:
    """Copies filling target block `sizes` at `dst_offsets` with the global block of tensor
    `name` at `offsets`, from whichever stored pieces hold it (one whole chunk for complete
    weights, the rank files' slices for distributed ones)."""
    from ..layout.slices import TensorSlice
    from ..transform.planner import cover
    want = TensorSlice(tuple(src.global_shapes[name]), tuple(offsets), tuple(sizes))
    ops = []
    for chunk, block in cover(want, src.chunks[name]):
        src_off = tuple(b - c for b, c in zip(block.offsets, chunk.slice.offsets))
        dst_off = tuple(d + b - o for d, b, o in zip(dst_offsets, block.offsets, offsets))
        ops.append(CopyOp(chunk.file, chunk.name, src_off, dst_off, tuple(block.sizes)))
    return tuple(ops)


def _export_groups(src: SourceCheckpoint, names: Sequence[str],
                   max_shard_size: int = 5 * 10 ** 9) -> Dict[str, str]:
    """Which output shard each tensor goes to: its source file for complete weights (shard
    names kept), else consecutive groups of at most `max_shard_size` bytes (rank files do not
    make sensible Hugging Face shards)."""
    if src.kind == "complete":
        return {n: src.chunks[n][0].file for n in names}
    out, size, k = {}, 0, 0
    for n in names:
        nbytes = prod(src.global_shapes[n]) * ITEMSIZE[src.dtypes[n]]
        if size and size + nbytes > max_shard_size:
            k, size = k + 1, 0
        out[n] = f"shard{k:05d}"
        size += nbytes
    return out


@without_gc
def plan_export_hf(src: SourceCheckpoint, family: str, num_heads: Optional[int] = None,
                   n_kv_heads: Optional[int] = None, hf_config: Optional[Mapping] = None,
                   head_dim: Optional[int] = None) -> Plan:
    """Plan MindSpore Transformers weights `src` -> Hugging Face weights, in one pass: complete
    weights, or distributed `rank_x/` files (each HF tensor assembled from the rank files'
    slices, no merged copy in between).

    Fused `w_qkv`/`w_gate_hidden` are split back (needs `num_heads`, `n_kv_heads`, and
    `head_dim` when it is not hidden/heads); biases follow their weights; optimizer
    moments (`adam_m.`, `adam_v.`) and hyper values are left out (logged). Output files are
    `model-0000k-of-0000n.safetensors` (one per source file, `model.safetensors` when there is
    one), `model.safetensors.index.json`, and `config.json` when `hf_config` is given. Files
    carry `{"format": "pt"}` metadata as transformers requires.
    """
    fam = get_family(family)
    chunks = src.chunks
    skipped = [n for n in chunks if n.startswith(OPTIMIZER_STATE_PREFIXES)]
    if skipped or src.hyper:
        logger.info("export-hf leaves out %d optimizer state tensor(s) and %d hyper value(s) "
                    "(not part of a Hugging Face model)", len(skipped), len(src.hyper))
    weights = {n: c for n, c in chunks.items() if not n.startswith(OPTIMIZER_STATE_PREFIXES)}
    unknown = []
    unfused: List[str] = []
    for n in weights:
        rule = fuse_rule_of(n)
        parts = [fill(p, rule[1]) for p in rule[0].parts] if rule else [n]
        if any(translate(p, fam.rows, 1) is None for p in parts):
            unknown.append(n)
        unfused.extend(parts)
    if unknown:
        raise unknown_error(unknown, family, "ms")
    tie = hf_config.get("tie_word_embeddings") if hf_config else None
    flags = None
    if hf_config and family == "llama":
        flags = {k: bool(hf_config.get(k)) for k in ("attention_bias", "mlp_bias")}
    num_layers = check_structure(unfused, family, "ms", tie, flags)
    shapes = _unfused_shapes(src, weights)
    group = _export_groups(src, list(weights))
    fused_present = any(fuse_rule_of(n) for n in weights)
    dims = None
    if fused_present or num_heads is not None:
        dims = _dims(shapes, num_heads, n_kv_heads, head_dim)

    assigned: List[Tuple[TargetTensor, str]] = []
    for n in weights:
        shape, dtype = tuple(src.global_shapes[n]), src.dtypes[n]
        rule = fuse_rule_of(n)
        if rule is None:
            hf_name = translate(n, fam.rows, 1)
            zero = (0,) * len(shape)
            assigned.append((TargetTensor(hf_name, dtype, shape,
                                          _global_ops(src, n, zero, shape, zero)), group[n]))
            continue
        rule_, layer = rule
        part_rows = _part_rows(rule_, shape[0], dims)
        blocks = _blocks_for(rule_, part_rows, *dims)
        rest = tuple(shape[1:])
        tail = (0,) * len(rest)
        for k, part in enumerate(rule_.parts):
            ops = tuple(op for b in blocks if b.part == k
                        for op in _global_ops(src, n, (b.fused_row,) + tail, (b.rows,) + rest,
                                              (b.part_row,) + tail))
            hf_name = translate(fill(part, layer), fam.rows, 1)
            assigned.append((TargetTensor(hf_name, dtype, (part_rows[k],) + rest, ops), group[n]))
    if dims is not None:
        _check_heads(shapes, num_layers, *dims)
    files, weight_map, total = _files_by_source(assigned, "hf", rename_sources=True)
    side = [(HF_INDEX, index_text(weight_map, total))]
    if hf_config is not None:
        side.append((HF_CONFIG, json.dumps(dict(hf_config), indent=2) + "\n"))
    return Plan("export_hf", tuple(files), tuple(side),
                f"MindSpore Transformers -> Hugging Face {family} ({len(weight_map)} tensors, "
                f"{num_layers} layers) from {src.root}")


def _part_rows(rule: FuseRule, fused_rows: int, dims) -> List[int]:
    if rule.layout == "ffn":
        if fused_rows % 2:
            raise ConversionError(f"{rule.fused}: {fused_rows} rows is odd; w_gate_hidden holds "
                                  f"w1 and w3 interleaved, so it needs an even row count")
        return [fused_rows // 2, fused_rows // 2]
    num_heads, n_kv_heads, head_dim = dims
    rows = [num_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
    if sum(rows) != fused_rows:
        raise ConversionError(
            f"{rule.fused}: {fused_rows} rows but num_heads={num_heads}, n_kv_heads={n_kv_heads}, "
            f"head_dim={head_dim} give {sum(rows)}; pass the model config these weights belong to")
    return rows


def _unfused_shapes(src: SourceCheckpoint, weights) -> Dict[str, Tuple[int, ...]]:
    """Global shapes by MindSpore name of the weights."""
    out = {}
    for n in weights:
        out[n] = tuple(src.global_shapes[n])
    if EMBEDDING not in out:
        raise ConversionError(f"{EMBEDDING} is missing; the weights are not a complete model")
    return out


def plan_nbytes(plan: Plan) -> int:
    """Bytes the plan writes (all files)."""
    return sum(f.nbytes for f in plan.files)

