"""Every config key the run schema accepts, derived from the schema itself (the key walk's list)."""
import dataclasses
import typing

from mindformers_st.config.schema import CALLBACK_TYPES, IGNORED_TOP_LEVEL, RunConfig


def _walk(cls, prefix, out):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _walk(tp, f"{prefix}{f.name}.", out)
        else:
            out.append(f"{prefix}{f.name}")


def schema_keys():
    """Dotted keys: sections walked field by field; callbacks as callbacks.<type>.<key>; the
    mappings validated by their builders (model.model_config, optimizer, lr_schedule) by the
    keys those builders accept; the top-level keys set aside by config.load."""
    from mindformers_st.models.config import IGNORED_KEYS, LlamaConfig
    from mindformers_st.trainer import lr, optim

    out = []
    _walk(RunConfig, "", out)
    expanded = {
        "model.model_config": [f"model.model_config.{f.name}" for f in dataclasses.fields(LlamaConfig)]
        + [f"model.model_config.{k}" for k in sorted(IGNORED_KEYS)],
        "optimizer": [f"optimizer.{k}" for k in sorted(optim._KEYS)],
        "lr_schedule": [f"lr_schedule.{k}" for k in sorted(set().union(*lr._KEYS.values()))],
    }
    keys = []
    for k in out:
        keys.extend(expanded.get(k, [k]))
    for kind, cls in CALLBACK_TYPES.items():
        keys.extend(f"callbacks.{kind}.{f.name}" for f in dataclasses.fields(cls))
    keys.extend(IGNORED_TOP_LEVEL)
    return keys
