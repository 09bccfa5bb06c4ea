"""Error types every layer raises, so callers can catch them by kind.

Messages name the file, the tensor and the rule that was broken, and say what to do next.
"""


class MindformersSTError(Exception):
    """Base class of every error this package raises on purpose."""


class SafetensorsFormatError(MindformersSTError):
    """A safetensors file breaks the format (header, dtype, offsets, metadata)."""


class CheckpointError(MindformersSTError):
    """A checkpoint (folder, index, rank files) is missing, inconsistent or does not fit the model."""


class LayoutError(MindformersSTError):
    """A parallel layout or strategy is impossible (sizes not divisible, wrong world size...)."""


class PlanError(MindformersSTError):
    """A transform plan cannot be built from the given sources and targets."""


class ConfigError(MindformersSTError):
    """A YAML config or CLI flag is unknown, has the wrong type, or contradicts another."""


class ConversionError(MindformersSTError):
    """Hugging Face <-> MindSpore name or tensor conversion failed (unknown name, wrong family)."""


class UndescribedRankFilesError(CheckpointError):
    """Rank files carry no slice description (MindSpore's own) and no strategy was given."""


class ChecksumError(CheckpointError):
    """Stored bytes do not match the checksum recorded for them (the file is corrupt)."""
