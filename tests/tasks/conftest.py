from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import ManualClock, TaskQueue
from conveyor.tasks.backends import Backend, MemoryBackend, SQLiteBackend

BACKENDS = ["memory", "sqlite", "redis"]


def make_backend(kind: str, request: pytest.FixtureRequest, folder: Path) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        return SQLiteBackend(folder / "queue.db")
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
    if kind == "redis":
        url: str = request.getfixturevalue("redis_url")
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
