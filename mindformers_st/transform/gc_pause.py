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
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


# gc.disable() is process-wide: the pauses of all threads (a load_ckpt_async read planning
# while the main thread builds the network, a background build) count as one, the state of
# before the first restored after the last. Each call saving and restoring the flag on its own
# could end with the collector off for good: B reads "disabled" while A is paused, A enables
# it again, B disables it and, having seen it disabled, leaves it so.
_lock = threading.RLock()
_depth = 0
_restore = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Within the block the cyclic collector does not run; once no thread is within such a
    block any more, it is enabled again if it was enabled before the first of them (nesting,
    overlapping calls on several threads and a caller's own gc.disable() are respected)."""
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()


def without_gc(fn: F) -> F:
    """`fn` runs with the cyclic collector paused (`gc_paused`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gc_paused():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
