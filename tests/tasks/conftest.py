from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.tasks.backends import Backend, MemoryBackend, SQLiteBackend

BACKENDS = ["memory", "sqlite"]


def make_backend(kind: str, folder: Path) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    return SQLiteBackend(folder / "queue.db")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend(request.param, tmp_path)
    yield b
    b.close()
