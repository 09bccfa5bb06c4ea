"""Models: the Llama-family config, parameter table, MindSpore network and model registry.

`config`, `param_table` and `registry` are importable without MindSpore; `llama` and `layers`
need it.
"""
from .config import LlamaConfig
from .registry import get_model, register_model

__all__ = ["LlamaConfig", "get_model", "register_model"]
