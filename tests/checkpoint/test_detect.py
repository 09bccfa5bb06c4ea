"""What load_checkpoint points at: HF / complete / distributed / one file / rank file, and the
load_ckpt_format check. Files are tiny real safetensors written by our storage layer."""
import os

import numpy as np
import pytest

from mindformers_st.checkpoint.detect import detect_checkpoint, is_hf_names
from mindformers_st.records.names import step_suffix
from mindformers_st.errors import CheckpointError, ConfigError
from mindformers_st.storage.writer import save_tensors

W = np.zeros((2, 2), np.float32)


def _save(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_tensors(str(path), {n: W for n in names})
    return str(path)


def test_hf_folder_is_detected_from_tensor_names(tmp_path):
    _save(tmp_path / "hf" / "model.safetensors", ["model.embed_tokens.weight",
                                                  "model.layers.0.self_attn.q_proj.weight"])
    src = detect_checkpoint(str(tmp_path / "hf"), "safetensors")
    assert src.kind == "hf" and src.format == "safetensors"


def test_mindspore_complete_folder_is_complete(tmp_path):
    _save(tmp_path / "ms" / "model-00001-of-00001.safetensors",
          ["model.tok_embeddings.embedding_weight", "lm_head.weight"])
    assert detect_checkpoint(str(tmp_path / "ms"), "safetensors").kind == "complete"


def test_rank_folders_are_distributed(tmp_path):
    for r in range(2):
        _save(tmp_path / "d" / f"rank_{r}" / f"x_rank_{r}-1_4.safetensors", ["lm_head.weight"])
    src = detect_checkpoint(str(tmp_path / "d") + "/", "safetensors")
    assert src.kind == "distributed" and src.file_suffix is None


def test_a_rank_file_names_a_step_of_the_distributed_folder(tmp_path):
    for r in range(2):
        _save(tmp_path / "d" / f"rank_{r}" / f"x_rank_{r}-1_4.safetensors", ["lm_head.weight"])
    src = detect_checkpoint(str(tmp_path / "d" / "rank_1" / "x_rank_1-1_4.safetensors"),
                            "safetensors")
    assert (src.kind, src.path, src.file_suffix) == ("distributed", str(tmp_path / "d"), "1_4")


def test_rank_file_without_step_suffix_is_refused(tmp_path):
    path = _save(tmp_path / "d" / "rank_0" / "weights.safetensors", ["lm_head.weight"])
    with pytest.raises(CheckpointError, match="rank_x/ folders"):
        detect_checkpoint(path, "safetensors")


def test_single_file_is_complete_or_hf(tmp_path):
    ms_file = _save(tmp_path / "a.safetensors", ["model.norm_out.weight"])
    hf_file = _save(tmp_path / "b.safetensors", ["model.norm.weight"])
    assert detect_checkpoint(ms_file, "safetensors").kind == "complete"
    assert detect_checkpoint(hf_file, "safetensors").kind == "hf"


@pytest.mark.parametrize("layout", ["flat", "ranks"])
def test_folder_of_the_other_format_says_which_format_to_set(tmp_path, layout):
    where = tmp_path / "w" if layout == "flat" else tmp_path / "w" / "rank_0"
    _save(where / "m.safetensors", ["lm_head.weight"])
    with pytest.raises(ConfigError, match="load_ckpt_format: 'safetensors'"):
        detect_checkpoint(str(tmp_path / "w"), "ckpt")   # the default format


def test_ckpt_file_with_safetensors_format_says_set_ckpt(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match="load_ckpt_format: 'ckpt'"):
        detect_checkpoint(str(path), "safetensors")


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_checkpoint(str(tmp_path / "nope"), "safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors file and no rank_x/"):
        detect_checkpoint(str(tmp_path / "empty"), "safetensors")
    with pytest.raises(ConfigError, match="load_ckpt_format"):
        detect_checkpoint(str(tmp_path), "npz")


def test_step_suffix_is_anchored():
    assert step_suffix("llama_rank_0-11_1.safetensors") == "11_1"
    assert step_suffix("llama_rank_0_1-2_30.ckpt") == "2_30"
    assert step_suffix("model.safetensors") is None
    assert is_hf_names(["model.layers.3.mlp.up_proj.weight"])
    assert not is_hf_names(["lm_head.weight", "model.layers.0.attention.wq.weight"])
