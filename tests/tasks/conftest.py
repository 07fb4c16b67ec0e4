from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import ManualClock, Task, TaskQueue, Worker
from conveyor.tasks.backends import Backend, MemoryBackend, SQLiteBackend

from ..conftest import eventually

BACKENDS = ["memory", "sqlite", "redis", "postgres"]


def make_backend(kind: str, request: pytest.FixtureRequest, folder: Path) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        return SQLiteBackend(folder / "queue.db")
    if kind == "postgres":
        from conveyor.tasks.backends.postgres import PostgresBackend

        return PostgresBackend(request.getfixturevalue("postgres_url"))
    from conveyor.tasks.backends.redis import RedisBackend

    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend(request.param, request, tmp_path)
    yield b
    b.close()


def queue_url(kind: str, request: pytest.FixtureRequest, folder: Path) -> str:
    if kind == "memory":
        return f"memory://{folder.name}"
    if kind in ("redis", "postgres"):
        url: str = request.getfixturevalue(f"{kind}_url")
        return url
    return f"sqlite:///{folder / 'q.db'}"


@pytest.fixture(params=BACKENDS)
def q(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskQueue]:
    """A task queue on each backend."""
    queue = TaskQueue(queue_url(request.param, request, tmp_path))
    yield queue
    queue.close()


#: where the manual clocks of these tests start (an epoch time: jobs store timestamps)
START = 1_000_000.0


@pytest.fixture(params=BACKENDS)
def clocked(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[TaskQueue, ManualClock]]:
    """A task queue on each backend, on a manual clock."""
    clock = ManualClock(START)
    queue = TaskQueue(queue_url(request.param, request, tmp_path), clock=clock)
    yield queue, clock
    queue.close()


def held_task(q: TaskQueue, gate: threading.Event) -> tuple[Task[[], str], threading.Event]:
    """A task ``hold`` that says it started, then runs until ``gate`` opens; returns "held"."""
    started = threading.Event()

    @q.task
    def hold() -> str:
        started.set()
        gate.wait(30)
        return "held"

    return hold, started


class Running:
    """A worker running on a thread of the test, and what its ``run()`` raised, if anything."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.raised: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.raised.append(exc)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(10)

    def advance_until_it_stops(self, clock: ManualClock, step_s: float) -> None:
        """Move the clock on by ``step_s`` each time the worker waits on it (its heartbeats
        and back-offs), until the worker has stopped by itself."""
        for _ in range(200):
            if not self.thread.is_alive():
                break
            eventually(lambda: clock.sleepers() >= 1 or not self.thread.is_alive())
            clock.advance(step_s)
        self.thread.join(10)
        assert not self.thread.is_alive()


def next_beat(run: Running, clock: ManualClock, step_s: float = 1.0) -> None:
    """Once the worker has written its record and looked at the others (and waits for its
    next beat), move the clock on to that beat."""

    def waiting() -> bool:
        saying = run.worker._saying
        return clock.sleepers() >= 1 and (saying is None or saying.done())

    eventually(waiting)
    clock.advance(step_s)
