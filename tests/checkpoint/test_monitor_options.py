"""CheckpointMonitor options: validation and the config wiring (no training, no MindSpore)."""
import os

import pytest

from mindformers_st.checkpoint.monitor import CheckpointMonitor
from mindformers_st.errors import ConfigError


def test_invalid_options_are_config_errors():
    with pytest.raises(ConfigError, match="remove_redundancy"):
        CheckpointMonitor(checkpoint_format="ckpt", remove_redundancy=True)
    with pytest.raises(ConfigError, match="prefix"):
        CheckpointMonitor(prefix="a/b")
    with pytest.raises(ConfigError, match="save_checkpoint_steps"):
        CheckpointMonitor(save_checkpoint_steps=0)


def test_config_callbacks_build_the_monitor(tmp_path):
    from mindformers_st.config.schema import RunConfig, build_callback
    from mindformers_st.trainer.callbacks import build_callbacks

    config = RunConfig(output_dir=str(tmp_path))
    config.callbacks = [build_callback({"type": "CheckpointMonitor", "prefix": "llama2",
                                        "save_checkpoint_steps": 10, "checkpoint_format": "safetensors",
                                        "remove_redundancy": True, "async_save": True}, "callbacks[0]")]
    mon = [c for c in build_callbacks(config) if isinstance(c, CheckpointMonitor)][0]
    assert (mon.prefix, mon.save_steps, mon.fmt, mon.remove_redundancy, mon.async_save) == \
        ("llama2", 10, "safetensors", True, True)
    assert mon.directory == os.path.join(str(tmp_path), "checkpoint")
