"""A bounded, closable buffer that moves items in chunks.

Items travel between workers in lists ("chunks"). A producer that hands over a list pays for one
lock round trip whatever its length; a consumer takes up to ``max_n`` items in one call, as whole
chunks where it can and by slicing the front one where it must. So a busy pipeline pays per chunk,
while an idle one pays nothing extra: a consumer that waits on an empty buffer wakes for the first
item and takes it alone.

The capacity is exact and counted in items: ``put_many`` admits what fits and waits for room for
the rest, so a full buffer blocks its producer (this is the backpressure every boundary relies on).

Two ways to end:

* ``close()`` — no more input; consumers drain what is there, then ``get_many`` returns ``None``.
* ``shutdown()`` — stop now; every waiter, present and future, gets :class:`BufferShutdown` and the
  items still inside are dropped (their number is returned, so a caller can account for them).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

from .._errors import ClosedResourceError

T = TypeVar("T")

#: single puts are gathered into chunks of at most this many items
_CHUNK = 256


class BufferShutdown(Exception):
    """Raised inside the engine to unwind a worker whose buffer was shut down."""


def _sleep(lock: threading.Lock, waiters: deque[threading.Lock], timeout_s: float | None) -> bool:
    """Sleep on ``waiters`` (the caller holds ``lock``) until woken by :func:`_wake`, or
    ``timeout_s``; False if timed out. ``lock`` is held again on return, whatever happens.

    What ``threading.Condition`` does, without its checks on every call: a buffer pays this
    for each item that finds a consumer asleep. A waiter leaves the deque when it is woken,
    so the deque holds the threads asleep and not yet woken: a put wakes no one twice, and
    skips the work when the deque is empty."""
    waiter = threading.Lock()
    waiter.acquire()
    waiters.append(waiter)
    lock.release()
    woken = False
    try:
        if timeout_s is None:
            woken = waiter.acquire()
        elif timeout_s > 0:
            woken = waiter.acquire(True, timeout_s)
    finally:
        lock.acquire()
        if not woken:
            try:
                waiters.remove(waiter)
            except ValueError:
                woken = True  # woken just as its time ran out
    return woken


def _wake(waiters: deque[threading.Lock], n: int) -> None:
    """Wake up to ``n`` of the threads asleep on ``waiters`` (the caller holds the lock)."""
    while n > 0 and waiters:
        waiters.popleft().release()
        n -= 1


class Buffer(Generic[T]):
    __slots__ = (
        "_chunks",
        "_closed",
        "_count",
        "_kicks",
        "_lock",
        "_not_empty",
        "_not_full",
        "_open_tail",
        "_shutdown",
        "accepted",
        "capacity",
        "name",
    )

    def __init__(self, capacity: int, name: str = "") -> None:
        if capacity < 1:
            raise ValueError("a buffer holds at least one item")
        self.capacity = capacity
        self.name = name
        self._chunks: deque[list[T]] = deque()
        self._count = 0
        # True while the last chunk is one of ours that single puts may append to
        self._open_tail = False
        self._closed = False
        self._shutdown = False
        self._kicks = 0
        #: items ever admitted, for statistics
        self.accepted = 0
        self._lock = threading.Lock()
        #: consumers asleep until there are items, producers asleep until there is room
        self._not_empty: deque[threading.Lock] = deque()
        self._not_full: deque[threading.Lock] = deque()

    # -- inspection -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown

    # -- producing --------------------------------------------------------------------------
    def put(self, item: T, timeout_s: float | None = None) -> bool:
        """Add one item, waiting for room. Returns False if ``timeout_s`` passed first."""
        deadline: float | None = None
        with self._lock:
            # the common case first: open (a shut-down buffer is closed too) and with room
            while self._closed or self._count >= self.capacity:
                if self._shutdown:
                    raise BufferShutdown
                if self._closed:
                    raise ClosedResourceError(f"buffer {self.name!r} is closed")
                if timeout_s is None:
                    self._wait_for_room(None)
                    continue
                if deadline is None:  # the clock is read only when there is a wait
                    deadline = time.monotonic() + timeout_s
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wait_for_room(left)
            if self._open_tail and len(self._chunks[-1]) < _CHUNK:
                self._chunks[-1].append(item)
            else:
                self._chunks.append([item])
                self._open_tail = True
            self._count += 1
            self.accepted += 1
            if self._not_empty:
                self._not_empty.popleft().release()
        return True

    def offer_many(self, items: list[T]) -> int:
        """Add what fits of ``items`` now, never waiting; return how many were added (the
        rest are not kept). For buffers whose overflow is dropped rather than waited for."""
        with self._lock:
            if self._shutdown:
                raise BufferShutdown
            if self._closed:
                raise ClosedResourceError(f"buffer {self.name!r} is closed")
            n = min(len(items), self.capacity - self._count)
            if n <= 0:
                return 0
            self._chunks.append(items if n == len(items) else items[:n])
            self._open_tail = False
            self._count += n
            self.accepted += n
            self._wake_consumers(n)
            return n

    def _wait_for_room(self, timeout_s: float | None) -> None:
        _sleep(self._lock, self._not_full, timeout_s)

    def put_many(self, items: list[T]) -> None:
        """Add every item of ``items``, waiting for room; the buffer takes ownership of the list."""
        if not items:
            return
        with self._lock:
            while True:
                if self._shutdown:
                    raise BufferShutdown
                if self._closed:
                    raise ClosedResourceError(f"buffer {self.name!r} is closed")
                free = self.capacity - self._count
                if free >= len(items):
                    self._chunks.append(items)
                    self._open_tail = False
                    self._count += len(items)
                    self.accepted += len(items)
                    self._wake_consumers(len(items))
                    return
                if free > 0:
                    self._chunks.append(items[:free])
                    self._open_tail = False
                    self._count += free
                    self.accepted += free
                    items = items[free:]
                    self._wake_consumers(free)
                self._wait_for_room(None)

    def _wake_consumers(self, n: int) -> None:
        _wake(self._not_empty, n)

    # -- consuming --------------------------------------------------------------------------
    def get_many(self, max_n: int, timeout_s: float | None = None) -> list[T] | None:
        """Take between 1 and ``max_n`` items, waiting while the buffer is empty.

        Returns ``None`` once the buffer is closed and drained, and ``[]`` if ``timeout_s``
        passed with nothing to take or :meth:`kick` woke the waiting consumers.
        """
        with self._lock:
            kicks = self._kicks
            while not self._count:
                if self._kicks != kicks:
                    return []
                if self._shutdown:
                    raise BufferShutdown
                if self._closed:
                    return None
                woken = _sleep(self._lock, self._not_empty, timeout_s)
                if not woken and timeout_s is not None:
                    if self._shutdown:
                        raise BufferShutdown
                    return [] if not self._count else self._take(max_n)
            if self._shutdown:
                raise BufferShutdown
            return self._take(max_n)

    def _take(self, max_n: int) -> list[T]:
        chunks = self._chunks
        first = chunks[0]
        n = len(first)
        if n > max_n:
            out = first[:max_n]
            del first[:max_n]
        else:
            out = chunks.popleft()
            if not chunks:
                self._open_tail = False
            # gather further whole chunks while they fit
            while chunks and n + len(chunks[0]) <= max_n:
                nxt = chunks.popleft()
                out.extend(nxt)
                n += len(nxt)
            if not chunks:
                self._open_tail = False
        taken = len(out)
        self._count -= taken
        if self._not_full:
            _wake(self._not_full, 1 if taken == 1 else len(self._not_full))
        return out

    def kick(self) -> None:
        """Wake every waiting consumer with an empty answer (so it can look at its own state)."""
        with self._lock:
            self._kicks += 1
            _wake(self._not_empty, len(self._not_empty))

    # -- ending -----------------------------------------------------------------------------
    def close(self) -> None:
        """No more puts; consumers drain the rest and then see the end."""
        with self._lock:
            self._closed = True
            _wake(self._not_empty, len(self._not_empty))
            _wake(self._not_full, len(self._not_full))

    def shutdown(self) -> int:
        """Stop now: wake every waiter with :class:`BufferShutdown`; return the items dropped."""
        with self._lock:
            dropped = self._count
            self._shutdown = True
            self._closed = True
            self._chunks.clear()
            self._count = 0
            _wake(self._not_empty, len(self._not_empty))
            _wake(self._not_full, len(self._not_full))
            return dropped
