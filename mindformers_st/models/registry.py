"""Model registry: the names usable in YAML `model.arch.type` / `model.model_config.type`.

`register_model` is a class decorator; `research/qwen2` style plug-ins call it from the file
given to `--register_path`. The registry itself is pure: built-in models are known by dotted
name (`BUILTIN_MODELS`) and imported on first use, so no model module imports the registry.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

from ..errors import ConfigError
from .config import LlamaConfig

logger = logging.getLogger(__name__)

_MODELS: Dict[str, Tuple[type, type]] = {}
_CONFIGS: Dict[str, type] = {"LlamaConfig": LlamaConfig}
# built-in models: name -> (module, class, config class), imported on first use
BUILTIN_MODELS = {"LlamaForCausalLM": ("mindformers_st.models.llama", "LlamaForCausalLM", LlamaConfig)}
# models this repository ships as --register_path plug-ins (name -> the folder to pass)
PLUGIN_PATHS = {"Qwen2ForCausalLM": "research/qwen2", "Qwen2Config": "research/qwen2"}


def register_model(name: str, config_cls: type = LlamaConfig):
    """Class decorator registering a model class under `name` with its config class.

    The config class is also registered under its own class name, so `model_config.type`
    resolves. Re-registering a name with a different class replaces it (with a warning).
    """
    def deco(cls):
        old = _MODELS.get(name)
        if old is not None and old[0] is not cls:
            logger.warning("register_model: %s re-registered (%s -> %s)", name,
                           old[0].__qualname__, cls.__qualname__)
        _MODELS[name] = (cls, config_cls)
        _CONFIGS.setdefault(config_cls.__name__, config_cls)
        return cls
    return deco


def _load_builtin() -> None:
    # Imported lazily so the registry stays importable (and configs can be validated) without
    # paying for a MindSpore import.
    import importlib
    for name, (module, attr, config_cls) in BUILTIN_MODELS.items():
        if name not in _MODELS:
            _MODELS[name] = (getattr(importlib.import_module(module), attr), config_cls)


def _unregistered(kind: str, name: str, known) -> ConfigError:
    plugin = PLUGIN_PATHS.get(name)
    if plugin:
        return ConfigError(f"{kind} {name!r} is not registered: add --register_path {plugin} "
                           f"to the run_mindformer.py command (it registers {name})")
    return ConfigError(f"{kind} {name!r} is not a registered model; known: {sorted(known)}. "
                       "Register yours with --register_path (a file using "
                       "mindformers_st.models.registry.register_model).")


def check_model_name(name: str) -> None:
    """Raise ConfigError unless `name` is a built-in or registered model; for a plug-in this
    repository ships (Qwen2ForCausalLM) the message names the exact `--register_path` flag.
    Pure: does not import MindSpore."""
    if name not in _MODELS and name not in BUILTIN_MODELS:
        raise _unregistered("model.arch.type", name, set(_MODELS) | set(BUILTIN_MODELS))


def get_model(name: str) -> Tuple[type, type]:
    """(model class, config class) registered as `name`; ConfigError listing the known names
    (naming the --register_path flag for the plug-ins this repository ships)."""
    if name not in _MODELS:
        _load_builtin()
    if name not in _MODELS:
        raise _unregistered("model.arch.type", name, _MODELS)
    return _MODELS[name]


def get_config_class(name: Optional[str]) -> type:
    """The config class registered as `name` (model_config.type); LlamaConfig when None."""
    if name is None:
        return LlamaConfig
    if name not in _CONFIGS:
        _load_builtin()
    if name not in _CONFIGS:
        if name in PLUGIN_PATHS:
            raise _unregistered("model.model_config.type", name, _CONFIGS)
        raise ConfigError(f"model.model_config.type {name!r} is not a known config class; "
                          f"known: {sorted(_CONFIGS)}")
    return _CONFIGS[name]
