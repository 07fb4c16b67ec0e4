"""A rate limit shared by every worker of a stage.

Each caller reserves its slots on one timeline (the next free instant advances by ``n / rate``
per reservation) and waits until its slot comes. Reserving is one short locked step, so many
workers of any kind share one limiter fairly; waiting happens outside the lock, on the clock, and
ends early when ``stop`` is set.
"""

from __future__ import annotations

import threading

from .clock import SYSTEM_CLOCK, Clock


class RateLimiter:
    def __init__(self, per_second: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if per_second <= 0:
            raise ValueError("a rate is a positive number of items per second")
        self.per_second = per_second
        self._clock = clock
        self._next = clock.now()
        self._lock = threading.Lock()

    def reserve(self, n: int = 1) -> float:
        """Reserve ``n`` slots; return how long the caller must wait before using them."""
        with self._lock:
            now = self._clock.now()
            start = max(now, self._next)
            self._next = start + n / self.per_second
            return start - now

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Wait for ``n`` slots; False if ``stop`` was set first."""
        delay = self.reserve(n)
        if delay > 0:
            return not self._clock.wait(stop, delay)
        return not stop.is_set()

    def max_batch(self) -> int:
        """How many items one reservation may cover: about 10 ms of the rate, at least one."""
        return max(1, int(self.per_second / 100))
