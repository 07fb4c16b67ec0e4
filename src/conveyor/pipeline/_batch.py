"""The ``batch`` stage: one thread that groups items into lists."""

from __future__ import annotations

import threading
import time
from typing import Any

from .._engine import BufferShutdown, WorkerPool
from .._engine.carry import merge


class _NoWork:
    def setup(self) -> None:
        return None

    def call(self, item: Any) -> Any:
        return item

    def teardown(self) -> None:
        return None


def no_work() -> _NoWork:
    return _NoWork()


class BatchPool(WorkerPool):
    """Emits lists of up to ``size`` items; a list that has waited ``within_s`` since its first
    item goes out as it is, and so does the last one at the end of the input."""

    kind = "batch"

    def __init__(self, step: Any, context: Any, size: int, within_s: float | None) -> None:
        super().__init__(step, context)
        self.step = step
        self.size = size
        self.within_s = within_s
        self._busy = 0

    def start(self) -> None:
        threading.Thread(
            target=self._run, name=f"{self.context.thread_name}:{self.step.name}", daemon=True
        ).start()

    @property
    def workers(self) -> int:
        return 0 if self.gone.is_set() else 1

    @property
    def busy(self) -> int:
        return self._busy

    def resize(self, n: int) -> None:
        # a batch stage has exactly one worker: the order of its lists depends on it
        return None

    def abort(self) -> None:
        return None

    def _emit(self, current: list[Any]) -> None:
        step = self.step
        with step.counters.lock:
            step.counters.finished += len(current)
            step.counters.emitted += 1
        ledger = step.ledger
        if ledger is None:
            step.outbox.put_many([current])
            return
        # carried items: one list carried by all their tokens
        merged = merge(current)
        ledger.enter((merged,))
        step.outbox.put_many([merged])
        ledger.leave(current)

    def _run(self) -> None:
        step = self.step
        inbox = step.inbox
        current: list[Any] = []
        deadline: float | None = None
        eof = False
        try:
            while True:
                timeout = None
                if current and deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
                got = inbox.get_many(self.size - len(current), timeout)
                if got is None:
                    eof = True
                    break
                if got:
                    with step.counters.lock:
                        step.counters.received += len(got)
                    if not current and self.within_s is not None:
                        deadline = time.monotonic() + self.within_s
                    current.extend(got)
                if len(current) >= self.size or (
                    current and deadline is not None and time.monotonic() >= deadline
                ):
                    self._emit(current)
                    current = []
                    deadline = None
            if current:
                self._emit(current)
        except BufferShutdown:
            pass
        except BaseException as exc:
            step.fatal(exc)
        finally:
            if eof:
                step.close_output()
            self.gone.set()
