"""Building a description or a plan makes tens of thousands of small acyclic objects (slices,
copy ops, target tensors) in one burst. Every 700 net allocations CPython's cyclic collector runs,
and every so often it walks every tracked object of the process — in a training process that is
MindSpore's whole object graph once `mindspore` is imported. Unpaused, the collector took a
large share of a load's describe, plan and prepare of many small tensors in such a process
(`benchmarks/bench_many_tensors.py --mindspore` records its time per phase). Nothing built
here forms cycles (plain frozen data), so the collector is paused for the burst and its previous
state restored after: memory is still freed by reference counting, and cycles made meanwhile
elsewhere are collected at the next run.
"""
from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Within the block the cyclic collector does not run; after it, it is enabled again if it
    was enabled before (nesting and a caller's own gc.disable() are respected)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_gc(fn: F) -> F:
    """`fn` runs with the cyclic collector paused (`gc_paused`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gc_paused():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
