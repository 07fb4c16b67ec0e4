"""The PostgreSQL backend beyond the conformance suite: its schema and migrations, the
transactional enqueue, wake-ups by notice, and faults (the server restarted, connections
terminated, a table locked, a reply lost, wrong credentials, psycopg missing)."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from conveyor import BackendError, BackendUnavailable, ConfigurationError, TaskQueue
from conveyor.cli import main
from conveyor.tasks.backends import NewJob
from conveyor.tasks.backends.postgres import SCHEMA_VERSION, PostgresBackend, migrate

from ..conftest import eventually
from ..postgres_server import PostgresServer
from .test_worker_processes import Env, open_env


def ends(env: Env) -> Counter[str]:
    return Counter(line.split()[1] for line in env.lines() if line.startswith("end "))


def fresh_url(server: PostgresServer, **query: str) -> str:
    """A schema of its own (not made yet)."""
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{server.url()}?schema=t{uuid.uuid4().hex[:12]}{extra}"


@contextlib.contextmanager
def sql(url: str) -> Iterator[psycopg.Connection[Any]]:
    backend = PostgresBackend(url, check_schema=False)
    conn = psycopg.connect(backend.libpq_url, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()
        backend.close()


# -- the schema ---------------------------------------------------------------------------------


def test_a_database_without_the_schema_says_to_run_migrate(
    postgres_server: PostgresServer,
) -> None:
    url = fresh_url(postgres_server)
    with pytest.raises(ConfigurationError, match=r"run `conveyor migrate postgresql://"):
        TaskQueue(url)
    out = CliRunner().invoke(main, ["migrate", url])
    assert out.exit_code == 0, out.output
    assert f"version 0 -> {SCHEMA_VERSION}" in out.output
    again = CliRunner().invoke(main, ["migrate", url])
    assert again.exit_code == 0 and "up to date" in again.output
    with TaskQueue(url) as q:
        assert q.enqueue("t").status() == "queued"


def test_migrate_from_several_processes_at_once_makes_the_schema_once(
    postgres_server: PostgresServer,
) -> None:
    url = fresh_url(postgres_server)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "conveyor", "migrate", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert sum("0 -> 1" in out for out in outs) == 1  # one made it, three found it made
    with TaskQueue(url) as q:
        assert q.stats().queued == 0


def test_a_schema_of_a_newer_conveyor_is_refused_with_its_version(postgres_url: str) -> None:
    backend = PostgresBackend(postgres_url)
    schema = backend.schema
    backend.close()
    with sql(postgres_url) as conn:
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(BackendError, match=r"version 99, made by a newer conveyor"):
        TaskQueue(postgres_url)
    with pytest.raises(BackendError, match=r"version 99"):
        migrate(postgres_url)
    with sql(postgres_url) as conn:  # nothing was changed by the refusal
        row = conn.execute(f'SELECT value FROM "{schema}".meta').fetchone()
        assert row == ("99",)


def test_a_schema_name_that_is_not_a_plain_name_is_refused(postgres_server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="letters, digits and _"):
        TaskQueue(f"{postgres_server.url()}?schema=a;drop")


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "psycopg" or name.startswith(("psycopg.", "conveyor.tasks.backends.postgres")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[postgres\]"):
        TaskQueue("postgresql://127.0.0.1:1/db")
    with pytest.raises(ConfigurationError, match=r"conveyor\[postgres\]"):
        TaskQueue.migrate("postgresql://127.0.0.1:1/db")


# -- credentials and reach ---------------------------------------------------------------------


def test_a_wrong_password_fails_at_once_and_is_never_repeated(
    postgres_server: PostgresServer,
) -> None:
    right = postgres_server.url("secret")
    wrong = right.replace(PostgresServer.PASSWORD, "hunter2")
    t0 = time.monotonic()
    for url in (wrong, wrong + "?schema=x"):
        with pytest.raises(BackendUnavailable, match="refused the connection") as caught:
            TaskQueue(url)
        assert "hunter2" not in str(caught.value)
    out = CliRunner().invoke(main, ["migrate", wrong])
    assert out.exit_code != 0 and "password authentication failed" in out.output
    assert "hunter2" not in out.output
    assert time.monotonic() - t0 < 5  # no retries
    url = f"{right}?schema=s{uuid.uuid4().hex[:8]}"
    migrate(url)
    with TaskQueue(url) as q:
        assert q.enqueue("t").status() == "queued"
        assert PostgresServer.PASSWORD not in repr(q) and PostgresServer.PASSWORD not in q.where


def test_an_unknown_database_fails_at_once(postgres_server: PostgresServer) -> None:
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        TaskQueue(postgres_server.url(db="nope"))
    assert time.monotonic() - t0 < 5


def test_an_unreachable_server_fails_after_retry_s() -> None:
    from ..redis_server import free_port

    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"unavailable for 0\.3 s"):
        TaskQueue(f"postgresql://conveyor@127.0.0.1:{free_port()}/db?retry_s=0.3")
    assert time.monotonic() - t0 < 5


def test_a_locked_table_makes_a_call_fail_after_retry_s_not_hang(
    postgres_server: PostgresServer,
) -> None:
    url = fresh_url(postgres_server, retry_s="0.5")
    migrate(url)
    with TaskQueue(url) as q, sql(url) as locker:
        schema = q.backend.schema  # type: ignore[attr-defined]
        locker.execute("BEGIN")
        locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="lock timeout"):
            q.enqueue("t")
        assert time.monotonic() - t0 < 5
        locker.execute("ROLLBACK")
        assert q.enqueue("t").status() == "queued"  # and it works again at once


# -- transactional enqueue -----------------------------------------------------------------------


@pytest.fixture
def pq(postgres_url: str) -> Iterator[TaskQueue]:
    with TaskQueue(postgres_url) as q:
        yield q


def test_a_job_enqueued_in_a_rolled_back_psycopg_transaction_never_existed(
    pq: TaskQueue,
) -> None:
    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]

    @pq.task
    def send(order: int) -> int:
        return order

    with psycopg.connect(libpq) as conn:  # not autocommit: a transaction is open
        conn.execute("CREATE TEMP TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (1)")
        job = send.enqueue(1, _connection=conn)
        assert pq.get(job.id) is None  # not committed: no one else sees it
        conn.rollback()
    assert pq.get(job.id) is None
    assert job.status() == "unknown"
    assert pq.stats().queued == 0


def test_a_job_enqueued_in_a_committed_transaction_wakes_a_worker(pq: TaskQueue) -> None:
    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]
    ran = threading.Event()

    @pq.task
    def send(order: int) -> int:
        ran.set()
        return order * 10

    worker = pq.worker(poll_s=60, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        eventually(lambda: worker._loop is not None and pq.backend._wakeups is not None)  # type: ignore[attr-defined]
        with psycopg.connect(libpq) as conn:
            job = send.enqueue(7, _connection=conn)
            many = send.enqueue_many([((8,), {}), ((9,), {})], _connection=conn)
            assert not ran.wait(0.2)  # not committed yet: nothing to run
            conn.commit()
        assert job.result(timeout_s=10) == 70  # woken by the commit, not by a 60 s poll
        assert [h.result(timeout_s=10) for h in many] == [80, 90]
    finally:
        worker.stop(now=True)
        thread.join(10)


def test_sqlalchemy_sessions_and_connections_enqueue_in_their_transaction(pq: TaskQueue) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]
    engine = sqlalchemy.create_engine(libpq.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with Session(engine) as session:
            session.execute(sqlalchemy.text("SELECT 1"))
            rolled = pq.enqueue("t", 1, _connection=session)
            session.rollback()
        with Session(engine) as session, session.begin():
            kept = pq.enqueue("t", 2, _connection=session)
        with engine.connect() as conn:
            by_conn = pq.enqueue("t", 3, _connection=conn)
            conn.rollback()
        with engine.begin() as conn:
            by_conn_kept = pq.enqueue("t", 4, _connection=conn)
    finally:
        engine.dispose()
    assert pq.get(rolled.id) is None and pq.get(by_conn.id) is None
    assert kept.status() == "queued" and by_conn_kept.status() == "queued"
    assert pq.stats().queued == 2


def test_an_id_taken_is_not_enqueued_again_in_a_transaction(pq: TaskQueue) -> None:
    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]
    first = pq.enqueue("t", 1, _id="order-1")
    with psycopg.connect(libpq) as conn:
        again = pq.enqueue("t", 2, _id="order-1", _connection=conn)
        conn.commit()
    assert first.added and not again.added
    job = pq.get("order-1")
    assert job is not None and pq.serializer.loads(job.payload)["args"] == [1]


def test_connection_is_refused_by_other_backends_and_for_things_that_are_not_connections(
    tmp_path: Path, pq: TaskQueue
) -> None:
    with (
        TaskQueue(f"sqlite:///{tmp_path / 'q.db'}") as q,
        pytest.raises(ConfigurationError, match="_connection is for PostgreSQL"),
    ):
        q.enqueue("t", _connection=object())
    with pytest.raises(ConfigurationError, match="give a psycopg connection"):
        pq.enqueue("t", _connection="postgresql://x")


# -- wake-ups -------------------------------------------------------------------------------------


# -- faults ----------------------------------------------------------------------------------------


def test_a_reply_lost_after_the_commit_answers_as_done(postgres_url: str) -> None:
    """The outcome's transaction committed, then the connection broke before the reply: the
    change is sent again and answers True, and the job is done once."""
    backend = PostgresBackend(postgres_url)
    try:
        backend.enqueue([NewJob("j", "default", "t", b"")], now=0)
        [lease] = backend.claim("default", "w", 30, now=0)
        real = backend._conn
        lost = [True]

        @contextlib.contextmanager
        def lossy() -> Iterator[Any]:
            with real() as conn:
                yield _LoseReply(conn, lost)

        backend._conn = lossy  # type: ignore[method-assign]
        assert backend.complete("j", lease.token, b"r", None, now=1)
        assert not lost[0]  # the first sending did commit, and its reply was lost
        backend._conn = real  # type: ignore[method-assign]
        job = backend.get("j")
        assert job is not None and (job.state, job.result) == ("done", b"r")
        assert not backend.complete("j", lease.token, b"again", None, now=2)  # not replayed
    finally:
        backend.close()


def test_a_claim_whose_reply_was_lost_finds_its_jobs_when_sent_again(postgres_url: str) -> None:
    """The claim committed, its reply was lost: sent again, it returns the jobs the first
    sending took (not fresh ones, leaving those to lapse as if a worker had died)."""
    backend = PostgresBackend(postgres_url)
    try:
        backend.enqueue([NewJob(f"j{i}", "default", "t", b"") for i in range(5)], now=0)
        real = backend._conn
        lost = [True]

        @contextlib.contextmanager
        def lossy() -> Iterator[Any]:
            with real() as conn:
                yield _LoseReply(conn, lost, marker="WITH lapsed")

        backend._conn = lossy  # type: ignore[method-assign]
        leases = backend.claim("default", "w", 30, now=1, limit=3)
        backend._conn = real  # type: ignore[method-assign]
        assert not lost[0]  # the first sending did claim, and its reply was lost
        assert [ls.job.id for ls in leases] == ["j0", "j1", "j2"]
        for lease in leases:
            job = backend.get(lease.job.id)
            assert job is not None and job.token == lease.token and job.attempts == 1
        assert [ls.job.id for ls in backend.claim("default", "w", 30, now=1, limit=9)] == [
            "j3",
            "j4",
        ]
    finally:
        backend.close()


class _LoseReply:
    """A connection whose first change commits (autocommit), then reports the connection
    broken, as if the reply had been lost on the way."""

    def __init__(
        self, conn: psycopg.Connection[Any], lost: list[bool], marker: str = "WITH up"
    ) -> None:
        self._conn = conn
        self._lost = lost
        self._marker = marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, query: Any, params: Any = None) -> Any:
        cur = self._conn.execute(query, params)
        if self._lost[0] and str(query).lstrip().startswith(self._marker):
            self._lost[0] = False
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return cur


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A cluster of this test's own, to restart and kill."""
    server = PostgresServer()
    try:
        server.start()
        server.create_database("conveyor")
        yield server
    finally:
        server.remove()


@pytest.fixture
def env(postgres_url: str, tmp_path: Path) -> Iterator[Env]:
    yield from open_env(tmp_path, postgres_url)


@pytest.fixture
def own_env(own_server: PostgresServer, tmp_path: Path) -> Iterator[Env]:
    url = f"{own_server.url()}?schema=conveyor"
    migrate(url)
    yield from open_env(tmp_path, url)


def test_four_workers_race_on_3000_jobs_and_run_each_once(env: Env) -> None:
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(3000)])
    workers = [env.worker("--burst", "--concurrency", "8") for _ in range(4)]
    for w in workers:
        assert w.wait(120) == 0
    assert ends(env) == Counter({str(i): 1 for i in range(3000)})
    assert env.queue.stats().done == 3000
    assert len({line.split()[2] for line in env.lines()}) == 4  # every worker took a share


def test_the_server_restarted_mid_run_loses_nothing(
    own_server: PostgresServer, own_env: Env
) -> None:
    env = own_env
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(1500)])
    for _ in range(2):
        env.worker("--lease-s", "2", "--concurrency", "8")
    eventually(lambda: sum(ends(env).values()) >= 300, timeout_s=60)
    own_server.restart()  # mid-run: workers and this producer lose their connections
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(1500, 2000)])
    eventually(lambda: env.queue.stats().done == 2000, timeout_s=90)
    # a job whose outcome could not be written ran again after its lease; one that was
    # written is never run again
    counts = ends(env)
    assert set(counts) == {str(i) for i in range(2000)}
    assert env.queue.stats().done == 2000
    for w in env.procs:
        assert w.poll() is None  # the workers rode out the restart


def test_terminated_connections_reconnect_without_losing_a_job(
    postgres_server: PostgresServer, env: Env
) -> None:
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(2000)])
    for _ in range(2):
        env.worker("--lease-s", "2", "--concurrency", "8")
    for done in range(100, 1100, 200):
        eventually(lambda d=done: sum(ends(env).values()) >= d, timeout_s=60)  # type: ignore[misc]
        postgres_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid != pg_backend_pid() AND datname = 'conveyor'"
        )
    eventually(lambda: env.queue.stats().done == 2000, timeout_s=90)
    assert set(ends(env)) == {str(i) for i in range(2000)}


def test_many_waiters_of_one_job_and_of_others_are_all_woken(postgres_url: str) -> None:
    backend = PostgresBackend(postgres_url)
    try:
        backend.enqueue([NewJob(f"j{i}", "default", "t", b"") for i in range(3)], now=0)
        leases = backend.claim("default", "w", 30, now=0, limit=3)
        woke: list[str] = []

        def waiter(job_id: str, timeout_s: float) -> None:
            backend.wait_for_job(job_id, timeout_s=timeout_s)
            woke.append(job_id)

        threads = [
            threading.Thread(target=waiter, args=("j0", 30)),
            threading.Thread(target=waiter, args=("j0", 0.3)),  # gives up first
            threading.Thread(target=waiter, args=("j1", 30)),
            threading.Thread(target=waiter, args=("j2", 30)),
        ]
        for t in threads:
            t.start()
        eventually(lambda: woke == ["j0"])  # one waiter of j0 left; the other still waits
        done = backend.complete_many([(ls.job.id, ls.token, None, None) for ls in leases], now=1)
        assert done == [True, True, True]
        for t in threads:
            t.join(5)
            assert not t.is_alive()  # every waiter woken by the one notice of the batch
        assert sorted(woke) == ["j0", "j0", "j1", "j2"]
    finally:
        backend.close()


def test_a_server_that_stops_answering_fails_the_call_instead_of_hanging(
    own_server: PostgresServer,
) -> None:
    url = f"{own_server.url()}?schema=conveyor&retry_s=1&timeout_s=1"
    migrate(url)
    with TaskQueue(url) as q:
        q.enqueue("t")  # a connection on the shelf, which will not be answered
        assert own_server.proc is not None
        pids = [own_server.proc.pid]
        children = subprocess.run(
            ["pgrep", "-P", str(own_server.proc.pid)], capture_output=True, text=True, check=False
        )
        pids += [int(p) for p in children.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a short-lived child may be gone
                os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable):
                q.enqueue("t")
            assert time.monotonic() - t0 < 15  # the limit and retry_s, not for ever
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert q.enqueue("t").status() == "queued"  # and it works again


def test_a_queue_dropped_without_close_leaves_no_connection_or_thread(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    def connections() -> int:
        return int(
            postgres_server.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'conveyor' "
                "AND pid != pg_backend_pid()"
            )
        )

    before = threading.active_count()
    for _ in range(5):
        q = TaskQueue(postgres_url)
        with contextlib.suppress(TimeoutError):
            q.enqueue("t").result(timeout_s=0.05)  # starts the wake-up listener
        del q
    gc.collect()
    eventually(lambda: threading.active_count() <= before and connections() == 0, timeout_s=10)


def test_a_lone_surrogate_in_an_error_or_a_note_is_stored_as_a_replacement(
    postgres_url: str,
) -> None:
    backend = PostgresBackend(postgres_url)
    try:
        backend.enqueue([NewJob("j", "default", "t", b"")], now=0)
        [lease] = backend.claim("default", "w", 30, now=0)
        assert backend.progress("j", lease.token, 0.5, "caf\udce9")
        assert backend.abort("j", "\udce9ve", now=1) == "requested"
        assert backend.retry("j", lease.token, 1, "cannot open caf\udce9.txt", now=1)
        job = backend.get("j")
        assert job is not None and job.progress_note == "caf\ufffd"
        assert job.history[0].error == "cannot open caf\ufffd.txt"
    finally:
        backend.close()


def test_a_password_in_the_query_is_masked_and_options_with_spaces_reach_libpq(
    postgres_server: PostgresServer,
) -> None:
    base = postgres_server.url("secret").replace(f":{PostgresServer.PASSWORD}@", "@")
    url = (
        f"{base}?password={PostgresServer.PASSWORD}&schema=pw{uuid.uuid4().hex[:6]}"
        "&application_name=my%20app&options=-c%20work_mem%3D8MB"
    )
    migrate(url)
    with TaskQueue(url) as q:
        assert PostgresServer.PASSWORD not in q.where and "password=***" in q.where
        libpq = q.backend.libpq_url  # type: ignore[attr-defined]
        with psycopg.connect(libpq) as conn:
            row = conn.execute(
                "SELECT current_setting('application_name'), current_setting('work_mem')"
            ).fetchone()
        assert row == ("my app", "8MB")
    with pytest.raises(BackendUnavailable, match="refused the connection") as caught:
        TaskQueue(f"{url}&nonsense=1")  # a fatal refusal fails at once, the password masked
    assert PostgresServer.PASSWORD not in str(caught.value)


def test_an_enqueue_in_an_open_transaction_does_not_lock_the_job_that_holds_the_id(
    pq: TaskQueue,
) -> None:
    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]
    pq.enqueue("t", _id="order-1")
    [lease] = pq.backend.claim(pq.name, "w", 30, pq.now())
    with psycopg.connect(libpq) as conn:
        again = pq.enqueue("t", _id="order-1", _connection=conn)
        assert not again.added
        # the transaction is still open: the job's own worker is not held up by it
        assert pq.backend.heartbeat("order-1", lease.token, 30, pq.now())
        assert pq.backend.complete("order-1", lease.token, None, None, pq.now())
        conn.rollback()


def test_an_enqueue_through_a_connection_of_dict_rows_reads_the_job_that_holds_the_id(
    pq: TaskQueue,
) -> None:
    from psycopg.rows import dict_row

    libpq = pq.backend.libpq_url  # type: ignore[attr-defined]
    pq.enqueue("t", 1, _id="order-2")
    with psycopg.connect(libpq, row_factory=dict_row) as conn:
        again = pq.enqueue("t", 2, _id="order-2", _connection=conn)
        conn.commit()
    assert not again.added and again.status() == "queued"
