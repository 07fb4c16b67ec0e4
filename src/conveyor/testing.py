"""Helpers for tests that must break things on purpose, deterministically.

``crash(fn, when=..., how=...)`` wraps a stage's function so that the worker running it dies (or
hangs) on a chosen item, a chosen number of times across all workers and processes. Tests of
conveyor itself use it, and so can tests of code built on conveyor::

    from conveyor.testing import crash

    flaky = crash(parse, when=lambda item: item == 7, how="sigkill")
    Pipeline(range(10)).map(flaky, kind="process", on_error=Retry(2)).run()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
import weakref
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

__all__ = ["HOW", "crash"]

T = TypeVar("T")
U = TypeVar("U")

#: the ways a worker can be made to fail
HOW = ("sigkill", "sigterm", "exit", "segfault", "hang", "raise")

How = Literal["sigkill", "sigterm", "exit", "segfault", "hang", "raise"]


class InjectedFault(RuntimeError):
    """Raised by ``crash(..., how="raise")``."""


class _Crash(Generic[T, U]):
    """Picklable (with cloudpickle) so that it travels to worker processes."""

    def __init__(
        self, fn: Callable[[T], U], when: Callable[[T], bool], how: How, times: int
    ) -> None:
        if how not in HOW:
            raise ValueError(f"how must be one of {HOW}, not {how!r}")
        self.fn = fn
        self.when = when
        self.how = how
        self.times = times
        # claims are files made with O_EXCL: exactly `times` claims succeed, whichever process
        self.marks = tempfile.mkdtemp(prefix="conveyor-crash-")
        weakref.finalize(self, shutil.rmtree, self.marks, True)
        self.__name__ = getattr(fn, "__name__", "crash")

    def _claim(self) -> bool:
        for n in range(self.times):
            try:
                fd = os.open(os.path.join(self.marks, str(n)), os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the test that made us is over
                return False
            os.close(fd)
            return True
        return False

    def __call__(self, item: T) -> U:
        if self.when(item) and self._claim():
            _fail_now(self.how)
        return self.fn(item)


def _fail_now(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "exit":
        os._exit(3)
    elif how == "segfault":
        ctypes.string_at(0)
    elif how == "hang":
        while True:
            with contextlib.suppress(Exception):
                pass
    raise InjectedFault("injected by conveyor.testing.crash")


def crash(
    fn: Callable[[T], U],
    *,
    when: Callable[[T], bool],
    how: How = "sigkill",
    times: int = 1,
) -> Callable[[T], U]:
    """``fn``, except that the first ``times`` items for which ``when(item)`` is true make the
    worker fail ``how``: ``"sigkill"``, ``"sigterm"``, ``"exit"`` (``os._exit(3)``),
    ``"segfault"``, ``"hang"`` (a busy loop that never returns) or ``"raise"``."""
    return _Crash(fn, when, how, times)
