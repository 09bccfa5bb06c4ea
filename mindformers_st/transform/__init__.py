"""Transform: every move of weights is a `Plan` (pure data) executed by one engine.

Describe a source (`describe_source`), plan a target (`plan_merge`, `plan_distributed`,
`plan_rank_slices`), then `execute` (to a folder, atomically) or `execute_to_memory`.
"""
from .plan import CopyOp, Plan, TargetFile, TargetTensor
from .sources import (SourceCheckpoint, SourceChunk, describe_complete, describe_distributed,
                      describe_source)
from .planner import (format_stats, plan_distributed, plan_merge, plan_rank_slices, plan_stats,
                      split_plan)
from .execute import commit_folder, execute, execute_files, execute_to_memory, staging_folder

__all__ = [
    "CopyOp", "Plan", "TargetFile", "TargetTensor", "SourceCheckpoint", "SourceChunk",
    "describe_complete", "describe_distributed", "describe_source", "plan_merge",
    "plan_distributed", "plan_rank_slices", "split_plan", "plan_stats", "format_stats",
    "execute", "execute_files", "execute_to_memory", "commit_folder", "staging_folder",
]
