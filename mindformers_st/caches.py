"""The package's process-wide caches, and one way to empty them all (`forget_all`).

Planning remembers what it worked out: parsed headers by file identity, parsed slice metadata
by text, layouts' slices and covers by value. None of these changes an answer, only its cost,
so a benchmark that wants what the first command of a process costs (issue 10 counts the
first parse of every header as per-tensor overhead) empties them with `forget_all`. Every
cache is made with `process_cache` or registered with `on_forget`;
tests/test_caches.py fails when a module makes an `lru_cache` of its own.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, List

_FORGETS: List[Callable[[], None]] = []
_LOCK = threading.Lock()


def on_forget(clear: Callable[[], None]) -> Callable[[], None]:
    """Register `clear` (empties one cache) to run at `forget_all`; returns it."""
    with _LOCK:
        _FORGETS.append(clear)
    return clear


def process_cache(maxsize: int):
    """`functools.lru_cache(maxsize)` whose cache `forget_all` empties."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        on_forget(cached.cache_clear)
        return cached
    return wrap


def forget_all() -> None:
    """Empty every cache of the package (in modules imported so far), as in a fresh process."""
    with _LOCK:
        clears = list(_FORGETS)
    for clear in clears:
        clear()
