"""`health_ckpts.json`: MindSpore Transformers' record of which saves are healthy.

A JSON list of `{"is_health": 0|1, "ckpt_name": "<rank-0 file name>"}`, one entry per save,
appended by rank 0 when `use_checkpoint_health_monitor` is on. `is_health` is 0 for a healthy
save and 1 when the embedding local norm reached `embedding_local_norm_threshold` (MindSpore
Transformers compares it only when pipeline_stage > 1).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List

from ..storage.atomic import atomic_write_text

HEALTH_FILE = "health_ckpts.json"


@dataclass(frozen=True)
class HealthEntry:
    """One save's health: 0 healthy, 1 not."""

    is_health: int
    ckpt_name: str

    def to_json(self) -> dict:
        return {"is_health": int(self.is_health), "ckpt_name": self.ckpt_name}

    @classmethod
    def from_json(cls, obj, where: str) -> "HealthEntry":
        if not isinstance(obj, dict) or not isinstance(obj.get("ckpt_name"), str) \
                or obj.get("is_health") not in (0, 1) or isinstance(obj.get("is_health"), bool):
            raise ValueError(f"{where}: entry {obj!r} is not {{\"is_health\": 0|1, \"ckpt_name\": str}}")
        return cls(int(obj["is_health"]), obj["ckpt_name"])


def read_health(folder: str) -> List[HealthEntry]:
    """The entries of `folder/health_ckpts.json` ([] when there is none). ValueError naming the
    file when it is not a list of entries."""
    path = os.path.join(folder, HEALTH_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, "r", encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc}); delete it to start a new record") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: must hold a list of entries, got {type(data).__name__}")
    return [HealthEntry.from_json(e, path) for e in data]


def append_health(folder: str, entry: HealthEntry) -> str:
    """Add `entry` to `folder/health_ckpts.json` (written whole and atomically); returns the path."""
    entries = read_health(folder) + [entry]
    os.makedirs(folder, exist_ok=True)
    return atomic_write_text(os.path.join(folder, HEALTH_FILE),
                             json.dumps([e.to_json() for e in entries], indent=4) + "\n")
