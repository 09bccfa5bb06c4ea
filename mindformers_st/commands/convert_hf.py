"""`mindformers-st convert-hf SRC_HF DST`: a Hugging Face Llama/Qwen2 folder -> complete
MindSpore Transformers weights (same shard names, `param_name_map.json`)."""
from __future__ import annotations

import logging

from ..convert import FAMILIES, plan_hf_folder
from .reshard import add_common_args, run_plan

logger = logging.getLogger(__name__)


def _convert_hf(args) -> int:
    result = plan_hf_folder(args.src, family=args.family, qkv_concat=args.qkv_concat)
    logger.info("family %s%s", result.family, ", qkv_concat" if args.qkv_concat else "")
    return run_plan(args, result.plan)


def register(subparsers) -> None:
    """Add the `convert-hf` subcommand."""
    p = subparsers.add_parser("convert-hf", help="Hugging Face weights -> MindSpore Transformers "
                                                 "complete weights",
                              description=__doc__.splitlines()[0])
    add_common_args(p, src_strategy=False)
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="model family (default: from config.json, else from tensor names)")
    p.add_argument("--qkv-concat", action="store_true",
                   help="fuse q/k/v into attention.w_qkv and w1/w3 into "
                        "feed_forward.w_gate_hidden (MindSpore Transformers' qkv_concat layouts)")
    p.set_defaults(func=_convert_hf)
