"""What one rank's training checkpoint holds, and how that file is written.

`snapshot_rank` collects this rank's local slices of a network's tensors (weights, optimizer
moments; checkpoint.network says which and how they are laid out), the optimizer's
`global_step` and the whole-valued hyper tensors a resume needs (epoch_num,
step_num, loss_scale, global_batch_size, learning_rate, data_position, seed), plus the
`__metadata__` self-description of contracts.md. Under `remove_redundancy` only the slices this
rank owns (layout.owners: each distinct slice written once, balanced over its replicas) are
taken; scalars are written by every rank, as MindSpore does for tensors without a layout.

`write_rank_file` writes a snapshot as safetensors (streaming writer, xxh3 checksums, atomic)
or as a MindSpore `.ckpt` (mindspore.save_checkpoint, then fsync and rename: atomic too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Set

import numpy as np

from ..errors import CheckpointError
from ..layout.owners import assign_owners, owned_by
from ..layout.slices import TensorSlice
from ..records.hyper import GLOBAL_STEP, GLOBAL_STEP_DTYPE, SAVE_HYPER_DTYPES as HYPER_DTYPES
from ..records.hyper import is_hyper
from .ckpt_format import as_standard_dtype
from ..records.rank_meta import RankFileMeta, save_id_of
from ..dtypes import numpy_to_st
from ..storage.atomic import atomic_path
from ..storage.writer import SafetensorsWriter

logger = logging.getLogger(__name__)


@dataclass
class RankSnapshot:
    """The arrays of one rank's save, in file order, and how to describe them.

    `slices` has an entry for every sliced tensor (parameters and moments); scalars have none.
    Arrays are views of live parameters unless `copied` (async saves must copy)."""

    arrays: Dict[str, np.ndarray]
    slices: Dict[str, TensorSlice]
    meta: RankFileMeta
    copied: bool = False
    network_names: tuple = ()        # the parameters among `arrays` (for checkpoint_network/)
    trainable_names: tuple = ()      # the trainable ones (for checkpoint_trainable/)
    deferred: list = field(default_factory=list)   # (live view, buffer) copies `fill` still owes

    def fill(self) -> None:
        """Take a deferred snapshot: copy each live tensor into its buffer. Must run before the
        arrays are read and before the live tensors change (snapshot_rank(defer=True))."""
        for live, buf in self.deferred:
            np.copyto(buf, live)
        self.deferred = []

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def metadata(self) -> Dict[str, str]:
        """The file's `__metadata__` (records.rank_meta)."""
        return self.meta.to_metadata()

    def subset(self, names) -> "RankSnapshot":
        """A snapshot of `names` only (same metadata, slices filtered), sharing the arrays: a
        deferred snapshot's subset is filled by the snapshot's own `fill()`."""
        names = [n for n in self.arrays if n in set(names)]
        return RankSnapshot({n: self.arrays[n] for n in names},
                            {n: self.slices[n] for n in names if n in self.slices},
                            self.meta.subset(names), self.copied)


def owned_names(state, ctx) -> Set[str]:
    """Names of the tensors (of `state`, a checkpoint.network.NetworkState) this rank writes
    under remove_redundancy.

    Every rank computes the same assignment alone (layout.owners is deterministic); a rank holds
    one block per tensor, so owning a tensor means owning exactly the slice it holds."""
    layouts = state.layouts
    mine = owned_by(assign_owners(layouts, state.dtypes), ctx.rank)
    for name, block in mine.items():
        held = layouts[name].slice_for(ctx.rank)
        if block != held:   # would mean owners.py and the layouts disagree: never write wrong bytes
            raise CheckpointError(f"{name}: remove_redundancy gave rank {ctx.rank} the block {block} "
                                  f"but it holds {held}; the owner assignment is inconsistent")
    return set(mine)


def _live(param, copy: bool, buffers: Optional[Dict[str, np.ndarray]] = None,
          deferred: Optional[list] = None) -> np.ndarray:
    # asnumpy() shares the parameter's memory on CPU: a save that runs while training
    # continues (async) must copy, a synchronous one can write straight from it.
    arr = as_standard_dtype(param.asnumpy())
    if not copy:
        return arr
    if buffers is None:
        return np.array(arr, copy=True)
    # Reusing last save's buffers skips allocating and page-faulting hundreds of MB per save.
    buf = buffers.get(param.name)
    if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
        logger.warning("%s: no snapshot buffer of shape %s %s was allocated at train begin; "
                       "allocating one now (this save blocks longer)", param.name,
                       tuple(arr.shape), arr.dtype)
        buf = buffers[param.name] = np.empty_like(arr)
    if deferred is not None:
        deferred.append((arr, buf))
    else:
        np.copyto(buf, arr)
    return buf


def rank_slices_of(state, ctx) -> Dict[str, TensorSlice]:
    """{name: this rank's slice} of every tensor of `state` with a layout (what snapshot_rank
    takes as `rank_slices`; layouts do not change during a run)."""
    return {name: lay.slice_for(ctx.rank) for name, lay in state.layouts.items()}


def snapshot_buffers(state, ctx, remove_redundancy: bool = False,
                     owned: Optional[Set[str]] = None) -> Dict[str, np.ndarray]:
    """One buffer per sliced tensor this rank saves of `state` (the arrays `snapshot_rank`
    copies with `copy=True`), shaped and typed as the live tensor and touched once, so an
    async save's snapshot is a plain copy into memory that is already mapped: allocating and
    page-faulting hundreds of MB at the save step would block training as long as the copy."""
    buffers: Dict[str, np.ndarray] = {}
    layouts = state.layouts
    for name, p in state.parameters().items():
        if name not in layouts or (remove_redundancy and name not in (owned or ())):
            continue
        live = _live(p, False)
        buf = np.empty_like(live)
        buf.reshape(-1).view(np.uint8).fill(0)   # fault every page in now, not in the first save
        buffers[name] = buf
    return buffers


def snapshot_rank(state, ctx, *, epoch: int, step: int, hyper: Mapping[str, float],
                  remove_redundancy: bool = False, owned: Optional[Set[str]] = None,
                  copy: bool = False, buffers: Optional[Dict[str, np.ndarray]] = None,
                  run_id: Optional[str] = None, defer: bool = False,
                  rank_slices: Optional[Mapping[str, TensorSlice]] = None) -> RankSnapshot:
    """This rank's save of `state` (a checkpoint.network.NetworkState): every tensor it holds
    (weights, optimizer moments and counters, under MindSpore's names), then the hyper tensors.

    `epoch`/`step` are the file-name numbers; `hyper` gives a value for every HYPER_DTYPES name
    (a network tensor of the same name, e.g. MindSpore's `learning_rate` parameter, wins). With
    remove_redundancy, `owned` (from owned_names) limits the sliced tensors written; tensors
    without a layout (global_step and other counters) are written whole by every rank. `copy`
    takes copies (for async saves), into `buffers` {name: array} when given: the caller must not
    reuse them before the previous snapshot's file is written. `run_id` (the same on every rank
    of the run) gives the file its save identity (records.rank_meta run_id, save_id). `defer`
    (with `copy` and `buffers`) leaves the copies to the snapshot's `fill()`: the arrays are the
    buffers, still to be filled from views of the live tensors. `rank_slices` ({name:
    layouts[name].slice_for(rank)}, from `rank_slices_of`) spares recomputing them per save."""
    missing = sorted(set(HYPER_DTYPES) - set(hyper))
    if missing:
        raise CheckpointError(f"snapshot: hyper values {missing} are missing; a save needs all of "
                              f"{sorted(HYPER_DTYPES)}")
    if remove_redundancy and owned is None:
        raise CheckpointError("snapshot: remove_redundancy needs the owned tensor names (owned_names)")
    params = state.parameters()
    layouts = state.layouts
    unknown = sorted(n for n in params if n not in layouts and not is_hyper(n))
    if unknown:
        raise CheckpointError(f"snapshot: {unknown[:5]} have no layout; the network and its layouts "
                              f"disagree, so this save could not be resharded")
    if defer and not (copy and buffers is not None):
        raise CheckpointError("snapshot: defer needs copy=True and buffers")
    arrays: Dict[str, np.ndarray] = {}
    slices: Dict[str, TensorSlice] = {}
    deferred: list = [] if defer else None
    for name, p in params.items():
        lay = layouts.get(name)
        if lay is None:   # a whole-valued counter: every rank writes it
            arr = np.array(_live(p, True, None), copy=True)
            arrays[name] = arr.astype(GLOBAL_STEP_DTYPE) if name == GLOBAL_STEP else arr
            continue
        if remove_redundancy and name not in owned:
            continue
        sl = rank_slices[name] if rank_slices is not None else lay.slice_for(ctx.rank)
        arr = _live(p, copy, buffers, deferred)
        if tuple(arr.shape) != tuple(sl.sizes):
            raise CheckpointError(f"snapshot: {name} holds {tuple(arr.shape)} on rank {ctx.rank} but its "
                                  f"layout says {tuple(sl.sizes)}; refusing to save a wrong slice")
        arrays[name], slices[name] = arr, sl
    for name, dtype in HYPER_DTYPES.items():
        if name not in arrays:
            arrays[name] = np.array(hyper[name], dtype=dtype)

    pc = ctx.config
    meta = RankFileMeta(int(ctx.rank), int(ctx.world_size), dict(slices),
                        pc.to_json() if hasattr(pc, "to_json") else {}, bool(remove_redundancy),
                        int(epoch), int(step), run_id=run_id,
                        save_id=None if run_id is None else save_id_of(run_id, epoch, step))
    network = tuple(n for n in state.weights if n in arrays)
    trainable = tuple(n for n in state.trainable(params) if n in arrays)
    return RankSnapshot(arrays, slices, meta, copy, network, trainable, deferred or [])


def write_rank_file(path: str, snap: RankSnapshot, fmt: str = "safetensors",
                    enc_key: Optional[bytes] = None, enc_mode: str = "AES-GCM") -> str:
    """Write `snap` to `path` atomically and durably; returns the path.

    safetensors: streamed, checksummed, fsynced and renamed by storage.SafetensorsWriter.
    ckpt: mindspore.save_checkpoint into a hidden temporary name, then fsync, rename, folder fsync
    (MindSpore renames but does not fsync, and a crash must never leave a half file under `path`),
    encrypted by MindSpore with `enc_key`/`enc_mode` when a key is given."""
    if enc_key is not None and fmt != "ckpt":
        raise CheckpointError("enc_key: only ckpt files are encrypted (as MindSpore)")
    if fmt == "safetensors":
        specs = [(n, numpy_to_st(a.dtype), a.shape) for n, a in snap.arrays.items()]
        with SafetensorsWriter(path, specs, metadata=snap.metadata) as w:
            for n, a in snap.arrays.items():
                w.write(n, a)
        return path
    if fmt != "ckpt":
        raise CheckpointError(f"checkpoint_format {fmt!r}: use 'safetensors' or 'ckpt'")
    import mindspore as ms

    from .ckpt_format import ckpt_description
    encrypt = {} if enc_key is None else {"enc_key": enc_key, "enc_mode": enc_mode}
    items = [{"name": n, "data": ms.Tensor(a)} for n, a in snap.arrays.items()]
    # The temporary name ends in .ckpt so MindSpore does not append another suffix.
    with atomic_path(path, suffix=".tmp.ckpt") as tmp:
        ms.save_checkpoint(items, tmp, append_dict=ckpt_description(snap.metadata), **encrypt)
    return path
