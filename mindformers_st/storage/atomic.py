"""The one way a file appears on disk: written under a hidden temporary name in its folder,
fsynced, renamed over the final name, the folder fsynced — readers see the old file or the new
one, never a part, and a failure (or a kill) leaves no final file. Imports nothing of ours."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator


def fsync_dir(folder: str) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """fsync an already written file by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str, suffix: str = ".tmp") -> str:
    """A fresh hidden name beside `path` (`.{name}.{pid}-{random}{suffix}`): folder scans skip
    it (hidden, and it does not end in the final extension unless `suffix` says so)."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{base}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def publish(tmp: str, path: str) -> str:
    """Rename the finished, fsynced `tmp` over `path` and fsync the folder. Returns `path`."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def remove_quietly(path: str) -> None:
    """Delete `path` if it exists (cleanup after a failure must not hide the failure)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, IsADirectoryError):
        pass


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path to write `path`'s content to (by any writer, e.g. MindSpore's);
    on a normal exit it is fsynced and published under `path`, on an exception removed."""
    path = os.path.abspath(os.fspath(path))
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        fsync_file(tmp)
        publish(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> str:
    """Write `data` to `path` atomically and durably (see the module doc). Returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
    return os.path.abspath(os.fspath(path))


def atomic_write_text(path, text: str) -> str:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
