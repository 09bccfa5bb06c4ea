"""The whole-valued ("hyper") tensors of checkpoints: which a save of ours writes, with their
dtypes, and which names count as hyper values when reading anyone's checkpoint."""
from __future__ import annotations

import numpy as np

GLOBAL_STEP = "global_step"

# Written by every save of ours (names as MindSpore Transformers' append_dict where it has one;
# learning_rate, data_position and seed are ours). global_step is the optimizer's counter.
SAVE_HYPER_DTYPES = {
    "epoch_num": np.int64, "step_num": np.int64, "loss_scale": np.float32,
    "global_batch_size": np.int64, "learning_rate": np.float32,
    "data_position": np.int64, "seed": np.int64,
}
GLOBAL_STEP_DTYPE = np.int32

# Values MindSpore / MindSpore Transformers store beside the weights that are never sliced.
MINDSPORE_HYPER = frozenset({
    GLOBAL_STEP, "epoch_num", "step_num", "loss_scale", "global_batch_size",
    "current_iterator_step", "last_overflow_iterator_step", "scale_sense",
})

# Every name a reader treats as a whole-valued hyper tensor.
HYPER_NAMES = MINDSPORE_HYPER | frozenset(SAVE_HYPER_DTYPES)

# The ones worth printing (inspect), in this order.
DISPLAY_ORDER = (GLOBAL_STEP, "epoch_num", "step_num", "loss_scale", "global_batch_size",
                 "learning_rate", "data_position", "seed")


def is_hyper(name: str) -> bool:
    """True for a whole-valued hyper tensor name (global_step, epoch_num, ...)."""
    return name in HYPER_NAMES


def is_whole_value(name: str, shape) -> bool:
    """True for a tensor stored whole beside the weights: a hyper name, or any 0-d tensor (the
    append_info scalars of a CheckpointMonitor are 0-d; no weight or moment is)."""
    return is_hyper(name) or tuple(shape) == ()


# ---- append_info: extra whole-valued tensors a CheckpointMonitor user asks for ----------------

# The words MindSpore's CheckpointConfig accepts in an append_info list; every save of ours
# writes both from the training state, so they add nothing.
APPEND_INFO_WORDS = ("epoch_num", "step_num")

# Names a save fills from the training state; an append_info dict may not set them (MindSpore
# reads a given epoch_num/step_num as an offset added to the live count, which would make the
# values a resume reads disagree with the run's own step).
_LIVE_NAMES = frozenset(SAVE_HYPER_DTYPES) | {GLOBAL_STEP}


def append_info_values(append_info, where: str = "append_info") -> dict:
    """The extra scalars of a MindSpore `append_info` list: {name: 0-d numpy array}.

    The form is MindSpore's (CheckpointConfig): None or a list of the words "epoch_num" /
    "step_num" and at most one {str: int | float | bool} mapping; values are stored as MindSpore
    stores them (`Tensor(value)`: bool -> bool, int -> int64, float -> float32). Raises ValueError
    naming `where` for any other form, a string value (a safetensors file holds numbers), or a
    name a save writes from the training state."""
    if append_info is None:
        return {}
    if not isinstance(append_info, (list, tuple)):
        raise ValueError(f"{where} must be a list like [\"epoch_num\", {{\"name\": 1.0}}], got "
                         f"{append_info!r}")
    out, dicts = {}, 0
    for element in append_info:
        if isinstance(element, str):
            if element not in APPEND_INFO_WORDS:
                raise ValueError(f"{where}: {element!r} is not one of {list(APPEND_INFO_WORDS)} "
                                 f"(extra values go in one {{name: number}} mapping)")
            continue
        if not isinstance(element, dict):
            raise ValueError(f"{where}: an element must be a word or a {{name: number}} mapping, "
                             f"got {element!r}")
        dicts += 1
        if dicts > 1:
            raise ValueError(f"{where} holds more than one mapping (MindSpore takes one); merge them")
        for key, value in element.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: key {key!r} must be a non-empty string")
            if key in _LIVE_NAMES:
                raise ValueError(f"{where}: {key!r} is written by every save from the training "
                                 f"state (the resumed step continues it); remove it")
            if isinstance(value, bool):
                out[key] = np.array(value, dtype=np.bool_)
            elif isinstance(value, int):
                out[key] = np.array(value, dtype=np.int64)
            elif isinstance(value, float):
                out[key] = np.array(value, dtype=np.float32)
            else:
                raise ValueError(f"{where}: {key!r} = {value!r}: values must be int, float or bool "
                                 f"(a safetensors file holds numbers, not {type(value).__name__})")
    return out
