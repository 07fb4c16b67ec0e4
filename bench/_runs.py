"""Run records shared by the Redis queue benchmark and the job functions peers import by path
(rq refuses functions of ``__main__``)."""

from __future__ import annotations

import threading
from collections import Counter

RUNS: Counter[int] = Counter()
_LOCK = threading.Lock()


def mark(i: int) -> None:
    with _LOCK:
        RUNS[i] += 1


def rq_noop(i: int) -> None:
    mark(i)
