"""`mindformers-st ckpt-to-safetensors SRC DST`: MindSpore `.ckpt` files -> safetensors with
the same tensor names, dtypes (bf16 too) and folder layout (`rank_x/` folders are kept).

SRC is one `.ckpt` file (DST is then a `.safetensors` file or a folder to put it in) or a
folder searched recursively for `.ckpt` files (DST mirrors its layout and appears atomically).
`.ckpt` is MindSpore's protobuf format, so this command alone imports MindSpore, lazily, to read
it with `mindspore.load_checkpoint`; writing goes through our streaming safetensors writer.
"""
from __future__ import annotations

import logging
import os
import shutil

from ..checkpoint.ckpt_format import convert_file, find_ckpt_files
from ..errors import CheckpointError

logger = logging.getLogger(__name__)


def _target_file(src: str, dst: str) -> str:
    if dst.endswith(".safetensors"):
        return dst
    return os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ".safetensors")


def _run(args) -> int:
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if os.path.isfile(src):
        if not src.endswith(".ckpt"):
            raise CheckpointError(f"{src}: not a .ckpt file")
        out = _target_file(src, dst)
        if args.dry_run:
            print(f"{src} -> {out}")
            return 0
        if os.path.exists(out) and not args.overwrite:
            raise CheckpointError(f"{out} exists; pass --overwrite or choose another DST")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        print(f"wrote {convert_file(src, out)}")
        return 0
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such file or folder")
    rels = find_ckpt_files(src)
    if not rels:
        raise CheckpointError(f"{src}: no .ckpt file in this folder or its subfolders")
    if args.dry_run:
        for rel in rels:
            print(f"{rel} -> {os.path.splitext(rel)[0]}.safetensors")
        return 0
    from ..transform.execute import commit_folder, staging_folder
    if os.path.exists(dst) and os.listdir(dst) and not args.overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty; pass --overwrite or choose "
                              f"another DST")
    tmp = staging_folder(dst)
    try:
        for rel in rels:
            out = os.path.join(tmp, os.path.splitext(rel)[0] + ".safetensors")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            convert_file(os.path.join(src, rel), out)
            logger.info("converted %s", rel)
        commit_folder(tmp, dst, overwrite=args.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {len(rels)} file(s) into {dst}")
    return 0


def register(subparsers) -> None:
    """Add the `ckpt-to-safetensors` subcommand."""
    p = subparsers.add_parser("ckpt-to-safetensors", help="MindSpore .ckpt -> safetensors "
                                                          "(names, dtypes, rank_x/ kept)",
                              description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="a .ckpt file, or a folder (rank_x/ kept)")
    p.add_argument("dst", metavar="DST", help="output .safetensors file or folder")
    p.add_argument("--dry-run", action="store_true", help="list what would be written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=_run)
