"""Build typed dataclasses from YAML data: unknown keys and wrong types are a ConfigError naming the key.

One small engine serves every config section: `build(cls, data, where)` walks the dataclass
fields of `cls`, checks each value against its type hint and recurses into nested dataclasses,
lists and dicts. Values that came from the command line arrive as `CliValue` strings and are
converted here according to the declared type, so `--output_dir 123` stays the string "123"
while `--runner_config.epochs 3` becomes the int 3. Pure Python.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Union

import yaml

from ..errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class CliValue(str):
    """A value given on the command line, still a string: converted by its declared type."""


def parse_bool_word(text: str):
    """`True`/`False` (any case, also yes/no/1/0) -> bool; anything else -> None."""
    low = text.strip().lower()
    if low in _TRUE_WORDS:
        return True
    if low in _FALSE_WORDS:
        return False
    return None


def _type_name(tp) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; known keys: {', '.join(sorted(known))}"


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the type hint `tp` (converting CLI strings) and return it.

    Raises ConfigError naming `where` (the dotted key) when it does not fit.
    """
    if isinstance(value, CliValue):
        value = _convert_cli(value, tp, where)
    if tp is Any:
        return _plain(value)
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{where}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}': expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [convert(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}': expected a mapping, got {value!r}")
        return {str(k): _plain(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-5" (no dot) as a string: accept any clean float spelling.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return str(value)
    elif tp is type(None):
        if value is None:
            return None
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported type hint {tp!r} at {where}")
    raise ConfigError(f"config key '{where}': expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _convert_cli(text: CliValue, tp: Any, where: str) -> Any:
    """A command-line string -> the Python value its declared type calls for."""
    raw = str(text)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp) if origin is Union else (tp,)
    if raw.strip().lower() in _NONE_WORDS and type(None) in args:
        return None
    if bool in args:
        b = parse_bool_word(raw)
        if b is not None:
            return b
    if int in args:
        try:
            return int(raw)
        except ValueError:
            pass
    if float in args:
        try:
            return float(raw)
        except ValueError:
            pass
    if str in args:
        return raw
    if bool in args and len([a for a in args if a is not type(None)]) == 1:
        raise ConfigError(f"config key '{where}': expected True or False, got {raw!r}")
    # lists, mappings, Any: read the text as YAML ("[1, 2]", "{a: 1}", "3", "abc")
    return _yaml_text(raw)


def _yaml_text(raw: str) -> Any:
    """Free-form command-line text as YAML would read it, plus "1e-4" as a float (YAML 1.1
    reads floats without a dot as strings)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def _plain(value: Any) -> Any:
    """Free-form values (Any, dict contents): convert nested CLI strings as YAML scalars."""
    if isinstance(value, CliValue):
        return _yaml_text(str(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def build(cls, data: Any, where: str = ""):
    """An instance of dataclass `cls` from the mapping `data` (None = all defaults).

    Every key must be a field of `cls` (ConfigError naming the dotted key and the known keys),
    and every value must fit its type hint. A class may define `_validate(self, where)` for
    rules across fields; it runs after the fields are set.
    """
    if data is None:
        data = {}
    label = where or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{label}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{where}.{key}" if where else key
        raise ConfigError(f"unknown config key '{full}'{_suggest(key, fields)}")
    kwargs = {}
    for name, value in data.items():
        full = f"{where}.{name}" if where else name
        kwargs[name] = convert(value, hints[name], full)
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree back to plain YAML-able data (the resolved config, for logs and files)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
