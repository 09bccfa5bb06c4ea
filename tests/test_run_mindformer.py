"""run_mindformer.py: flags and errors, the 7B configs' plans, HF config.json merging, and (slow)
the seed's predict command with the tiny twin on 2 msrun workers. The seed's pretrain and
finetune commands run in tests/test_guide.py (the user guide's sections 2 and 3 are those very
commands), which asserts what they write and print."""
import importlib.util
import json
import os
import subprocess

import pytest

from mindformers_st.config import load_config
from mindformers_st.trainer.resolve import resolve_model
from mindformers_st.errors import ConfigError
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "scripts", "msrun_launcher.sh")
SEVEN_B = [("configs/llama2/pretrain_llama2_7b.yaml", None, 8),
           ("configs/llama2/finetune_llama2_7b.yaml", None, 8),
           ("configs/llama2/predict_llama2_7b.yaml", None, 2),
           ("research/qwen2/qwen2_7b/finetune_qwen2_7b.yaml", "research/qwen2", 2),
           ("research/qwen2/qwen2_7b/predict_qwen2_7b_instruct.yaml", "research/qwen2", 2)]


def runner():
    spec = importlib.util.spec_from_file_location("run_mindformer_under_test",
                                                  os.path.join(ROOT, "run_mindformer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("config, register, ranks", SEVEN_B)
def test_7b_configs_plan_and_only_save_strategy(tmp_path, capsys, config, register, ranks):
    argv = ["--config", os.path.join(ROOT, config), "--only_save_strategy", "True",
            "--output_dir", str(tmp_path)]
    if register:
        argv += ["--register_path", os.path.join(ROOT, register)]
    assert runner().main(argv) == 0
    out = capsys.readouterr().out
    assert "B elements" in out and f"-> {ranks} ranks" in out and "bytes per rank" in out
    files = sorted(os.listdir(tmp_path / "strategy"))
    assert files == sorted(f"ckpt_strategy_rank_{r}.ckpt" for r in range(ranks))


def test_bad_flag_value_exits_1_naming_the_key(tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs/llama2/pretrain_llama2_tiny.yaml"),
            "--runner_config.epochs", "many", "--output_dir", str(tmp_path)]
    assert runner().main(argv) == 1
    assert "runner_config.epochs" in capsys.readouterr().err


def test_register_path_must_be_a_package(tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs/llama2/pretrain_llama2_tiny.yaml"),
            "--register_path", str(tmp_path)]
    assert runner().main(argv) == 1
    assert "__init__.py" in capsys.readouterr().err


def hf_folder(tmp_path, **over):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
           "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 256, "tie_word_embeddings": False}
    cfg.update(over)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_hf_config_json_fills_model_config_the_yaml_leaves_out(tmp_path):
    folder = hf_folder(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model_config:\n    seq_length: 32\n")
    resolved = resolve_model(load_config(str(path), [("load_checkpoint", folder)]))
    mc = resolved.config
    assert (mc.hidden_size, mc.num_layers, mc.n_kv_heads, mc.intermediate_size, mc.seq_length) == \
        (64, 2, 2, 192, 32)
    assert resolved.arch == "LlamaForCausalLM" and resolved.family == "llama"


def test_yaml_contradicting_config_json_names_both(tmp_path):
    folder = hf_folder(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model_config:\n    num_layers: 4\n")
    with pytest.raises(ConfigError) as info:
        resolve_model(load_config(str(path), [("load_checkpoint", folder)]))
    msg = str(info.value)
    assert "num_layers" in msg and "4" in msg and "config.json" in msg


# ---- the seed's commands, tiny twins, 2 workers ---------------------------------------------


def launch(command, out_dir, workers=2):
    env = dict(os.environ, MF_LAUNCH_TIMEOUT="800")
    res = subprocess.run(["bash", LAUNCHER, command, str(workers), str(free_port()),
                          str(out_dir / "msrun_log"), "True", "300"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out_dir / "msrun_log" / "worker_0.log", encoding="utf-8") as fh:
        return fh.read()


@pytest.mark.slow
def test_seed_predict_command_tiny_qwen2(tiny_run_data, tmp_path):
    log = launch(f"python run_mindformer.py --config research/qwen2/qwen2_tiny/predict_qwen2_tiny.yaml "
                 f"--run_mode predict --use_parallel True --register_path research/qwen2 "
                 f"--predict_data 'I love Beijing, because' --output_dir {tmp_path} "
                 f"--processor.tokenizer.tokenizer_file {tiny_run_data}/tokenizer.json", tmp_path)
    assert "'text_generation_text': ['I love Beijing, because" in log
    with open(tmp_path / "predict" / "results.json", encoding="utf-8") as fh:
        results = json.load(fh)
    assert results[0]["prompt"] == "I love Beijing, because"
    assert results[0]["output_ids"][:len(results[0]["input_ids"])] == results[0]["input_ids"]
    assert len(results[0]["output_ids"]) > len(results[0]["input_ids"])


def test_the_plan_of_a_tiny_model_reads_in_its_own_units(tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs/llama2/pretrain_llama2_tiny.yaml"),
            "--only_save_strategy", "True", "--parallel_config.data_parallel", "1",
            "--output_dir", str(tmp_path)]
    assert runner().main(argv) == 0
    out = capsys.readouterr().out
    assert " K elements, " in out and " KiB of weights" in out and "0.00" not in out, out
    assert "wrote 1 strategy file to" in out, out
    assert "-> 1 rank\n" in out, out
