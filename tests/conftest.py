from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest


def eventually(cond: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait for a condition that another thread will make true (never used to order work)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


@pytest.fixture
def gate() -> threading.Event:
    """An event a test opens to let blocked work go on; always opened at the end."""
    ev = threading.Event()
    yield ev
    ev.set()
