"""``sqlite:///path``: a durable queue in one file, shared by many processes on one machine.

The file is in WAL mode (readers never block the writer) with ``synchronous=NORMAL``: a commit
survives the process being killed; a power cut may lose the last commits, never corrupt the
file. Every change runs in a ``BEGIN IMMEDIATE`` transaction, which takes the write lock up
front, so two workers can never claim the same job. Connections are lent for one call at a
time from a small shelf, so they never outlive the queue and no thread holds one when it ends.

SQLite cannot notify another process of a commit, so waiting for work polls ``PRAGMA
data_version`` (a cheap read that changes when another connection commits), backing off from
5 ms to 100 ms.

Errors. A call that finds the file locked by another writer waits for it up to ``busy_s`` (30 s;
``?busy_s=`` in the URL), then raises :class:`~conveyor.BackendUnavailable`, as it does for a
full disk or an I/O error: the transaction was rolled back whole, and trying later may work. A
file that is not a database, or is damaged, raises :class:`~conveyor.BackendError`.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..._errors import BackendError, BackendUnavailable, ClosedResourceError, ConfigurationError
from .base import (
    ABORTED,
    DEAD,
    DONE,
    PARKED_S,
    QUEUED,
    RUNNING,
    STATES,
    WAITING,
    WORKER_KEPT_S,
    Backend,
    ClaimAfter,
    Job,
    Lease,
    Limit,
    NewJob,
    Outcomes,
    QueueCounts,
    ScheduleInfo,
    WorkerInfo,
    check_listing,
    fresh_job,
    kept_error,
    not_run_because,
    parse_history,
    rate_step,
    replaceable,
    reservation_kept_s,
    taken_whole,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    key TEXT,
    attempts INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    run_at REAL NOT NULL,
    lease_until REAL,
    token TEXT,
    result BLOB,
    error TEXT,
    finished_at REAL,
    keep_until REAL,
    lost INTEGER NOT NULL DEFAULT 0,
    progress REAL,
    progress_note TEXT,
    worker TEXT,
    started_at REAL,
    history TEXT,
    waits_for INTEGER NOT NULL DEFAULT 0,
    then_jobs TEXT,
    inputs TEXT,
    abort_by TEXT
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (queue, state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (queue, key, state, seq) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_keep ON jobs (keep_until) WHERE state = 'done';
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    last_beat REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS places (
    grp TEXT NOT NULL,
    token TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (grp, token)
);
CREATE TABLE IF NOT EXISTS buckets (
    grp TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reserved (
    grp TEXT NOT NULL,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (grp, job_id)
);
CREATE TABLE IF NOT EXISTS parked (
    seq INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    job_id TEXT NOT NULL,
    UNIQUE (grp, job_id)
);
"""

_COLUMNS = (
    "id, queue, task, payload, state, priority, key, attempts, enqueued_at, run_at, "
    "lease_until, token, result, error, finished_at, keep_until, lost, progress, progress_note, "
    "worker, started_at, history, waits_for, then_jobs, inputs, abort_by"
)


#: the error of an aborted job, in SQL
_ABORTED_BY = "'aborted by ' || coalesce(abort_by, '?')"


def _ended(outcome: str, at: str, error: str) -> str:
    """The SET part that appends the attempt under way to the job's history (JSON lines): it
    ended ``at`` (SQL) as ``outcome``, with ``error`` (SQL: what ``kept_error`` keeps).
    SQLite reads every column in a SET at its value before the UPDATE."""
    return (
        "history = coalesce(history, '') || json_object('n', attempts, 'worker', worker, "
        f"'started_at', started_at, 'ended_at', {at}, 'outcome', '{outcome}', "
        f"'error', {error}) || char(10)"
    )


_CLAIMABLE = """
SELECT id FROM jobs AS j
WHERE j.queue = ? AND j.state = 'queued' AND j.run_at <= ?
  AND (j.key IS NULL OR (
        NOT EXISTS (SELECT 1 FROM jobs AS r
                    WHERE r.queue = j.queue AND r.key = j.key AND r.state = 'running')
    AND NOT EXISTS (SELECT 1 FROM jobs AS e
                    WHERE e.queue = j.queue AND e.key = j.key AND e.state = 'queued'
                      AND e.seq < j.seq)))
ORDER BY j.priority DESC, j.seq
LIMIT ?
"""


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file made by an earlier version up to the current schema (idempotent; two
    processes doing it at once are fine: the second finds the column there)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, kind in (
        ("lost", "INTEGER NOT NULL DEFAULT 0"),
        ("progress", "REAL"),
        ("progress_note", "TEXT"),
        ("worker", "TEXT"),
        ("started_at", "REAL"),
        ("history", "TEXT"),
        ("waits_for", "INTEGER NOT NULL DEFAULT 0"),
        ("then_jobs", "TEXT"),
        ("inputs", "TEXT"),
        ("abort_by", "TEXT"),
    ):
        if name in columns:
            continue
        try:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


_NAMES = tuple(_COLUMNS.split(", "))


def _job(row: Any) -> Job:
    fields = dict(zip(_NAMES, row, strict=True))
    fields["history"] = parse_history(fields["history"])
    then = fields.pop("then_jobs")
    fields["then"] = tuple((dep, place) for dep, place in json.loads(then)) if then else ()
    inputs = fields["inputs"]
    fields["inputs"] = _inputs(inputs) if inputs else ()
    return Job(**fields)


def _inputs(text: str) -> tuple[tuple[int, bytes | None], ...]:
    """The inputs column (JSON: place -> base64 of the result, or null) as ``Job.inputs``."""
    return tuple(
        (int(place), None if data is None else base64.b64decode(data))
        for place, data in sorted(json.loads(text).items(), key=lambda kv: int(kv[0]))
    )


_INSERT = (
    "INSERT INTO jobs (id, queue, task, payload, state, priority, key, attempts, enqueued_at, "
    "run_at, waits_for, then_jobs) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"
)


def _row(new: NewJob, now: float) -> tuple[Any, ...]:
    state = WAITING if new.waits_for > 0 else QUEUED
    then = json.dumps([list(pair) for pair in new.then]) if new.then else None
    return (
        new.id,
        new.queue,
        new.task,
        new.payload,
        state,
        new.priority,
        new.key,
        now,
        new.run_at,
        new.waits_for,
        then,
    )


def _follow(db: sqlite3.Connection, job_id: str, now: float) -> None:
    """``job_id`` is now done or dead: tell the jobs that wait for it (see the contract), in
    the caller's transaction."""
    row = db.execute(
        "SELECT state, result, then_jobs, task, error FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None or not row[2]:
        return
    state, result, then, task, error = row
    if state == DONE:
        data = None if result is None else base64.b64encode(result).decode()
        for dep_id, place in json.loads(then):
            found = db.execute(
                "SELECT waits_for, inputs FROM jobs WHERE id = ? AND state = 'waiting'", (dep_id,)
            ).fetchone()
            if found is None:
                continue
            inputs = json.loads(found[1]) if found[1] else {}
            inputs[str(place)] = data
            left = found[0] - 1
            db.execute(
                "UPDATE jobs SET waits_for = ?, inputs = ?, state = ? WHERE id = ?",
                (left, json.dumps(inputs), QUEUED if left <= 0 else WAITING, dep_id),
            )
        return
    blocked = [(job_id, task, error, then)]
    while blocked:
        dead_id, dead_task, dead_error, dead_then = blocked.pop()
        for dep_id, _ in json.loads(dead_then or "[]"):
            found = db.execute(
                "SELECT task, then_jobs FROM jobs WHERE id = ? AND state = 'waiting'", (dep_id,)
            ).fetchone()
            if found is None:
                continue
            why = not_run_because(dead_id, dead_task, dead_error)
            db.execute(
                "UPDATE jobs SET state = 'dead', error = ?, finished_at = ? WHERE id = ?",
                (why, now, dep_id),
            )
            blocked.append((dep_id, found[0], why, found[1]))


def _acquire(
    db: sqlite3.Connection, limits: Sequence[Limit], job_id: str, token: str, now: float
) -> float | None:
    """``acquire``, in the caller's write transaction."""
    holds = db.execute(
        "SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND token = ?",
        (job_id, token),
    ).fetchone()
    if holds is None:
        return PARKED_S  # that run does not hold the job (any more): it must not start
    wait = 0.0
    full: list[str] = []
    starts: list[tuple[str, float, float]] = []
    reserves: list[tuple[str, float, float, float]] = []
    for limit in limits:
        if limit.concurrency is not None:
            # the places of runs that are over are free again, however they ended
            db.execute(
                "DELETE FROM places WHERE grp = ? AND NOT EXISTS (SELECT 1 FROM jobs "
                "WHERE jobs.id = places.job_id AND jobs.state = 'running' "
                "AND jobs.token = places.token)",
                (limit.group,),
            )
            (held,) = db.execute(
                "SELECT COUNT(*) FROM places WHERE grp = ? AND token != ?",
                (limit.group, token),
            ).fetchone()
            if held >= limit.concurrency:
                full.append(limit.group)
                wait = max(wait, PARKED_S)
        if limit.rate is not None:
            db.execute(  # reservations whose job never came back
                "DELETE FROM reserved WHERE grp = ? AND at < ?",
                (limit.group, now - reservation_kept_s(limit.rate)),
            )
            row = db.execute(
                "SELECT tokens, at FROM buckets WHERE grp = ?", (limit.group,)
            ).fetchone()
            booked = db.execute(
                "SELECT at FROM reserved WHERE grp = ? AND job_id = ?", (limit.group, job_id)
            ).fetchone()
            state = None if row is None else (row[0], row[1])
            need, bucket = rate_step(state, limit.rate, now, None if booked is None else booked[0])
            if need == 0:
                starts.append((limit.group, *bucket))
            else:
                wait = max(wait, need)
                if booked is None:
                    reserves.append((limit.group, *bucket, now + need))
    if wait > 0:
        db.executemany(
            "INSERT OR IGNORE INTO parked (grp, job_id) VALUES (?, ?)",
            [(group, job_id) for group in full],
        )
        if not full:  # a job parked for a place reserves no start: it may wait long
            db.executemany(_SET_BUCKET, [(group, tokens, at) for group, tokens, at, _ in reserves])
            db.executemany(
                "INSERT OR REPLACE INTO reserved (grp, job_id, at) VALUES (?, ?, ?)",
                [(group, job_id, due) for group, _, _, due in reserves],
            )
        db.execute(  # handed back in the same change: no end can slip in between
            "UPDATE jobs SET state = 'queued', token = NULL, lease_until = NULL, "
            "run_at = ?, attempts = MAX(0, attempts - 1) "
            "WHERE id = ? AND state = 'running' AND token = ?",
            (now + wait, job_id, token),
        )
        return wait
    db.executemany(
        "INSERT OR IGNORE INTO places (grp, token, job_id) VALUES (?, ?, ?)",
        [(lim.group, token, job_id) for lim in limits if lim.concurrency is not None],
    )
    db.executemany(_SET_BUCKET, starts)
    db.executemany(
        "DELETE FROM reserved WHERE grp = ? AND job_id = ?",
        [(lim.group, job_id) for lim in limits if lim.rate is not None],
    )
    return None


_SET_BUCKET = (
    "INSERT INTO buckets (grp, tokens, at) VALUES (?, ?, ?) ON CONFLICT (grp) "
    "DO UPDATE SET tokens = excluded.tokens, at = excluded.at"
)


_COMPLETE = (
    "UPDATE jobs SET state = 'done', token = NULL, lease_until = NULL, result = ?, "
    "finished_at = ?, keep_until = ?"
)


def _completed_rows(
    done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
) -> list[tuple[Any, ...]]:
    return [
        (result, now, None if keep_s is None else now + keep_s, job_id, token)
        for job_id, token, result, keep_s in done
    ]


def _held_in(
    db: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]], follow_at: float | None
) -> list[bool]:
    """``sql`` (an UPDATE's SET part) for each row of values ending with ``(job_id, token)``,
    in the transaction of ``db``, applied only where the token holds the job (see
    ``_held_updates``)."""
    where = sql + " WHERE id = ? AND state = 'running' AND token = ?"
    held = [db.execute(where, row).rowcount == 1 for row in rows]
    if follow_at is not None:
        for row, ok in zip(rows, held, strict=True):
            if ok:
                _follow(db, row[-2], follow_at)
    return held


class SQLiteBackend(Backend):
    #: idle connections kept for the next call; more are opened while more threads call at
    #: once, and closed again when they come back to a full shelf
    _IDLE = 4

    def __init__(self, path: str | Path, busy_s: float = 30.0, create: bool = True) -> None:
        """``create=False``: open a queue that is there, never make one (the file must exist
        and hold conveyor's tables); for tools that only look."""
        self.path = str(path)
        self.busy_s = busy_s
        if self.path != ":memory:":
            if not create and not Path(self.path).is_file():
                raise ConfigurationError(
                    f"no SQLite queue at {self.path!r}: the file does not exist (nothing was "
                    "created)"
                )
            if create:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # connections are lent for one call at a time, never tied to a thread: a thread that
        # ends holds none, and close() closes every one that is not in use (the others close
        # when their call returns)
        self._idle: list[sqlite3.Connection] = []
        # a queue dropped without close() still closes what it holds
        self._release = weakref.finalize(self, _close_all, self._idle)
        self._lent = 0
        self._lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._waits = threading.Condition()
        self._waiting = 0  # waits under way (see _poll)
        # every statement of the schema is idempotent: many processes may open the file at once
        with self._db() as db:
            if not create and self.path != ":memory:":
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
                if "jobs" not in tables:
                    self.close()
                    raise ConfigurationError(
                        f"{self.path!r} is not a conveyor queue (it has no jobs table)"
                    )
            db.executescript(_SCHEMA)
            _migrate(db)

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, timeout=self.busy_s, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call, back on the shelf afterwards."""
        with self._lock:
            if self._closed:
                raise ClosedResourceError(f"the queue at {self.path} was closed")
            db = self._idle.pop() if self._idle else None
            self._lent += 1
        broken = False
        try:
            if db is None:
                db = self._connect()
            yield db
        except sqlite3.OperationalError as exc:
            broken = True
            raise BackendUnavailable(f"the SQLite queue {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            broken = True
            raise BackendError(f"the SQLite queue {self.path}: {exc}") from exc
        finally:
            with self._lock:
                self._lent -= 1
                # a connection that met an error is not lent again: a fresh one has no state
                keep = (
                    db is not None
                    and not broken
                    and not self._closed
                    and len(self._idle) < self._IDLE
                )
                if keep:
                    assert db is not None
                    self._idle.append(db)
            if db is not None and not keep:
                db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back by itself (a full disk)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def worker_beat(self, info: WorkerInfo) -> None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO workers (id, last_beat, record) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET last_beat = excluded.last_beat, "
                    "record = excluded.record",
                    (info.id, info.last_beat, info.to_json()),
                )
                db.execute(
                    "DELETE FROM workers WHERE last_beat < ?", (info.last_beat - WORKER_KEPT_S,)
                )
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def workers(self) -> list[WorkerInfo]:
        with self._db() as db:
            rows = db.execute("SELECT record FROM workers ORDER BY last_beat DESC").fetchall()
        return [WorkerInfo.from_json(record) for (record,) in rows]

    def jobs(
        self,
        queue: str,
        state: str | None = None,
        *,
        task: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        check_listing(state, limit, offset)
        where, args = ["queue = ?"], [queue]
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        sql = (
            f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY enqueued_at, id LIMIT ? OFFSET ?"
        )
        with self._db() as db:
            return [_job(row) for row in db.execute(sql, (*args, limit, offset))]

    def _read(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    # -- the contract ---------------------------------------------------------------------------
    def enqueue(
        self, jobs: Sequence[NewJob], now: float, whole: bool = False
    ) -> list[tuple[Job, bool]]:
        if len(jobs) == 1 and not whole:
            # the common case: one statement, its own transaction (autocommit). seq is the
            # rowid, numbered past every row there is
            new = jobs[0]
            with self._db() as db:
                cur = db.execute(_INSERT + " ON CONFLICT (id) DO NOTHING", _row(new, now))
            if cur.rowcount == 1:
                return [(fresh_job(new, now), True)]
        with self._write() as db:
            if whole:
                taken = taken_whole(jobs, [self._read(db, new.id) for new in jobs], now)
                if taken is not None:
                    return taken
            return self._enqueue(db, jobs, now)

    def _enqueue(
        self, db: sqlite3.Connection, jobs: Sequence[NewJob], now: float
    ) -> list[tuple[Job, bool]]:
        """``enqueue``, inside the caller's write transaction."""
        out: list[tuple[Job, bool]] = []
        rows = []
        added: dict[str, Job] = {}  # an id twice in one batch: the first one counts
        for new in jobs:
            if new.id in added:
                out.append((added[new.id], False))
                continue
            old = self._read(db, new.id)
            if old is not None and not replaceable(old, now):
                out.append((old, False))
                continue
            if old is not None:
                db.execute("DELETE FROM jobs WHERE id = ?", (new.id,))
            job = fresh_job(new, now)
            rows.append(_row(new, now))
            added[job.id] = job
            out.append((job, True))
        db.executemany(_INSERT, rows)
        return out

    def swap_schedule(
        self,
        name: str,
        expected: ScheduleInfo | None,
        new: ScheduleInfo | None,
        jobs: Sequence[NewJob] = (),
        now: float = 0.0,
    ) -> bool:
        with self._write() as db:
            row = db.execute("SELECT record FROM schedules WHERE name = ?", (name,)).fetchone()
            if (row[0] if row else None) != (None if expected is None else expected.expected()):
                return False
            if new is None:
                db.execute("DELETE FROM schedules WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO schedules (name, record) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                    (name, new.to_json()),
                )
            self._enqueue(db, jobs, now)
        return True

    def schedules(self) -> list[ScheduleInfo]:
        with self._db() as db:
            rows = db.execute("SELECT name, record FROM schedules ORDER BY name").fetchall()
        return [ScheduleInfo.read(name, record) for name, record in rows]

    def claim(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int = 1
    ) -> list[Lease]:
        with self._write() as db:
            return self._claim_in(db, queue, worker, lease_s, now, limit)

    def _claim_in(
        self, db: sqlite3.Connection, queue: str, worker: str, lease_s: float, now: float,
        limit: int,
    ) -> list[Lease]:  # fmt: skip
        """``claim``, in the transaction of ``db``."""
        db.execute(
            "UPDATE jobs SET state = 'queued', token = NULL, lease_until = NULL, "
            f"lost = lost + 1, {_ended('lost', 'lease_until', 'NULL')} "
            "WHERE queue = ? AND state = 'running' AND lease_until <= ?",
            (queue, now),
        )
        ids = [r[0] for r in db.execute(_CLAIMABLE, (queue, now, limit))]
        tokens = [uuid.uuid4().hex for _ in ids]
        db.executemany(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, token = ?, "
            "lease_until = ?, worker = ?, started_at = ? WHERE id = ?",
            [(t, now + lease_s, worker, now, i) for i, t in zip(ids, tokens, strict=True)],
        )
        leases = []
        for job_id, token in zip(ids, tokens, strict=True):
            job = self._read(db, job_id)
            assert job is not None
            leases.append(Lease(job, token))
        return leases

    def _held_updates(
        self, sql: str, rows: Sequence[tuple[Any, ...]], follow_at: float | None = None
    ) -> list[bool]:
        """Run ``sql`` (an UPDATE's SET part) for each row of values ending with ``(job_id,
        token)``, in one transaction; each is applied only where the token holds the job.
        ``follow_at``: the change ends the job (done or dead); the jobs waiting for it hear
        of it in the same transaction."""
        with self._write() as db:
            return _held_in(db, sql, rows, follow_at)

    def heartbeat(self, job_id: str, token: str, lease_s: float, now: float) -> bool:
        return self.heartbeat_many([(job_id, token)], lease_s, now)[0]

    def heartbeat_many(
        self, held: Sequence[tuple[str, str]], lease_s: float, now: float
    ) -> list[bool]:
        return self._held_updates(
            "UPDATE jobs SET lease_until = ?",
            [(now + lease_s, job_id, token) for job_id, token in held],
        )

    def complete(
        self, job_id: str, token: str, result: bytes | None, keep_s: float | None, now: float
    ) -> bool:
        return self.complete_many([(job_id, token, result, keep_s)], now)[0]

    def complete_many(
        self, done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
    ) -> list[bool]:
        return self._held_updates(_COMPLETE, _completed_rows(done, now), follow_at=now)

    def complete_then_claim(
        self, done: Outcomes, queue: str, worker: str, lease_s: float, now: float, limit: int
    ) -> ClaimAfter:
        # one transaction, one commit: if it fails, neither part happened
        try:
            with self._write() as db:
                results = _held_in(db, _COMPLETE, _completed_rows(done, now), now)
                return results, self._claim_in(db, queue, worker, lease_s, now, limit)
        except Exception as exc:
            return exc, exc

    def retry(self, job_id: str, token: str, run_at: float, error: str, now: float) -> bool:
        return self._held_updates(
            "UPDATE jobs SET state = 'queued', token = NULL, lease_until = NULL, run_at = ?, "
            f"error = ?, {_ended('retried', '?', '?')}",
            [(run_at, error, now, kept_error(error), job_id, token)],
        )[0]

    def fail(self, job_id: str, token: str, error: str, now: float) -> bool:
        return self._held_updates(
            "UPDATE jobs SET state = 'dead', token = NULL, lease_until = NULL, error = ?, "
            f"finished_at = ?, {_ended('dead', '?', '?')}",
            [(error, now, now, kept_error(error), job_id, token)],
            follow_at=now,
        )[0]

    def release(self, job_id: str, token: str, now: float, run_at: float | None = None) -> bool:
        return self._held_updates(
            "UPDATE jobs SET state = 'queued', token = NULL, lease_until = NULL, run_at = ?, "
            "attempts = MAX(0, attempts - 1)",
            [(now if run_at is None else run_at, job_id, token)],
        )[0]

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            return self._read(db, job_id)

    def finish(self, job_id: str, now: float) -> None:
        with self._write() as db:
            before = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cur = db.execute(
                "UPDATE jobs SET state = 'done', token = NULL, lease_until = NULL, "
                "finished_at = ?, keep_until = NULL WHERE id = ?",
                (now, job_id),
            )
            if before is not None and before[0] != DONE:
                _follow(db, job_id, now)
            if cur.rowcount == 0:
                db.execute(
                    "INSERT INTO jobs (id, queue, task, payload, state, priority, key, "
                    "attempts, enqueued_at, run_at, finished_at) "
                    "VALUES (?, '', '', x'', 'done', 0, NULL, 0, ?, ?, ?)",
                    (job_id, now, now, now),
                )

    def progress(self, job_id: str, token: str, fraction: float, note: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ?, progress_note = ? "
                "WHERE id = ? AND state = 'running' AND token = ?",
                (fraction, note, job_id, token),
            )
            return cur.rowcount == 1

    def cancel(self, job_id: str, reason: str, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'dead', error = ?, finished_at = ? "
                "WHERE id = ? AND state IN ('queued', 'waiting')",
                (reason, now, job_id),
            )
            if cur.rowcount == 1:
                _follow(db, job_id, now)
            return cur.rowcount == 1

    def acquire(self, limits: Sequence[Limit], job_id: str, token: str, now: float) -> float | None:
        return self.acquire_many([(limits, job_id, token)], now)[0]

    def acquire_many(
        self, runs: Sequence[tuple[Sequence[Limit], str, str]], now: float
    ) -> list[float | None]:
        with self._write() as db:
            return [_acquire(db, limits, job_id, token, now) for limits, job_id, token in runs]

    def release_places(self, limits: Sequence[Limit], token: str, now: float) -> None:
        with self._write() as db:
            for limit in limits:
                if limit.concurrency is None:
                    continue
                db.execute("DELETE FROM places WHERE grp = ? AND token = ?", (limit.group, token))
                while True:
                    row = db.execute(
                        "SELECT seq, job_id FROM parked WHERE grp = ? ORDER BY seq LIMIT 1",
                        (limit.group,),
                    ).fetchone()
                    if row is None:
                        break
                    db.execute("DELETE FROM parked WHERE seq = ?", (row[0],))
                    moved = db.execute(
                        "UPDATE jobs SET run_at = ? WHERE id = ? AND state = 'queued' "
                        "AND run_at > ?",
                        (now, row[1], now),
                    )
                    if moved.rowcount:
                        break

    def abort(self, job_id: str, by: str, now: float) -> str:
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return "unknown"
            (state,) = row
            if state == RUNNING:
                db.execute("UPDATE jobs SET abort_by = ? WHERE id = ?", (by, job_id))
                return "requested"
            if state not in (QUEUED, WAITING):
                return str(state)
            db.execute(
                "UPDATE jobs SET state = 'aborted', abort_by = ?, error = ?, finished_at = ? "
                "WHERE id = ?",
                (by, f"aborted by {by}", now, job_id),
            )
            _follow(db, job_id, now)
            return ABORTED

    def aborted(self, job_id: str, token: str, now: float) -> bool:
        return self._held_updates(
            "UPDATE jobs SET state = 'aborted', token = NULL, lease_until = NULL, "
            f"error = {_ABORTED_BY}, finished_at = ?, {_ended('aborted', '?', _ABORTED_BY)}",
            [(now, now, job_id, token)],
            follow_at=now,
        )[0]

    def abort_requests(self, job_ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._db() as db:
            for start in range(0, len(job_ids), 500):
                chunk = list(job_ids[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(
                    db.execute(
                        f"SELECT id, abort_by FROM jobs WHERE id IN ({marks}) "
                        "AND state = 'running' AND abort_by IS NOT NULL",
                        chunk,
                    ).fetchall()
                )
        return found

    def unfinish(self, job_id: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ? AND state = 'done'", (job_id,))
            return cur.rowcount == 1

    def doctor(self, now: float, repair: bool = False) -> list[str]:
        said: list[str] = []
        with self._db() as db:
            check = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            said += [f"the file is damaged: {line}" for line in check]
            return said  # nothing in it can be trusted enough to repair
        states = "', '".join(STATES)
        rules = [
            (
                f"state NOT IN ('{states}')",
                "its state is none of conveyor's",
                "state = 'dead', error = 'conveyor doctor: found in state ' || state, "
                "token = NULL, lease_until = NULL",
            ),
            (
                "state = 'running' AND (token IS NULL OR lease_until IS NULL)",
                "running, but without a lease",
                "state = 'queued', token = NULL, lease_until = NULL, lost = lost + 1",
            ),
            (
                "state != 'running' AND (token IS NOT NULL OR lease_until IS NOT NULL)",
                "not running, but with a lease",
                "token = NULL, lease_until = NULL",
            ),
        ]
        with self._write() as db:
            for where, what, fix in rules:
                for (job_id,) in db.execute(f"SELECT id FROM jobs WHERE {where}").fetchall():
                    said.append(f"job {job_id}: {what}" + ("; put right" if repair else ""))
                if repair:
                    db.execute(f"UPDATE jobs SET {fix} WHERE {where}")
        return said

    def _requeue(self, where: str, value: str, now: float) -> int:
        with self._write() as db:
            return db.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, lost = 0, run_at = ?, "
                "finished_at = NULL "
                f"WHERE state = 'dead' AND {where} = ?",
                (now, value),
            ).rowcount

    def requeue(self, job_id: str, now: float) -> bool:
        return self._requeue("id", job_id, now) == 1

    def requeue_dead(self, queue: str, now: float) -> int:
        return self._requeue("queue", queue, now)

    def purge(self, queue: str) -> int:
        with self._write() as db:
            cur = db.execute("DELETE FROM jobs WHERE queue = ? AND state != 'running'", (queue,))
            return cur.rowcount

    def expire(self, now: float) -> int:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state = 'done' AND keep_until IS NOT NULL "
                "AND keep_until <= ?",
                (now,),
            )
            return cur.rowcount

    def counts(self, queue: str, now: float) -> QueueCounts:
        # one read transaction, so the counts and the leases are one snapshot
        with self._db() as db:
            db.execute("BEGIN")
            try:
                return self._counts(db, queue, now)
            finally:
                db.execute("COMMIT")

    def _counts(self, db: sqlite3.Connection, queue: str, now: float) -> QueueCounts:
        per_state = dict(
            db.execute("SELECT state, COUNT(*) FROM jobs WHERE queue = ? GROUP BY state", (queue,))
        )
        (delayed,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE queue = ? AND state = 'queued' AND run_at > ?",
            (queue, now),
        ).fetchone()
        (oldest,) = db.execute(
            "SELECT MIN(enqueued_at) FROM jobs WHERE queue = ? AND state = 'queued' "
            "AND run_at <= ?",
            (queue, now),
        ).fetchone()
        leases = tuple(
            (job_id, until - now)
            for job_id, until in db.execute(
                "SELECT id, lease_until FROM jobs WHERE queue = ? AND state = 'running' "
                "ORDER BY lease_until",
                (queue,),
            )
        )
        return QueueCounts(
            queued=per_state.get(QUEUED, 0),
            delayed=delayed,
            running=per_state.get(RUNNING, 0),
            done=per_state.get(DONE, 0),
            dead=per_state.get(DEAD, 0),
            oldest_waiting_s=None if oldest is None else max(0.0, now - oldest),
            leases=leases,
            waiting=per_state.get(WAITING, 0),
            aborted=per_state.get(ABORTED, 0),
        )

    def next_run_at(self, queue: str) -> float | None:
        with self._db() as db:
            (at,) = db.execute(
                "SELECT MIN(CASE WHEN state = 'queued' THEN run_at ELSE lease_until END) "
                "FROM jobs WHERE queue = ? AND state IN ('queued', 'running')",
                (queue,),
            ).fetchone()
        return None if at is None else float(at)

    def _poll(self, timeout_s: float) -> None:
        # a wait may still be under way on another thread when the backend is closed (a
        # stopped worker does not wait for its waiter): close() ends it and waits for it, so
        # no connection is closed while a thread uses it
        with self._waits:
            if self._closing.is_set():
                return
            self._waiting += 1
        try:
            with self._db() as db:
                self._watch(db, timeout_s)
        finally:
            with self._waits:
                self._waiting -= 1
                self._waits.notify_all()

    def _watch(self, db: sqlite3.Connection, timeout_s: float) -> None:
        """Return when another connection commits, the backend closes, or time is up."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        (start,) = db.execute("PRAGMA data_version").fetchone()
        pause = 0.005
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._closing.wait(min(pause, left)):
                return
            (now,) = db.execute("PRAGMA data_version").fetchone()
            if now != start:
                return
            pause = min(pause * 2, 0.1)

    def wait_for_work(self, queue: str, timeout_s: float) -> None:
        self._poll(timeout_s)

    def wait_for_job(self, job_id: str, timeout_s: float) -> None:
        self._poll(timeout_s)

    def close(self) -> None:
        self._closing.set()
        with self._waits:
            self._waits.wait_for(lambda: self._waiting == 0, timeout=5)
        with self._lock:
            self._closed = True
        self._release()


def _close_all(connections: list[sqlite3.Connection]) -> None:
    while connections:
        connections.pop().close()
