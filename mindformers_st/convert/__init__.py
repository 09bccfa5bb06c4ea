"""Hugging Face <-> MindSpore Transformers names and tensors for the Llama family (Llama 2/3,
Qwen2), kept as data (`rules.py`), executed as ordinary plans (`planner.py`). Pure Python."""
from .fuse import RowBlock, ffn_blocks, fuse_rows, qkv_blocks, split_rows
from .folders import (ConversionResult, convert_hf_folder, export_hf_folder, plan_hf_folder,
                      plan_ms_folder, read_yaml_model_config)
from .hf_config import (detect_family, hf_config_to_model_config, hf_rope_to_model_config,
                        model_config_rope_to_hf, model_config_to_hf_config, read_hf_config)
from .planner import check_structure, plan_convert_hf, plan_export_hf
from .rules import (FAMILIES, FUSE_RULES, LLAMA_RENAMES, QKV_BIAS_RENAMES, hf_to_ms_name,
                    ms_to_hf_name, ms_to_hf_names)

__all__ = [
    "RowBlock", "ffn_blocks", "fuse_rows", "qkv_blocks", "split_rows",
    "ConversionResult", "convert_hf_folder", "export_hf_folder", "plan_hf_folder",
    "plan_ms_folder", "read_yaml_model_config",
    "detect_family", "hf_config_to_model_config", "hf_rope_to_model_config",
    "model_config_rope_to_hf", "model_config_to_hf_config", "read_hf_config",
    "check_structure", "plan_convert_hf", "plan_export_hf",
    "FAMILIES", "FUSE_RULES", "LLAMA_RENAMES", "QKV_BIAS_RENAMES", "hf_to_ms_name",
    "ms_to_hf_name", "ms_to_hf_names",
]
