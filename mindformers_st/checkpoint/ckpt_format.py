"""MindSpore `.ckpt` files read as numpy and copied to safetensors (same names, dtypes, bf16 too).

`.ckpt` is MindSpore's protobuf format, so this module imports MindSpore, lazily, to read it with
`mindspore.load_checkpoint`; writing goes through our streaming safetensors writer. The load hook
(`.ckpt` weights are read through a converted copy) and `mindformers-st ckpt-to-safetensors` use it.

Our own `.ckpt` rank files describe their slices as our safetensors do: CheckpointMonitor stores
the rank file description (`records.rank_meta`, key `mindformers_st`) as a string entry of the
`.ckpt` (MindSpore's `append_dict`; MindSpore's own loaders report it as not loaded and go on),
and the copy carries it into the safetensors `__metadata__`, so the readers re-cut our `.ckpt`
saves without a strategy.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np

from ..dtypes import numpy_to_st
from ..errors import CheckpointError
from ..records.rank_meta import METADATA_KEY, RankFileMeta
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


def read_ckpt(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """The tensors of a MindSpore `.ckpt` file as numpy arrays in file order, and its non-tensor
    entries (`append_dict` strings and numbers) by name."""
    import mindspore as ms   # only this command touches MindSpore
    try:
        params = ms.load_checkpoint(path)
    except Exception as exc:   # MindSpore raises ValueError/RuntimeError for damaged files
        raise CheckpointError(f"{path}: MindSpore cannot read this .ckpt ({exc}); is it a "
                              f"complete MindSpore checkpoint?") from exc
    arrays, others = {}, {}
    for name, value in params.items():
        if hasattr(value, "asnumpy"):
            arrays[name] = as_standard_dtype(value.asnumpy())
        else:
            others[name] = value
    return arrays, others


def ckpt_description(metadata: Dict[str, str]) -> Dict[str, str]:
    """The `append_dict` a `.ckpt` rank file of ours carries: the rank file description
    (`records.rank_meta`) of its safetensors `__metadata__`, as one string entry."""
    return {METADATA_KEY: metadata[METADATA_KEY]} if METADATA_KEY in metadata else {}


def as_standard_dtype(a: np.ndarray) -> np.ndarray:
    """`a` with ml_dtypes' bfloat16 where MindSpore gave its own numpy bfloat16 type (not the
    one our storage maps to BF16); the bits are the same, so they are re-viewed, not copied."""
    # itemsize first: numpy builds dtype.name anew on each call, per tensor of every save
    if a.dtype.itemsize == 2 and a.dtype.name == "bfloat16" and a.dtype != np.dtype(ml_dtypes.bfloat16):
        return a.view(np.uint16).view(ml_dtypes.bfloat16)
    return a


def convert_file(src: str, dst: str, checksums: bool = True) -> str:
    """Write the tensors of `.ckpt` file `src` to safetensors file `dst` (atomically, with
    `{"format": "ms"}` metadata as MindSpore writes). Returns the path written."""
    arrays, others = read_ckpt(src)
    metadata = {"format": "ms"}
    described = others.pop(METADATA_KEY, None)
    if isinstance(described, str):   # ours: the slices travel on, checked as the file is read
        meta = RankFileMeta.from_metadata({METADATA_KEY: described}, src)
        metadata.update(meta.to_metadata())
    if others:
        logger.warning("%s: %d non-tensor entr%s left out (safetensors holds tensors only): %s",
                       src, len(others), "y" if len(others) == 1 else "ies", list(others)[:5])
    specs = [(name, numpy_to_st(a.dtype), tuple(a.shape)) for name, a in arrays.items()]
    with SafetensorsWriter(dst, specs, metadata=metadata, checksums=checksums) as w:
        for name in list(arrays):
            w.write(name, arrays.pop(name))   # drop each array once written
    return w.path
