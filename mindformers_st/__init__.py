"""mindformers-st: the safetensors weights lifecycle for MindSpore large-model training.

For MindSpore scripts: `mindformers_st.CheckpointMonitor` (a `mindspore.train.Callback`) and
`mindformers_st.load_checkpoint(network, path, optimizer=None, ...)`.

Layers (see docs/architecture.md): config -> models (parameter table) -> layout (who holds which
slice) -> transform (plans of byte ranges, one engine) -> storage (safetensors files).
"""

__version__ = "0.1.0"

__all__ = ["CheckpointMonitor", "load_checkpoint"]


def __getattr__(name):
    # The MindSpore-facing entry points load MindSpore; importing the package does not.
    if name == "CheckpointMonitor":
        from .checkpoint.monitor import CheckpointMonitor
        return CheckpointMonitor
    if name == "load_checkpoint":
        from .checkpoint.api import load_checkpoint
        return load_checkpoint
    raise AttributeError(name)
