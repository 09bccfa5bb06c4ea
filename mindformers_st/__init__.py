"""mindformers-st: the safetensors weights lifecycle for MindSpore large-model training.

Layers (see docs/architecture.md): config -> models (parameter table) -> layout (who holds which
slice) -> transform (plans of byte ranges, one engine) -> storage (safetensors files).
"""

__version__ = "0.1.0"
