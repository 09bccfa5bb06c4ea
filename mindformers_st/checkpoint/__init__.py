"""Training checkpoints: saving (`CheckpointMonitor`), loading (the load hook) and resume.

The records these read and write (file names, rank-file metadata, commit records, hyper values)
and the one folder scanner live in `mindformers_st.records`. Importing this package does not
import MindSpore.
"""
__all__ = ["CheckpointMonitor"]


def __getattr__(name):
    # CheckpointMonitor pulls in the trainer's callback protocol; load it on first use only.
    if name == "CheckpointMonitor":
        from .monitor import CheckpointMonitor
        return CheckpointMonitor
    raise AttributeError(name)
