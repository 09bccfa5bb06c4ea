"""Who holds which slice: layouts (MindSpore semantics), parallel config, save owners, strategy files.

Pure Python; never imports MindSpore (strategy.py loads MindSpore's generated protobuf module by
file path only).
"""
from .owners import assign_owners, bytes_per_rank, owned_by
from .param_table import ITEMSIZE, ParamSpec, ParamTable
from .parallel_config import (ParallelConfig, plan_layouts, rank_coords,
                              stage_of)
from .slices import TensorSlice
from .strategy import (read_strategy, strategy_file_name, write_merged_strategy_file,
                       write_rank_strategy_files, write_strategy_file)
from .tensor_layout import TensorLayout, layouts_equivalent, rank_slices

__all__ = [
    "ITEMSIZE", "ParamSpec", "ParamTable", "ParallelConfig", "TensorLayout", "TensorSlice",
    "assign_owners", "bytes_per_rank", "layouts_equivalent", "owned_by",
    "plan_layouts", "rank_coords", "rank_slices", "read_strategy", "stage_of",
    "strategy_file_name", "write_merged_strategy_file",
    "write_rank_strategy_files", "write_strategy_file",
]
