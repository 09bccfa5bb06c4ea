"""The parallel context: rank, world size and the data/tensor-parallel groups of this process.

`init_parallel` reads the msrun environment (through `mindspore.communication.init`), checks
that dp x mp x pp equals the world size, and creates one communication group per data-parallel
and per model-parallel replica set. Rank order is MindSpore's: rank = stage*dp*mp + dp_idx*mp +
mp_idx (the last axis varies fastest), the same as `layout.rank_coords`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError, LayoutError

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """What this process is in the parallel job.

    dp_group / mp_group are MindSpore communication group names, or None when that axis has
    size 1 (no communication needed). Under pipeline parallelism prev_group / next_group are the
    2-rank groups with the same (dp, mp) position on the previous / next stage (None on the
    first / last stage), and pp_group holds that position on every stage. `config` is the
    ParallelConfig actually in force (all ones when use_parallel is False).
    """

    rank: int
    world_size: int
    config: Any                    # layout.ParallelConfig
    dp_group: Optional[str] = None
    mp_group: Optional[str] = None
    world_group: Optional[str] = None
    prev_group: Optional[str] = None
    next_group: Optional[str] = None
    pp_group: Optional[str] = None
    device_target: str = "CPU"
    use_parallel: bool = False
    seed: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that writes shared files)."""
        return self.rank == 0

    @property
    def coords(self) -> Tuple[int, int, int]:
        """(stage, dp_idx, mp_idx) of this rank."""
        dp, mp = self.config.data_parallel, self.config.model_parallel
        per_stage = dp * mp
        stage, local = divmod(self.rank, per_stage)
        return stage, local // mp, local % mp

    @property
    def stage(self) -> int:
        """This rank's pipeline stage (0 without pipeline parallelism)."""
        return self.coords[0]

    @property
    def dp_rank(self) -> int:
        """Index of this rank in its data-parallel group."""
        return self.coords[1]

    @property
    def mp_rank(self) -> int:
        """Index of this rank in its model-parallel (tensor-parallel) group."""
        return self.coords[2]

    @property
    def dp_size(self) -> int:
        return self.config.data_parallel

    @property
    def mp_size(self) -> int:
        return self.config.model_parallel

    def local_batch(self, global_batch):
        """The rows of `global_batch` (first dim = global batch size) this rank trains on:
        the contiguous dp_rank-th of data_parallel equal shares (same rows on every mp rank)."""
        dp = self.config.data_parallel
        n = len(global_batch)
        if n % dp:
            raise ConfigError(f"global batch of {n} rows is not divisible by data_parallel {dp}; "
                              "set batch_size so that batch_size * data_parallel rows are fed")
        k = n // dp
        return global_batch[self.dp_rank * k:(self.dp_rank + 1) * k]

    def layouts(self, table) -> Dict[str, Any]:
        """`plan_layouts(table, self.config)`: every parameter's TensorLayout for this job."""
        from ..layout.parallel_config import plan_layouts
        return plan_layouts(table, self.config)

    def all_reduce_sum(self, values):
        """Element-wise sum over every rank of small non-negative integers (flags, bytes,
        lengths below 2**24): the CPU AllReduce takes float only, exact for those in float32."""
        import numpy as np
        values = np.asarray(values)
        if self.world_size <= 1 or self.world_group is None:
            return values.astype(np.int64)
        from mindspore import Tensor, ops
        out = ops.AllReduce(group=self.world_group)(Tensor(values.astype(np.float32))).asnumpy()
        return np.rint(out).astype(np.int64)

    def barrier(self) -> None:
        """Block until every rank of the job reaches this point (no-op on one card).

        An AllReduce of one number on the world group: CPU supports it everywhere, and
        reading the result back forces completion.
        """
        if self.world_size <= 1 or self.world_group is None:
            return
        import numpy as np
        from mindspore import Tensor, ops
        ops.AllReduce(group=self.world_group)(Tensor(np.zeros(1, np.float32))).asnumpy()


_COMM_READY = False
_GROUPS: set = set()


def _set_device(ms, device_target: str) -> None:
    """Set the device once; MindSpore refuses a second set_device even with the same value."""
    try:
        ms.set_device(device_target)
    except RuntimeError as err:
        current = ms.get_context("device_target")
        if current != device_target:
            raise ConfigError(f"device_target {device_target!r} requested but this process "
                              f"already runs on {current!r}; MindSpore cannot switch devices "
                              "within a process") from err


def _single_card_config(pc):
    """`pc` with every parallel axis set to 1 (keeps vocab_emb_dp and other flags)."""
    changes = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}
    if hasattr(pc, "optimizer_shard"):
        changes["optimizer_shard"] = False
    if hasattr(pc, "micro_batch_num"):
        changes["micro_batch_num"] = 1
    return dataclasses.replace(pc, **changes)


def init_parallel(pc, use_parallel: bool, device_target: str = "CPU",
                  seed: int = 0) -> ParallelContext:
    """Set the MindSpore device and mode, and (use_parallel) init communication and groups.

    - use_parallel False: one card, no communication; the returned config is `pc` with dp, mp,
      pp set to 1 (a warning is logged if `pc` asked for more).
    - use_parallel True: `mindspore.communication.init()` under msrun; LayoutError if
      dp*mp*pp != world size; one group per dp replica set and per mp set (created only for
      the sets this rank belongs to, which is what CPU collectives need).
    Seeds MindSpore's global RNG with `seed` (same on every rank).
    """
    import mindspore as ms

    if not isinstance(device_target, str) or not device_target:
        raise ConfigError(f"context.device_target must be a device name such as 'CPU' or "
                          f"'Ascend', got {device_target!r}")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    _set_device(ms, device_target)
    if device_target == "CPU":
        # On CPU there is no device to overlap with, and PyNative's asynchronous dispatch
        # threads cost ~20x on small ops on a busy 2-core host (measured: a tiny Llama forward
        # 1.0 s async vs 0.05 s synchronous). Other devices keep asynchronous launch.
        ms.runtime.launch_blocking()
    ms.set_seed(int(seed))
    dp, mp, pp = pc.data_parallel, pc.model_parallel, pc.pipeline_stage
    for key, v in (("data_parallel", dp), ("model_parallel", mp), ("pipeline_stage", pp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"parallel_config.{key} must be a positive int, got {v!r}")

    if not use_parallel:
        if dp * mp * pp != 1:
            logger.warning("use_parallel is False: ignoring parallel_config dp=%d mp=%d pp=%d "
                           "and running on one card", dp, mp, pp)
        return ParallelContext(rank=0, world_size=1, config=_single_card_config(pc),
                               device_target=device_target, use_parallel=False, seed=seed)

    from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        logger.warning("use_parallel is True but no msrun environment was found "
                       "(MS_WORKER_NUM unset); launch with msrun / scripts/msrun_launcher.sh")
    global _COMM_READY
    if not _COMM_READY:       # init() may run once per process; later calls reuse it
        init()
        _COMM_READY = True
    rank, world = get_rank(), get_group_size()
    if dp * mp * pp != world:
        raise LayoutError(
            f"parallel_config data_parallel({dp}) x model_parallel({mp}) x pipeline_stage({pp}) "
            f"= {dp * mp * pp}, but msrun started {world} workers; make them equal "
            "(change parallel_config or --worker_num).")
    world_group = GlobalComm.WORLD_COMM_GROUP
    per_stage = dp * mp
    stage, local = divmod(rank, per_stage)
    dp_idx, mp_idx = divmod(local, mp)
    base = stage * per_stage
    dp_ranks = [base + i * mp + mp_idx for i in range(dp)]
    mp_ranks = [base + dp_idx * mp + j for j in range(mp)]
    dp_group = _group(f"mfst_dp_s{stage}_m{mp_idx}", dp_ranks, world, world_group, create_group)
    mp_group = _group(f"mfst_mp_s{stage}_d{dp_idx}", mp_ranks, world, world_group, create_group)
    # Pipeline: one 2-rank group per pair of neighbouring stages at the same (dp, mp) position
    # (a transfer between them is an all-reduce where the receiver adds zeros: CPU has no
    # Send/Receive), and one group of that position over every stage (loss broadcast).
    def pair(s):
        return _group(f"mfst_pp_s{s}_d{dp_idx}_m{mp_idx}",
                      [s * per_stage + local, (s + 1) * per_stage + local], world, world_group,
                      create_group)
    prev_group = pair(stage - 1) if stage > 0 else None
    next_group = pair(stage) if stage < pp - 1 else None
    if pp == 2:
        pp_group = prev_group or next_group
    else:
        pp_group = _group(f"mfst_ppcol_d{dp_idx}_m{mp_idx}",
                          [s * per_stage + local for s in range(pp)], world, world_group,
                          create_group)
    logger.info("rank %d/%d: stage %d dp %d/%d mp %d/%d, dp_group=%s mp_group=%s pp_group=%s",
                rank, world, stage, dp_idx, dp, mp_idx, mp, dp_group, mp_group, pp_group)
    return ParallelContext(rank=rank, world_size=world, config=pc, dp_group=dp_group,
                           mp_group=mp_group, world_group=world_group, prev_group=prev_group,
                           next_group=next_group, pp_group=pp_group,
                           device_target=device_target, use_parallel=True, seed=seed)


def _group(name, ranks, world, world_group, create_group) -> Optional[str]:
    """A group over `ranks`: None for one rank, the world group when it is everyone."""
    if len(ranks) == 1:
        return None
    if len(ranks) == world:
        return world_group
    if name not in _GROUPS:       # a group name can be created only once per process
        create_group(name, ranks)
        _GROUPS.add(name)
    return name


def group_for_ranks(ctx: ParallelContext, ranks) -> Optional[str]:
    """A communication group over exactly `ranks` (which hold `ctx.rank`): None for one rank,
    the world group for all, this rank's dp or mp group when it is that set, else a group
    created the first time it is asked for (every member must ask for it at the same point of
    its collective order, as for any collective)."""
    ranks = sorted(int(r) for r in ranks)
    if ctx.rank not in ranks:
        raise ValueError(f"rank {ctx.rank} asked for a group it is not in: {ranks}")
    if len(ranks) == 1:
        return None
    if len(ranks) == ctx.world_size:
        return ctx.world_group
    dp, mp = ctx.config.data_parallel, ctx.config.model_parallel
    stage, dp_idx, mp_idx = ctx.coords
    base = stage * dp * mp
    if ranks == [base + i * mp + mp_idx for i in range(dp)] and ctx.dp_group:
        return ctx.dp_group
    if ranks == [base + dp_idx * mp + j for j in range(mp)] and ctx.mp_group:
        return ctx.mp_group
    import hashlib
    from mindspore.communication import create_group
    name = "mfst_set_" + hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:16]
    return _group(name, ranks, ctx.world_size, ctx.world_group, create_group)


def context_from_mindspore() -> ParallelContext:
    """The job as MindSpore's own training sees it (a script using `Model.train`): rank and world
    size from `mindspore.communication` when it was initialised (msrun, DATA_PARALLEL), else one
    card. The ParallelConfig is pure data parallelism over the world; collectives use the world
    group."""
    from ..layout.parallel_config import ParallelConfig
    try:
        from mindspore.communication import GlobalComm, get_group_size, get_rank
        inited = bool(getattr(GlobalComm, "INITED", False))
    except ImportError:   # pragma: no cover - MindSpore is a dependency
        inited = False
    if not inited:
        return ParallelContext(rank=0, world_size=1, config=ParallelConfig())
    rank, world = get_rank(), get_group_size()
    return ParallelContext(rank=rank, world_size=world, config=ParallelConfig(data_parallel=world),
                           dp_group=GlobalComm.WORLD_COMM_GROUP if world > 1 else None,
                           world_group=GlobalComm.WORLD_COMM_GROUP, use_parallel=world > 1)
