from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
