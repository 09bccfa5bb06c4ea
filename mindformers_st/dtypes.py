"""The safetensors dtype names, their sizes and the numpy dtypes they map to (bfloat16/float8 via
ml_dtypes): the one dtype table, a leaf every layer may import (it imports only `errors`)."""
from __future__ import annotations

import logging
from typing import Dict

import ml_dtypes
import numpy as np

from .errors import SafetensorsFormatError

logger = logging.getLogger(__name__)

# The full list of dtypes the safetensors format defines that we read and write. Every value is
# little-endian, as the format stores data little-endian.
ST_TO_NUMPY: Dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

_NUMPY_TO_ST: Dict[np.dtype, str] = {v: k for k, v in ST_TO_NUMPY.items()}

# safetensors dtype name -> bytes per element
ITEMSIZE: Dict[str, int] = {k: v.itemsize for k, v in ST_TO_NUMPY.items()}

# the dtype names of YAML model configs (param_init_type, compute_dtype) and of HF config.json
YAML_DTYPE_TO_ST: Dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ST_TO_YAML_DTYPE: Dict[str, str] = {v: k for k, v in YAML_DTYPE_TO_ST.items()}

# MindSpore dtype names (`str(parameter.dtype)`) -> safetensors names; strings only, so reading
# a parameter's dtype never copies its data off the device
MINDSPORE_TO_ST: Dict[str, str] = {
    "Bool": "BOOL", "UInt8": "U8", "Int8": "I8", "Int16": "I16", "UInt16": "U16",
    "Float16": "F16", "BFloat16": "BF16", "Int32": "I32", "UInt32": "U32", "Float32": "F32",
    "Float64": "F64", "Int64": "I64", "UInt64": "U64",
}


def numpy_to_st(dtype) -> str:
    """The safetensors dtype name of a numpy dtype (anything `np.dtype()` accepts).

    Native-endian and little-endian spellings are accepted; big-endian arrays, object, string and
    complex dtypes raise SafetensorsFormatError (safetensors cannot store them).
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise SafetensorsFormatError(f"{dtype!r} is not a numpy dtype: {exc}") from exc
    if dt.byteorder == ">":
        raise SafetensorsFormatError(
            f"numpy dtype {dt.str} is big-endian; safetensors stores little-endian data. "
            f"Convert with arr.astype(arr.dtype.newbyteorder('<')) first.")
    name = _NUMPY_TO_ST.get(dt.newbyteorder("<") if dt.byteorder == "=" else dt)
    if name is None:
        name = _NUMPY_TO_ST.get(dt)
    if name is None:
        raise SafetensorsFormatError(
            f"numpy dtype {dt} has no safetensors equivalent; supported: "
            f"{', '.join(sorted(ST_TO_NUMPY))}. Cast the array to one of them first.")
    return name


def st_to_numpy(name: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype name; SafetensorsFormatError for unknown names."""
    try:
        return ST_TO_NUMPY[name]
    except (KeyError, TypeError):
        raise SafetensorsFormatError(
            f"unknown safetensors dtype {name!r}; the format defines "
            f"{', '.join(sorted(ST_TO_NUMPY))}") from None
