"""`mindformers-st convert-layout SRC DST`: between MindSpore Transformers' two checkpoint
layouts, either way.

- SRC in the Checkpoint 2.0 layout (a folder with `latest_checkpointed_iteration.txt`, or one
  `iteration_XXXXXXXX/`) -> legacy complete weights: `model-0000k-of-0000n.safetensors`,
  `param_name_map.json`, `hyper_param.safetensors` (with common.json's counters);
- SRC in the legacy layout (complete weights, or a `rank_x/` folder: the save the scanner picks
  or `--step`) -> DST in the Checkpoint 2.0 layout at `--iteration` (default: the source's
  global_step): one-card files for complete weights, each rank's blocks kept for distributed
  ones (with metadata.json); common.json from the source's hyper values.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..errors import PlanError
from ..records.hyper import SAVE_HYPER_DTYPES, GLOBAL_STEP, GLOBAL_STEP_DTYPE
from ..records.iteration import CommonInfo
from ..records.names import HYPER_FILE
from ..storage.reader import open_safetensors
from ..transform import describe_source, plan_merge
from ..transform.iteration_plan import plan_iteration
from ..transform.planner import DEFAULT_MAX_SHARD_SIZE
from ..transform.sources import SourceCheckpoint
from .reshard import add_common_args, parse_size, run_plan

_COMMON_KEYS = ("epoch_num", "step_num", GLOBAL_STEP, "loss_scale", "global_batch_size")


def hyper_numbers(src: SourceCheckpoint) -> Dict[str, float]:
    """The scalar hyper values a source holds (counters of common.json first, then the stored
    one-element tensors), by name."""
    out: Dict[str, float] = {}
    for name, chunk in src.hyper.items():
        if chunk.slice.numel == 1:
            with open_safetensors(chunk.file) as sf:
                out[name] = sf.read(chunk.name).reshape(-1)[0].item()
    out.update(src.counters)
    return out


def counters_writer(src: SourceCheckpoint):
    """A finalize hook adding common.json's counters that no file holds to the staged
    `hyper_param.safetensors` (created when the source had no hyper tensor)."""
    def write(folder: str) -> None:
        from ..storage.writer import load_tensors, save_tensors
        path = os.path.join(folder, HYPER_FILE)
        held = load_tensors(path) if os.path.isfile(path) else {}
        extra = {}
        for name, value in src.counters.items():
            if name in held:
                continue
            dtype = GLOBAL_STEP_DTYPE if name == GLOBAL_STEP else SAVE_HYPER_DTYPES.get(name)
            extra[name] = np.array([value], dtype or np.float32)
        if extra:
            save_tensors(path, {**held, **extra}, {"format": "ms"})
    return write


def _convert_layout(args) -> int:
    src = describe_source(args.src, args.src_strategy, args.step)
    if src.layout == "iteration":
        if args.iteration is not None:
            raise PlanError("--iteration names the iteration to write; SRC is already in the "
                            "Checkpoint 2.0 layout (it converts to legacy complete weights)")
        return run_plan(args, plan_merge(src, args.max_shard_size), finalize=counters_writer(src))
    values = hyper_numbers(src)
    iteration = args.iteration
    if iteration is None:
        if GLOBAL_STEP not in values:
            raise PlanError(f"{args.src}: holds no global_step to name the iteration; pass "
                            f"--iteration N")
        iteration = int(values[GLOBAL_STEP])
    common = CommonInfo(**{k: (float(values[k]) if k == "loss_scale" else int(values[k]))
                           for k in _COMMON_KEYS if k in values})
    return run_plan(args, plan_iteration(src, iteration, common, args.prefix))


def register(subparsers) -> None:
    """Add the `convert-layout` subcommand."""
    p = subparsers.add_parser("convert-layout",
                              help="legacy layout <-> MindSpore Transformers 2.x Checkpoint 2.0 "
                                   "(iteration_XXXXXXXX/)",
                              description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--iteration", type=int, default=None,
                   help="to Checkpoint 2.0: the iteration to write (default: global_step)")
    p.add_argument("--prefix", default=None,
                   help="to Checkpoint 2.0: a user prefix for the shard names ({prefix}-model-...)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help="to legacy: largest output shard, e.g. 5GB (decimal, default) or 2GiB")
    p.set_defaults(func=_convert_layout)
