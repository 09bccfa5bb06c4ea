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
