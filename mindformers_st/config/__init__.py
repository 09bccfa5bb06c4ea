"""The typed, validated run config: MindSpore Transformers' YAML keys, CLI flags and overrides.

    cfg = load_config("configs/llama2/pretrain_llama2_tiny.yaml", [("runner_config.epochs", "2")])
    cfg.parallel_config.model_parallel, cfg.callback("CheckpointMonitor"), ...

Unknown keys, wrong types and broken rules raise `mindformers_st.errors.ConfigError` naming the
key. Pure Python (no MindSpore).
"""
from .cli_args import RunArgs, parse_run_args
from .load import build_config, load_config, read_yaml, set_dotted
from .schema import (CALLBACK_TYPES, CheckpointMonitorConfig, MFLossMonitorConfig, RunConfig)
from .typed import to_dict

__all__ = [
    "RunArgs", "parse_run_args", "build_config", "load_config", "read_yaml", "set_dotted",
    "CALLBACK_TYPES", "CheckpointMonitorConfig", "MFLossMonitorConfig", "RunConfig", "to_dict",
]
