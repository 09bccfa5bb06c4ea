"""The parallel configuration (dp, mp, pp, optimizer shard) and the layouts it gives a model.

`plan_layouts(table, pc)` is the one place that decides how MindSpore Transformers' Llama is cut:
per stage the device matrix is `[dp, mp]`; a parameter's `split_dim` goes over mp (tensor_map
value 0); vocab-parallel parameters are split only when `vocab_emb_dp` is False; the optimizer
shard cuts dim 0 again over the parameter's replica group; pipeline stages come from `layer`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Tuple

from ..errors import LayoutError
from .param_table import ParamSpec, ParamTable
from .tensor_layout import TensorLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """MindSpore Transformers' `parallel_config` keys that decide the weight layout."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    optimizer_shard: bool = False
    vocab_emb_dp: bool = True
    micro_batch_num: int = 1

    def __post_init__(self):
        for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel_config.{key} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        """dp * mp * pp: the number of ranks this config needs."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (dp * mp)."""
        return self.data_parallel * self.model_parallel

    def check_world_size(self, world_size: int) -> None:
        """LayoutError unless dp * mp * pp equals `world_size` (the number of launched ranks)."""
        if self.world_size != world_size:
            raise LayoutError(
                f"data_parallel {self.data_parallel} x model_parallel {self.model_parallel} x "
                f"pipeline_stage {self.pipeline_stage} = {self.world_size}, but the world size is "
                f"{world_size}; change parallel_config or the number of launched workers")

    def to_json(self) -> dict:
        """The keys our safetensors metadata records (see docs/contracts.md)."""
        d = asdict(self)
        d.pop("micro_batch_num")
        return d

    @staticmethod
    def from_json(obj: Mapping) -> "ParallelConfig":
        """Inverse of `to_json`; unknown keys are ignored (older/newer writers)."""
        known = {k: obj[k] for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                     "optimizer_shard", "vocab_emb_dp", "micro_batch_num")
                 if k in obj}
        return ParallelConfig(**known)


def rank_coords(rank: int, pc: ParallelConfig) -> Tuple[int, int, int]:
    """(stage, dp_idx, mp_idx) of a global rank; rank = stage*dp*mp + dp_idx*mp + mp_idx."""
    if not 0 <= rank < pc.world_size:
        raise LayoutError(f"rank {rank} is outside the world of {pc.world_size} ranks "
                          f"(dp {pc.data_parallel} x mp {pc.model_parallel} x pp "
                          f"{pc.pipeline_stage})")
    stage, local = divmod(rank, pc.stage_size)
    dp_idx, mp_idx = divmod(local, pc.model_parallel)
    return stage, dp_idx, mp_idx


def stage_of(spec: ParamSpec, num_layers: int, pp: int) -> int:
    """The pipeline stage holding `spec`: layer -1 -> first, >= num_layers -> last, layers evenly."""
    if pp == 1:
        return 0
    if num_layers % pp:
        raise LayoutError(f"{num_layers} layers cannot be divided evenly over pipeline_stage {pp}; "
                          f"choose a pipeline_stage that divides num_layers")
    if spec.layer < 0:
        return 0
    if spec.layer >= num_layers:
        return pp - 1
    return spec.layer // (num_layers // pp)


def _layout_for(spec: ParamSpec, pc: ParallelConfig, stage: int) -> TensorLayout:
    dp, mp = pc.data_parallel, pc.model_parallel
    tensor_map = [-1] * len(spec.shape)
    split = spec.split_dim is not None and not (spec.vocab_parallel and pc.vocab_emb_dp)
    if split:
        if not 0 <= spec.split_dim < len(spec.shape):
            raise LayoutError(f"parameter {spec.name}: split_dim {spec.split_dim} is outside its "
                              f"shape {spec.shape}")
        if spec.shape[spec.split_dim] % mp:
            raise LayoutError(f"parameter {spec.name}: dim {spec.split_dim} of shape {spec.shape} "
                              f"({spec.shape[spec.split_dim]}) is not divisible by model_parallel "
                              f"{mp}; choose a model_parallel that divides it")
        tensor_map[spec.split_dim] = 0
    opt_step = opt_size = 0
    if pc.optimizer_shard and spec.shape:
        # The replica group: dp ranks for an mp-split tensor, all dp*mp ranks of the stage for a
        # replicated one (MindSpore shards over every repeated device, not only the dp axis).
        group = dp if split else dp * mp
        local0 = spec.shape[0] // (mp if split and spec.split_dim == 0 else 1)
        if group > 1 and local0 % group == 0:
            opt_size = group
            opt_step = mp if split else 1   # product of the device axes right of the group's axes
        elif group > 1:
            # As MindSpore does for a first dimension the group does not divide: the parameter
            # simply stays unsharded (replicated) for the optimizer.
            logger.debug("optimizer shard skipped for %s: dim 0 slice %d not divisible by %d",
                         spec.name, local0, group)
    return TensorLayout(spec.shape, (dp, mp), tuple(tensor_map), opt_step, opt_size, stage)


def plan_layouts(table: ParamTable, pc: ParallelConfig) -> Dict[str, TensorLayout]:
    """Every parameter's layout under `pc` (optimizer moments in `table` follow their parameter).

    Raises LayoutError naming the parameter and the numbers when a split dim is not divisible by
    model_parallel or the layers are not divisible by pipeline_stage."""
    if table.num_layers % pc.pipeline_stage:
        raise LayoutError(f"num_layers {table.num_layers} is not divisible by pipeline_stage "
                          f"{pc.pipeline_stage}; layers must be divided evenly over stages")
    layouts: Dict[str, TensorLayout] = {}
    for spec in table:
        if spec.name in layouts:
            raise LayoutError(f"parameter {spec.name} appears twice in the parameter table")
        stage = stage_of(spec, table.num_layers, pc.pipeline_stage)
        layouts[spec.name] = _layout_for(spec, pc, stage)
    return layouts


