"""MindRecord files in and out: write token rows, read them back as per-rank batches.

Training data order is decided here, not by MindSpore's shuffle: for epoch e the sample order is
a permutation drawn from (seed, e); global batch b holds samples [b*G, (b+1)*G) of it (G =
batch_size x data_parallel) and data-parallel rank d gets rows [d*batch_size, (d+1)*batch_size)
of that global batch. So the order is the same for any number of model-parallel ranks, a resumed
run can start at any (epoch, step), and every dp rank reads only its own rows.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def write_mindrecord(path: str, columns: Dict[str, np.ndarray], description: str = "tokens") -> str:
    """Write equal-length int32 rows (`columns[name]` is [N, L]) to the MindRecord file `path`.

    An existing file (and its .db index) is replaced. Returns `path`.
    """
    from mindspore.mindrecord import FileWriter

    n = {len(v) for v in columns.values()}
    if len(n) != 1 or not n or 0 in n:
        raise ConfigError(f"write_mindrecord {path}: columns need the same, non-zero number of "
                          f"rows, got { {k: len(v) for k, v in columns.items()} }")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in (path, path + ".db"):
        if os.path.exists(stale):
            os.remove(stale)
    writer = FileWriter(file_name=path, shard_num=1, overwrite=True)
    schema = {name: {"type": "int32", "shape": [-1]} for name in columns}
    writer.add_schema(schema, description)
    rows = [{name: np.ascontiguousarray(col[i], np.int32) for name, col in columns.items()}
            for i in range(next(iter(n)))]
    for start in range(0, len(rows), 1000):
        writer.write_raw_data(rows[start:start + 1000])
    writer.commit()
    logger.info("wrote %d rows (%s) to %s", len(rows), ", ".join(columns), path)
    return path


def mindrecord_files(dataset_dir: str) -> List[str]:
    """The MindRecord file(s) that `dataset_dir` names: a file, or the files in a folder."""
    if not dataset_dir:
        raise ConfigError("train_dataset.data_loader.dataset_dir is empty; pass "
                          "--train_dataset_dir /path/to/data.mindrecord")
    if os.path.isfile(dataset_dir):
        why = _not_mindrecord(dataset_dir)
        if why:
            raise ConfigError(f"config key 'train_dataset.data_loader.dataset_dir' "
                              f"(--train_dataset_dir): {dataset_dir} is not a MindRecord file "
                              f"({why}); build one with `python -m mindformers_st.data "
                              f"pretrain|finetune`")
        return [dataset_dir]
    if os.path.isdir(dataset_dir):
        files = sorted(f for f in glob.glob(os.path.join(dataset_dir, "*"))
                       if os.path.isfile(f) and not f.endswith(".db")
                       and os.path.exists(f + ".db"))
        if files:
            return files
    raise ConfigError(f"config key 'train_dataset.data_loader.dataset_dir' (--train_dataset_dir): "
                      f"{dataset_dir!r}: no MindRecord file (with its .db index) found; "
                      f"build one with `python -m mindformers_st.data pretrain|finetune`")


def _not_mindrecord(path: str) -> str:
    """Why `path` is not a MindRecord shard MindSpore can open ('' when it looks like one): the
    file starts with its header's length (uint64, little-endian) and the header's JSON, and
    its `.db` index sits next to it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8 + 16)
        size = os.path.getsize(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if len(head) < 24 or int.from_bytes(head[:8], "little") > size \
            or not head[8:].startswith(b'{"header_size"'):
        return "no MindRecord header"
    if not os.path.isfile(path + ".db"):
        return f"its index {os.path.basename(path)}.db is missing"
    return ""


@dataclass
class BatchPlan:
    """How the data is cut into steps: samples, global batch size, steps per epoch."""

    num_samples: int
    batch_size: int          # per data-parallel rank
    data_parallel: int
    drop_remainder: bool = True

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.data_parallel

    @property
    def steps_per_epoch(self) -> int:
        full = self.num_samples // self.global_batch
        if not self.drop_remainder and self.num_samples % self.global_batch:
            raise ConfigError("drop_remainder False is not supported (every dp rank needs a full "
                              "batch); set train_dataset.drop_remainder: True")
        return full


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The sample order of `epoch`: a permutation from (seed, epoch), or 0..N-1 unshuffled."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_indices(plan: BatchPlan, epoch: int, dp_rank: int, seed: int, shuffle: bool,
                 start_step: int = 0) -> np.ndarray:
    """Sample indices this dp rank reads in `epoch` from `start_step` on, in batch order."""
    order = epoch_order(plan.num_samples, epoch, seed, shuffle)
    gb, bs = plan.global_batch, plan.batch_size
    steps = range(start_step, plan.steps_per_epoch)
    parts = [order[s * gb + dp_rank * bs: s * gb + (dp_rank + 1) * bs] for s in steps]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class TrainData:
    """The training batches of one dp rank, read from MindRecord with MindDataset.

    `batches(epoch, start_step)` yields dicts column -> int32 array [batch_size, L].
    """

    def __init__(self, dataset_dir: str, columns: Sequence[str], batch_size: int,
                 data_parallel: int, dp_rank: int, seed: int, shuffle: bool = True,
                 num_samples: Optional[int] = None, drop_remainder: bool = True,
                 num_parallel_workers: int = 1):
        import mindspore.dataset as ds

        self.files = mindrecord_files(dataset_dir)
        self.columns = list(columns)
        probe = ds.MindDataset(self.files, columns_list=self.columns, shuffle=False)
        total = probe.get_dataset_size()
        if num_samples is not None:
            total = min(total, num_samples)
        self.plan = BatchPlan(total, batch_size, data_parallel, drop_remainder)
        if self.plan.steps_per_epoch == 0:
            raise ConfigError(f"dataset {dataset_dir!r} has {total} samples, fewer than one "
                              f"global batch ({batch_size} x data_parallel {data_parallel}); "
                              f"lower runner_config.batch_size or build more data")
        self.dp_rank, self.seed, self.shuffle = dp_rank, seed, shuffle
        self.workers = max(1, num_parallel_workers)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
        """This rank's batches of `epoch`, starting at step `start_step` of that epoch."""
        import mindspore.dataset as ds

        idx = rank_indices(self.plan, epoch, self.dp_rank, self.seed, self.shuffle, start_step)
        if len(idx) == 0:
            return
        sampler = ds.SubsetSampler([int(i) for i in idx])
        data = ds.MindDataset(self.files, columns_list=self.columns, sampler=sampler,
                              num_parallel_workers=self.workers)
        data = data.batch(self.plan.batch_size, drop_remainder=True)
        for row in data.create_dict_iterator(num_epochs=1, output_numpy=True):
            yield {k: np.asarray(v, np.int32) for k, v in row.items()}


def read_all(dataset_dir: str, columns: Sequence[str]) -> Dict[str, np.ndarray]:
    """Every row of the MindRecord file(s), in file order (for tests and inspection)."""
    import mindspore.dataset as ds

    data = ds.MindDataset(mindrecord_files(dataset_dir), columns_list=list(columns), shuffle=False)
    rows = list(data.create_dict_iterator(num_epochs=1, output_numpy=True))
    return {c: np.stack([r[c] for r in rows]) for c in columns}
