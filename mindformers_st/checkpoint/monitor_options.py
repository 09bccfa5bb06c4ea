"""CheckpointMonitor's MindSpore options, checked once: `append_info` (extra scalars in every
save), `enc_key`/`enc_mode` (`.ckpt` encryption), `saved_network` (which cell is saved) and the
MindSpore Transformers health monitor's settings. Each raises ConfigError naming the option."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def append_values(append_info) -> dict:
    """MindSpore's append_info as {name: 0-d array} (records.hyper), or ConfigError."""
    from ..records.hyper import append_info_values
    try:
        return append_info_values(append_info, "CheckpointMonitor append_info")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


ENC_MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")


def encryption(enc_key, enc_mode, fmt):
    """(key, mode) for mindspore.save_checkpoint: MindSpore encrypts `.ckpt` only and refuses
    both options for safetensors; ConfigError for those and for a key that is not 16/24/32 bytes."""
    if fmt == "safetensors" and (enc_key is not None or enc_mode != "AES-GCM"):
        key = "enc_key" if enc_key is not None else "enc_mode"
        raise ConfigError(f"CheckpointMonitor {key}: safetensors files are never encrypted "
                          f"(MindSpore encrypts checkpoint_format 'ckpt' only); drop {key} or "
                          f"save ckpt")
    if enc_mode not in ENC_MODES:
        raise ConfigError(f"CheckpointMonitor enc_mode must be one of {ENC_MODES}, got {enc_mode!r}")
    if enc_key is None:
        if enc_mode != "AES-GCM":
            logger.warning("CheckpointMonitor enc_mode %r has no effect without enc_key", enc_mode)
        return None, enc_mode
    if not isinstance(enc_key, bytes) or len(enc_key) not in (16, 24, 32):
        raise ConfigError("CheckpointMonitor enc_key must be bytes of length 16, 24 or 32 (as "
                          f"MindSpore), got {type(enc_key).__name__}"
                          f"{' of length %d' % len(enc_key) if isinstance(enc_key, (bytes, str)) else ''}")
    return enc_key, enc_mode


def saved_network(net):
    """MindSpore's saved_network: None or an nn.Cell, else ConfigError."""
    if net is None:
        return None
    from mindspore import nn
    if not isinstance(net, nn.Cell):
        raise ConfigError(f"CheckpointMonitor saved_network must be None or a mindspore.nn.Cell "
                          f"(as MindSpore), got {type(net).__name__}")
    return net


def health_settings(on, threshold, folder):
    """The health-monitor settings ({"threshold", "dir"}) or None when it is off."""
    if not isinstance(on, bool):
        raise ConfigError(f"use_checkpoint_health_monitor must be a bool, got {on!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, float):
        raise ConfigError(f"embedding_local_norm_threshold must be a float (as MindSpore "
                          f"Transformers), got {threshold!r}")
    return {"threshold": threshold, "dir": os.path.abspath(folder)} if on else None


def add_append_values(snap, values, state) -> None:
    """Add the append_info scalars to snapshot `snap` (written whole, last, by every rank); a
    name the save already holds (a tensor of `state`, a hyper value) is refused."""
    for name, value in values.items():
        if name in snap.arrays or name in state.parameters():
            raise CheckpointError(f"append_info: {name!r} is already a tensor of this save; "
                                  f"choose another name")
        snap.arrays[name] = np.array(value, copy=True)
