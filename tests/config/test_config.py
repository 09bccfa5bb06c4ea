"""The run config: YAML keys, CLI flags and overrides, and the errors that name the key."""
import os

import pytest
import yaml

from mindformers_st.config import load_config, parse_run_args, to_dict
from mindformers_st.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_yaml(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_empty_yaml_gives_mindformers_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {}))
    assert cfg.output_dir == "./output"
    assert cfg.load_ckpt_format == "ckpt"
    assert cfg.context.device_target == "CPU"
    assert cfg.parallel_config.vocab_emb_dp is True
    assert cfg.parallel_config.gradient_aggregation_group == 4
    assert cfg.callbacks == []


def test_overrides_are_converted_by_declared_type(tmp_path):
    path = write_yaml(tmp_path, {"callbacks": [{"type": "MFLossMonitor"},
                                               {"type": "CheckpointMonitor"}]})
    cfg = load_config(path, [("runner_config.epochs", "3"), ("output_dir", "123"),
                             ("use_parallel", "true"), ("resume_training", "rank_0-1_2"),
                             ("optimizer.learning_rate", "1e-4"),
                             ("callbacks.1.save_checkpoint_steps", "7"),
                             ("model.model_config.num_layers", "2")])
    assert cfg.runner_config.epochs == 3
    assert cfg.output_dir == "123"                      # a str key stays a string
    assert cfg.use_parallel is True
    assert cfg.resume_training == "rank_0-1_2"          # bool or file name
    assert cfg.optimizer["learning_rate"] == pytest.approx(1e-4)
    assert cfg.callback("CheckpointMonitor").save_checkpoint_steps == 7
    assert cfg.model.model_config["num_layers"] == 2


def test_resume_training_word_true_is_bool(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {}), [("resume_training", "True")])
    assert cfg.resume_training is True


@pytest.mark.parametrize("override, words", [
    (("runner_config.epoch", "3"), ["runner_config.epoch", "did you mean 'epochs'"]),
    (("runner_config.epochs", "three"), ["runner_config.epochs", "expected int"]),
    (("use_parallel", "maybe"), ["use_parallel", "True or False"]),
    (("load_ckpt_format", "bin"), ["load_ckpt_format", "'ckpt' or 'safetensors'"]),
    (("run_mode", "eval"), ["run_mode"]),
    (("parallel_config.context_parallel", "2"), ["parallel_config.context_parallel"]),
    (("train_dataset.data_loader.type", "JsonDataset"), ["train_dataset.data_loader.type"]),
    (("nonsense", "1"), ["nonsense"]),
])
def test_bad_key_or_value_is_config_error_naming_key(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {}), [override])
    for w in words:
        assert w in str(info.value)


def test_yaml_type_errors_name_the_key(tmp_path):
    path = write_yaml(tmp_path, {"runner_config": {"batch_size": "two"}})
    with pytest.raises(ConfigError, match=r"runner_config\.batch_size"):
        load_config(path)
    path = write_yaml(tmp_path, {"parallel_config": {"data_parallel": 0}})
    with pytest.raises(ConfigError, match=r"parallel_config\.data_parallel"):
        load_config(path)


@pytest.mark.parametrize("cb, key", [
    ({"type": "CheckpointMonitor", "prefix": "a/b"}, "callbacks.0.prefix"),
    ({"type": "CheckpointMonitor", "checkpoint_format": "npz"}, "callbacks.0.checkpoint_format"),
    ({"type": "CheckpointMonitor", "remove_redundancy": True}, "callbacks.0.remove_redundancy"),
    ({"type": "CheckpointMonitor", "save_checkpoint_steps": 0}, "callbacks.0.save_checkpoint_steps"),
    ({"type": "CheckpointMonitor", "keep_checkpoint_max": 0}, "callbacks.0.keep_checkpoint_max"),
    ({"type": "CheckpointMonitor", "async_save": "soon"}, "callbacks.0.async_save"),
    ({"type": "CheckpointMonitor", "prefx": "x"}, "callbacks.0.prefx"),
    ({"type": "TimeMonitor"}, "callbacks.0.type"),
    ({"prefix": "x"}, "callbacks.0"),
])
def test_checkpoint_monitor_keys_are_validated(tmp_path, cb, key):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {"callbacks": [cb]}))
    assert key in str(info.value)


def test_checkpoint_monitor_defaults_follow_mindformers(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"callbacks": [{"type": "CheckpointMonitor"}]}))
    cm = cfg.callback("CheckpointMonitor")
    assert (cm.prefix, cm.save_checkpoint_steps, cm.keep_checkpoint_max, cm.checkpoint_format,
            cm.remove_redundancy, cm.integrated_save, cm.async_save) == \
        ("CKP", 1, 5, "ckpt", False, True, False)


def test_standalone_run_ignores_parallel_config(tmp_path):
    path = write_yaml(tmp_path, {"use_parallel": False,
                                 "parallel_config": {"data_parallel": 2, "model_parallel": 2}})
    cfg = load_config(path)
    assert cfg.parallel_config.device_num == 1
    # but planning (only_save_strategy) keeps the strategy it is asked to plan
    cfg = load_config(path, [("only_save_strategy", "True")])
    assert cfg.parallel_config.device_num == 4


def test_optimizer_shard_follows_enable_parallel_optimizer_unless_set(tmp_path):
    path = write_yaml(tmp_path, {"parallel": {"enable_parallel_optimizer": True}})
    assert load_config(path).optimizer_shard is True
    assert load_config(path, [("parallel_config.optimizer_shard", "False")]).optimizer_shard is False


def test_mindformers_only_keys_are_accepted_and_kept_aside(tmp_path):
    path = write_yaml(tmp_path, {"trainer": {"type": "CausalLanguageModelingTrainer"},
                                 "recompute_config": {"recompute": True}})
    cfg = load_config(path)
    assert set(cfg.ignored) == {"trainer", "recompute_config"}


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips_to_plain_data(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"callbacks": [{"type": "MFLossMonitor"}]}))
    plain = to_dict(cfg)
    yaml.safe_dump(plain)          # plain data only
    assert plain["callbacks"][0]["type"] == "MFLossMonitor"


# ---- command line -----------------------------------------------------------------------------

def test_cli_flags_map_to_mindformers_keys():
    args = parse_run_args([
        "--config", "c.yaml", "--run_mode", "finetune", "--use_parallel", "True",
        "--train_dataset_dir", "/d/a.mindrecord", "--epochs", "2", "--batch_size", "4",
        "--load_checkpoint", "/w", "--load_ckpt_format", "safetensors", "--auto_trans_ckpt", "True",
        "--predict_data", "I love Beijing, because", "hello", "--register_path", "research/qwen2",
        "--model.model_config.num_layers", "2", "--runner_config.train_steps=5",
        "--options", "seed=3"])
    assert args.config == "c.yaml"
    assert args.register_path == "research/qwen2"
    ov = dict(args.overrides)
    assert ov["run_mode"] == "finetune"
    assert ov["train_dataset.data_loader.dataset_dir"] == "/d/a.mindrecord"
    assert ov["runner_config.epochs"] == "2" and ov["runner_config.batch_size"] == "4"
    assert ov["predict_data"] == ["I love Beijing, because", "hello"]
    assert ov["model.model_config.num_layers"] == "2"
    assert ov["runner_config.train_steps"] == "5"
    assert ov["seed"] == "3"


def test_cli_dangling_token_is_config_error():
    with pytest.raises(ConfigError, match="no value"):
        parse_run_args(["--config", "c.yaml", "--runner_config.epochs"])
    with pytest.raises(ConfigError, match="unexpected"):
        parse_run_args(["--config", "c.yaml", "stray"])


def test_cli_unknown_flag_reaches_the_schema_and_is_named(tmp_path):
    args = parse_run_args(["--config", write_yaml(tmp_path, {}), "--lod_checkpoint", "/w"])
    with pytest.raises(ConfigError, match="lod_checkpoint.*did you mean 'load_checkpoint'"):
        load_config(args.config, args.overrides)


def test_every_flag_of_mindformers_run_mindformer_works_or_is_refused_by_name(tmp_path):
    from mindformers_st.config.cli_args import FLAG_KEYS, REFUSED_FLAGS
    # run_mindformer.py's own flags (MindSpore Transformers r1.x and dev), besides --config
    theirs = {"mode", "device_id", "device_target", "run_mode", "do_eval", "train_dataset_dir",
              "eval_dataset_dir", "predict_data", "modal_type", "predict_batch_size", "adapter_id",
              "load_checkpoint", "src_strategy_path_or_dir", "auto_trans_ckpt",
              "transform_process_num", "only_save_strategy", "resume_training",
              "strategy_load_checkpoint", "remote_save_url", "seed", "use_parallel", "profile",
              "options", "epochs", "batch_size", "gradient_accumulation_steps", "sink_mode",
              "num_samples", "output_dir", "register_path", "do_sample", "trust_remote_code",
              "vocab_file", "train_dataset"}
    handled = set(FLAG_KEYS) | set(REFUSED_FLAGS) | {"predict_data", "options", "register_path"}
    assert theirs <= handled, theirs - handled
    yml = write_yaml(tmp_path, {})
    for flag in REFUSED_FLAGS:
        with pytest.raises(ConfigError, match=f"flag --{flag} .*: .*remove the flag"):
            parse_run_args(["--config", yml, f"--{flag}", "True"])
    for flag in ("do_eval", "profile", "trust_remote_code"):   # off is what happens: accepted
        assert parse_run_args(["--config", yml, f"--{flag}", "False"]).overrides == []
    with pytest.raises(ConfigError, match="--profile 'maybe': give True or False"):
        parse_run_args(["--config", yml, "--profile=maybe"])


def test_vocab_file_flag_names_the_tokenizer_over_the_yaml_one(tmp_path):
    from mindformers_st.trainer.resolve import tokenizer_file
    yml = write_yaml(tmp_path, {"processor": {"tokenizer": {"tokenizer_file": "a/tokenizer.json"}}})
    args = parse_run_args(["--config", yml, "--vocab_file", "b/tokenizer.json"])
    assert tokenizer_file(load_config(args.config, args.overrides)) == "b/tokenizer.json"
    args = parse_run_args(["--config", yml, "--vocab_file", "b/tokenizer.model"])
    with pytest.raises(ConfigError, match="vocab_file 'b/tokenizer.model' is not a tokenizer.json"):
        tokenizer_file(load_config(args.config, args.overrides))
