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


class WriteError(MindformersSTError):
    """The file system refused a write (full, read-only, no permission, a file in the way); the
    message names what was being written and where."""


def os_error_text(exc: OSError, path: str = "") -> str:
    """`path: reason (ENAME)` for an OSError: its own file name when it has one, else `path`."""
    import errno as _errno
    where = getattr(exc, "filename", None) or path
    reason = exc.strerror or str(exc)
    name = _errno.errorcode.get(exc.errno or 0)
    return f"{where + ': ' if where else ''}{reason}{f' ({name})' if name else ''}"


def write_failed(what: str, path: str, exc: OSError) -> WriteError:
    """A WriteError saying that writing `what` to `path` failed and why (raise it `from exc`)."""
    return WriteError(f"{what}: writing {os_error_text(exc, path)}")
