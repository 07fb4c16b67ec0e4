from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .postgres_server import PostgresServer
from .redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    """Worker processes of process stages and tasks come from the forkserver, and import the
    module that defines their function: here, a test module, which imports pytest (half a
    second, per process). Started first, with pytest and conveyor loaded, the server forks
    children that have them already: what a child would import anyway, it imports; only the
    time changes. (A hook, not import time: a spawned child imports this module too.)"""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["conveyor._engine.processes", "pytest", "tests.conftest"]
    )
    multiprocessing.forkserver.ensure_running()


def eventually(cond: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait for a condition that another thread will make true (never used to order work)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def inside(thread: threading.Thread, function: str, timeout_s: float = 10.0) -> None:
    """Wait until ``thread`` is running ``function`` (somewhere on its stack): a test that needs
    another thread to be blocked in a call before it goes on waits for that, not for time."""

    def there() -> bool:
        frame = sys._current_frames().get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
        return False

    eventually(there, timeout_s)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Counting:
    """A source that counts the items taken from it (to check how far the source was read)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.taken += 1
            yield i


@pytest.fixture
def no_child_left() -> Iterator[None]:
    """A test that fails midway leaves its children waiting on a channel: kill them, so that
    the session's exit (which joins every child) cannot hang on them."""
    yield
    for child in multiprocessing.active_children():
        child.kill()
        child.join(10)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event a test opens to let blocked work go on; always opened at the end."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server started for this test session (never the one on 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer, request: pytest.FixtureRequest) -> str:
    """The session server's URL, with a key prefix of this test's own."""
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster started for this test session (never the machine's
    own server), with a database ``conveyor`` and a user ``secret`` that needs a password."""
    server = PostgresServer()
    try:
        server.start()
        server.create_database("conveyor")
        server.psql(f"CREATE ROLE secret LOGIN PASSWORD '{server.PASSWORD}'")
        server.psql("GRANT ALL ON DATABASE conveyor TO secret")
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The session cluster's URL, with a schema of this test's own, made by ``migrate``."""
    from conveyor.tasks.backends.postgres import migrate

    url = f"{postgres_server.url()}?schema=t{uuid.uuid4().hex[:12]}"
    migrate(url)
    return url
