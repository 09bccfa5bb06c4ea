"""Training checkpoints: saving (`CheckpointMonitor`, commit protocol) and loading/resume.

`commit.committed_saves(directory)` is the one answer to "which saves can resume use" for both
the saver and the loader. Importing this package does not import MindSpore.
"""
from .commit import (COMMITTED_FILE, META_FILE, CommittedSave, ckpt_file_name, committed_saves,
                     parse_ckpt_name, read_rank_meta)

__all__ = ["COMMITTED_FILE", "META_FILE", "CommittedSave", "ckpt_file_name", "committed_saves",
           "parse_ckpt_name", "read_rank_meta", "CheckpointMonitor"]


def __getattr__(name):
    # CheckpointMonitor pulls in the trainer's callback protocol; load it on first use only.
    if name == "CheckpointMonitor":
        from .monitor import CheckpointMonitor
        return CheckpointMonitor
    raise AttributeError(name)
