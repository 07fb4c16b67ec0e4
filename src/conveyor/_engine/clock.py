"""Time as a dependency.

Everything that waits or measures asks a :class:`Clock`: the engine (rate limits, retry
backoff, time limits), the task queues (job timestamps, leases, delays, heartbeats) and the
dispatcher (deadlines). Tests replace the system clock with :class:`ManualClock` and move time
by hand instead of sleeping.

A clock gives two scales: ``now()``, monotonic seconds for intervals and deadlines in one
process, and ``time()``, seconds since the epoch for what is stored and compared across
processes and machines (when a job may run, when a lease lapses).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time as _time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (what is stored: job timestamps, leases)."""
        ...

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        """Block until ``event`` is set or ``timeout_s`` passes; return whether it is set."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` in a coroutine."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time``, ``Event.wait``, ``asyncio.sleep``."""

    #: a task queue corrects this clock's ``time()`` by how far it is from its storage's
    #: clock (leases are judged on one clock for every worker); a manual clock is left alone
    follows_storage = True

    # the functions themselves, not methods calling them: a deadline check on every call of a
    # hot path costs one C call
    now = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        return event.wait(timeout_s)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to (``advance``).

    ``wait`` returns at once with the event's state, after advancing the clock by the time it
    was asked to wait: code that backs off or paces itself on a thread runs to completion
    without real sleeping, and the test reads how much time it would have spent from
    :meth:`now`. ``sleep`` (in a coroutine) waits until the test advances the clock past its
    end: a heartbeat every ten seconds beats once per ``advance(10)``.

    ``now()`` and ``time()`` read the same counter, which starts at ``start`` (give an epoch
    time for code that stores timestamps).
    """

    follows_storage = False

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]]
        self._sleepers = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            now = self._now
            due = []
            while self._sleepers and self._sleepers[0][0] <= now:
                due.append(heapq.heappop(self._sleepers))
        for _, _, loop, fut in due:
            if not fut.done():  # a sleep cancelled (its loop may be gone) needs no waking
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, fut)

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        if event.is_set():
            return True
        if timeout_s is not None and timeout_s > 0:
            self.advance(timeout_s)
        return event.is_set()

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if seconds <= 0:
                fut.set_result(None)
            else:
                entry = (self._now + seconds, next(self._order), loop, fut)
                heapq.heappush(self._sleepers, entry)
        await fut

    def sleepers(self) -> int:
        """Coroutines sleeping on this clock now (for tests: wait until code is waiting)."""
        with self._lock:
            return sum(1 for *_, fut in self._sleepers if not fut.done())


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


SYSTEM_CLOCK = SystemClock()
