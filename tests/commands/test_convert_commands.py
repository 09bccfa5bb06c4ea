"""The convert-hf, export-hf and ckpt-to-safetensors commands, end to end through the CLI."""
import os

import numpy as np
import pytest
import yaml

from mindformers_st.cli import main
from mindformers_st.convert import plan_hf_folder
from tests.convert.helpers import BF16, hf_config, hf_tensors, read_folder, write_hf_folder


def _yaml(path, model_config):
    with open(path, "w") as fh:
        yaml.safe_dump({"model": {"model_config": dict(model_config, type="LlamaConfig")}}, fh)
    return str(path)


@pytest.mark.parametrize("family,fused", [("llama", True), ("qwen2", False)])
def test_convert_then_export_round_trips_through_the_cli(tmp_path, family, fused):
    tensors = hf_tensors(bias=family == "qwen2", kv_heads=2, dtype=BF16)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, shards=2,
                         config=hf_config(family, dtype="bfloat16"))
    ms, back = str(tmp_path / "ms"), str(tmp_path / "back")
    flags = ["--qkv-concat"] if fused else []
    assert main(["convert-hf", hf, ms, "--no-progress"] + flags) == 0
    assert "param_name_map.json" in os.listdir(ms)
    cfg = _yaml(tmp_path / "run.yaml", plan_hf_folder(hf).model_config)
    assert main(["export-hf", ms, back, "--config", cfg, "--no-progress"]) == 0
    got = read_folder(back)
    assert got.keys() == tensors.keys()
    assert all(got[n].tobytes() == tensors[n].tobytes() and got[n].dtype == tensors[n].dtype
               for n in tensors)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(), config=hf_config("llama"))
    out = tmp_path / "ms"
    assert main(["convert-hf", hf, str(out), "--dry-run", "--qkv-concat"]) == 0
    text = capsys.readouterr().out
    assert "MindSpore Transformers" in text and "model-00001-of-00002.safetensors" in text
    assert not out.exists()


def test_wrong_family_is_an_error_exit_naming_the_fix(tmp_path, capsys):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(bias=True), config=hf_config("qwen2"))
    assert main(["convert-hf", hf, str(tmp_path / "ms"), "--family", "llama"]) == 1
    assert "--family qwen2" in capsys.readouterr().err
    assert not (tmp_path / "ms").exists()


def _save_ckpt(path, arrays):
    import mindspore as ms
    params = [{"name": n, "data": ms.Tensor(a.astype(np.float32), dtype=ms.bfloat16)
               if a.dtype == BF16 else ms.Tensor(a)} for n, a in arrays.items()]
    ms.save_checkpoint(params, path)


def test_ckpt_folders_become_safetensors_keeping_names_dtypes_and_rank_folders(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {}
    for r in range(2):
        arrays = {"model.norm_out.weight": rng.standard_normal(8).astype(np.float32),
                  "model.layers.0.attention.wq.weight": rng.standard_normal((4, 8)).astype(BF16),
                  "adam_m.model.norm_out.weight": rng.standard_normal(8).astype(np.float16),
                  "global_step": np.array([7 + r], np.int32)}
        os.makedirs(tmp_path / "src" / f"rank_{r}")
        _save_ckpt(str(tmp_path / "src" / f"rank_{r}" / f"llama_rank_{r}-1_4.ckpt"), arrays)
        ranks[r] = arrays
    dst = tmp_path / "dst"
    assert main(["ckpt-to-safetensors", str(tmp_path / "src"), str(dst)]) == 0
    for r, arrays in ranks.items():
        got = read_folder(str(dst / f"rank_{r}"))
        assert os.listdir(dst / f"rank_{r}") == [f"llama_rank_{r}-1_4.safetensors"]
        assert list(got) == list(arrays)   # names and order kept
        for n, a in arrays.items():
            assert got[n].dtype == a.dtype and got[n].tobytes() == a.tobytes(), n


def test_single_ckpt_file_matches_mindspore_own_converter(tmp_path):
    import mindspore as ms
    from mindformers_st.storage.reader import open_safetensors
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).astype(BF16),
              "b": np.arange(3, dtype=np.float32)}
    src = str(tmp_path / "net.ckpt")
    _save_ckpt(src, arrays)
    ours = str(tmp_path / "ours.safetensors")
    assert main(["ckpt-to-safetensors", src, ours]) == 0
    ms.ckpt_to_safetensors(src, str(tmp_path / "theirs"))
    theirs = str(tmp_path / "theirs" / "net.safetensors")
    with open_safetensors(ours) as a, open_safetensors(theirs) as b:
        assert a.metadata["format"] == "ms"
        assert set(a.tensors) == set(b.tensors)
        for n in a.tensors:
            assert a.tensors[n].dtype == b.tensors[n].dtype
            assert a.read(n).tobytes() == b.read(n).tobytes()
    assert main(["ckpt-to-safetensors", src, ours]) == 1   # exists: refuse without --overwrite
