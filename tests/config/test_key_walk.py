"""The key walk: EVERY key the run schema accepts (derived from the schema, tests/config/
key_walk_keys.py) either has a behaviour test (TESTED: the test exists and its file sets the
key), is refused with a ConfigError naming it (REFUSED), is warned about by name when set to a
value that would change MindSpore Transformers' behaviour (the no-effect tables; each warning
is checked here), or can never change behaviour here and is documented in docs/runtime.md
(DOCUMENTED). A new key without an entry fails `test_every_schema_key_has_exactly_one_entry`."""
import ast
import dataclasses
import logging
import os
import typing

import pytest

from mindformers_st.config import load_config
from mindformers_st.config.schema import (CALLBACK_TYPES, IGNORED_TOP_LEVEL, NO_EFFECT_MONITOR,
                                          NO_EFFECT_ON_REQUEST_EXIT, NO_EFFECT_TOP_LEVEL, RunConfig)
from mindformers_st.config.unused_keys import IGNORED_WHY, NO_EFFECT_KEYS, NO_EFFECT_LOSS_MONITOR
from mindformers_st.errors import ConfigError
from mindformers_st.models.config import IGNORED_KEYS as MODEL_IGNORED
from mindformers_st.models.config import NO_EFFECT_FIELDS as MODEL_NO_EFFECT
from mindformers_st.models.config import LlamaConfig
from tests.config.key_walk_keys import schema_keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
E2E = "tests/test_e2e_flows.py"
LOADER = "tests/checkpoint/test_loader.py"
KEYS_T = "tests/config/test_key_behaviour.py"
MON_K = "tests/checkpoint/test_monitor_keys.py"
LLAMA = "tests/models/test_llama.py::test_logits_match_an_independent_numpy_llama"
ROPE = "tests/models/test_rope_and_biases.py::test_logits_equal_transformers_past_the_original_length"

# key -> the behaviour test ("file::test", or (that, a word the file must contain when the key
# reaches the test under another name, e.g. a command-line flag)).
TESTED = {
    "seed": "tests/models/test_llama.py::test_parameter_names_are_mindspore_transformers_names_and_init_is_layout_free",
    "output_dir": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "run_mode": f"{E2E}::test_predict_from_hf_complete_and_distributed_gives_the_same_text",
    "use_parallel": "tests/config/test_config.py::test_standalone_run_ignores_parallel_config",
    "load_checkpoint": f"{E2E}::test_predict_from_hf_complete_and_distributed_gives_the_same_text",
    "load_ckpt_format": "tests/checkpoint/test_detect.py::test_folder_of_the_other_format_says_which_format_to_set",
    "auto_trans_ckpt": f"{E2E}::test_resume_after_kill_9_with_changed_strategy_dp2_to_mp2_continues",
    "remove_redundancy": f"{LOADER}::test_distributed_auto_trans_merges_online_then_loads",
    "src_strategy_path_or_dir": f"{LOADER}::test_distributed_other_layout_without_auto_trans_names_both_layouts",
    "direct_reshard": f"{LOADER}::test_direct_reshard_cuts_from_rank_files_without_a_complete_copy",
    "derived_write": f"{LOADER}::test_distributed_auto_trans_merges_online_then_loads",
    "verify_checksums": "tests/checkpoint/test_integrity_load.py::test_corrupt_rank_file_fails_every_load_mode_and_changes_nothing",
    "resume_training": f"{E2E}::test_resume_after_kill_9_with_the_same_strategy_is_bit_identical",
    "only_save_strategy": "tests/test_run_mindformer.py::test_7b_configs_plan_and_only_save_strategy",
    "transform_process_num": f"{E2E}::test_predict_from_hf_complete_and_distributed_gives_the_same_text",
    "load_ckpt_async": f"{E2E}::test_resume_skips_a_damaged_newest_save_together_on_every_rank",
    "balanced_load": "tests/checkpoint/test_balanced_load_msrun.py::test_balanced_load_sets_the_same_parameters_and_reads_each_byte_once",
    "ignore_data_skip": f"{E2E}::test_resume_with_ignore_data_skip_restarts_the_data_not_the_step",
    "data_skip_steps": "tests/config/test_no_silent_keys.py::test_data_position_follows_mindspore_transformers_rules",
    "resume_by_last_timestamp_ckpt": f"{E2E}::test_resume_by_last_timestamp_in_a_folder_without_records",
    "pretrained_model_dir": "tests/config/test_no_silent_keys.py::test_pretrained_model_dir_is_loaded_when_load_checkpoint_is_empty",
    "use_checkpoint_health_monitor": f"{MON_K}::test_run_mindformer_stores_append_info_and_records_health",
    "predict_data": "tests/test_run_mindformer.py::test_seed_predict_command_tiny_qwen2",
    "predict_batch_size": f"{KEYS_T}::test_predict_batch_size_and_max_decode_length",
    "context.device_target": "tests/parallel/test_context.py::test_device_target_must_be_a_name",
    "parallel.enable_parallel_optimizer": "tests/config/test_config.py::test_optimizer_shard_follows_enable_parallel_optimizer_unless_set",
    "parallel_config.data_parallel": f"{E2E}::test_resume_after_kill_9_with_changed_strategy_dp2_to_mp2_continues",
    "parallel_config.model_parallel": f"{E2E}::test_resume_after_kill_9_with_changed_strategy_dp2_to_mp2_continues",
    "parallel_config.pipeline_stage": "tests/transform/test_planner.py::test_pipeline_target_puts_each_stage_tensors_in_its_ranks",
    "parallel_config.optimizer_shard": "tests/config/test_config.py::test_optimizer_shard_follows_enable_parallel_optimizer_unless_set",
    "parallel_config.vocab_emb_dp": "tests/layout/test_parallel_config.py::test_column_row_and_replicated_params_dp2_mp2",
    "runner_config.epochs": ("tests/test_run_mindformer.py::test_bad_flag_value_exits_1_naming_the_key", "epochs"),
    "runner_config.batch_size": f"{E2E}::test_resume_with_a_doubled_global_batch_rescales_the_step",
    "runner_config.gradient_accumulation_steps": "tests/models/test_training.py::test_gradient_accumulation_over_micro_batches_equals_one_big_batch",
    "runner_config.train_steps": f"{E2E}::test_resume_at_train_steps_says_there_is_nothing_to_train",
    "runner_wrapper.use_clip_grad": f"{KEYS_T}::test_clipping_keys_reach_the_train_step",
    "runner_wrapper.max_grad_norm": f"{KEYS_T}::test_clipping_keys_reach_the_train_step",
    "optimizer.type": "tests/models/test_training.py::test_adamw_state_names_and_one_update_match_numpy",
    "optimizer.betas": "tests/models/test_training.py::test_adamw_state_names_and_one_update_match_numpy",
    "optimizer.beta1": f"{KEYS_T}::test_beta1_beta2_are_betas",
    "optimizer.beta2": f"{KEYS_T}::test_beta1_beta2_are_betas",
    "optimizer.eps": "tests/models/test_training.py::test_adamw_state_names_and_one_update_match_numpy",
    "optimizer.weight_decay": "tests/models/test_training.py::test_adamw_state_names_and_one_update_match_numpy",
    "optimizer.learning_rate": "tests/config/test_key_walk.py::test_optimizer_learning_rate_is_warned_about",
    "lr_schedule.type": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.learning_rate": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.lr_end": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.warmup_ratio": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.warmup_steps": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.decay_steps": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.total_steps": "tests/models/test_training.py::test_cosine_with_warmup_follows_mindformers_formula",
    "lr_schedule.warmup_lr_init": f"{KEYS_T}::test_warmup_lr_init_and_num_cycles_shape_the_schedule",
    "lr_schedule.num_cycles": f"{KEYS_T}::test_warmup_lr_init_and_num_cycles_shape_the_schedule",
    "train_dataset.data_loader.dataset_dir": (f"{E2E}::test_pretrain_saves_deduplicated_safetensors_and_merges_offline", "train_dataset_dir"),
    "train_dataset.data_loader.shuffle": "tests/data/test_data_tools.py::test_dp_ranks_read_disjoint_rows_of_each_global_batch",
    "train_dataset.data_loader.num_samples": "tests/data/test_data_tools.py::test_dp_ranks_read_disjoint_rows_of_each_global_batch",
    "train_dataset.input_columns": f"{KEYS_T}::test_data_keys_drop_remainder_workers_and_input_columns",
    "train_dataset.num_parallel_workers": f"{KEYS_T}::test_data_keys_drop_remainder_workers_and_input_columns",
    "train_dataset.drop_remainder": f"{KEYS_T}::test_data_keys_drop_remainder_workers_and_input_columns",
    "model.arch.type": ("tests/models/test_config.py::test_registry_knows_llama_and_rejects_unknown_names", "LlamaForCausalLM"),
    "model.model_config.vocab_size": LLAMA,
    "model.model_config.hidden_size": LLAMA,
    "model.model_config.num_layers": LLAMA,
    "model.model_config.num_heads": LLAMA,
    "model.model_config.n_kv_heads": LLAMA,
    "model.model_config.intermediate_size": LLAMA,
    "model.model_config.multiple_of": "tests/models/test_config.py::test_from_dict_reads_mindformers_keys_and_ignores_ascend_only_ones",
    "model.model_config.ffn_dim_multiplier": f"{KEYS_T}::test_ffn_dim_multiplier_scales_the_derived_intermediate_size",
    "model.model_config.rms_norm_eps": "tests/models/test_llama.py::test_hf_model_gives_the_same_logits",
    "model.model_config.head_dim": "tests/models/test_rope_and_biases.py::test_explicit_head_dim_shapes_the_projections",
    "model.model_config.theta": ROPE,
    "model.model_config.extend_method": ROPE,
    "model.model_config.scaling_factor": ROPE,
    "model.model_config.seq_length": "tests/trainer/test_train_loop.py::test_tiny_pretrain_lowers_the_loss",
    "model.model_config.qkv_has_bias": "tests/models/test_llama.py::test_biases_change_the_output",
    "model.model_config.attn_proj_has_bias": "tests/models/test_rope_and_biases.py::test_llama_biases_are_parameters_with_mindspore_transformers_names",
    "model.model_config.mlp_has_bias": "tests/models/test_rope_and_biases.py::test_llama_biases_are_parameters_with_mindspore_transformers_names",
    "model.model_config.qkv_concat": "tests/models/test_llama.py::test_qkv_concat_model_with_fused_weights_equals_the_unfused_model",
    "model.model_config.tie_word_embeddings": "tests/models/test_llama.py::test_tied_embeddings_have_no_lm_head_and_share_the_table",
    "model.model_config.compute_dtype": "tests/models/test_llama.py::test_bf16_parameters_train_and_keep_their_dtype",
    "model.model_config.param_init_type": "tests/models/test_llama.py::test_bf16_parameters_train_and_keep_their_dtype",
    "model.model_config.initializer_range": f"{KEYS_T}::test_initializer_range_is_the_std_of_initial_weights",
    "model.model_config.do_sample": "tests/models/test_training.py::test_sampling_is_seeded_and_filters_work",
    "model.model_config.top_k": "tests/models/test_training.py::test_sampling_is_seeded_and_filters_work",
    "model.model_config.top_p": "tests/models/test_training.py::test_sampling_is_seeded_and_filters_work",
    "model.model_config.temperature": f"{KEYS_T}::test_temperature_sharpens_or_flattens_sampling",
    "model.model_config.repetition_penalty": "tests/models/test_training.py::test_generate_applies_the_repetition_penalty",
    "model.model_config.max_decode_length": f"{KEYS_T}::test_predict_batch_size_and_max_decode_length",
    "model.model_config.eos_token_id": "tests/models/test_training.py::test_generate_greedy_batched_left_padding_equals_one_by_one_and_stops_at_eos",
    "model.model_config.pad_token_id": "tests/models/test_llama.py::test_loss_is_cross_entropy_of_shifted_tokens_and_masks_pad_and_ignored_labels",
    "model.model_config.ignore_token_id": "tests/models/test_llama.py::test_loss_is_cross_entropy_of_shifted_tokens_and_masks_pad_and_ignored_labels",
    "processor.tokenizer.tokenizer_file": "tests/test_run_mindformer.py::test_seed_predict_command_tiny_qwen2",
    "processor.tokenizer.vocab_file": f"{KEYS_T}::test_vocab_file_names_a_tokenizer_json_or_is_refused",
    "callbacks.MFLossMonitor.type": "tests/config/test_config.py::test_checkpoint_monitor_keys_are_validated",
    "callbacks.MFLossMonitor.per_print_times": "tests/trainer/test_train_loop.py::test_tiny_pretrain_lowers_the_loss",
    "callbacks.CheckpointMonitor.type": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.prefix": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.directory": "tests/checkpoint/test_monitor.py::test_second_run_in_same_directory_keeps_counting_old_saves",
    "callbacks.CheckpointMonitor.save_checkpoint_steps": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.keep_checkpoint_max": "tests/checkpoint/test_monitor.py::test_sync_save_writes_the_contract_file_and_prunes_to_keep_max",
    "callbacks.CheckpointMonitor.save_network_params": ("tests/checkpoint/test_monitor.py::test_ckpt_format_is_mindspore_loadable", "checkpoint_network"),
    "callbacks.CheckpointMonitor.save_trainable_params": ("tests/checkpoint/test_monitor.py::test_async_save_commits_and_logs_blocked_time", "checkpoint_trainable"),
    "callbacks.CheckpointMonitor.async_save": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.checkpoint_format": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.remove_redundancy": "tests/checkpoint/test_monitor_options.py::test_config_callbacks_build_the_monitor",
    "callbacks.CheckpointMonitor.append_info": f"{MON_K}::test_run_mindformer_stores_append_info_and_records_health",
    "callbacks.CheckpointMonitor.global_batch_size": "tests/checkpoint/test_monitor.py::test_sync_save_writes_the_contract_file_and_prunes_to_keep_max",
    "callbacks.CheckpointMonitor.embedding_local_norm_threshold": f"{MON_K}::test_health_monitor_records_every_committed_save",
    "callbacks.CheckpointMonitor.exception_save": "tests/trainer/test_stop.py::test_exception_save_commits_the_last_completed_step_before_the_error",
    "use_graceful_exit": "tests/trainer/test_stop.py::test_sigterm_with_use_graceful_exit_saves_the_step_exits_0_and_resume_continues",
    "parallel_config.micro_batch_num": ("tests/models/test_pipeline.py::test_pp2_matches_one_card", "micro-batches"),
    "use_legacy_format": "tests/checkpoint/test_monitor_iteration.py::test_the_yaml_key_reaches_the_monitor",
    "callbacks.OnRequestExit.type": ("tests/trainer/test_stop_rules.py::test_on_request_exit_config_file_asks_for_a_stop", "OnRequestExit"),
    "callbacks.OnRequestExit.config_file": "tests/trainer/test_stop_rules.py::test_on_request_exit_config_file_asks_for_a_stop",
    "callbacks.OnRequestExit.save_ckpt": "tests/trainer/test_stop_rules.py::test_on_request_exit_config_file_asks_for_a_stop",
    "callbacks.OnRequestExit.sig": "tests/trainer/test_stop_rules.py::test_on_request_exit_keys_without_effect_warn_and_it_needs_use_graceful_exit",
}

# key -> (overrides that make load_config (or the model build) refuse it, words of the error)
REFUSED = {
    "parallel_config.context_parallel": ([("parallel_config.context_parallel", 2)], "context_parallel"),
    "parallel_config.expert_parallel": ([("parallel_config.expert_parallel", 2)], "expert_parallel"),
    "train_dataset.data_loader.type": ([("train_dataset.data_loader.type", "JsonDataset")],
                                       "data_loader.type"),
    "callbacks.CheckpointMonitor.enc_key": ([("callbacks.1.enc_key", "k")], "callbacks.1.enc_key"),
    "callbacks.CheckpointMonitor.saved_network": ([("callbacks.1.saved_network", "net")],
                                                  "callbacks.1.saved_network"),
    "model.model_config.embedding_init_type": (None, "embedding_init_type"),   # at model build
}

# Keys whose value cannot change behaviour here (as in MindSpore Transformers): each must be in
# the key table of docs/runtime.md with the reason.
DOCUMENTED = {
    "callbacks.CheckpointMonitor.integrated_save",   # MindSpore Transformers forces it False under parallel
    "model.model_config.type",                       # the class is model.arch.type's
}


def _warned():
    """{dotted key: how to set it} for every key of a no-effect table."""
    out = {}
    for k in NO_EFFECT_TOP_LEVEL:
        out[k] = "top"
    for k in NO_EFFECT_KEYS:
        out[k] = "section"
    for k in IGNORED_TOP_LEVEL:
        out[k] = "ignored"
    for k in NO_EFFECT_MONITOR:
        out[f"callbacks.CheckpointMonitor.{k}"] = "callback"
    for k in NO_EFFECT_LOSS_MONITOR:
        out[f"callbacks.MFLossMonitor.{k}"] = "callback"
    for k in NO_EFFECT_ON_REQUEST_EXIT:
        out[f"callbacks.OnRequestExit.{k}"] = "callback"
    for k in set(MODEL_IGNORED) | set(MODEL_NO_EFFECT):
        out[f"model.model_config.{k}"] = "model"
    return out


WARNED = _warned()


def _declared(dotted):
    """(default, type hint) of a schema key."""
    parts = dotted.split(".")
    if parts[0] == "callbacks":
        cls, name = CALLBACK_TYPES[parts[1]], parts[2]
    elif dotted.startswith("model.model_config."):
        cls, name = LlamaConfig, parts[2]
    else:
        cls = RunConfig
        for p in parts[:-1]:
            cls = typing.get_type_hints(cls)[p]
        name = parts[-1]
    if not dataclasses.is_dataclass(cls) or name not in cls.__dataclass_fields__:
        return None, typing.Any
    f = cls.__dataclass_fields__[name]
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return default, typing.get_type_hints(cls)[name]


SPECIAL = {"context.mode": 0, "trainer": {"type": "Seq2SeqTrainer"},
           "train_dataset_task": {"type": "ContrastiveLanguageImagePretrainDataset"},
           "micro_batch_interleave_num": 2, "enc_mode": "AES-CBC"}


def _other(dotted, default, hint):
    """A valid value other than the default: what a user would set to ask for the feature."""
    leaf = dotted.split(".")[-1]
    if dotted in SPECIAL or leaf in SPECIAL:
        return SPECIAL.get(dotted, SPECIAL.get(leaf))
    if leaf.endswith(("_type", "_dtype")):
        return "float16"
    tp = hint
    if typing.get_origin(hint) is typing.Union:
        tp = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if tp is bool or isinstance(default, bool):
        return not bool(default)
    if tp is int:
        return (default or 0) + 3
    if tp is float:
        return float(default or 0.0) + 1.5
    if typing.get_origin(tp) in (dict, typing.Dict):
        return {"option": 1}
    if typing.get_origin(tp) in (list, typing.List):
        return ["x"]
    return "on"


def _setting(dotted, how, value):
    """(overrides, the name the warning must give)."""
    parts = dotted.split(".")
    if how == "callback":
        entry = {"type": parts[1], parts[2]: value}
        cbs = [{"type": "MFLossMonitor"}, {"type": "CheckpointMonitor"}, {"type": "OnRequestExit"}]
        idx = {"MFLossMonitor": 0, "CheckpointMonitor": 1}.get(parts[1], 2)
        cbs[idx] = entry
        return [("callbacks", cbs)], f"callbacks.{idx}.{parts[2]}"
    return [(dotted, value)], dotted


def test_every_schema_key_has_exactly_one_entry():
    keys = schema_keys()
    assert len(keys) == len(set(keys)), "a key is listed twice by the schema walk"
    entries = {}
    for name, table in (("TESTED", TESTED), ("REFUSED", REFUSED), ("DOCUMENTED", DOCUMENTED),
                        ("warned", WARNED)):
        for k in table:
            entries.setdefault(k, []).append(name)
    missing = sorted(set(keys) - set(entries))
    assert not missing, f"schema keys with no behaviour test, refusal or warning: {missing}"
    stale = sorted(set(entries) - set(keys))
    assert not stale, f"registry entries for keys the schema no longer has: {stale}"
    both = {k: v for k, v in entries.items() if len(v) > 1}
    assert not both, f"keys in more than one category: {both}"


def _test_defined(test_id):
    path, name = test_id.split("::")
    full = os.path.join(ROOT, path)
    assert os.path.isfile(full), f"{path} does not exist"
    with open(full, encoding="utf-8") as fh:
        src = fh.read()
    names = {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{test_id}: no such test"
    return src


@pytest.mark.parametrize("key", sorted(TESTED))
def test_a_tested_key_names_a_test_that_sets_it(key):
    entry = TESTED[key]
    test_id, word = entry if isinstance(entry, tuple) else (entry, key.split(".")[-1])
    src = _test_defined(test_id)
    assert word in src, f"{test_id} never mentions {word!r}: it cannot exercise {key}"


@pytest.mark.parametrize("key", sorted(WARNED))
def test_a_key_without_effect_is_warned_about_by_name(key, caplog):
    value = _other(key, *_declared(key))
    with caplog.at_level(logging.WARNING):
        if WARNED[key] == "model":
            LlamaConfig.from_dict({key.split(".")[-1]: value})
            name = key
        else:
            overrides, name = _setting(key, WARNED[key], value)
            load_config(TINY, overrides)
    assert f"config key '{name}' = " in caplog.text and "has no effect here" in caplog.text, \
        f"setting {key} = {value!r} gave no warning naming it"


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_a_refused_key_is_a_config_error_naming_it(key):
    overrides, words = REFUSED[key]
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        if overrides is None:   # refused when the model is built
            from mindformers_st.layout.parallel_config import ParallelConfig
            from mindformers_st.models.llama import LlamaForCausalLM
            from mindformers_st.parallel.context import init_parallel
            cfg = LlamaConfig.from_dict(dict(vocab_size=64, hidden_size=16, num_layers=1,
                                             num_heads=4, **{key.split(".")[-1]: "float16"}))
            LlamaForCausalLM(cfg, init_parallel(ParallelConfig(), False))
        else:
            load_config(TINY, overrides)


def test_documented_keys_are_in_the_runtime_key_table():
    with open(os.path.join(ROOT, "docs", "runtime.md"), encoding="utf-8") as fh:
        doc = fh.read()
    absent = [k for k in sorted(DOCUMENTED) if f"`{k}`" not in doc]
    assert not absent, f"docs/runtime.md does not say what these keys do: {absent}"


def test_optimizer_learning_rate_is_warned_about(caplog):
    import mindspore as ms
    import numpy as np
    from mindformers_st.trainer.optim import build_optimizer

    class Net:
        def trainable_params(self):
            return [ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")]
    with caplog.at_level(logging.WARNING):
        build_optimizer(Net(), {"type": "AdamW", "learning_rate": 5e-5}, 1e-3)
    assert "config key 'optimizer.learning_rate' = 5e-05 has no effect here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_optimizer(Net(), {"type": "AdamW"}, 1e-3)
    assert "optimizer.learning_rate" not in caplog.text


def test_every_set_aside_top_level_key_has_a_reason():
    assert set(IGNORED_TOP_LEVEL) <= set(IGNORED_WHY), set(IGNORED_TOP_LEVEL) - set(IGNORED_WHY)


def test_every_schema_key_has_a_row_in_the_runtime_key_table():
    with open(os.path.join(ROOT, "docs", "runtime.md"), encoding="utf-8") as fh:
        doc = fh.read()
    absent = [k for k in schema_keys() if f"| `{k}` |" not in doc]
    assert not absent, f"docs/runtime.md 'Every key' has no row for {absent}"
