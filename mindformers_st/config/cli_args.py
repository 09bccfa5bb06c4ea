"""The command line of run_mindformer.py: MindSpore Transformers' flags -> dotted config overrides.

Every flag value stays a string here; `config.load` converts it by the key's declared type, so
one place decides what "True" or "3" means and names the key when it does not fit.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from ..errors import ConfigError

# flag -> dotted config key it sets (None: the flag itself, at the top level)
FLAG_KEYS = {
    "run_mode": "run_mode",
    "use_parallel": "use_parallel",
    "load_checkpoint": "load_checkpoint",
    "load_ckpt_format": "load_ckpt_format",
    "auto_trans_ckpt": "auto_trans_ckpt",
    "src_strategy_path_or_dir": "src_strategy_path_or_dir",
    "resume_training": "resume_training",
    "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "train_dataset": "train_dataset.data_loader.dataset_dir",
    "predict_batch_size": "predict_batch_size",
    "output_dir": "output_dir",
    "seed": "seed",
    "epochs": "runner_config.epochs",
    "batch_size": "runner_config.batch_size",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "sink_mode": "runner_config.sink_mode",
    "num_samples": "train_dataset.data_loader.num_samples",
    "remove_redundancy": "remove_redundancy",
    "only_save_strategy": "only_save_strategy",
    "transform_process_num": "transform_process_num",
    "device_target": "context.device_target",
    "mode": "context.mode",
    "device_id": "context.device_id",
    "do_sample": "model.model_config.do_sample",
    "vocab_file": "processor.tokenizer.vocab_file",
}

# Flags of MindSpore Transformers' run_mindformer.py this runtime does not implement: refused by
# name (never silently accepted). Switch flags are accepted when off, as that is what happens.
REFUSED_FLAGS = {
    "do_eval": "evaluation during training is not implemented by this runtime",
    "eval_dataset_dir": "evaluation (run_mode eval, do_eval) is not implemented by this runtime",
    "profile": "profiling is not implemented by this runtime (use MindSpore's profiler around "
               "the run)",
    "modal_type": "multi-modal predict data is not implemented by this runtime (text prompts only)",
    "adapter_id": "LoRA adapters (slora) are not implemented by this runtime",
    "strategy_load_checkpoint": "this runtime plans its own layouts; a strategy to load is not "
                                "read (src_strategy_path_or_dir describes weights to load)",
    "remote_save_url": "outputs are written to output_dir only; copy them yourself",
    "trust_remote_code": "this runtime never runs code from a model folder (tokenizer.json and "
                         "safetensors only)",
}
SWITCH_FLAGS = ("do_eval", "profile", "trust_remote_code")
MULTI_VALUE_FLAGS = ("modal_type", "adapter_id")

_HELP = {
    "run_mode": "train | finetune | predict",
    "use_parallel": "True to run distributed (launch with scripts/msrun_launcher.sh)",
    "load_checkpoint": "weights to load: HF folder, complete MindSpore folder, rank_x/ folder",
    "load_ckpt_format": "ckpt | safetensors",
    "auto_trans_ckpt": "re-cut loaded weights for this run's parallel_config",
    "src_strategy_path_or_dir": "strategy file/folder of distributed source weights",
    "resume_training": "True, or the checkpoint file name to resume from",
    "train_dataset_dir": "MindRecord file or folder (train_dataset.data_loader.dataset_dir)",
    "train_dataset": "alias of --train_dataset_dir",
    "predict_batch_size": "prompts per generate call",
    "output_dir": "where checkpoints, strategy files and results go (default ./output)",
    "seed": "random seed (weights init, data order, sampling)",
    "epochs": "runner_config.epochs",
    "batch_size": "runner_config.batch_size (per data-parallel rank)",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "sink_mode": "runner_config.sink_mode (accepted; steps always run one by one)",
    "num_samples": "read only this many samples of the dataset",
    "remove_redundancy": "weights to load were saved without redundancy",
    "only_save_strategy": "write {output_dir}/strategy/ files and exit",
    "transform_process_num": "ranks that build an online merge/conversion (divides the world size)",
    "device_target": "context.device_target (CPU)",
    "mode": "context.mode (0 graph, 1 pynative)",
    "device_id": "context.device_id",
    "do_sample": "model.model_config.do_sample",
    "vocab_file": "a tokenizer.json (processor.tokenizer.vocab_file; takes the place of "
                  "processor.tokenizer.tokenizer_file)",
}


@dataclass
class RunArgs:
    """What the command line says: the YAML, the overrides to apply to it, the register path."""

    config: str
    overrides: List[Tuple[str, Any]] = field(default_factory=list)
    register_path: Optional[str] = None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for run_mindformer.py's named flags (extra --a.b.c pairs are parsed apart)."""
    parser = argparse.ArgumentParser(
        prog="run_mindformer.py", allow_abbrev=False,
        description="Train, finetune or predict with a MindSpore Transformers-style YAML config. "
                    "Any further '--a.b.c value' pair overrides that YAML key.")
    parser.add_argument("--config", required=True, help="the run YAML (required)")
    for flag, key in FLAG_KEYS.items():
        parser.add_argument(f"--{flag}", default=None, metavar="VALUE", help=_HELP.get(flag, key))
    for flag, why in REFUSED_FLAGS.items():
        parser.add_argument(f"--{flag}", default=None, metavar="VALUE",
                            nargs="+" if flag in MULTI_VALUE_FLAGS else None,
                            help=f"refused: {why}" + (" (False is accepted)"
                                                      if flag in SWITCH_FLAGS else ""))
    parser.add_argument("--predict_data", nargs="+", default=None, metavar="PROMPT",
                        help="one or more prompts for run_mode predict")
    parser.add_argument("--register_path", default=None,
                        help="folder whose __init__.py registers extra models (e.g. research/qwen2)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="more overrides as a.b.c=value pairs")
    return parser


def parse_run_args(argv: Sequence[str]) -> RunArgs:
    """Parse run_mindformer.py's argv (without the program name) into RunArgs.

    Unknown `--a.b.c value` / `--a.b.c=value` pairs become overrides (checked against the schema
    later, so a typo is a ConfigError naming the key). A dangling token is a ConfigError.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    _refuse_unimplemented(args)
    overrides: List[Tuple[str, Any]] = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append((key, value))
    if args.vocab_file is not None:   # the flag names the tokenizer: the YAML's one gives way
        overrides.append(("processor.tokenizer.tokenizer_file", ""))
    if args.predict_data is not None:
        overrides.append(("predict_data", list(args.predict_data)))
    for item in args.options or ():
        if "=" not in item:
            raise ConfigError(f"--options expects key=value pairs, got {item!r}")
        k, v = item.split("=", 1)
        overrides.append((k.strip(), v))
    overrides.extend(_parse_extra(extra))
    return RunArgs(config=args.config, overrides=overrides, register_path=args.register_path)


def _refuse_unimplemented(args) -> None:
    """ConfigError naming the first flag of REFUSED_FLAGS given (switches: given as true)."""
    from .typed import parse_bool_word
    for flag, why in REFUSED_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in SWITCH_FLAGS:
            on = parse_bool_word(value)
            if on is None:
                raise ConfigError(f"run_mindformer.py flag --{flag} {value!r}: give True or False")
            if not on:
                continue
        shown = " ".join(value) if isinstance(value, list) else value
        raise ConfigError(f"run_mindformer.py flag --{flag} {shown}: {why}; remove the flag")


def _parse_extra(tokens: List[str]) -> List[Tuple[str, str]]:
    pairs: List[Tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ConfigError(f"unexpected command-line argument {tok!r}; overrides are written "
                              f"--a.b.c value")
        body = tok[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"flag {tok!r} has no value; write {tok} VALUE")
            key, value = body, tokens[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs
