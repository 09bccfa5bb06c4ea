"""`mindformers-st reshard SRC DST`: distributed -> distributed directly (no complete copy).

Also home of the argument helpers `merge` and `split` share: target layouts from a strategy or
from `--config YAML --dp --mp --pp`, dry-run printing, running a plan into DST.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from typing import Dict, Optional, Tuple

from ..config.load import read_yaml
from ..errors import ConfigError, PlanError
from ..layout.param_table import OPTIMIZER_STATE_PREFIXES
from ..layout.parallel_config import ParallelConfig, plan_layouts
from ..transform import (describe_source, execute, format_stats, plan_distributed, plan_stats)
from ..transform.planner import with_source_shapes
from ..transform.sources import SourceCheckpoint
from .options import add_step_arg, add_verify_args

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """Bytes from "5GB" (decimal), "2GiB" (binary), "500MB" or a plain integer."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 5GB, 500MB, 2GiB or bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def add_common_args(p: argparse.ArgumentParser, src_strategy: bool = True) -> None:
    """SRC, DST and the options every transform command has."""
    p.add_argument("src", metavar="SRC", help="source checkpoint (folder of rank_x/, complete "
                                              "folder, or one .safetensors file)")
    p.add_argument("dst", metavar="DST", help="output folder (created atomically)")
    if src_strategy:
        p.add_argument("--src-strategy", default=None,
                       help="MindSpore strategy of the source (one file, a folder of per-rank "
                            "files, or pipeline-merged); optional for files we wrote")
        add_step_arg(p)
    add_verify_args(p)
    p.add_argument("--workers", type=int, default=4,
                   help="tensors in flight per process (threads), default 4")
    p.add_argument("--processes", type=positive_int, default=1, metavar="N",
                   help="worker processes, default 1; the output files are divided among them "
                        "(each file written by one process, with --workers threads), so at most "
                        "one process per output file is used (MindSpore Transformers' "
                        "transform_process_num)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan's costs (bytes read, files opened, peak buffer) and stop")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """How to say what the distributed target is: a strategy, or a config plus dp/mp/pp."""
    p.add_argument("--dst-strategy", default=None,
                   help="MindSpore strategy of the target (file or folder of per-rank files)")
    p.add_argument("--config", default=None, help="run YAML; its model.model_config gives the "
                                                  "parameter table")
    p.add_argument("--dp", type=int, default=None, help="data_parallel (required with --config)")
    p.add_argument("--mp", type=int, default=None, help="model_parallel (required with --config)")
    p.add_argument("--pp", type=int, default=None, help="pipeline_stage (required with --config)")
    p.add_argument("--optimizer-shard", action="store_true", default=None,
                   help="shard parameters over data parallel (parallel.enable_parallel_optimizer)")
    p.add_argument("--vocab-emb-dp", choices=["true", "false"], default=None,
                   help="keep embedding/lm_head whole on every mp rank (default from the YAML, "
                        "else true)")
    p.add_argument("--remove-redundancy", action="store_true",
                   help="store each distinct slice in one rank file only")
    p.add_argument("--prefix", default="checkpoint",
                   help="rank file prefix: rank_r/{prefix}_rank_r.safetensors")


def layouts_from_config(args, src: SourceCheckpoint) -> Tuple[Dict, ParallelConfig]:
    """Target layouts from `--config` (model.model_config) and the parallel flags; optimizer
    moments get their parameter's layout when the source has them."""
    from ..models.config import LlamaConfig
    from ..models.param_table import llama_param_table
    data = read_yaml(args.config)
    model_cfg = (data.get("model") or {}).get("model_config")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{args.config}: no model.model_config mapping; the target layout "
                          f"needs the model's sizes")
    table = llama_param_table(LlamaConfig.from_dict(dict(model_cfg)))
    if any(n.startswith(OPTIMIZER_STATE_PREFIXES) for n in src.chunks):
        table = table.with_optimizer_states()
    yaml_pc = data.get("parallel_config") or {}
    yaml_par = data.get("parallel") or {}
    # The target's shape is said on the command line, never taken from the YAML in part: a
    # YAML's data_parallel silently joining `--mp 2` made another layout than the one asked for.
    missing = [f"--{f}" for f in ("dp", "mp", "pp") if getattr(args, f) is None]
    if missing:
        raise ConfigError(f"--config needs the target's --dp, --mp and --pp (missing "
                          f"{', '.join(missing)}); the YAML's parallel_config is not used for them")
    vocab = {"true": True, "false": False}.get(args.vocab_emb_dp) if args.vocab_emb_dp else None
    pc = ParallelConfig(
        data_parallel=args.dp, model_parallel=args.mp, pipeline_stage=args.pp,
        optimizer_shard=bool(args.optimizer_shard if args.optimizer_shard is not None
                             else yaml_par.get("enable_parallel_optimizer", False)),
        vocab_emb_dp=bool(vocab if vocab is not None else yaml_pc.get("vocab_emb_dp", True)))
    return plan_layouts(table, pc), pc


def describe_target(args, layouts, pc: Optional[ParallelConfig]) -> str:
    """One line saying the target layout (printed before anything is planned or written)."""
    from ..layout.strategy import strategy_world_size
    if pc is None:
        return (f"target layout: strategy {args.dst_strategy} "
                f"({strategy_world_size(layouts)} rank(s))")
    return (f"target layout: data_parallel {pc.data_parallel} x model_parallel "
            f"{pc.model_parallel} x pipeline_stage {pc.pipeline_stage} = {pc.world_size} "
            f"rank(s), optimizer_shard {pc.optimizer_shard}, vocab_emb_dp {pc.vocab_emb_dp}"
            f"{', remove_redundancy' if args.remove_redundancy else ''}")


def target_layouts(args, src: SourceCheckpoint) -> Tuple[Dict, Optional[ParallelConfig]]:
    """(layouts, ParallelConfig or None) for the target the flags describe."""
    if args.dst_strategy and args.config:
        raise ConfigError("give either --dst-strategy or --config with --dp/--mp/--pp, not both")
    if args.dst_strategy:
        from ..layout.strategy import read_strategy
        return read_strategy(args.dst_strategy), None
    if args.config:
        return layouts_from_config(args, src)
    raise ConfigError("say what the target is: --dst-strategy FILE, or --config YAML with "
                      "--dp N --mp N --pp N")


def run_plan(args, plan, finalize=None) -> int:
    """Print the dry-run report, or execute the plan into DST."""
    if args.dry_run:
        print(plan.description)
        print(format_stats(plan_stats(plan, args.workers, args.processes)))
        return 0
    paths = execute(plan, args.dst, workers=args.workers, progress=not args.no_progress,
                    overwrite=args.overwrite, finalize=finalize,
                    verify=getattr(args, "verify", "read"), processes=args.processes)
    # Every file that landed (rank files, shards, param_name_map.json, hyper_param, strategy
    # files), not only the tensors' files the plan returns.
    landed = sum(len([f for f in files if not f.startswith(".")])
                 for _, _, files in os.walk(args.dst))
    print(f"{plan.kind}: wrote {landed} file(s) ({len(paths)} of tensors) into "
          f"{os.path.abspath(args.dst)}")
    return 0


def strategy_writer(args, layouts, pc):
    """A finalize hook writing the target's strategy files into DST/strategy/."""
    def write(folder: str) -> None:
        out = os.path.join(folder, "strategy")
        os.makedirs(out, exist_ok=True)
        if pc is not None:
            from ..layout.strategy import write_rank_strategy_files
            write_rank_strategy_files(out, layouts, pc)
        elif os.path.isdir(args.dst_strategy):
            for f in sorted(os.listdir(args.dst_strategy)):
                if f.endswith((".ckpt", ".json")):
                    shutil.copy(os.path.join(args.dst_strategy, f), out)
        else:
            shutil.copy(args.dst_strategy, out)
    return write


def distributed_target(args, src: SourceCheckpoint) -> int:
    """Plan and run src -> rank_x/ per the target flags (split and reshard)."""
    layouts, pc = target_layouts(args, src)
    print(describe_target(args, layouts, pc), flush=True)
    plan = plan_distributed(src, layouts, pc, remove_redundancy=args.remove_redundancy,
                            prefix=args.prefix)
    if not args.dry_run:
        # strategies without shapes get them from the source inside plan_distributed
        layouts = with_source_shapes(src, layouts)
    return run_plan(args, plan, finalize=strategy_writer(args, layouts, pc))


def _reshard(args) -> int:
    src = describe_source(args.src, args.src_strategy, args.step)
    if src.kind != "distributed":
        raise PlanError(f"{args.src} holds complete weights; use `mindformers-st split` to cut "
                        f"them into rank files")
    return distributed_target(args, src)


def register(subparsers) -> None:
    """Add the `reshard` subcommand."""
    p = subparsers.add_parser(
        "reshard", help="re-cut rank_x/ weights for another parallel layout, directly",
        description=__doc__.splitlines()[0])
    add_common_args(p)
    add_target_args(p)
    p.set_defaults(func=_reshard)
