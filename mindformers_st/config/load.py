"""Read a run YAML, apply `--a.b.c value` overrides and return the validated `RunConfig`.

Pure Python. The command line of run_mindformer.py is parsed in `config.cli_args`; this module
only knows dotted keys and values.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, Iterable, Optional, Tuple

import yaml

from ..errors import ConfigError
from .schema import IGNORED_TOP_LEVEL, RunConfig, build_callback
from .typed import CliValue, build
from .unused_keys import warn_unused

logger = logging.getLogger(__name__)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently; a config where a setting is quietly overridden is a wrong run)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config key {key!r} appears twice in one mapping (line "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> Dict[str, Any]:
    """The mapping stored in the YAML file `path`. ConfigError if it is missing, not UTF-8, not
    valid YAML, empty, not a mapping, or gives a key twice."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass --config with a YAML file "
                          f"such as configs/llama2/pretrain_llama2_tiny.yaml")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if data is None:
        # an empty file would silently become the default 7B model
        raise ConfigError(f"config file {path!r} is empty; a run config needs at least "
                          f"model.model_config")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for key "a.b.c", creating missing mappings.

    A numeric part indexes a list (`callbacks.1.prefix`). ConfigError when the path crosses a
    value that is neither a mapping nor a list.
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} has an empty part; write --a.b.c value")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override --{key}: '{'.'.join(parts[:i])}' is not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, key)
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override --{key}: '{'.'.join(parts[:-1])}' is not a section")


def _list_index(items: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override '{where}': {part!r} is not an index of a list of "
                          f"{len(items)} items")
    return int(part)


def _list_item(items: list, part: str, where: str) -> Any:
    return items[_list_index(items, part, where)]


def build_config(data: Dict[str, Any]) -> RunConfig:
    """The validated RunConfig for an already-merged mapping (YAML plus overrides)."""
    data = dict(data)
    ignored = {k: data.pop(k) for k in list(data) if k in IGNORED_TOP_LEVEL}
    raw_callbacks = data.pop("callbacks", None) or []
    if not isinstance(raw_callbacks, list):
        raise ConfigError(f"config key 'callbacks' must be a list of {{type: ...}} mappings, "
                          f"got {raw_callbacks!r}")
    cfg = build(RunConfig, data, "")
    cfg.callbacks = [build_callback(cb, f"callbacks.{i}") for i, cb in enumerate(raw_callbacks)]
    cfg.ignored = ignored
    warn_unused(cfg, RunConfig(), ignored)
    if cfg.use_checkpoint_health_monitor and cfg.callback("CheckpointMonitor") is None:
        logger.warning("config key 'use_checkpoint_health_monitor' = True has no effect here: no "
                       "CheckpointMonitor callback is configured (it records that callback's saves)")
    return cfg


def load_config(path: str, overrides: Optional[Iterable[Tuple[str, Any]]] = None) -> RunConfig:
    """Read `path`, apply `overrides` ((dotted key, value) pairs; str values are treated as
    command-line text and converted by the key's declared type) and validate.

    Raises ConfigError naming the offending key for unknown keys, wrong types or broken rules.
    """
    data = copy.deepcopy(read_yaml(path))
    for key, value in overrides or ():
        set_dotted(data, key, CliValue(value) if isinstance(value, str) else value)
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
