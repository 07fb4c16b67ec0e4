"""SQLite faults: a write lock held by another process past the busy timeout, a full disk, a
file that is not a database. The worker waits them out; a producer gets the contract's errors,
never a raw ``sqlite3`` one, and nothing half-written is left."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import BackendError, BackendUnavailable, TaskQueue
from conveyor.tasks.backends import SQLiteBackend

from ..conftest import eventually

LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class Locker:
    """Another process holding the file's write lock until told to let go."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0
        self.proc.stdout.close()


def refusals(caplog: pytest.LogCaptureFixture) -> int:
    return sum("trying again" in r.getMessage() for r in caplog.records)


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "q.db"


def test_a_lock_held_past_the_busy_timeout_is_waited_out_by_the_worker(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    q = TaskQueue(f"sqlite:///{db_path}?busy_s=0.1")
    runs: list[str] = []
    started, gate = threading.Event(), threading.Event()

    @q.task
    def hold(name: str) -> str:
        runs.append(name)
        started.set()
        gate.wait(30)
        return name

    @q.task
    def quick(name: str) -> str:
        runs.append(name)
        return name

    long = hold.enqueue("long")
    worker = q.worker(lease_s=30, poll_s=0.05, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert started.wait(10)
        locker = Locker(db_path)
        with pytest.raises(BackendUnavailable, match="locked"):
            quick.enqueue("refused")  # a producer: the contract's error, not sqlite3's
        gate.set()  # its outcome meets the lock
        seen = refusals(caplog)
        eventually(lambda: refusals(caplog) >= seen + 2, timeout_s=20)
        assert thread.is_alive() and long.status() == "running"
        locker.release()
        assert long.result(timeout_s=20) == "long"
        after = quick.enqueue("after")
        assert after.result(timeout_s=20) == "after"
        assert runs == ["long", "after"] and worker.failure is None
    finally:
        gate.set()
        worker.stop()
        thread.join(10)
        q.close()


def test_a_full_disk_refuses_an_enqueue_whole(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = TaskQueue(f"sqlite:///{db_path}")

    @q.task
    def f(blob: str) -> None:
        return None

    f.enqueue("small")
    q.close()
    real_connect = SQLiteBackend._connect

    def small_disk(self: SQLiteBackend) -> sqlite3.Connection:
        db = real_connect(self)
        count = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {count + 2}")  # room for a little more only
        return db

    monkeypatch.setattr(SQLiteBackend, "_connect", small_disk)
    q = TaskQueue(f"sqlite:///{db_path}")
    f = q.task(f.fn, name=f.name)
    try:
        with pytest.raises(BackendUnavailable, match="full"):
            f.enqueue_many([(("x" * 100_000,), {}) for _ in range(20)])
        assert q.stats().queued == 1  # the batch was refused whole
        with pytest.raises(BackendUnavailable, match="full"):
            f.enqueue("y" * 1_000_000)
        assert q.stats().queued == 1
        f.enqueue("fits")
        assert q.stats().queued == 2
    finally:
        q.close()


def test_a_file_that_is_not_a_database_is_a_backend_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is not SQLite, " * 100)
    with pytest.raises(BackendError) as raised:
        TaskQueue(f"sqlite:///{db_path}")
    assert not isinstance(raised.value, BackendUnavailable)
    assert "not a database" in str(raised.value)


def test_doctor_finds_and_repairs_rows_out_of_step(db_path: Path) -> None:
    q = TaskQueue(f"sqlite:///{db_path}")
    try:

        @q.task
        def work(name: str) -> str:
            return name

        jobs = [work.enqueue(name) for name in ("a", "b", "c")]
        assert q.backend.doctor(q.now()) == []
        with sqlite3.connect(db_path) as db:  # edited by hand
            db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (jobs[0].id,))
            db.execute("UPDATE jobs SET token = 'x' WHERE id = ?", (jobs[1].id,))
            db.execute("UPDATE jobs SET state = 'paused' WHERE id = ?", (jobs[2].id,))
        db.close()
        found = q.backend.doctor(q.now())
        assert sorted(found) == sorted(
            [
                f"job {jobs[0].id}: running, but without a lease",
                f"job {jobs[1].id}: not running, but with a lease",
                f"job {jobs[2].id}: its state is none of conveyor's",
            ]
        )
        assert all(line.endswith("; put right") for line in q.backend.doctor(q.now(), True))
        assert q.backend.doctor(q.now()) == []
        q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
        assert [jobs[0].result(timeout_s=5), jobs[1].result(timeout_s=5)] == ["a", "b"]
        assert jobs[2].status() == "dead"
    finally:
        q.close()


#: the jobs table as the first released version made it (before lost, progress and history)
_FIRST_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, queue TEXT NOT NULL, task TEXT NOT NULL,
    payload BLOB NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL, key TEXT,
    attempts INTEGER NOT NULL, enqueued_at REAL NOT NULL, run_at REAL NOT NULL,
    lease_until REAL, token TEXT, result BLOB, error TEXT, finished_at REAL, keep_until REAL
);
INSERT INTO jobs (id, queue, task, payload, state, priority, attempts, enqueued_at, run_at)
VALUES ('old', 'q', 't', x'7b7d', 'queued', 0, 0, 1.0, 1.0);
"""


def test_a_file_of_an_earlier_version_is_brought_up_to_date_and_keeps_its_jobs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(_FIRST_SCHEMA)
    db.close()  # the with block commits; it does not close
    backend = SQLiteBackend(path)
    again = SQLiteBackend(path)  # a second process opening it at once finds it done
    try:
        old = backend.get("old")
        assert old is not None and (old.lost, old.history, old.worker) == (0, (), None)
        [lease] = again.claim("q", "w", 30, 2.0)
        assert lease.job.id == "old" and lease.job.worker == "w"
        assert again.retry("old", lease.token, 3.0, "boom", 2.5)
        got = backend.get("old")
        assert got is not None and [(r.outcome, r.error) for r in got.runs()] == [
            ("retried", "boom")
        ]
    finally:
        backend.close()
        again.close()
