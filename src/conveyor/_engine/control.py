"""A control thread for requests that must not take locks where they are made.

A signal handler runs in the main thread between two bytecodes, possibly while that thread
holds a lock the request would need (a buffer's, a run's): taking it there deadlocks.
``SimpleQueue.put`` is reentrant, so :func:`defer` only enqueues, and this daemon thread does
the work. It is started by :func:`ensure_started`, called where starting a thread is safe.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("conveyor")

_requests: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
_started = False
_start_lock = threading.Lock()


def _serve() -> None:
    while True:
        request = _requests.get()
        try:
            request()
        except Exception:
            log.exception("a deferred conveyor request failed")


def ensure_started() -> None:
    global _started
    if _started:
        return
    with _start_lock:
        if not _started:
            threading.Thread(target=_serve, name="conveyor:control", daemon=True).start()
            _started = True


def defer(request: Callable[[], object]) -> None:
    """Run ``request`` soon on the control thread; safe to call from a signal handler."""
    _requests.put(request)
