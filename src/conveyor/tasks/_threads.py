"""A thread pool whose threads are daemons.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, so one
task stuck in a call that never returns would keep a stopped worker alive forever. A worker
that shuts down has already handed such a job back to the queue; its thread must not hold the
process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DaemonThreadPool(Executor):
    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max_workers
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._work.put((future, fn, args, kwargs))
            if self._idle == 0 and self._threads < self._max:
                self._threads += 1
                threading.Thread(
                    target=self._serve, daemon=True, name=f"{self._name}:{self._threads}"
                ).start()
            else:
                self._idle -= 1
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._work.put(None)
