"""Rotary embedding frequencies for every RoPE scaling the Llama family runs (pure numpy).

The scaling is named as MindSpore Transformers' LlamaConfig names it: `extend_method` and
`scaling_factor` (a number, or a mapping of the method's parameters):

| extend_method | scaling_factor | frequencies (theta, head dim d, i = 0, 2, ..., d-2) |
|---|---|---|
| "None"        | ignored | theta^(-i/d) |
| "linear"      | {factor} | theta^(-i/d) / factor (Hugging Face `linear`) |
| "PI"          | number s | theta^(-i/d) / s (position interpolation: positions / s) |
| "NTK"         | number s | (theta·s)^(-i/d) (static NTK: a larger base) |
| "DYNAMIC_NTK" | {factor, original_max_position_embeddings} | HF `dynamic`: base grows with the longest position seen |
| "LLAMA3"      | {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} | HF `llama3` |

"YARN" (MindSpore Transformers has it) changes the attention scale as well and is refused here,
as is every other name: `check_rope` raises a ConfigError naming the key.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import ConfigError

# extend_method -> the scaling_factor keys it needs (None: a plain number)
METHOD_KEYS = {
    "None": None,
    "linear": ("factor",),
    "PI": None,
    "NTK": None,
    "DYNAMIC_NTK": ("factor", "original_max_position_embeddings"),
    "LLAMA3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
REFUSED_METHODS = ("YARN",)


def check_rope(extend_method: str, scaling_factor: Any, head_dim: int) -> None:
    """Raise ConfigError (naming `extend_method` or `scaling_factor` and the offending field)
    unless the pair is one this model computes exactly; returns None when it is."""
    key = "model.model_config.extend_method"
    if extend_method in REFUSED_METHODS:
        raise ConfigError(f"{key}={extend_method!r} is not implemented here (it rescales "
                          f"attention as well); supported: {sorted(METHOD_KEYS)}")
    if extend_method not in METHOD_KEYS:
        raise ConfigError(f"{key}={extend_method!r} is unknown; supported: {sorted(METHOD_KEYS)}")
    need = METHOD_KEYS[extend_method]
    sf_key = "model.model_config.scaling_factor"
    if need is None:
        if extend_method != "None" and (not _is_number(scaling_factor) or scaling_factor <= 0):
            raise ConfigError(f"{sf_key}={scaling_factor!r}: extend_method {extend_method!r} "
                              f"needs a positive number")
        return
    if not isinstance(scaling_factor, Mapping):
        raise ConfigError(f"{sf_key}={scaling_factor!r}: extend_method {extend_method!r} needs a "
                          f"mapping with keys {list(need)}")
    missing = [k for k in need if k not in scaling_factor]
    extra = sorted(k for k in scaling_factor if k not in need)
    if missing or extra:
        raise ConfigError(f"{sf_key} for extend_method {extend_method!r}: missing {missing}, "
                          f"unknown {extra}; it takes exactly {list(need)}")
    for k in need:
        if not _is_number(scaling_factor[k]) or scaling_factor[k] <= 0:
            raise ConfigError(f"{sf_key}.{k}={scaling_factor[k]!r} must be a positive number")
    if scaling_factor["factor"] < 1:
        raise ConfigError(f"{sf_key}.factor={scaling_factor['factor']!r} must be >= 1")
    if extend_method == "LLAMA3" and \
            scaling_factor["low_freq_factor"] >= scaling_factor["high_freq_factor"]:
        raise ConfigError(f"{sf_key}: low_freq_factor {scaling_factor['low_freq_factor']} must "
                          f"be below high_freq_factor {scaling_factor['high_freq_factor']}")
    if extend_method == "DYNAMIC_NTK" and head_dim <= 2:
        raise ConfigError(f"{sf_key}: DYNAMIC_NTK needs a head dim above 2, got {head_dim}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def inv_freq(head_dim: int, theta: float, extend_method: str = "None",
             scaling_factor: Any = 1.0, seq_len: Optional[int] = None) -> np.ndarray:
    """The `head_dim // 2` inverse frequencies (float64) of a checked rope setting.

    `seq_len` (the longest position + 1 of the current forward) matters only for DYNAMIC_NTK:
    as in transformers, the base grows once `seq_len` passes original_max_position_embeddings.
    """
    check_rope(extend_method, scaling_factor, head_dim)
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    base = float(theta)
    if extend_method == "NTK":
        base *= float(scaling_factor)
    elif extend_method == "DYNAMIC_NTK":
        factor = float(scaling_factor["factor"])
        original = int(scaling_factor["original_max_position_embeddings"])
        length = max(int(seq_len or original), original)
        base *= ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    freqs = 1.0 / base ** exponents
    if extend_method == "linear":
        freqs = freqs / float(scaling_factor["factor"])
    elif extend_method == "PI":
        freqs = freqs / float(scaling_factor)
    elif extend_method == "LLAMA3":
        freqs = _llama3(freqs, scaling_factor)
    return freqs


def _llama3(freqs: np.ndarray, sf: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1's scaling: long wavelengths / factor, short ones kept, a smooth ramp between."""
    factor = float(sf["factor"])
    low, high = float(sf["low_freq_factor"]), float(sf["high_freq_factor"])
    old_len = float(sf["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)
