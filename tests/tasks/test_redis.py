"""The Redis backend under faults: the server restarted, connections killed, many workers,
wrong credentials, redis-py missing. The conformance and queue suites run on Redis as well."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import BackendUnavailable, ConfigurationError, TaskQueue
from conveyor.tasks.backends import NewJob

from ..conftest import eventually
from ..redis_server import RedisServer
from .test_worker_processes import Env, open_env


def ends(env: Env) -> Counter[str]:
    return Counter(line.split()[1] for line in env.lines() if line.startswith("end "))


def wait_for_ends(env: Env, n: int, timeout_s: float = 60) -> None:
    eventually(lambda: sum(ends(env).values()) >= n, timeout_s=timeout_s)


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", aof=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    yield from open_env(tmp_path, redis_url)


def test_four_workers_race_on_5000_jobs_and_run_each_once(env: Env) -> None:
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(5000)])
    workers = [env.worker("--burst", "--concurrency", "8") for _ in range(4)]
    for w in workers:
        assert w.wait(120) == 0
    assert ends(env) == Counter({str(i): 1 for i in range(5000)})
    assert env.queue.stats().done == 5000
    assert len({line.split()[2] for line in env.lines()}) == 4  # every worker took a share


@pytest.fixture
def aof_env(aof_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    yield from open_env(tmp_path, aof_server.url)


def test_redis_restarted_mid_run_loses_nothing_acknowledged(
    aof_server: RedisServer, aof_env: Env
) -> None:
    env = aof_env
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(1500)])
    for _ in range(2):
        env.worker("--lease-s", "2", "--concurrency", "8")
    wait_for_ends(env, 300)
    aof_server.stop()  # mid-run: workers and this producer lose their connections
    aof_server.start()  # the same port and folder: the AOF is read back
    # the producer reconnects by itself
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(1500, 2000)])
    eventually(lambda: env.queue.stats().done == 2000, timeout_s=60)
    assert ends(env) == Counter({str(i): 1 for i in range(2000)})
    for w in env.procs:
        assert w.poll() is None  # the workers rode out the restart


def test_killed_connections_reconnect_without_running_a_job_twice(
    redis_server: RedisServer, env: Env
) -> None:
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(2000)])
    for _ in range(2):
        env.worker("--lease-s", "2", "--concurrency", "8")
    for done in range(100, 1100, 100):
        wait_for_ends(env, done)
        # every client but the one asking: workers, their wake-up listeners, this producer
        assert redis_server.command("CLIENT", "KILL", "TYPE", "normal").startswith(b":")
        assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub").startswith(b":")
    eventually(lambda: env.queue.stats().done == 2000, timeout_s=60)
    assert ends(env) == Counter({str(i): 1 for i in range(2000)})


def test_a_wrong_password_is_a_clear_error_not_a_hang(redis_server: RedisServer) -> None:
    user = "u" + str(time.monotonic_ns())
    assert (
        redis_server.command("ACL", "SETUSER", user, "on", ">right", "~*", "&*", "+@all")
        == b"+OK\r\n"
    )
    base = f"127.0.0.1:{redis_server.port}/0"
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="refused the credentials"):
        TaskQueue(f"redis://{user}:wrong@{base}")
    with pytest.raises(BackendUnavailable) as caught:
        TaskQueue(f"redis://{user}:wrong@{base}")
    assert "wrong" not in str(caught.value)  # the password is not repeated in messages
    assert time.monotonic() - t0 < 5
    q = TaskQueue(f"redis://{user}:right@{base}?prefix=acl{user}:")
    assert q.enqueue("t", 1).status() == "queued"
    assert "right" not in repr(q)
    q.close()


def test_an_unreachable_server_fails_after_retry_s(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "gone")  # a free port nobody listens on
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"unreachable for 0\.3 s"):
        TaskQueue(f"redis://127.0.0.1:{server.port}/0?retry_s=0.3")
    assert time.monotonic() - t0 < 5


def test_without_redis_py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "redis" or name.startswith(("redis.", "conveyor.tasks.backends.redis")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[redis\]"):
        TaskQueue("redis://127.0.0.1:1/0")


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_result_waits_for_the_completion_notice(kind: str, request: pytest.FixtureRequest) -> None:
    q = TaskQueue(request.getfixturevalue(f"{kind}_url"))
    backend = q.backend
    backend.enqueue([NewJob("j", "default", "t", b"")], now=0)
    [lease] = backend.claim("default", "w", 30, now=0)
    woke = threading.Event()

    def waiter() -> None:
        backend.wait_for_job("j", timeout_s=30)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    # the waiter subscribes, then looks at the job, then waits: a completion at any point
    # ends its wait long before its 30 s
    assert not woke.wait(0.05)
    assert backend.complete("j", lease.token, None, None, now=1)
    assert woke.wait(5)
    t.join(5)
    q.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_workers_wait_for_work_on_a_notice(kind: str, request: pytest.FixtureRequest) -> None:
    """An idle worker with a long poll_s starts a new job at once: it is woken, not polling
    (Redis: pub/sub; PostgreSQL: LISTEN/NOTIFY)."""
    q = TaskQueue(request.getfixturevalue(f"{kind}_url"))
    ran = threading.Event()

    @q.task
    def hello() -> None:
        ran.set()

    worker = q.worker(poll_s=60, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        eventually(lambda: worker._loop is not None and q.backend._wakeups is not None)  # type: ignore[attr-defined]
        hello.enqueue()
        assert ran.wait(5)
    finally:
        worker.stop(now=True)
        thread.join(10)
        q.close()
