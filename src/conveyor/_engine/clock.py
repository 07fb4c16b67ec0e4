"""Time as a dependency.

Everything in the engine that waits or measures asks a :class:`Clock`, so tests can replace the
system clock with :class:`ManualClock` and move time by hand instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        """Block until ``event`` is set or ``timeout_s`` passes; return whether it is set."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Event.wait``."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        return event.wait(timeout_s)


class ManualClock:
    """A clock that only moves when told to.

    ``wait`` returns at once with the event's state, after advancing the clock by the time it was
    asked to wait: code that backs off or paces itself runs to completion without real sleeping,
    and the test reads how much time it would have spent from :meth:`now`.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, event: threading.Event, timeout_s: float | None) -> bool:
        if event.is_set():
            return True
        if timeout_s is not None and timeout_s > 0:
            self.advance(timeout_s)
        return event.is_set()


SYSTEM_CLOCK = SystemClock()
