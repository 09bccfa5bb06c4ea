"""No MindSpore Transformers key is accepted and silently ignored: the ones this runtime does not
implement warn by name when set; data skip and pretrained_model_dir do what MindSpore
Transformers does."""
import logging
import os

import numpy as np
import pytest

from mindformers_st.config import load_config
from mindformers_st.config.schema import NO_EFFECT_MONITOR, NO_EFFECT_TOP_LEVEL
from mindformers_st.errors import ConfigError
from mindformers_st.trainer.train import data_start

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
VALUES = {"use_legacy": "False",
          "enc_mode": "AES-CBC",
          "use_checkpoint_health_monitor": "True", "embedding_local_norm_threshold": "2.0",
          "embedding_size": "16", "health_ckpts_record_dir": "out/health",
          "save_checkpoint_seconds": "60", "keep_checkpoint_per_n_minutes": "5"}


@pytest.mark.parametrize("key", sorted(NO_EFFECT_TOP_LEVEL) + sorted(NO_EFFECT_MONITOR))
def test_a_key_without_effect_here_is_warned_about_by_name(key, caplog):
    name = key if key in NO_EFFECT_TOP_LEVEL else f"callbacks.1.{key}"
    with caplog.at_level(logging.WARNING):
        load_config(TINY, [(name, VALUES[key])])
    assert f"config key '{name}'" in caplog.text and "has no effect here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config(TINY, [])
    assert f"config key '{name}'" not in caplog.text   # defaults never warn


def test_data_position_follows_mindspore_transformers_rules():
    class C:
        ignore_data_skip, data_skip_steps = False, None
    assert data_start(C, 10, 4) == (2, 2)                     # default: the resumed step
    C.data_skip_steps = 5
    assert data_start(C, 10, 4) == (1, 1)                     # exactly N steps of data
    C.ignore_data_skip = True
    assert data_start(C, 10, 4) == (0, 0)                     # from the beginning
    with pytest.raises(ConfigError, match="data_skip_steps"):
        load_config(TINY, [("data_skip_steps", "-1")])


def test_pretrained_model_dir_is_loaded_when_load_checkpoint_is_empty(tmp_path):
    from mindformers_st.storage.writer import save_tensors
    save_tensors(str(tmp_path / "model.safetensors"), {"w": np.zeros(2, np.float32)})
    cfg = load_config(TINY, [("pretrained_model_dir", str(tmp_path))])
    assert cfg.load_checkpoint == str(tmp_path)
    cfg = load_config(TINY, [("pretrained_model_dir", str(tmp_path)), ("load_checkpoint", "x")])
    assert cfg.load_checkpoint == "x"                          # an explicit path wins


@pytest.mark.parametrize("text, why", [(b"", "is empty"), (b"a: 1\na: 2\n", "appears twice"),
                                       (b"model: \xff\xfe\n", "not UTF-8"), (b"- 1\n", "mapping")])
def test_a_yaml_that_is_empty_repeats_a_key_or_is_not_utf8_is_refused(tmp_path, text, why):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=why):
        load_config(str(path), [])
