"""``postgresql://``: the queue in a PostgreSQL database, shared by workers on many machines.

Every change of state is one transaction. Workers claim with ``FOR UPDATE SKIP LOCKED``, so
claims never wait for each other, and take a batch per call. Waiting is woken by ``LISTEN`` /
``NOTIFY``: every change that makes a job claimable notifies the queue's channel, and every
change that ends a job notifies its id, so idle workers and ``job.result()`` do not poll.

Schema. The tables live in a schema of their own (``conveyor``, or ``?schema=NAME`` in the
URL), made and brought up to date by ``conveyor migrate URL`` (or :func:`migrate`): versioned,
idempotent, and serialised by an advisory lock, so several machines may run it at once. A queue
opened on a database without the schema, or with an older one, says to run it; a schema made
by a newer conveyor is refused with its version.

Transactional enqueue. :meth:`PostgresBackend.enqueue_in` writes jobs through the caller's own
connection (psycopg 3 or 2, or an SQLAlchemy session or connection): the job exists if and only
if the caller's transaction commits, and the wake-up notice is sent by the commit.

Connections. Each call borrows a connection from a small shelf. A call that meets a broken
connection (the server restarting, a failover, a terminated backend), a deadlock or a
serialisation failure is run again on a fresh connection with exponential back-off, for up to
``retry_s`` seconds (20 by default; ``?retry_s=`` in the URL), then raises
:class:`~conveyor.BackendUnavailable`. A change sent again whose first sending did commit (the
reply was what got lost) answers as if it had just done its work. A wrong password, an unknown
user or database fails at once, with the URL's password masked.

URL: ``postgresql://[user[:password]@]host[:port]/db[?schema=conveyor&retry_s=20]``; the other
query options are libpq's (``sslmode``, ``application_name``...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlparse, urlunparse

import psycopg
from psycopg import errors as pg_errors

from ..._errors import (
    BackendError,
    BackendUnavailable,
    ClosedResourceError,
    ConfigurationError,
    redacted,
)
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
    Job,
    Lease,
    Limit,
    NewJob,
    QueueCounts,
    ScheduleInfo,
    WorkerInfo,
    check_listing,
    fresh_job,
    kept_error,
    not_run_because,
    rate_step,
    replaceable,
    reservation_kept_s,
    storable,
    taken_whole,
)
from .sqlite import _COLUMNS
from .sqlite import _job as _row_job

log = logging.getLogger("conveyor.tasks")

T = TypeVar("T")

#: the schema version this conveyor writes and reads
SCHEMA_VERSION = 1

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")

#: how many jobs one statement takes at most (arrays of parameters)
_CHUNK = 1000

#: error classes after which the same change, sent again, may work: a broken connection
#: (08), a server shutting down or starting (57P0x), too many connections or a full disk
#: (53), a deadlock or serialisation failure (40), a lock not available (55P03)
_AGAIN_STATES = ("08", "57P01", "57P02", "57P03", "53", "40001", "40P01", "55P03")
#: what libpq says when the credentials or names in the URL are wrong: trying again is no use
_REFUSED = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "invalid connection option",
    "unrecognized configuration parameter",
    "invalid value for parameter",
    "invalid URI",
    "invalid sslmode",
)


#: what libpq is told unless the URL says otherwise: TCP keepalives (a connection to a host
#: that vanished is found broken within about 25 s, the listener's too) and a limit on how
#: long sent data may go unacknowledged
_TCP_DEFAULTS = (
    ("keepalives", "1"),
    ("keepalives_idle", "10"),
    ("keepalives_interval", "5"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
)
#: how long one call may wait for the server's answer before its connection is cut and the
#: call tried again (``?timeout_s=`` in the URL): a server that stops answering (stopped,
#: swapping, behind a stuck proxy) never holds a caller for longer
CALL_TIMEOUT_S = 60.0


class _Watchdog:
    """Cuts the connection of a call that has waited for the server longer than its limit:
    the call then fails as on any broken connection, and is tried again or reported. One
    thread per backend, started with the first call (no user code runs there)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._calls: dict[int, tuple[psycopg.Connection[Any], float]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        key = id(conn)
        with self._lock:
            self._calls[key] = (conn, time.monotonic() + self.limit_s)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._watch, name="conveyor:pg-watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.limit_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._calls.values() if deadline <= now]
            for conn in late:
                log.warning(
                    "PostgreSQL: a call had no answer within %g s; its connection is cut",
                    self.limit_s,
                )
                _cut(conn)

    def close(self) -> None:
        self._closed.set()


def _cut(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down under a call that waits on it: its wait ends with
    an error at once (closing the connection would wait for the call)."""
    import socket

    with contextlib.suppress(Exception), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _text(value: str | None) -> str | None:
    """Text as PostgreSQL can store it: without NUL or lone surrogates (U+FFFD in their
    place)."""
    return None if value is None else storable(value).replace("\x00", "\ufffd")


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for libpq, and conveyor's own options taken out of its query."""
    parsed = urlparse(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if name in ("schema", "retry_s", "timeout_s"):
            ours[name] = value
        else:
            theirs.append((name, value))
    scheme = "postgresql" if parsed.scheme == "postgres" else parsed.scheme
    given = {name for name, _ in theirs}
    for name, value in _TCP_DEFAULTS:
        if name not in given:  # a dead peer or link ends the connection, not a call
            theirs.append((name, value))
    # libpq reads %20 as a space, not "+"
    query = urlencode(theirs, quote_via=quote)
    return urlunparse(parsed._replace(scheme=scheme, query=query)), ours


def _schema_sql(s: str) -> list[str]:
    """The statements of schema version 1, in schema ``s`` (quoted)."""
    return [
        f"""CREATE TABLE {s}.jobs (
            seq bigserial NOT NULL,
            id text PRIMARY KEY,
            queue text NOT NULL,
            task text NOT NULL,
            payload bytea NOT NULL,
            state text NOT NULL,
            priority integer NOT NULL,
            key text,
            attempts integer NOT NULL DEFAULT 0,
            enqueued_at double precision NOT NULL,
            run_at double precision NOT NULL,
            lease_until double precision,
            token text,
            ended_token text,
            result bytea,
            error bytea,
            finished_at double precision,
            keep_until double precision,
            lost integer NOT NULL DEFAULT 0,
            progress double precision,
            progress_note text,
            worker text,
            started_at double precision,
            history text,
            waits_for integer NOT NULL DEFAULT 0,
            then_jobs text,
            inputs text,
            abort_by text
        )""",
        # claims: the queued jobs of a queue in claim order
        f"CREATE INDEX jobs_ready ON {s}.jobs (queue, priority DESC, seq) WHERE state = 'queued'",
        # when the next queued job comes due (waits), and which leases lapse first
        f"CREATE INDEX jobs_due ON {s}.jobs (queue, run_at) WHERE state = 'queued'",
        f"CREATE INDEX jobs_leases ON {s}.jobs (queue, lease_until) WHERE state = 'running'",
        # one job of a key at a time, in enqueue order
        f"CREATE INDEX jobs_key ON {s}.jobs (queue, key, seq) "
        "WHERE key IS NOT NULL AND state IN ('queued', 'running')",
        # results that expire
        f"CREATE INDEX jobs_keep ON {s}.jobs (keep_until) "
        "WHERE state = 'done' AND keep_until IS NOT NULL",
        f"""CREATE TABLE {s}.workers (
            id text PRIMARY KEY,
            last_beat double precision NOT NULL,
            record text NOT NULL
        )""",
        f"CREATE TABLE {s}.schedules (name text PRIMARY KEY, record text NOT NULL)",
        f"""CREATE TABLE {s}.places (
            grp text NOT NULL, token text NOT NULL, job_id text NOT NULL,
            PRIMARY KEY (grp, token)
        )""",
        f"""CREATE TABLE {s}.buckets (
            grp text PRIMARY KEY, tokens double precision NOT NULL,
            at double precision NOT NULL
        )""",
        f"""CREATE TABLE {s}.reserved (
            grp text NOT NULL, job_id text NOT NULL, at double precision NOT NULL,
            PRIMARY KEY (grp, job_id)
        )""",
        f"""CREATE TABLE {s}.parked (
            seq bigserial PRIMARY KEY, grp text NOT NULL, job_id text NOT NULL,
            UNIQUE (grp, job_id)
        )""",
    ]


#: each version's statements, from the one before it (version 1: from nothing)
_MIGRATIONS: dict[int, Callable[[str], list[str]]] = {1: _schema_sql}


def _connect_error(where: str, exc: psycopg.Error) -> BackendUnavailable | None:
    """The error to raise at once for a connection refused for good (wrong password, unknown
    user or database), or None when trying again may work."""
    text = str(exc)
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith(("28", "3D")) or any(part in text for part in _REFUSED):
        # libpq's message names the host and user, never the password
        return BackendUnavailable(f"PostgreSQL at {where} refused the connection: {text.strip()}")
    return None


def _again_worthy(exc: BaseException) -> bool:
    """Whether the same change, sent again on a fresh connection, may work."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith(_AGAIN_STATES)
    if isinstance(exc, psycopg.Error):
        state = getattr(exc, "sqlstate", None) or ""
        return state.startswith(_AGAIN_STATES)
    return isinstance(exc, OSError)


def migrate(url: str) -> list[str]:
    """Create conveyor's schema in the database at ``url``, or bring it up to the version this
    conveyor knows; returns what was done, one line each (nothing: it was up to date). Safe to
    run from several machines at once (an advisory lock serialises them) and again at any
    time. A schema made by a newer conveyor is left alone and refused."""
    libpq_url, ours = _split_url(url)
    schema = _schema_name(ours.get("schema", "conveyor"))
    where = redacted(url)
    try:
        conn = psycopg.connect(libpq_url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        refused = _connect_error(where, exc)
        raise refused or BackendUnavailable(f"PostgreSQL at {where}: {exc}") from exc
    said: list[str] = []
    s = f'"{schema}"'
    try:
        with conn.transaction():
            # another migration under way is waited for, a stuck one not for ever
            conn.execute("SET LOCAL lock_timeout = '60s'")
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"conveyor:{schema}",))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.meta (name text PRIMARY KEY, value text NOT NULL)"
            )
            row = conn.execute(
                f"SELECT value FROM {s}.meta WHERE name = 'schema_version'"
            ).fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"the schema {schema!r} at {where} is version {version}, made by a newer "
                    f"conveyor; this one knows up to version {SCHEMA_VERSION}: upgrade conveyor"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step](s):
                    conn.execute(statement)
                said.append(f"schema {schema!r}: version {step - 1} -> {step}")
            conn.execute(
                f"INSERT INTO {s}.meta (name, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
    except psycopg.Error as exc:
        raise BackendError(f"PostgreSQL at {where}: the migration failed: {exc}") from exc
    finally:
        conn.close()
    return said


def _schema_name(name: str) -> str:
    if not _SCHEMA_NAME.fullmatch(name):
        raise ConfigurationError(
            f"schema {name!r}: a PostgreSQL queue's schema is a name of letters, digits and _ "
            "(at most 48, not starting with a digit)"
        )
    return name


class _Wakeups:
    """One connection per backend that ``LISTEN``\\s, on a thread of its own (no user code runs
    there), counting the notices of each queue and of each job waited for. A waiter compares
    the count with the one seen by its last claim, so a notice sent between that claim and the
    wait is not missed; after a reconnection every count moves (anything may have been
    missed)."""

    def __init__(self, backend: PostgresBackend) -> None:
        # what it needs of the backend, not the backend: a queue dropped without close()
        # is still collected, and this thread then ends by itself
        self._owner = weakref.ref(backend)
        self._url = backend.libpq_url
        self._wake = backend.wake_channel
        self._ended = backend.ended_channel
        self._cond = threading.Condition()
        self.counts: dict[str, int] = {}
        self.ended: dict[str, int] = {}  # job ids waited for
        self.tags: dict[str, str] = {}  # and their tags (see _tag)
        self.watchers: dict[str, int] = {}  # and how many wait for each
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._listen, name="conveyor:pg-wake", daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _bump_all(self) -> None:
        with self._cond:
            for table in (self.counts, self.ended):
                for name in table:
                    table[name] += 1
            self._cond.notify_all()

    def _listen(self) -> None:
        delay = 0.05
        while not self._closed.is_set() and self._owner() is not None:
            try:
                conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                log.debug("PostgreSQL wake-up listener reconnecting: %s", exc)
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._conn = conn
            try:
                conn.execute(f'LISTEN "{self._wake}"')
                conn.execute(f'LISTEN "{self._ended}"')
                self._bump_all()  # (re)listening: a notice sent meanwhile may have been missed
                self._ready.set()
                delay = 0.05
                while not self._closed.is_set() and self._owner() is not None:
                    for notice in conn.notifies(timeout=1.0):
                        if self._closed.is_set():
                            break
                        self._heard(notice.channel, notice.payload)
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    log.debug("PostgreSQL wake-up listener reconnecting: %s", exc)
                    self._closed.wait(delay)
                    delay = min(delay * 2, 2.0)
            except Exception:  # pragma: no cover - a bug must not end the thread silently
                log.exception("PostgreSQL wake-up listener failed; waits fall back to timeouts")
                return
            finally:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()

    def _heard(self, channel: str, payload: str) -> None:
        with self._cond:
            if channel == self._wake:
                self.counts[payload] = self.counts.get(payload, 0) + 1
                self._cond.notify_all()
                return
            if not self.ended:
                return
            tags = {payload[i : i + _TAG_CHARS] for i in range(0, len(payload), _TAG_CHARS)}
            moved = False
            for job_id, tag in self.tags.items():
                if tag in tags:
                    self.ended[job_id] += 1
                    moved = True
            if moved:
                self._cond.notify_all()

    def seen(self, queue: str) -> int:
        with self._cond:
            return self.counts.setdefault(queue, 0)

    def wait(self, queue: str, since: int | None, timeout_s: float) -> None:
        with self._cond:
            count = self.counts.setdefault(queue, 0)
            if since is not None and count != since:
                return
            self._cond.wait_for(
                lambda: self.counts[queue] != count or self._closed.is_set(), max(0.0, timeout_s)
            )

    @contextmanager
    def watching(self, job_id: str) -> Iterator[Callable[[float], None]]:
        """While inside, notices of ``job_id``'s end are counted; the function it gives waits
        for one (or a reconnection) for up to so many seconds."""
        with self._cond:
            self.ended.setdefault(job_id, 0)
            self.tags[job_id] = _tag(job_id)
            self.watchers[job_id] = self.watchers.get(job_id, 0) + 1
            since = self.ended[job_id]  # a notice from here on ends the wait, even one that
            # comes before the wait begins

        def wait(timeout_s: float) -> None:
            with self._cond:
                self._cond.wait_for(
                    lambda: self.ended[job_id] != since or self._closed.is_set(),
                    max(0.0, timeout_s),
                )

        try:
            yield wait
        finally:
            with self._cond:
                self.watchers[job_id] -= 1
                if not self.watchers[job_id]:  # the last waiter of this job
                    del self.watchers[job_id], self.ended[job_id], self.tags[job_id]

    def close(self) -> None:
        self._closed.set()
        with self._cond:  # waits under way end now
            self._cond.notify_all()
        if self._thread.is_alive():
            # a notice of its own wakes the listener now, not at its next timeout
            with (
                contextlib.suppress(Exception),
                psycopg.connect(self._url, autocommit=True, connect_timeout=2) as conn,
            ):
                conn.execute("SELECT pg_notify(%s, '')", (self._wake,))
        self._thread.join(2)


class PostgresBackend(Backend):
    wakes_without_polling = True
    #: idle connections kept for the next call (more are opened while more threads call)
    _IDLE = 4

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        retry_s: float | None = None,
        check_schema: bool = True,
    ) -> None:
        """``check_schema=False``: do not look for the schema now (``conveyor migrate``)."""
        self.libpq_url, ours = _split_url(url)
        self.url = url
        self.where = redacted(url)
        self.schema = _schema_name(schema if schema is not None else ours.get("schema", "conveyor"))
        try:
            self.retry_s = retry_s if retry_s is not None else float(ours.get("retry_s", 20.0))
        except ValueError as exc:
            raise ConfigurationError(f"retry_s in {self.where!r}: {exc}") from None
        s = self._s = f'"{self.schema}"'
        self.wake_channel = f"{self.schema}_wake"
        self.ended_channel = f"{self.schema}_ended"
        self._idle: list[psycopg.Connection[Any]] = []
        self._release = weakref.finalize(self, _close_all, self._idle)
        try:
            limit_s = float(ours.get("timeout_s", CALL_TIMEOUT_S))
        except ValueError as exc:
            raise ConfigurationError(f"timeout_s in {self.where!r}: {exc}") from None
        if not limit_s > 0:
            raise ConfigurationError(f"timeout_s in {self.where!r} is a number of seconds > 0")
        self._watchdog = _Watchdog(limit_s)
        weakref.finalize(self, self._watchdog.close)
        self._lock = threading.Lock()
        self._closed = False
        self._wakeups: _Wakeups | None = None
        self._wakeups_lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._columns = _COLUMNS
        self._insert = _insert_sql(s)
        # the same, but a job that holds the id stays as it is (nothing is locked)
        self._insert_new = self._insert.replace(
            f"DO UPDATE SET {_REPLACE} WHERE {_REPLACEABLE}", "DO NOTHING"
        )
        self._insert_many = _insert_many_sql(s)
        self._insert_fresh = _insert_fresh_sql(s)
        self._claim = _claim_sql(s)
        self._claimed_by = (
            f"SELECT 0, j.seq, j.priority, {', '.join('j.' + c for c in _COLUMNS.split(', '))} "
            f"FROM {s}.jobs AS j WHERE j.queue = %(queue)s AND j.state = 'running' "
            "AND j.token LIKE ANY(%(patterns)s)"
        )
        self._hand_back = f"""
            WITH mine AS (SELECT * FROM unnest(%(ids)s::text[], %(tokens)s::text[])
                          AS m(id, token)),
            bad AS (
                SELECT j.id FROM {s}.jobs AS j
                JOIN mine AS m ON j.id = m.id AND j.token = m.token AND j.state = 'running'
                WHERE EXISTS (SELECT 1 FROM {s}.jobs AS o
                              WHERE o.queue = j.queue AND o.key = j.key AND o.id <> j.id
                                AND (o.state = 'running'
                                     OR (o.state = 'queued' AND o.seq < j.seq)))
            )
            UPDATE {s}.jobs AS j SET state = 'queued', token = NULL, lease_until = NULL,
                attempts = greatest(0, j.attempts - 1)
            FROM bad WHERE j.id = bad.id RETURNING j.id"""
        if check_schema:
            self._check_schema()

    # -- connections --------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.libpq_url, autocommit=True, connect_timeout=self._connect_timeout()
            )
        except psycopg.Error as exc:
            refused = _connect_error(self.where, exc)
            if refused is not None:
                raise refused from None
            raise
        try:
            # a change that waits for a lock (a table locked by hand, a long migration) gives
            # up after a while and is tried again, so that retry_s bounds every call
            lock_ms = int(min(5.0, max(0.05, self.retry_s / 4)) * 1000)
            conn.execute(f"SET lock_timeout = {lock_ms}")
            # and the server ends a statement that runs past the watchdog's limit itself
            conn.execute(f"SET statement_timeout = {int(self._watchdog.limit_s * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_timeout(self) -> int:
        """libpq's connect_timeout (whole seconds, at least 2): within retry_s."""
        return max(2, min(10, int(self.retry_s)))

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one attempt of one call, back on the shelf afterwards unless it met
        an error (a fresh one has no state)."""
        with self._lock:
            if self._closed:
                raise ClosedResourceError(f"the queue at {self.where} was closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        except psycopg.OperationalError:
            # the server may have gone away: the idle connections are likely broken too
            with self._lock:
                stale, self._idle[:] = list(self._idle), []
            _close_all(stale)
            raise
        finally:
            with self._lock:
                keep = ok and not self._closed and len(self._idle) < self._IDLE
                keep = keep and not conn.closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                with contextlib.suppress(Exception):
                    conn.close()

    def _run(self, attempt: Callable[[psycopg.Connection[Any], bool], T]) -> T:
        """Run ``attempt(conn, replay)`` until it gets through; ``replay`` is True when it is
        sent again after a broken connection (its first sending may have committed)."""
        deadline: float | None = None
        delay = 0.05
        replay = False
        while True:
            try:
                with self._conn() as conn, self._watchdog.watch(conn):
                    return attempt(conn, replay)
            except (BackendError, ClosedResourceError, ConfigurationError):
                raise
            except pg_errors.UndefinedTable as exc:
                if "does not exist" in str(exc):
                    raise self._no_schema() from exc
                raise BackendError(f"PostgreSQL at {self.where}: {exc}") from exc
            except (psycopg.Error, OSError) as exc:
                if not _again_worthy(exc):
                    raise BackendError(
                        f"PostgreSQL at {self.where} refused a change: {exc}"
                    ) from exc
                failure: BaseException = exc
                replay = replay or isinstance(exc, psycopg.OperationalError | OSError)
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.retry_s
                log.warning("PostgreSQL at %s: %s; trying again", self.where, failure)
            if now >= deadline:
                raise BackendUnavailable(
                    f"PostgreSQL at {self.where} unavailable for {self.retry_s:g} s: {failure}"
                ) from failure
            time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - now)))
            delay = min(delay * 2, 2.0)

    def _no_schema(self) -> ConfigurationError:
        return ConfigurationError(
            f"the database at {self.where} has no conveyor schema {self.schema!r} (or not all "
            f"of it): run `conveyor migrate {self.where}` first"
        )

    def _check_schema(self) -> None:
        def read(conn: psycopg.Connection[Any], _replay: bool) -> int | None:
            row = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{self._s}.meta",)
            ).fetchone()
            if not row or not row[0]:
                return None
            found = conn.execute(
                f"SELECT value FROM {self._s}.meta WHERE name = 'schema_version'"
            ).fetchone()
            return None if found is None else int(found[0])

        version = self._run(read)
        if version is None:
            raise self._no_schema()
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"the schema {self.schema!r} at {self.where} is version {version}, made by a "
                f"newer conveyor; this one knows up to version {SCHEMA_VERSION}: upgrade conveyor"
            )
        if version < SCHEMA_VERSION:
            raise ConfigurationError(
                f"the schema {self.schema!r} at {self.where} is version {version}, older than "
                f"this conveyor's ({SCHEMA_VERSION}): run `conveyor migrate {self.where}`"
            )

    def migrate(self) -> list[str]:
        """:func:`migrate` on this backend's database and schema."""
        return migrate(self.url)

    def storage_time(self) -> float:
        def read(conn: psycopg.Connection[Any], _replay: bool) -> float:
            row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
            assert row is not None
            return float(row[0])

        return self._run(read)

    # -- enqueueing ---------------------------------------------------------------------------
    def enqueue(
        self, jobs: Sequence[NewJob], now: float, whole: bool = False
    ) -> list[tuple[Job, bool]]:
        if not jobs:
            return []

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> list[tuple[Job, bool]]:
            if not whole and len(jobs) == 1:
                # the common case: one statement, its own transaction
                return [self._enqueue_one(conn.cursor(), jobs[0], now)]
            if not whole and len(jobs) <= _CHUNK:
                # one statement is its own transaction (autocommit): one round trip
                return self._enqueue_many(conn, jobs, now, alone=True)
            with conn.transaction():
                out = self._enqueue_many(conn, jobs, now)
                first: dict[str, int] = {}
                for i, new in enumerate(jobs):
                    first.setdefault(new.id, i)
                if whole and not all(out[i][1] for i in first.values()):
                    # what was there before: nothing where this batch added the job
                    there = [
                        None if out[first[new.id]][1] else out[first[new.id]][0] for new in jobs
                    ]
                    taken = taken_whole(jobs, there, now)
                    if taken is not None:
                        raise _Taken(taken)  # rolls the transaction back: nothing added
                return out

        try:
            return self._run(attempt)
        except _Taken as taken:
            return taken.out

    def _enqueue_one(
        self, cur: Any, new: NewJob, now: float, in_theirs: bool = False
    ) -> tuple[Job, bool]:
        """One job, through any DB-API cursor of this database (psycopg 3 or 2): the
        statement that adds it also sends the wake-up notice, delivered at commit.
        ``in_theirs``: the caller's transaction, which may stay open for long: a job that
        holds the id is only read, never locked (an insert that replaces one locks it), so
        the transaction holds up no worker's change of that job."""
        values = (*_values(new, now), now, self.wake_channel)
        for _ in range(100):
            if in_theirs:
                cur.execute(self._insert_new, (*_values(new, now), self.wake_channel))
                if cur.fetchone() is not None:
                    return fresh_job(new, now), True
                found = self._read_by(cur, new.id)
                if found is not None and not replaceable(found, now):
                    return found, False
            cur.execute(self._insert, values)
            if cur.fetchone() is not None:
                return fresh_job(new, now), True
            found = self._read_by(cur, new.id)
            if found is not None:  # taken (it may be gone by now: then it is added afresh)
                return found, False
        raise BackendError(f"job {new.id!r} keeps changing while it is enqueued")

    def _read_by(self, cur: Any, job_id: str) -> Job | None:
        cur.execute(f"SELECT {self._columns} FROM {self._s}.jobs WHERE id = %s", (job_id,))
        row = cur.fetchone()
        if row is None:
            return None
        if isinstance(row, dict):  # a cursor whose rows are dicts, in the caller's connection
            row = list(row.values())
        return _job(row)

    def _enqueue_many(
        self,
        conn: psycopg.Connection[Any],
        jobs: Sequence[NewJob],
        now: float,
        alone: bool = False,
    ) -> list[tuple[Job, bool]]:
        """``enqueue`` in the caller's transaction: one statement per chunk of jobs.
        ``alone``: no transaction is open, and the jobs are one chunk: each statement is
        its own."""
        first: dict[str, int] = {}  # an id twice in one batch: the first one counts
        for i, new in enumerate(jobs):
            first.setdefault(new.id, i)
        unique = [jobs[i] for i in sorted(first.values())]
        missing: list[str] = []
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            columns = [list(c) for c in zip(*(_values(new, now) for new in chunk), strict=True)]
            woken = sorted({new.queue for new in chunk if new.waits_for <= 0})
            try:
                # the common case, new ids: a plain insert (in a savepoint, unless it is its
                # own transaction), faster than one that looks at each id
                with contextlib.nullcontext() if alone else conn.transaction():
                    conn.execute(self._insert_fresh, (*columns, self.wake_channel, woken))
                continue
            except pg_errors.UniqueViolation:
                pass  # an id is taken (or was being enqueued beside): look at each one
            row = conn.execute(
                self._insert_many, (*columns, now, self.wake_channel, columns[0])
            ).fetchone()
            assert row is not None
            missing += row[1]
        taken = set(missing)
        existing: dict[str, Job] = {}
        if missing:
            for row in conn.execute(
                f"SELECT {self._columns} FROM {self._s}.jobs WHERE id = ANY(%s)", (missing,)
            ):
                job = _job(row)
                existing[job.id] = job
        out: list[tuple[Job, bool]] = []
        for i, new in enumerate(jobs):
            if first[new.id] != i:
                kept = out[first[new.id]][0]
                out.append((kept, False))
            elif new.id not in taken:
                out.append((fresh_job(new, now), True))
            elif new.id in existing:
                out.append((existing[new.id], False))
            else:  # taken when inserted, gone since: the caller's transaction is retried
                raise pg_errors.SerializationFailure(f"job {new.id!r} changed while enqueued")
        return out

    def enqueue_in(
        self, connection: Any, jobs: Sequence[NewJob], now: float
    ) -> list[tuple[Job, bool]]:
        """``enqueue`` through ``connection`` — a psycopg (3 or 2) connection, or an
        SQLAlchemy ``Session`` or ``Connection`` of this database — in its transaction: the
        jobs exist if and only if it commits (and a worker is woken when it does). Never
        retried: a failure is the caller's transaction's."""
        cur = _cursor_of(connection)
        try:
            return [self._enqueue_one(cur, new, now, in_theirs=True) for new in jobs]
        except Exception as exc:
            if type(exc).__name__ == "UndefinedTable":
                raise self._no_schema() from exc
            raise
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    # -- claims and outcomes ------------------------------------------------------------------
    def claim(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int = 1
    ) -> list[Lease]:
        # a wake-up notice counted after this point ends the next wait at once
        self._seen[queue] = self._listener().seen(queue)
        if limit <= 0:
            return []

        # the tokens' beginnings, made once: a claim sent again after a lost reply finds the
        # jobs its first sending took, instead of leaving them to lapse as if it had crashed
        bases = [f"{os.urandom(8).hex()}:" for _ in range(2)]

        def attempt(conn: psycopg.Connection[Any], replay: bool) -> list[Lease]:
            taken: list[Any] = []
            if replay:
                found = conn.execute(
                    self._claimed_by, {"queue": queue, "patterns": [b + "%" for b in bases]}
                ).fetchall()
                taken += [r[1:] for r in found]
            for base in bases:
                if len(taken) >= limit:
                    break
                rows = conn.execute(
                    self._claim,
                    {
                        "queue": queue,
                        "now": now,
                        "limit": limit - len(taken),
                        "until": now + lease_s,
                        "worker": worker,
                        "base": base,
                    },
                ).fetchall()
                taken += [r[1:] for r in rows if r[1] is not None]
                # leases that lapsed were taken back by the same statement, which could not
                # see them queued: one more claim may take them
                if not rows[0][0]:
                    break
            jobs = [(r[0], r[1], _job(r[2:])) for r in taken]
            keyed = [job for _, _, job in jobs if job.key is not None]
            if keyed:
                handed = self._one_of_each_key(conn, queue, keyed)
                jobs = [entry for entry in jobs if entry[2].id not in handed]
            jobs.sort(key=lambda e: (-e[1], e[0]))  # claim order: priority, then enqueue order
            return [Lease(job, job.token or "") for _, _, job in jobs]

        return self._run(attempt)

    def _one_of_each_key(
        self, conn: psycopg.Connection[Any], queue: str, keyed: Sequence[Job]
    ) -> set[str]:
        """Make sure of the keyed jobs a claim took: under each key's advisory lock, with a
        snapshot taken after it, a job is handed back (uncounted) if another job of its key
        runs, or one enqueued before it is queued again (requeued, or a workflow step let
        go) since the claim's snapshot. Claims of one key check one after the other, and
        each sees what the one before it kept: at most one job of a key runs, and never
        ahead of an earlier one. Returns the ids handed back."""
        keys = sorted({job.key for job in keyed if job.key is not None})
        with conn.pipeline(), conn.transaction():
            for key in keys:
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))",
                    (f"{self.schema}:key:{queue}:{key}",),
                )
            cur = conn.execute(
                self._hand_back,
                {"ids": [j.id for j in keyed], "tokens": [j.token for j in keyed]},
            )
            return {r[0] for r in cur.fetchall()}

    def _held(
        self,
        set_sql: str,
        columns: Sequence[Sequence[Any]],
        scalars: dict[str, Any],
        *,
        more: str = "",
        follow_at: float | None = None,
        ends: bool = False,
        wakes: bool = False,
    ) -> list[bool]:
        """Apply ``set_sql`` (the SET part of an UPDATE of ``{s}.jobs AS j``, reading ``v``:
        the row of ``columns``) to each row of ``columns`` (arrays: ids, tokens, then ``more``
        columns named in ``more``, e.g. ``", %(c2)s::bytea[]|result"``) whose token still
        holds its job. ``follow_at``: the change ends the jobs (done or dead), and the jobs
        waiting for them hear of it in the same transaction; ``ends``: their end is
        notified; ``wakes``: they are claimable again, their queues are notified (the queues
        of keyed jobs always are: the next job of the key may run once one ends). Returns,
        per row, whether it was applied (or, sent again, had been).

        Jobs that nothing waits for (nearly all) are changed by one statement in one round
        trip; those of a workflow in a transaction with what follows from their end."""
        ids, tokens = columns[0], columns[1]
        s = self._s
        params = {
            "ids": list(ids),
            "tokens": list(tokens),
            **_arrays(columns),
            **scalars,
            "ended": self.ended_channel,
            "wake": self.wake_channel,
            "ends": ends,
            "wakes": wakes,
        }
        extra_arrays = "".join(part.split("|")[0] for part in more.split(";") if part)
        extra_names = "".join(", " + part.split("|")[1] for part in more.split(";") if part)
        source = (
            f"unnest(%(ids)s::text[], %(tokens)s::text[]{extra_arrays}) "
            f"AS v(id, token{extra_names})"
        )
        held = "j.id = v.id AND j.state = 'running' AND j.token = v.token"
        update = f"UPDATE {s}.jobs AS j SET {set_sql} FROM {source} WHERE {held}"
        # one notice of their ends (the tags of all of them) and one per queue to wake,
        # whatever the number of jobs: a notice costs the server, and every listener
        told = (
            "told AS (SELECT CASE WHEN %(ends)s AND count(*) > 0 THEN "
            f"pg_notify(%(ended)s, string_agg({_TAG_SQL.format('id')}, '')) END FROM up), "
            "woke AS (SELECT pg_notify(%(wake)s, q) FROM (SELECT DISTINCT queue AS q FROM up "
            "WHERE %(wakes)s OR key IS NOT NULL) AS w) "
        )
        sent = "(SELECT count(*) FROM told), (SELECT count(*) FROM woke)"
        returning = "RETURNING j.id, j.queue, j.key"
        if follow_at is None:
            fast = f"WITH up AS ({update} {returning}), {told} SELECT id, false, {sent} FROM up"
        else:
            fast = (
                f"WITH up AS ({update} AND j.then_jobs IS NULL {returning}), {told}, "
                f"later AS (SELECT j.id FROM {s}.jobs AS j JOIN {source} ON {held} "
                "AND j.then_jobs IS NOT NULL) "
                f"SELECT id, false, {sent} FROM up UNION ALL "
                "SELECT id, true, 0, 0 FROM later"
            )
        slow = f"WITH up AS ({update} {returning}), {told} SELECT id, false, {sent} FROM up"

        def attempt(conn: psycopg.Connection[Any], replay: bool) -> list[bool]:
            rows = conn.execute(fast, params).fetchall()
            done = {r[0] for r in rows if not r[1]}
            later = [r[0] for r in rows if r[1]]
            if later:
                with conn.transaction():
                    ended = conn.execute(slow, params).fetchall()
                    for job_id, *_rest in ended:
                        assert follow_at is not None
                        self._follow(conn, job_id, follow_at)
                done |= {r[0] for r in ended}
            if replay and len(done) < len(ids):
                # the first sending may have committed: its outcome is ours
                again = conn.execute(
                    f"SELECT v.id FROM unnest(%s::text[], %s::text[]) AS v(id, token) "
                    f"JOIN {s}.jobs AS j ON j.id = v.id AND j.ended_token = v.token",
                    (list(ids), list(tokens)),
                ).fetchall()
                done |= {r[0] for r in again}
            return [job_id in done for job_id in ids]

        return self._run(attempt)

    def heartbeat(self, job_id: str, token: str, lease_s: float, now: float) -> bool:
        return self.heartbeat_many([(job_id, token)], lease_s, now)[0]

    def heartbeat_many(
        self, held: Sequence[tuple[str, str]], lease_s: float, now: float
    ) -> list[bool]:
        if not held:
            return []
        ids = [job_id for job_id, _ in held]
        tokens = [token for _, token in held]
        return self._held("lease_until = %(until)s", [ids, tokens], {"until": now + lease_s})

    def complete(
        self, job_id: str, token: str, result: bytes | None, keep_s: float | None, now: float
    ) -> bool:
        return self.complete_many([(job_id, token, result, keep_s)], now)[0]

    def complete_many(
        self, done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
    ) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(done), _CHUNK):
            chunk = done[start : start + _CHUNK]
            out += self._held(
                "state = 'done', token = NULL, lease_until = NULL, ended_token = v.token, "
                "result = v.result, finished_at = %(now)s, keep_until = v.keep",
                [
                    [d[0] for d in chunk],
                    [d[1] for d in chunk],
                    [d[2] for d in chunk],
                    [None if d[3] is None else float(now + d[3]) for d in chunk],
                ],
                {"now": now},
                more=", %(c2)s::bytea[]|result;, %(c3)s::float8[]|keep",
                follow_at=now,
                ends=True,
            )
        return out

    def _one(
        self, set_sql: str, job_id: str, token: str, scalars: dict[str, Any], **kw: Any
    ) -> bool:
        """``_held`` for one job."""
        return self._held(set_sql, [[job_id], [token]], scalars, **kw)[0]

    def retry(self, job_id: str, token: str, run_at: float, error: str, now: float) -> bool:
        return self._one(
            "state = 'queued', token = NULL, lease_until = NULL, ended_token = v.token, "
            "run_at = %(run_at)s, error = %(error)s, "
            + _ended("retried", "%(now)s::float8", "%(kept)s::text"),
            job_id,
            token,
            {"run_at": run_at, "error": _error(error), "now": now, "kept": kept_error(error)},
            wakes=True,
        )

    def fail(self, job_id: str, token: str, error: str, now: float) -> bool:
        return self._one(
            "state = 'dead', token = NULL, lease_until = NULL, ended_token = v.token, "
            "error = %(error)s, finished_at = %(now)s, "
            + _ended("dead", "%(now)s::float8", "%(kept)s::text"),
            job_id,
            token,
            {"error": _error(error), "now": now, "kept": kept_error(error)},
            follow_at=now,
            ends=True,
        )

    def release(self, job_id: str, token: str, now: float, run_at: float | None = None) -> bool:
        return self._one(
            "state = 'queued', token = NULL, lease_until = NULL, ended_token = v.token, "
            "run_at = %(run_at)s, attempts = greatest(0, j.attempts - 1)",
            job_id,
            token,
            {"run_at": now if run_at is None else run_at},
            wakes=True,
        )

    def aborted(self, job_id: str, token: str, now: float) -> bool:
        why = "'aborted by ' || coalesce(j.abort_by, '?')"
        return self._one(
            "state = 'aborted', token = NULL, lease_until = NULL, ended_token = v.token, "
            f"error = convert_to({why}, 'UTF8'), finished_at = %(now)s, "
            + _ended("aborted", "%(now)s::float8", why),
            job_id,
            token,
            {"now": now},
            follow_at=now,
            ends=True,
        )

    def progress(self, job_id: str, token: str, fraction: float, note: str) -> bool:
        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> bool:
            cur = conn.execute(
                f"UPDATE {self._s}.jobs SET progress = %s, progress_note = %s "
                "WHERE id = %s AND state = 'running' AND token = %s",
                (fraction, _text(note), job_id, token),
            )
            return cur.rowcount == 1

        return self._run(attempt)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, conn: psycopg.Connection[Any], job_id: str, lock: bool = False) -> Job | None:
        row = conn.execute(
            f"SELECT {self._columns} FROM {self._s}.jobs WHERE id = %s"
            + (" FOR UPDATE" if lock else ""),
            (job_id,),
        ).fetchone()
        return None if row is None else _job(row)

    def get(self, job_id: str) -> Job | None:
        return self._run(lambda conn, _replay: self._read(conn, job_id))

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
        where, args = ["queue = %s"], [queue]
        if state is not None:
            where.append("state = %s")
            args.append(state)
        if task is not None:
            where.append("task = %s")
            args.append(task)
        sql = (
            f"SELECT {self._columns} FROM {self._s}.jobs WHERE {' AND '.join(where)} "
            "ORDER BY enqueued_at, id LIMIT %s OFFSET %s"
        )
        return self._run(
            lambda conn, _replay: [_job(r) for r in conn.execute(sql, (*args, limit, offset))]
        )

    def counts(self, queue: str, now: float) -> QueueCounts:
        sql = f"""
            SELECT
              count(*) FILTER (WHERE state = 'queued'),
              count(*) FILTER (WHERE state = 'queued' AND run_at > %(now)s),
              count(*) FILTER (WHERE state = 'running'),
              count(*) FILTER (WHERE state = 'done'),
              count(*) FILTER (WHERE state = 'dead'),
              min(enqueued_at) FILTER (WHERE state = 'queued' AND run_at <= %(now)s),
              count(*) FILTER (WHERE state = 'waiting'),
              count(*) FILTER (WHERE state = 'aborted'),
              array_agg(id ORDER BY lease_until) FILTER (WHERE state = 'running'),
              array_agg(lease_until ORDER BY lease_until) FILTER (WHERE state = 'running')
            FROM {self._s}.jobs WHERE queue = %(queue)s"""

        def read(conn: psycopg.Connection[Any], _replay: bool) -> QueueCounts:
            row = conn.execute(sql, {"now": now, "queue": queue}).fetchone()
            assert row is not None
            queued, delayed, running, done, dead, oldest, waiting, aborted, ids, untils = row
            return QueueCounts(
                queued=queued,
                delayed=delayed,
                running=running,
                done=done,
                dead=dead,
                oldest_waiting_s=None if oldest is None else max(0.0, now - oldest),
                leases=tuple((i, u - now) for i, u in zip(ids or (), untils or (), strict=True)),
                waiting=waiting,
                aborted=aborted,
            )

        return self._run(read)

    def next_run_at(self, queue: str) -> float | None:
        sql = (
            f"SELECT least((SELECT min(run_at) FROM {self._s}.jobs WHERE queue = %(q)s AND "
            f"state = 'queued'), (SELECT min(lease_until) FROM {self._s}.jobs WHERE "
            "queue = %(q)s AND state = 'running'))"
        )

        def read(conn: psycopg.Connection[Any], _replay: bool) -> float | None:
            row = conn.execute(sql, {"q": queue}).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return self._run(read)

    # -- changes by id ------------------------------------------------------------------------
    def finish(self, job_id: str, now: float) -> None:
        s = self._s

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> None:
            with conn.transaction():
                before = conn.execute(
                    f"SELECT state FROM {s}.jobs WHERE id = %s FOR UPDATE", (job_id,)
                ).fetchone()
                if before is None:
                    conn.execute(
                        f"INSERT INTO {s}.jobs (id, queue, task, payload, state, priority, "
                        "attempts, enqueued_at, run_at, finished_at) "
                        "VALUES (%s, '', '', '', 'done', 0, 0, %s, %s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET state = 'done', token = NULL, "
                        "lease_until = NULL, finished_at = excluded.finished_at, "
                        "keep_until = NULL",
                        (job_id, now, now, now),
                    )
                    return
                conn.execute(
                    f"UPDATE {s}.jobs SET state = 'done', token = NULL, lease_until = NULL, "
                    "finished_at = %s, keep_until = NULL WHERE id = %s",
                    (now, job_id),
                )
                if before[0] != DONE:
                    self._follow(conn, job_id, now)
                    self._ended_now(conn, job_id)

        self._run(attempt)

    def unfinish(self, job_id: str) -> bool:
        return self._run(
            lambda conn, _replay: (
                conn.execute(
                    f"DELETE FROM {self._s}.jobs WHERE id = %s AND state = 'done'", (job_id,)
                ).rowcount
                == 1
            )
        )

    def cancel(self, job_id: str, reason: str, now: float) -> bool:
        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> bool:
            with conn.transaction():
                cur = conn.execute(
                    f"UPDATE {self._s}.jobs SET state = 'dead', error = %s, finished_at = %s "
                    "WHERE id = %s AND state IN ('queued', 'waiting')",
                    (_error(reason), now, job_id),
                )
                if cur.rowcount == 1:
                    self._follow(conn, job_id, now)
                    self._ended_now(conn, job_id)
                return cur.rowcount == 1

        return self._run(attempt)

    def abort(self, job_id: str, by: str, now: float) -> str:
        by = _text(by) or ""

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> str:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT state FROM {self._s}.jobs WHERE id = %s FOR UPDATE", (job_id,)
                ).fetchone()
                if row is None:
                    return "unknown"
                (state,) = row
                if state == RUNNING:
                    conn.execute(
                        f"UPDATE {self._s}.jobs SET abort_by = %s WHERE id = %s", (by, job_id)
                    )
                    return "requested"
                if state not in (QUEUED, WAITING):
                    return str(state)
                conn.execute(
                    f"UPDATE {self._s}.jobs SET state = 'aborted', abort_by = %s, error = %s, "
                    "finished_at = %s WHERE id = %s",
                    (by, _error(f"aborted by {by}"), now, job_id),
                )
                self._follow(conn, job_id, now)
                self._ended_now(conn, job_id)
                return ABORTED

        return self._run(attempt)

    def abort_requests(self, job_ids: Sequence[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        return self._run(
            lambda conn, _replay: dict(
                conn.execute(
                    f"SELECT id, abort_by FROM {self._s}.jobs WHERE id = ANY(%s) "
                    "AND state = 'running' AND abort_by IS NOT NULL",
                    (list(job_ids),),
                ).fetchall()
            )
        )

    def _requeue(self, where: str, value: str, now: float) -> int:
        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> int:
            with conn.transaction():
                rows = conn.execute(
                    f"UPDATE {self._s}.jobs SET state = 'queued', attempts = 0, lost = 0, "
                    f"run_at = %s, finished_at = NULL WHERE state = 'dead' AND {where} = %s "
                    "RETURNING queue",
                    (now, value),
                ).fetchall()
                for queue in {r[0] for r in rows}:
                    conn.execute("SELECT pg_notify(%s, %s)", (self.wake_channel, queue))
                return len(rows)

        return self._run(attempt)

    def requeue(self, job_id: str, now: float) -> bool:
        return self._requeue("id", job_id, now) == 1

    def requeue_dead(self, queue: str, now: float) -> int:
        return self._requeue("queue", queue, now)

    def purge(self, queue: str) -> int:
        return self._run(
            lambda conn, _replay: (
                conn.execute(
                    f"DELETE FROM {self._s}.jobs WHERE queue = %s AND state != 'running'", (queue,)
                ).rowcount
            )
        )

    def expire(self, now: float) -> int:
        """In chunks, each its own transaction: a long sweep holds no lock for long and leaves
        the dead rows for autovacuum bit by bit."""
        sql = (
            f"DELETE FROM {self._s}.jobs WHERE id IN (SELECT id FROM {self._s}.jobs "
            "WHERE state = 'done' AND keep_until IS NOT NULL AND keep_until <= %s "
            f"LIMIT {_CHUNK} FOR UPDATE SKIP LOCKED)"
        )
        total = 0
        while True:
            n = self._run(lambda conn, _replay: conn.execute(sql, (now,)).rowcount)
            total += n
            if n < _CHUNK:
                return total

    def _ended_now(self, conn: psycopg.Connection[Any], job_id: str) -> None:
        """Notify the end of ``job_id`` (finished, cancelled, aborted by hand), and its
        queue when it has a key: the next job of the key may run now."""
        conn.execute(
            f"SELECT pg_notify(%s, %s), CASE WHEN key IS NOT NULL THEN pg_notify(%s, queue) END "
            f"FROM {self._s}.jobs WHERE id = %s",
            (self.ended_channel, _tag(job_id), self.wake_channel, job_id),
        )

    # -- workflows ------------------------------------------------------------------------------
    def _follow(self, conn: psycopg.Connection[Any], job_id: str, now: float) -> None:
        """``job_id`` is now done or dead: tell the jobs that wait for it (see the contract),
        in the caller's transaction."""
        import base64

        s = self._s
        row = conn.execute(
            f"SELECT state, result, then_jobs, task, error FROM {s}.jobs WHERE id = %s",
            (job_id,),
        ).fetchone()
        if row is None or not row[2]:
            return
        state, result, then, task, error = row
        error = None if error is None else bytes(error).decode("utf-8", "surrogatepass")
        if state == DONE:
            data = None if result is None else base64.b64encode(result).decode()
            woken: set[str] = set()
            for dep_id, place in json.loads(then):
                found = conn.execute(
                    f"SELECT waits_for, inputs, queue FROM {s}.jobs WHERE id = %s "
                    "AND state = 'waiting' FOR UPDATE",
                    (dep_id,),
                ).fetchone()
                if found is None:
                    continue
                inputs = json.loads(found[1]) if found[1] else {}
                inputs[str(place)] = data
                left = found[0] - 1
                conn.execute(
                    f"UPDATE {s}.jobs SET waits_for = %s, inputs = %s, state = %s WHERE id = %s",
                    (left, json.dumps(inputs), QUEUED if left <= 0 else WAITING, dep_id),
                )
                if left <= 0:
                    woken.add(found[2])
            for queue in woken:
                conn.execute("SELECT pg_notify(%s, %s)", (self.wake_channel, queue))
            return
        blocked = [(job_id, task, error, then)]
        while blocked:
            dead_id, dead_task, dead_error, dead_then = blocked.pop()
            for dep_id, _ in json.loads(dead_then or "[]"):
                found = conn.execute(
                    f"SELECT task, then_jobs FROM {s}.jobs WHERE id = %s AND state = 'waiting' "
                    "FOR UPDATE",
                    (dep_id,),
                ).fetchone()
                if found is None:
                    continue
                why = not_run_because(dead_id, dead_task, dead_error)
                conn.execute(
                    f"UPDATE {s}.jobs SET state = 'dead', error = %s, finished_at = %s "
                    "WHERE id = %s",
                    (_error(why), now, dep_id),
                )
                conn.execute("SELECT pg_notify(%s, %s)", (self.ended_channel, _tag(dep_id)))
                blocked.append((dep_id, found[0], why, found[1]))

    # -- limits ---------------------------------------------------------------------------------
    def _lock_groups(self, conn: psycopg.Connection[Any], groups: Sequence[str]) -> None:
        """Serialise the changes of these limits' groups for the rest of the transaction
        (always in the same order: two transactions never wait for each other in a cycle)."""
        for group in sorted(set(groups)):
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}:lim:{group}",)
            )

    def acquire(self, limits: Sequence[Limit], job_id: str, token: str, now: float) -> float | None:
        return self.acquire_many([(limits, job_id, token)], now)[0]

    def acquire_many(
        self, runs: Sequence[tuple[Sequence[Limit], str, str]], now: float
    ) -> list[float | None]:
        if not runs:
            return []

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> list[float | None]:
            with conn.transaction():
                self._lock_groups(conn, [lim.group for limits, _, _ in runs for lim in limits])
                return [
                    self._acquire(conn, limits, job_id, token, now)
                    for limits, job_id, token in runs
                ]

        return self._run(attempt)

    def _acquire(
        self,
        conn: psycopg.Connection[Any],
        limits: Sequence[Limit],
        job_id: str,
        token: str,
        now: float,
    ) -> float | None:
        """``acquire``, in the caller's transaction, its groups locked."""
        s = self._s
        holds = conn.execute(
            f"SELECT 1 FROM {s}.jobs WHERE id = %s AND state = 'running' AND token = %s",
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
                conn.execute(
                    f"DELETE FROM {s}.places AS p WHERE grp = %s AND NOT EXISTS (SELECT 1 "
                    f"FROM {s}.jobs AS j WHERE j.id = p.job_id AND j.state = 'running' "
                    "AND j.token = p.token)",
                    (limit.group,),
                )
                row = conn.execute(
                    f"SELECT count(*) FROM {s}.places WHERE grp = %s AND token != %s",
                    (limit.group, token),
                ).fetchone()
                if row is not None and row[0] >= limit.concurrency:
                    full.append(limit.group)
                    wait = max(wait, PARKED_S)
            if limit.rate is not None:
                conn.execute(  # reservations whose job never came back
                    f"DELETE FROM {s}.reserved WHERE grp = %s AND at < %s",
                    (limit.group, now - reservation_kept_s(limit.rate)),
                )
                bucket_row = conn.execute(
                    f"SELECT tokens, at FROM {s}.buckets WHERE grp = %s", (limit.group,)
                ).fetchone()
                booked = conn.execute(
                    f"SELECT at FROM {s}.reserved WHERE grp = %s AND job_id = %s",
                    (limit.group, job_id),
                ).fetchone()
                state = None if bucket_row is None else (bucket_row[0], bucket_row[1])
                need, bucket = rate_step(
                    state, limit.rate, now, None if booked is None else booked[0]
                )
                if need == 0:
                    starts.append((limit.group, *bucket))
                else:
                    wait = max(wait, need)
                    if booked is None:
                        reserves.append((limit.group, *bucket, now + need))
        cur = conn.cursor()
        if wait > 0:
            if full:
                cur.executemany(
                    f"INSERT INTO {s}.parked (grp, job_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    [(group, job_id) for group in full],
                )
            else:  # a job parked for a place reserves no start: it may wait long
                cur.executemany(
                    _set_bucket(s), [(group, tokens, at) for group, tokens, at, _ in reserves]
                )
                cur.executemany(
                    f"INSERT INTO {s}.reserved (grp, job_id, at) VALUES (%s, %s, %s) "
                    "ON CONFLICT (grp, job_id) DO UPDATE SET at = excluded.at",
                    [(group, job_id, due) for group, _, _, due in reserves],
                )
            cur.execute(  # handed back in the same change: no end can slip in between
                f"UPDATE {s}.jobs SET state = 'queued', token = NULL, lease_until = NULL, "
                "run_at = %s, attempts = greatest(0, attempts - 1) "
                "WHERE id = %s AND state = 'running' AND token = %s",
                (now + wait, job_id, token),
            )
            return wait
        places = [(lim.group, token, job_id) for lim in limits if lim.concurrency is not None]
        if places:
            cur.executemany(
                f"INSERT INTO {s}.places (grp, token, job_id) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                places,
            )
        if starts:
            cur.executemany(_set_bucket(s), starts)
        rated = [(lim.group, job_id) for lim in limits if lim.rate is not None]
        if rated:
            cur.executemany(f"DELETE FROM {s}.reserved WHERE grp = %s AND job_id = %s", rated)
        return None

    def release_places(self, limits: Sequence[Limit], token: str, now: float) -> None:
        groups = [limit.group for limit in limits if limit.concurrency is not None]
        if not groups:
            return
        s = self._s

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> None:
            with conn.transaction():
                self._lock_groups(conn, groups)
                for group in groups:
                    conn.execute(
                        f"DELETE FROM {s}.places WHERE grp = %s AND token = %s", (group, token)
                    )
                    while True:
                        row = conn.execute(
                            f"DELETE FROM {s}.parked WHERE seq = (SELECT seq FROM {s}.parked "
                            "WHERE grp = %s ORDER BY seq LIMIT 1) RETURNING job_id",
                            (group,),
                        ).fetchone()
                        if row is None:
                            break
                        moved = conn.execute(
                            f"UPDATE {s}.jobs SET run_at = %s WHERE id = %s AND "
                            "state = 'queued' AND run_at > %s RETURNING queue",
                            (now, row[0], now),
                        ).fetchone()
                        if moved is not None:
                            conn.execute("SELECT pg_notify(%s, %s)", (self.wake_channel, moved[0]))
                            break

        self._run(attempt)

    # -- schedules and workers ------------------------------------------------------------------
    def swap_schedule(
        self,
        name: str,
        expected: ScheduleInfo | None,
        new: ScheduleInfo | None,
        jobs: Sequence[NewJob] = (),
        now: float = 0.0,
    ) -> bool:
        s = self._s
        was = None if expected is None else expected.expected()
        record = None if new is None else new.to_json()

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> bool:
            with conn.transaction():
                if was is None and record is not None:
                    swapped = conn.execute(
                        f"INSERT INTO {s}.schedules (name, record) VALUES (%s, %s) "
                        "ON CONFLICT (name) DO NOTHING",
                        (name, record),
                    ).rowcount
                elif was is None:
                    found = conn.execute(
                        f"SELECT 1 FROM {s}.schedules WHERE name = %s", (name,)
                    ).fetchone()
                    swapped = 0 if found else 1
                elif record is None:
                    swapped = conn.execute(
                        f"DELETE FROM {s}.schedules WHERE name = %s AND record = %s", (name, was)
                    ).rowcount
                else:
                    swapped = conn.execute(
                        f"UPDATE {s}.schedules SET record = %s WHERE name = %s AND record = %s",
                        (record, name, was),
                    ).rowcount
                if swapped != 1:
                    return False
                if jobs:
                    self._enqueue_many(conn, jobs, now)
                return True

        return self._run(attempt)

    def schedules(self) -> list[ScheduleInfo]:
        rows = self._run(
            lambda conn, _replay: conn.execute(
                f"SELECT name, record FROM {self._s}.schedules ORDER BY name"
            ).fetchall()
        )
        return [ScheduleInfo.read(name, record) for name, record in rows]

    def worker_beat(self, info: WorkerInfo) -> None:
        s = self._s

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> None:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {s}.workers (id, last_beat, record) VALUES (%s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET last_beat = excluded.last_beat, "
                    "record = excluded.record",
                    (info.id, info.last_beat, _text(info.to_json())),
                )
                conn.execute(
                    f"DELETE FROM {s}.workers WHERE last_beat < %s",
                    (info.last_beat - WORKER_KEPT_S,),
                )

        self._run(attempt)

    def workers(self) -> list[WorkerInfo]:
        rows = self._run(
            lambda conn, _replay: conn.execute(
                f"SELECT record FROM {self._s}.workers ORDER BY last_beat DESC"
            ).fetchall()
        )
        return [WorkerInfo.from_json(record) for (record,) in rows]

    def doctor(self, now: float, repair: bool = False) -> list[str]:
        said: list[str] = []
        states = "', '".join(STATES)
        rules = [
            (
                f"state NOT IN ('{states}')",
                "its state is none of conveyor's",
                "state = 'dead', error = convert_to('conveyor doctor: found in state ' || state, "
                "'UTF8'), "
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

        def attempt(conn: psycopg.Connection[Any], _replay: bool) -> list[str]:
            lines: list[str] = []
            with conn.transaction():
                for where, what, fix in rules:
                    for (job_id,) in conn.execute(
                        f"SELECT id FROM {self._s}.jobs WHERE {where}"
                    ).fetchall():
                        lines.append(f"job {job_id}: {what}" + ("; put right" if repair else ""))
                    if repair:
                        conn.execute(f"UPDATE {self._s}.jobs SET {fix} WHERE {where}")
            return lines

        said += self._run(attempt)
        return said

    # -- waiting without polling ----------------------------------------------------------------
    def _listener(self) -> _Wakeups:
        with self._wakeups_lock:
            if self._wakeups is None:
                self._wakeups = _Wakeups(self)
                if self._closed:  # closed meanwhile: a wait on it returns at once
                    self._wakeups.close()
            return self._wakeups

    def wait_for_work(self, queue: str, timeout_s: float) -> None:
        wakeups = self._listener()
        wakeups.wait(queue, self._seen.get(queue), timeout_s)
        self._seen[queue] = wakeups.seen(queue)

    def wait_for_job(self, job_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._listener().watching(job_id) as wait:
            try:
                job = self.get(job_id)
            except BackendError:
                # the caller looks at the job again; a short pause keeps an outage from spinning
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                return
            if job is None or job.state in (DONE, DEAD, ABORTED):
                return
            wait(deadline - time.monotonic())

    def close(self) -> None:
        self._watchdog.close()
        with self._wakeups_lock:
            self._closed = True
            wakeups = self._wakeups
        if wakeups is not None:
            wakeups.close()
        with self._lock:
            self._closed = True
        self._release()


class _Taken(Exception):
    """A whole enqueue found an id taken: what it returns (the transaction is rolled back)."""

    def __init__(self, out: list[tuple[Job, bool]]) -> None:
        super().__init__("taken")
        self.out = out


#: how a notice names a job that ended: the first characters of the md5 of its id, so that
#: the notice of a batch of a thousand ends fits PostgreSQL's 8000 bytes (a waiter whose tag
#: another job shares looks at its job once more for nothing)
_TAG_CHARS = 7
_TAG_SQL = "left(md5({}), 7)"


def _tag(job_id: str) -> str:
    import hashlib

    return hashlib.md5(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:_TAG_CHARS]


def _close_all(connections: list[psycopg.Connection[Any]]) -> None:
    while connections:
        with contextlib.suppress(Exception):
            connections.pop().close()


def _job(row: Sequence[Any]) -> Job:
    """A job from a row of ``_COLUMNS`` (bytea may come as a memoryview from psycopg 2)."""
    values = list(row)
    for i in (3, 12):  # payload, result
        if isinstance(values[i], memoryview):
            values[i] = bytes(values[i])
    if values[13] is not None:  # the error
        values[13] = bytes(values[13]).decode("utf-8", "surrogatepass")
    return _row_job(values)


def _error(text: str) -> bytes:
    """An error as stored: UTF-8 bytes (PostgreSQL's text cannot hold a NUL, and the job's
    own error is kept whole)."""
    return text.encode("utf-8", "surrogatepass")


def _values(new: NewJob, now: float) -> tuple[Any, ...]:
    """The values ``_insert_sql`` and ``_insert_many_sql`` take of a job, in order."""
    then = json.dumps([list(pair) for pair in new.then]) if new.then else None
    return (
        new.id,
        new.queue,
        new.task,
        new.payload,
        WAITING if new.waits_for > 0 else QUEUED,
        new.priority,
        new.key,
        float(now),
        float(new.run_at),
        new.waits_for,
        then,
    )


#: what an enqueue that replaces a job (dead, aborted, or done with its result expired) sets
_REPLACE = """
    seq = excluded.seq, queue = excluded.queue, task = excluded.task,
    payload = excluded.payload, state = excluded.state, priority = excluded.priority,
    key = excluded.key, attempts = 0, enqueued_at = excluded.enqueued_at,
    run_at = excluded.run_at, lease_until = NULL, token = NULL, ended_token = NULL,
    result = NULL, error = NULL, finished_at = NULL, keep_until = NULL, lost = 0,
    progress = NULL, progress_note = NULL, worker = NULL, started_at = NULL, history = NULL,
    waits_for = excluded.waits_for, then_jobs = excluded.then_jobs, inputs = NULL,
    abort_by = NULL
"""

_REPLACEABLE = (
    "j.state IN ('dead', 'aborted') OR (j.state = 'done' AND j.keep_until IS NOT NULL "
    "AND j.keep_until <= %s)"
)

_INSERT_COLUMNS = (
    "id, queue, task, payload, state, priority, key, enqueued_at, run_at, waits_for, then_jobs"
)


def _insert_sql(s: str) -> str:
    """One job (``_values``, then now and the wake-up channel), with ``%s`` placeholders
    only: every DB-API driver of PostgreSQL takes it. Returns a row when it was added."""
    return f"""
        WITH added AS (
            INSERT INTO {s}.jobs AS j ({_INSERT_COLUMNS})
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (id) DO UPDATE SET {_REPLACE} WHERE {_REPLACEABLE}
            RETURNING id, queue, state
        )
        SELECT id, CASE WHEN state = 'queued' THEN pg_notify(%s, queue)::text END FROM added
    """


def _insert_many_sql(s: str) -> str:
    """Many jobs, as arrays of each column (then now, the wake-up channel and the ids
    again); returns one row: the ids that were not added (taken). Their places in the
    enqueue order (``seq``) are drawn in the batch's order, then the rows are written in
    the order of their ids: two batches that share ids wait for each other in one order,
    never in a cycle (a deadlock)."""
    return f"""
        WITH added AS (
            INSERT INTO {s}.jobs AS j (seq, {_INSERT_COLUMNS})
            {_rows_in_id_order(s)}
            ON CONFLICT (id) DO UPDATE SET {_REPLACE} WHERE {_REPLACEABLE}
            RETURNING id, queue, state
        ),
        woken AS (
            SELECT pg_notify(%s, q) FROM (SELECT DISTINCT queue AS q FROM added
                                          WHERE state = 'queued') AS w
        )
        SELECT (SELECT count(*) FROM woken),
               array(SELECT unnest(%b::text[]) EXCEPT SELECT id FROM added)
    """


def _rows_in_id_order(s: str) -> str:
    """The jobs of the arrays, numbered in the batch's order and then sorted by id."""
    return f"""
            SELECT seq, id, queue, task, payload, state, priority, key, enqueued_at, run_at,
                   waits_for, then_jobs
            FROM (
                SELECT nextval(pg_get_serial_sequence('{s}.jobs', 'seq')) AS seq, v.*
                FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[], %b::text[],
                            %b::integer[], %b::text[], %b::float8[], %b::float8[],
                            %b::integer[], %b::text[])
                     WITH ORDINALITY AS v(id, queue, task, payload, state, priority, key,
                                          enqueued_at, run_at, waits_for, then_jobs, n)
                ORDER BY n
            ) AS numbered
            ORDER BY id"""


def _insert_fresh_sql(s: str) -> str:
    """Many jobs whose ids are all free, as ``_insert_many_sql`` takes them (then the
    wake-up channel and the queues to wake); an id taken fails it whole."""
    return f"""
        WITH added AS (
            INSERT INTO {s}.jobs (seq, {_INSERT_COLUMNS})
            {_rows_in_id_order(s)}
        ),
        woke AS (SELECT pg_notify(%s, q) FROM unnest(%b::text[]) AS q)
        SELECT (SELECT count(*) FROM woke)
    """


def _claim_sql(s: str) -> str:
    """One statement, its own transaction: take back the queue's lapsed leases, and take up
    to ``limit`` claimable jobs in the rules' order, skipping rows another claim has locked;
    a job with a key only when no job of its key runs or was enqueued before it and is still
    queued (a job locked by another claim is still queued to this snapshot, so the next of
    its key is not taken beside it). The first column of every row is how many leases
    lapsed; there is always a row (with NULLs when nothing was claimed)."""
    return f"""
        WITH lapsed AS (
            UPDATE {s}.jobs AS j SET state = 'queued', token = NULL, lease_until = NULL,
                lost = j.lost + 1, {_ended("lost", "j.lease_until", "NULL::text")}
            WHERE j.id IN (SELECT id FROM {s}.jobs WHERE queue = %(queue)s
                           AND state = 'running' AND lease_until <= %(now)s
                           FOR UPDATE SKIP LOCKED)
            RETURNING j.id
        ),
        picked AS (
            SELECT j.id FROM {s}.jobs AS j
            WHERE j.queue = %(queue)s AND j.state = 'queued' AND j.run_at <= %(now)s
              AND (j.key IS NULL OR (
                    NOT EXISTS (SELECT 1 FROM {s}.jobs AS r
                                WHERE r.queue = j.queue AND r.key = j.key
                                  AND r.state = 'running')
                AND NOT EXISTS (SELECT 1 FROM {s}.jobs AS e
                                WHERE e.queue = j.queue AND e.key = j.key
                                  AND e.state = 'queued' AND e.seq < j.seq)))
            ORDER BY j.priority DESC, j.seq
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE {s}.jobs AS j SET state = 'running', attempts = j.attempts + 1,
                token = %(base)s || j.seq::text, lease_until = %(until)s,
                worker = %(worker)s, started_at = %(now)s
            FROM picked WHERE j.id = picked.id
            RETURNING j.seq, j.priority, {", ".join("j." + c for c in _COLUMNS.split(", "))}
        )
        SELECT (SELECT count(*) FROM lapsed), c.*
        FROM (SELECT 1) AS one LEFT JOIN claimed AS c ON true
    """


def _ended(outcome: str, at: str, error: str) -> str:
    """The SET part that appends the attempt under way to the job's history (JSON lines): it
    ended ``at`` (SQL) as ``outcome``, with ``error`` (SQL). Every expression of a SET reads
    the row as it was before the UPDATE."""
    return (
        "history = coalesce(j.history, '') || json_build_object('n', j.attempts, "
        "'worker', j.worker, 'started_at', j.started_at, "
        f"'ended_at', {at}, 'outcome', '{outcome}', 'error', {error})::text || chr(10)"
    )


def _arrays(columns: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
    """The arrays after ids and tokens, as ``c2``, ``c3``..."""
    return {f"c{i}": list(values) for i, values in enumerate(columns) if i >= 2}


def _set_bucket(s: str) -> str:
    return (
        f"INSERT INTO {s}.buckets (grp, tokens, at) VALUES (%s, %s, %s) ON CONFLICT (grp) "
        "DO UPDATE SET tokens = excluded.tokens, at = excluded.at"
    )


def _cursor_of(connection: Any) -> Any:
    """A DB-API cursor on ``connection``: a psycopg 3 or 2 connection, or an SQLAlchemy
    ``Session`` or ``Connection`` (whose driver is one of them)."""
    module = type(connection).__module__
    if module.startswith("sqlalchemy"):
        if hasattr(connection, "get_bind") and callable(getattr(connection, "connection", None)):
            connection = connection.connection()  # a Session: the Connection of its transaction
        raw = getattr(connection, "connection", None)
        if raw is None or not hasattr(raw, "cursor"):
            raise ConfigurationError(
                f"_connection={type(connection).__name__}: give an SQLAlchemy Session or "
                "Connection (a synchronous one), a psycopg connection, or no _connection"
            )
        return raw.cursor()
    if module.startswith(("psycopg", "psycopg2")) and hasattr(connection, "cursor"):
        if type(connection).__name__.startswith("Async"):
            raise ConfigurationError(
                "_connection is an async connection: give a synchronous psycopg connection "
                "(the enqueue is synchronous)"
            )
        return connection.cursor()
    raise ConfigurationError(
        f"_connection={type(connection).__name__}: give a psycopg connection, or an "
        "SQLAlchemy Session or Connection, of the queue's database"
    )
