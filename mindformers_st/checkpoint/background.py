"""The one background thread of an async save: writes, commit records and pruning, in order.

`CheckpointMonitor(async_save=True)` hands this thread everything of a save that touches the
disk — the rank file(s), then (once every rank agreed the files are durable) the commit record,
the deletion of pruned saves and `meta.json` — so the training loop only snapshots and agrees.
Tasks run strictly in submission order on a single thread: a save's records are written after
its files, and the next save's files after the previous save's records. Collectives never run
here (they stay on the main thread, in the same order on every rank).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class Task:
    """One submitted function: `done` once it returned or raised; `error` holds what it raised
    (the main thread reports it: an exception on this thread must not end it)."""

    def __init__(self, fn: Callable[[], None], name: str):
        self.fn, self.name = fn, name
        self.error: Optional[BaseException] = None
        self._finished = threading.Event()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> None:
        """Block until the task has run."""
        self._finished.wait()

    def _run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:   # reported by whoever waits on the task
            self.error = exc
            logger.error("background %s failed: %s", self.name, exc)
        finally:
            self._finished.set()


class BackgroundWriter:
    """A FIFO of tasks run one after another on one daemon thread, started at the first
    `submit` and stopped by `close` (which first runs everything already submitted)."""

    def __init__(self, name: str):
        self.name = name
        self._queue: "queue.Queue[Optional[Task]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._last: Optional[Task] = None

    def submit(self, fn: Callable[[], None], name: str) -> Task:
        """Queue `fn` after every task submitted before; returns its Task."""
        task = Task(fn, name)
        if self._thread is None or not self._thread.is_alive():
            # daemon: a run that dies of an exception must not hang on an unfinished save
            # (what it leaves is a hidden temporary or an uncommitted file, both cleaned up)
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._last = task
        self._queue.put(task)
        return task

    def drain(self) -> None:
        """Block until every task submitted so far has run."""
        if self._last is not None:
            self._last.wait()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            task._run()
