"""Waiting for a file descriptor to be readable: look for a moment before going to sleep.

Going to sleep in ``poll`` and being woken by the other process's write is most of the time of a
round trip between two processes. A wait that looks again and again for ``SPIN_S`` first takes an
answer that comes within it without sleeping; a wait that lasts longer costs ``SPIN_S`` of CPU
once, then sleeps as before.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: how long a wait looks without sleeping
SPIN_S = 50e-6


def poll_briefly(poll: Any, left: float | None) -> list[tuple[int, int]]:
    """``poll.poll`` (a ``select.poll``) for up to ``left`` seconds (None: no limit), looking
    without sleeping for the first ``SPIN_S`` of it."""
    events: list[tuple[int, int]] = poll.poll(0)
    if events or (left is not None and left <= 0):
        return events
    now = time.monotonic
    start = now()
    end = start + (SPIN_S if left is None else min(SPIN_S, left))
    while now() < end:
        events = poll.poll(0)
        if events:
            return events
    if left is None:
        return poll.poll(None)  # type: ignore[no-any-return]
    return poll.poll(max(0, math.ceil((left - (now() - start)) * 1000)))  # type: ignore[no-any-return]
