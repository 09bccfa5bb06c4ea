"""`mindformers-st export-hf SRC DST --config YAML`: MindSpore Transformers weights — complete,
or a `rank_x/` folder exported in one pass without a merged copy — -> a Hugging Face folder
(weights, `model.safetensors.index.json`, `config.json`) that `transformers` loads."""
from __future__ import annotations

import logging

from ..convert import FAMILIES, plan_ms_folder, read_yaml_model_config
from .reshard import add_common_args, run_plan

logger = logging.getLogger(__name__)


def _export_hf(args) -> int:
    model_config = read_yaml_model_config(args.config)
    result = plan_ms_folder(args.src, model_config, family=args.family,
                            strategy=args.src_strategy, step=args.step)
    logger.info("family %s", result.family)
    return run_plan(args, result.plan)


def register(subparsers) -> None:
    """Add the `export-hf` subcommand."""
    p = subparsers.add_parser("export-hf", help="MindSpore Transformers complete weights -> "
                                                "Hugging Face folder",
                              description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--config", required=True,
                   help="run YAML whose model.model_config gives num_heads, n_kv_heads, "
                        "rms_norm_eps, theta... (sizes are read from the weights)")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="model family (default: qwen2 when q/k/v biases are present, else llama)")
    p.set_defaults(func=_export_hf)
