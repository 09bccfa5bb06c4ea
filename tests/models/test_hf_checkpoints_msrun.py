"""run_mindformer.py predict straight from transformers-written folders: a Llama with Llama 3.1
RoPE scaling, attention and MLP biases and an explicit head_dim (bf16), on one card and with
model_parallel 2 on 2 msrun workers through scripts/msrun_launcher.sh (the row-parallel biases
are added once, after the all-reduce); and a Qwen2.5-style folder, which needs
--register_path research/qwen2 (the error says so). All print transformers' greedy tokens."""
import json
import os
import subprocess
import sys

import pytest

from . import hf_tiny
from .msrun_util import free_port

torch = pytest.importorskip("torch", reason="torch not installed")
transformers = pytest.importorskip("transformers", reason="transformers not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
NEW = 14

YAML = """seed: 0
output_dir: '{out}'
load_checkpoint: '{hf}'
load_ckpt_format: 'safetensors'
auto_trans_ckpt: True
run_mode: 'predict'
use_parallel: True
context:
  mode: 1
  device_target: "CPU"
  device_id: 0
parallel_config:
  data_parallel: 1
  model_parallel: 2
  pipeline_stage: 1
  micro_batch_num: 1
  vocab_emb_dp: True
model:
  model_config:
    seq_length: 64
    max_decode_length: {max_decode}
    do_sample: False
    use_past: True
  arch:
    type: LlamaForCausalLM
"""


def _env():
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3",
                OMP_NUM_THREADS="1", MF_LAUNCH_TIMEOUT="600")


def _results(out):
    with open(os.path.join(out, "predict", "results.json"), encoding="utf-8") as fh:
        return json.load(fh)[0]


@pytest.mark.slow
def test_predict_from_a_llama3_biased_hf_folder_gives_transformers_tokens_on_1_and_2_cards(
        tmp_path):
    cfg = hf_tiny.config_json("llama3", "llama", biases=True, head_dim=12, dtype="bfloat16")
    hf = hf_tiny.save(torch, hf_tiny.build(torch, transformers, cfg), str(tmp_path / "hf"),
                      "bfloat16")
    text = hf_tiny.write_word_tokenizer(hf)
    prompt = hf_tiny.PROMPT
    want = hf_tiny.hf_greedy(torch, transformers, hf, prompt, NEW, eos=2)
    assert len(want) > len(prompt) + 5, want     # a real continuation, not an immediate eos
    config = tmp_path / "predict.yaml"

    # one card
    out1 = str(tmp_path / "out1")
    config.write_text(YAML.format(out=out1, hf=hf, max_decode=len(prompt) + NEW))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config",
                          str(config), "--use_parallel", "False", "--auto_trans_ckpt", "False",
                          "--predict_data", text],
                         cwd=str(tmp_path), env=dict(_env(), PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = _results(out1)
    assert got["input_ids"] == prompt
    assert got["output_ids"] == want

    # model_parallel 2 through the launcher
    out2 = str(tmp_path / "out2")
    config.write_text(YAML.format(out=out2, hf=hf, max_decode=len(prompt) + NEW))
    log_dir = str(tmp_path / "msrun_log")
    cmd = " ".join([os.path.join(ROOT, "run_mindformer.py"), "--config", str(config),
                    "--predict_data", f"'{text}'"])
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), cmd, "2",
                          str(free_port()), log_dir, "True", "600"],
                         cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                         timeout=900)
    logs = ""
    for w in (0, 1):   # both workers ran (the launcher names their logs worker_{w}.log)
        path = os.path.join(log_dir, f"worker_{w}.log")
        if os.path.exists(path):
            logs += open(path, errors="replace").read()[-3000:]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:] + logs
    assert "model_parallel=2" in res.stdout + logs
    assert _results(out2)["output_ids"] == want


QWEN_YAML = """seed: 0
output_dir: '{out}'
load_checkpoint: '{hf}'
load_ckpt_format: 'safetensors'
run_mode: 'predict'
use_parallel: False
context:
  mode: 1
  device_target: "CPU"
  device_id: 0
model:
  model_config:
    seq_length: 64
    max_decode_length: {max_decode}
    do_sample: False
    use_past: True
"""


@pytest.mark.slow
def test_qwen2_5_folder_predicts_transformers_tokens_once_register_path_is_given(tmp_path):
    """A Qwen2.5-style folder (Qwen2 architecture, sliding_window set but off, tied, bf16): without
    --register_path the run stops naming the flag; with it, predict gives transformers' tokens."""
    cfg = hf_tiny.config_json("default", "qwen2", tied=True, dtype="bfloat16")
    cfg.update(sliding_window=131072, use_sliding_window=False, max_window_layers=21,
               rope_theta=1000000.0)
    hf = hf_tiny.save(torch, hf_tiny.build(torch, transformers, cfg), str(tmp_path / "hf"),
                      "bfloat16")
    text = hf_tiny.write_word_tokenizer(hf)
    want = hf_tiny.hf_greedy(torch, transformers, hf, hf_tiny.PROMPT, NEW, eos=2)
    assert len(want) > len(hf_tiny.PROMPT) + 5, want
    out = str(tmp_path / "out")
    config = tmp_path / "predict.yaml"
    config.write_text(QWEN_YAML.format(out=out, hf=hf, max_decode=len(hf_tiny.PROMPT) + NEW))
    argv = [sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config", str(config),
            "--predict_data", text]
    env = dict(_env(), PYTHONPATH=ROOT)
    res = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0 and "--register_path research/qwen2" in res.stderr, res.stderr
    assert not os.path.exists(out + "/predict")
    res = subprocess.run(argv + ["--register_path", os.path.join(ROOT, "research", "qwen2")],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Qwen2ForCausalLM" in res.stdout + res.stderr
    assert _results(out)["output_ids"] == want
