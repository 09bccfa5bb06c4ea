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


def key_table() -> str:
    """The rows of docs/runtime.md "Every key", from the walk's registry and the no-effect tables
    (print them with `python -m tests.config.key_walk_keys` after adding a key)."""
    from mindformers_st.config.schema import NO_EFFECT_MONITOR, NO_EFFECT_TOP_LEVEL
    from mindformers_st.config.unused_keys import IGNORED_WHY, NO_EFFECT_KEYS, NO_EFFECT_LOSS_MONITOR
    from mindformers_st.models.config import NO_EFFECT_FIELDS
    from tests.config import test_key_walk as walk

    def why(k):
        leaf = k.split(".")[-1]
        for table, key in ((NO_EFFECT_TOP_LEVEL, k), (NO_EFFECT_KEYS, k), (IGNORED_WHY, k)):
            if key in table:
                return table[key]
        if k.startswith("callbacks.CheckpointMonitor.") and leaf in NO_EFFECT_MONITOR:
            return NO_EFFECT_MONITOR[leaf]
        if k.startswith("callbacks.MFLossMonitor.") and leaf in NO_EFFECT_LOSS_MONITOR:
            return NO_EFFECT_LOSS_MONITOR[leaf]
        if leaf in NO_EFFECT_FIELDS:
            return NO_EFFECT_FIELDS[leaf]
        return "this runtime does not implement it (docs/models.md)"

    rows = ["| key | behaviour | test |", "|---|---|---|"]
    for k in schema_keys():
        if k in walk.TESTED:
            e = walk.TESTED[k]
            rows.append(f"| `{k}` | honoured, as MindSpore Transformers | "
                        f"{e[0] if isinstance(e, tuple) else e} |")
        elif k in walk.REFUSED:
            rows.append(f"| `{k}` | refused with a ConfigError naming it (see the rules above) | "
                        f"tests/config/test_key_walk.py (refused) |")
        elif k in walk.DOCUMENTED:
            rows.append(f"| `{k}` | cannot change behaviour here (table above) | documented |")
        else:
            rows.append(f"| `{k}` | warned by name when set: {why(k)} | "
                        f"tests/config/test_key_walk.py (warned) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(key_table())
