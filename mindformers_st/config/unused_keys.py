"""MindSpore Transformers keys that this runtime accepts (so their YAML files load) but that change
nothing here, each with the reason; `warn_unused` names every one set to a value that would
change MindSpore Transformers' behaviour. No key is accepted and silently ignored.

The top-level and CheckpointMonitor tables (`schema.NO_EFFECT_TOP_LEVEL`, `NO_EFFECT_MONITOR`)
live beside their classes; these are the sections' keys and the top-level keys `config.load`
sets aside (`schema.IGNORED_TOP_LEVEL`). Pure Python.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

logger = logging.getLogger(__name__)

_GRAPH = "this runtime runs MindSpore in PyNative mode (no graph compilation)"
_AUTO = ("layouts come from parallel_config (explicit data/model/pipeline parallel), not from "
         "MindSpore's auto-parallel context")

# dotted key (from the top of the run config) -> why it has no effect here.
NO_EFFECT_KEYS: Dict[str, str] = {
    "context.mode": _GRAPH + "; GRAPH_MODE is not used",
    "context.device_id": "each msrun worker uses its own device (CPU has none to choose)",
    "context.max_device_memory": "it is not passed to MindSpore (the CPU has no device memory pool)",
    "context.max_call_depth": _GRAPH,
    "context.save_graphs": _GRAPH,
    "context.save_graphs_path": _GRAPH,
    "context.jit_config": _GRAPH,
    "context.jit_level": _GRAPH,
    "context.memory_optimize_level": "it is not passed to MindSpore (graph-mode memory reuse)",
    "context.runtime_num_threads": "it is not passed to MindSpore (its default thread count is used)",
    "context.enable_graph_kernel": _GRAPH,
    "context.graph_kernel_flags": _GRAPH,
    "context.ascend_config": "Ascend-only options are not passed to MindSpore",
    "context.mempool_block_size": "it is not passed to MindSpore (device memory pool)",
    "context.affinity_cpu_list": "cores are bound by the launcher (MF_BIND_CORE), not by this key",
    "context.deterministic": "it is not passed to MindSpore (Ascend kernels' determinism)",
    "context.pynative_synchronize": "on CPU every launch is synchronous already; elsewhere it is "
                                    "not passed to MindSpore",
    "parallel.parallel_mode": _AUTO,
    "parallel.gradients_mean": "gradients are always averaged over the data-parallel ranks",
    "parallel.enable_alltoall": _AUTO,
    "parallel.full_batch": "every data-parallel rank reads its own rows of the global batch",
    "parallel.search_mode": _AUTO,
    "parallel.strategy_ckpt_save_file": "strategy files are always written to "
                                        "{output_dir}/strategy/ckpt_strategy_rank_{r}.ckpt "
                                        "(as MindSpore Transformers rewrites this key)",
    "parallel.strategy_ckpt_load_file": "layouts come from parallel_config; pass a source "
                                        "strategy with src_strategy_path_or_dir",
    "parallel.strategy_ckpt_config": "strategy files are always written to {output_dir}/strategy",
    "parallel.parallel_optimizer_config": "optimizer shard splits every moment over data_parallel "
                                          "(no threshold, no gradient-accumulation shard)",
    "parallel.pipeline_config": "pipeline stages cannot run on this backend",
    "parallel.dataset_strategy": "every data-parallel rank reads its own rows of the global batch",
    "parallel.device_num": "the world size is the number of msrun workers",
    "parallel.loss_repeated_mean": _AUTO,
    "parallel.auto_pipeline": "pipeline stages cannot run on this backend",
    "parallel.dump_local_norm": "local norms are not dumped",
    "parallel.comm_fusion": "collectives are not fused",
    "parallel.enable_alltoall_fusion": "collectives are not fused",
    "parallel_config.seq_split_num": "sequences are not split (no sequence pipeline)",
    "parallel_config.use_seq_parallel": "sequence parallel is not implemented; activations stay "
                                        "whole on every model-parallel rank",
    "parallel_config.gradient_aggregation_group": "gradients are all-reduced in one flat buffer",
    "parallel_config.context_parallel_algo": "context_parallel must be 1 here",
    "parallel_config.ulysses_degree_in_cp": "context_parallel must be 1 here",
    "parallel_config.mem_coeff": "it is an auto-parallel cost-model weight",
    "runner_config.sink_mode": "the loop runs one step at a time (no dataset sink)",
    "runner_config.sink_size": "the loop runs one step at a time (no dataset sink)",
    "runner_config.stop_step": "use runner_config.train_steps to stop after N steps",
    "runner_wrapper.type": "the train step is always MFTrainOneStepCell's (loss, clipping, update)",
    "runner_wrapper.scale_sense": "fp32 training on CPU needs no loss scaling",
    "runner_wrapper.local_norm": "per-parameter gradient norms are not reported",
    "train_dataset.output_columns": "the columns are input_ids (and labels)",
    "train_dataset.construct_args_key": "the network takes input_ids (and labels)",
    "train_dataset.python_multiprocessing": "batches are read in this process",
    "train_dataset.batch_size": "the per-rank batch is runner_config.batch_size (MindSpore "
                                "Transformers overwrites this key with it too)",
    "train_dataset.repeat": "epochs come from runner_config.epochs",
    "train_dataset.numa_enable": "it is not passed to MindSpore's dataset",
    "train_dataset.prefetch_size": "it is not passed to MindSpore's dataset",
    "train_dataset.seed": "the data order comes from the top-level seed",
    "train_dataset.pad_token_id": "padding is written into the MindRecord by the data tools",
    "processor.type": "the processor is the tokenizer (processor.tokenizer)",
    "processor.return_tensors": "the processor is the tokenizer (processor.tokenizer)",
    "processor.tokenizer.type": "every tokenizer is a Hugging Face tokenizer.json",
    "processor.tokenizer.merges_file": "tokenizer.json holds the merges",
    "processor.tokenizer.unk_token": "special tokens come from tokenizer.json and model_config",
    "processor.tokenizer.bos_token": "special tokens come from tokenizer.json and model_config",
    "processor.tokenizer.eos_token": "special tokens come from tokenizer.json and model_config",
    "processor.tokenizer.pad_token": "special tokens come from tokenizer.json and model_config",
    "processor.tokenizer.add_bos_token": "prompts are encoded as tokenizer.json says",
    "processor.tokenizer.add_eos_token": "prompts are encoded as tokenizer.json says",
    "processor.tokenizer.model_max_length": "prompts are limited by model_config.seq_length",
    "processor.tokenizer.chat_template": "prompts are used as given (no chat template)",
    "processor.tokenizer.auto_register": "register models with --register_path",
}

# `{type: MFLossMonitor}` keys MindSpore Transformers' trainer fills itself (its values replace
# the YAML's) or that this monitor does not implement.
NO_EFFECT_LOSS_MONITOR: Dict[str, str] = {
    "learning_rate": "the monitor reads the optimizer's learning rate",
    "micro_batch_num": "the monitor reads the run's own values",
    "micro_batch_interleave_num": "the monitor reads the run's own values",
    "origin_epochs": "the monitor reads the run's own values",
    "dataset_size": "the monitor reads the run's own values",
    "initial_epoch": "the monitor reads the run's own values (a resume continues them)",
    "initial_step": "the monitor reads the run's own values (a resume continues them)",
    "global_batch_size": "the monitor reads the run's own values",
    "gradient_accumulation_steps": "the monitor reads the run's own values",
    "check_for_nan_in_loss_and_grad": "a NaN loss is printed, training does not stop",
}

# Top-level keys `config.load` sets aside (schema.IGNORED_TOP_LEVEL) -> why they have no effect.
IGNORED_WHY: Dict[str, str] = {
    "trainer": "the loop follows run_mode (a causal-LM trainer)",
    "train_dataset_task": "the dataset is train_dataset (a MindRecord of input_ids)",
    "eval_dataset": "there is no evaluation during training",
    "eval_dataset_task": "there is no evaluation during training",
    "eval_callbacks": "there is no evaluation during training",
    "metric": "there is no evaluation during training",
    "do_eval": "there is no evaluation during training",
    "eval_step_interval": "there is no evaluation during training",
    "eval_epoch_interval": "there is no evaluation during training",
    "recompute_config": "activations are kept, never recomputed (same results, more memory)",
    "moe_config": "models here are dense (no mixture of experts)",
    "profile": "the profiler is not started",
    "profile_start_step": "the profiler is not started",
    "profile_stop_step": "the profiler is not started",
    "profile_communication": "the profiler is not started",
    "profile_memory": "the profiler is not started",
    "init_start_profile": "the profiler is not started",
    "layer_scale": "every layer uses the optimizer's learning rate",
    "layer_decay": "every layer uses the optimizer's learning rate",
    "lr_scale": "the learning rate is lr_schedule's",
    "micro_batch_interleave_num": "micro-batches are not interleaved",
    "swap_config": "parameters are never swapped to host memory",
    "auto_tune": "the data pipeline is not auto-tuned",
    "filepath_prefix": "the data pipeline is not auto-tuned",
    "autotune_per_step": "the data pipeline is not auto-tuned",
    "remote_save_url": "saves stay in output_dir (no ModelArts upload)",
    "use_graceful_exit": "a stopped run resumes from its last committed save",
    "monitor_config": "local norms and losses are not dumped",
    "tensorboard": "nothing is written for TensorBoard",
    "wrapper": "the train step is always MFTrainOneStepCell's",
    "adapter_id": "no LoRA adapters are loaded",
    "model_name": "the model is model.arch",
    "trust_remote_code": "no remote code is run (register models with --register_path)",
}

# Values of set-aside keys that ask for nothing MindSpore Transformers would do differently.
_INERT_TYPES = {"trainer": "CausalLanguageModelingTrainer",
                "train_dataset_task": "CausalLanguageModelDataset"}


def _inert(key: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == {} or value == []:
        return True
    if key == "micro_batch_interleave_num" and value == 1:
        return True
    if key in _INERT_TYPES and isinstance(value, dict):
        return value.get("type") == _INERT_TYPES[key]
    return False


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def warn_unused(cfg, defaults, ignored: Dict[str, Any]) -> None:
    """Warn, naming the key, for every NO_EFFECT_KEYS key `cfg` sets to something other than
    `defaults` (a RunConfig of defaults) and for every set-aside top-level key in `ignored`
    whose value asks for something (not None/False/empty)."""
    for key, why in NO_EFFECT_KEYS.items():
        value = _get(cfg, key)
        if value is not None and value != "" and value != _get(defaults, key):
            logger.warning("config key '%s' = %r has no effect here: %s", key, value, why)
    for key, value in ignored.items():
        if not _inert(key, value):
            logger.warning("config key '%s' = %r has no effect here: %s", key, value,
                           IGNORED_WHY.get(key, "it is not used by this runtime"))
