"""From a validated RunConfig to what a run needs: the model class name and its config, the
tokenizer file, the ParallelConfig, and the plan (parameter table, per-rank bytes, strategy files).

When `load_checkpoint` is a Hugging Face folder, `model_config` keys the YAML leaves out are taken
from its `config.json` and the family from its `architectures`; a YAML value that contradicts
config.json is a ConfigError naming both. Pure Python (no MindSpore).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..convert.hf_config import detect_family, hf_config_to_model_config, read_hf_config
from ..errors import ConfigError, ConversionError
from ..layout.param_table import ParamTable
from ..layout.parallel_config import ParallelConfig, plan_layouts
from ..models.param_table import llama_param_table
from ..models.registry import check_model_name, get_config_class
from ..config.schema import RunConfig

logger = logging.getLogger(__name__)

# model_config keys that describe the weights (and their positions): YAML and config.json must
# agree on them, or the model would silently compute something else than the checkpoint
STRUCTURAL_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads",
                   "head_dim", "intermediate_size", "qkv_has_bias", "attn_proj_has_bias",
                   "mlp_has_bias", "tie_word_embeddings", "extend_method", "scaling_factor")
# HF family -> the registered model name that runs it
FAMILY_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ResolvedModel:
    """The model to build: registered name, config object, where its values came from."""

    arch: str
    config: Any                      # the registered config class instance (LlamaConfig...)
    model_config: Dict[str, Any]     # the merged mapping it was built from
    hf_folder: Optional[str] = None  # load_checkpoint, when it is an HF folder
    family: Optional[str] = None


def hf_folder_of(cfg: RunConfig) -> Optional[str]:
    """`load_checkpoint` when it is a folder with an HF `config.json`, else None."""
    path = cfg.load_checkpoint
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    return None


def merge_hf_model_config(yaml_mc: Dict[str, Any], hf_mc: Dict[str, Any], folder: str,
                          ) -> Dict[str, Any]:
    """YAML model_config completed from config.json values; ConfigError on a contradiction in
    a structural key. Non-structural keys (seq_length, dtypes, token ids...) keep the YAML value."""
    merged = dict(yaml_mc)
    for key, hf_value in hf_mc.items():
        if key not in merged or merged[key] is None:
            merged[key] = hf_value
        elif key in STRUCTURAL_KEYS and merged[key] != hf_value:
            raise ConfigError(
                f"model.model_config.{key} is {merged[key]!r} in the YAML but {hf_value!r} in "
                f"{os.path.join(folder, 'config.json')}; the weights have the config.json shape: "
                f"remove {key} from the YAML (it is read from config.json) or fix it")
    return merged


def resolve_model(cfg: RunConfig) -> ResolvedModel:
    """The model name and validated model config of a run (HF config.json merged in).

    ConfigError before any weight is read for a config.json this package cannot run (naming
    the key) and for an unregistered model (naming the --register_path flag to add)."""
    mc = dict(cfg.model.model_config)
    arch = cfg.model.arch.type
    folder = hf_folder_of(cfg)
    family = None
    if folder:
        try:
            hf_raw = read_hf_config(folder)
            family = detect_family(hf_raw)
            hf_mc = hf_config_to_model_config(hf_raw, family)
        except ConversionError as exc:
            raise ConfigError(f"load_checkpoint {folder}: {exc}") from exc
        # config.json's max_position_embeddings is not the training sequence length
        for key in ("seq_length", "max_position_embedding", "param_init_type", "compute_dtype"):
            hf_mc.pop(key, None)
        mc = merge_hf_model_config(mc, hf_mc, folder)
        if arch is None:
            arch = FAMILY_ARCH.get(family, "LlamaForCausalLM")
        logger.info("model_config completed from %s/config.json (family %s)", folder, family)
    arch = arch or "LlamaForCausalLM"
    check_model_name(arch)   # before any weight is read; names --register_path for qwen2
    config_cls = get_config_class(mc.get("type"))
    try:
        model_cfg = config_cls.from_dict(mc)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in model.model_config)") if "model_config" not in str(exc) \
            else exc
    return ResolvedModel(arch, model_cfg, mc, folder, family)


def tokenizer_file(cfg: RunConfig, resolved: Optional[ResolvedModel] = None) -> Optional[str]:
    """The tokenizer.json of the run: processor.tokenizer.tokenizer_file, a vocab_file ending in
    .json, else the HF folder's tokenizer.json; None when there is none."""
    tk = cfg.processor.tokenizer
    for path in (tk.tokenizer_file, tk.vocab_file):
        if path and (path.endswith(".json") or os.path.isdir(path)):
            return path
    if tk.vocab_file:
        raise ConfigError(f"processor.tokenizer.vocab_file {tk.vocab_file!r} is not a "
                          f"tokenizer.json; this runtime reads Hugging Face tokenizer.json files "
                          f"(set processor.tokenizer.tokenizer_file)")
    folder = resolved.hf_folder if resolved else hf_folder_of(cfg)
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return os.path.join(folder, "tokenizer.json")
    return None


def parallel_config_of(cfg: RunConfig) -> ParallelConfig:
    """layout.ParallelConfig of the run's parallel_config section."""
    pc = cfg.parallel_config
    return ParallelConfig(data_parallel=pc.data_parallel, model_parallel=pc.model_parallel,
                          pipeline_stage=pc.pipeline_stage, optimizer_shard=cfg.optimizer_shard,
                          vocab_emb_dp=pc.vocab_emb_dp, micro_batch_num=pc.micro_batch_num)


def param_table_of(resolved: ResolvedModel, with_optimizer: bool) -> ParamTable:
    """The model's parameter table (plus AdamW moments when training)."""
    table = llama_param_table(resolved.config)
    return table.with_optimizer_states() if with_optimizer else table


def format_count(n: int) -> str:
    """An element count with the unit that keeps it readable: 372 K, 6.74 B (never 0.000 B)."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(int(n))


def plural(n: int, word: str) -> str:
    """"1 rank", "2 ranks"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_bytes(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe_plan(cfg: RunConfig, resolved: ResolvedModel) -> str:
    """A printable plan: parallel config, parameter table summary, bytes per rank."""
    pc = parallel_config_of(cfg)
    training = cfg.run_mode in ("train", "finetune")
    table = param_table_of(resolved, training)
    layouts = plan_layouts(table, pc)
    specs = table.by_name()
    per_rank = [0] * pc.world_size
    for name, lay in layouts.items():
        item = specs[name].nbytes // max(1, specs[name].numel)
        for r in lay.ranks():
            sl = lay.slice_for(r)
            n = 1
            for s in sl.sizes:
                n *= s
            per_rank[r] += n * item
    weights = [p for p in table if not p.name.startswith(("adam_m.", "adam_v."))]
    lines = [
        f"model {resolved.arch}: {len(weights)} parameters, "
        f"{format_count(sum(p.numel for p in weights))} elements, "
        f"{format_bytes(sum(p.nbytes for p in weights))} of weights"
        + (f" (+ AdamW moments: {format_bytes(table.total_bytes)} in all)" if training else ""),
        f"parallel_config: data_parallel={pc.data_parallel} model_parallel={pc.model_parallel} "
        f"pipeline_stage={pc.pipeline_stage} optimizer_shard={pc.optimizer_shard} "
        f"vocab_emb_dp={pc.vocab_emb_dp} -> {plural(pc.world_size, 'rank')}",
        f"{'name':58s} {'global shape':>16s} {'dtype':>5s}  {'rank 0 slice':>16s}",
    ]
    shown = weights if len(weights) <= 9 else weights[:6] + [None] + weights[-3:]
    for p in shown:
        if p is None:
            lines.append(f"... ({len(weights) - 9} more)")
            continue
        sl = layouts[p.name].slice_for(0) if 0 in layouts[p.name].ranks() else None
        lines.append(f"{p.name:58s} {str(list(p.shape)):>16s} {p.dtype:>5s}  "
                     f"{str(list(sl.sizes)) if sl else '-':>16s}")
    lines.append("bytes per rank: " + ", ".join(f"rank {r}: {format_bytes(b)}"
                                                for r, b in enumerate(per_rank)))
    return "\n".join(lines)


def write_strategy(cfg: RunConfig, resolved: ResolvedModel, folder: Optional[str] = None,
                   ) -> List[str]:
    """Write `ckpt_strategy_rank_{r}.ckpt` for every rank of the run into
    `{output_dir}/strategy/` (or `folder`); returns the paths."""
    from ..layout.strategy import write_rank_strategy_files

    pc = parallel_config_of(cfg)
    training = cfg.run_mode in ("train", "finetune")
    layouts = plan_layouts(param_table_of(resolved, training), pc)
    folder = folder or os.path.join(cfg.output_dir, "strategy")
    os.makedirs(folder, exist_ok=True)
    return write_rank_strategy_files(folder, layouts, pc)
