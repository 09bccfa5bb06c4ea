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
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from ..dtypes import numpy_to_st
from ..storage.writer import SafetensorsWriter

logger = logging.getLogger(__name__)


def find_ckpt_files(src: str) -> List[str]:
    """`.ckpt` files under folder `src` (recursively), as sorted relative paths."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        out.extend(os.path.relpath(os.path.join(root, f), src) for f in files
                   if f.endswith(".ckpt"))
    return sorted(out)


def read_ckpt(path: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """The tensors of a MindSpore `.ckpt` file as numpy arrays in file order, and the names of
    non-tensor entries (strings from `append_dict`) that safetensors cannot hold."""
    import mindspore as ms   # only this command touches MindSpore
    try:
        params = ms.load_checkpoint(path)
    except Exception as exc:   # MindSpore raises ValueError/RuntimeError for damaged files
        raise CheckpointError(f"{path}: MindSpore cannot read this .ckpt ({exc}); is it a "
                              f"complete MindSpore checkpoint?") from exc
    arrays, skipped = {}, []
    for name, value in params.items():
        if hasattr(value, "asnumpy"):
            arrays[name] = _as_standard_dtype(value.asnumpy())
        else:
            skipped.append(name)
    return arrays, skipped


def _as_standard_dtype(a: np.ndarray) -> np.ndarray:
    """MindSpore returns bf16 as its own numpy bfloat16 type, which is not ml_dtypes'
    (the one our storage maps to BF16); the bits are the same, so re-view them."""
    if a.dtype.name == "bfloat16" and a.dtype != np.dtype(ml_dtypes.bfloat16):
        return a.view(np.uint16).view(ml_dtypes.bfloat16)
    return a


def convert_file(src: str, dst: str, checksums: bool = True) -> str:
    """Write the tensors of `.ckpt` file `src` to safetensors file `dst` (atomically, with
    `{"format": "ms"}` metadata as MindSpore writes). Returns the path written."""
    arrays, skipped = read_ckpt(src)
    if skipped:
        logger.warning("%s: %d non-tensor entr%s left out (safetensors holds tensors only): %s",
                       src, len(skipped), "y" if len(skipped) == 1 else "ies", skipped[:5])
    specs = [(name, numpy_to_st(a.dtype), tuple(a.shape)) for name, a in arrays.items()]
    with SafetensorsWriter(dst, specs, metadata={"format": "ms"}, checksums=checksums) as w:
        for name in list(arrays):
            w.write(name, arrays.pop(name))   # drop each array once written
    return w.path


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
