"""`mindformers-st merge SRC DST`: distributed rank_x/ weights (or a Checkpoint 2.0 save) ->
complete weights (`model-0000k-of-0000n.safetensors`, `param_name_map.json`,
`hyper_param.safetensors`)."""
from __future__ import annotations

from ..errors import PlanError
from ..transform import describe_source, plan_merge
from ..transform.planner import DEFAULT_MAX_SHARD_SIZE
from .reshard import add_common_args, parse_size, run_plan


def _merge(args) -> int:
    src = describe_source(args.src, args.src_strategy, args.step)
    if src.layout == "iteration":   # either cut: merged, its common.json counters kept
        from .convert_layout import counters_writer
        return run_plan(args, plan_merge(src, args.max_shard_size), finalize=counters_writer(src))
    if src.kind != "distributed":
        raise PlanError(f"{args.src} already holds complete weights; nothing to merge (use "
                        f"`split` or `reshard` to re-cut)")
    return run_plan(args, plan_merge(src, args.max_shard_size))


def register(subparsers) -> None:
    """Add the `merge` subcommand."""
    p = subparsers.add_parser("merge", help="merge rank_x/ weights into complete weights",
                              description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest output shard, e.g. 5GB (decimal, default) or 2GiB")
    p.set_defaults(func=_merge)
