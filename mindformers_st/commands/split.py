"""`mindformers-st split SRC DST`: complete weights -> rank_x/ files for a parallel layout
(`--dst-strategy S`, or `--config YAML --dp N --mp N --pp N`)."""
from __future__ import annotations

from ..transform import describe_complete
from .reshard import add_common_args, add_target_args, distributed_target


def _split(args) -> int:
    return distributed_target(args, describe_complete(args.src))


def register(subparsers) -> None:
    """Add the `split` subcommand."""
    p = subparsers.add_parser("split", help="cut complete weights into rank_x/ files",
                              description=__doc__.splitlines()[0])
    add_common_args(p, src_strategy=False)
    add_target_args(p)
    p.set_defaults(func=_split)
