"""Task queues on PostgreSQL: conveyor against procrastinate, pgqueuer and saq, and psycopg floors.

    bench/setup && .bench-venv/bin/python -m bench.postgres_queues         # 10k jobs, 3 runs
    .bench-venv/bin/python -m bench.postgres_queues --jobs 2000 --repeat 1

One throw-away PostgreSQL cluster is started for the whole run (``tests.postgres_server``: its
own data folder and a free loopback port, never the machine's own server) with fsync,
synchronous_commit and full_page_writes off: the same for every peer, so commits cost no disk
flush here. Every peer gets a new database for each measure of each run, dropped afterwards, so
no table, index or dead row carries over. The runs go round the peers in turn; the figures are
medians of ``--repeat`` runs. For each peer, with N no-op jobs (``--jobs``):

* one by one: N jobs enqueued with one call each (jobs/s);
* in batches: N jobs enqueued through the peer's own batch call, 1000 jobs a call, in another
  new database ("no batch API" where it has none);
* processed: the N jobs enqueued one by one are run by ONE worker with 8 concurrent slots, in
  this process; the time runs from the worker's start (its connections already open where the
  peer opens them before its worker) to the last job's run. Every job records its run, and a
  peer that runs a job twice or loses one is reported next to its name.

Peers, each set up as its documentation shows, on psycopg 3 unless said otherwise:

* conveyor: ``TaskQueue(url + "?schema=bench_conveyor")``, its schema made first by
  ``TaskQueue.migrate`` (what ``conveyor migrate URL`` does), an async task,
  ``noop.enqueue(i)`` and ``q.enqueue_many(noop, calls)``, and the burst worker of
  ``bench/redis_queues.py``: ``q.worker(concurrency=8, burst=True)``;
* procrastinate: ``App(connector=PsycopgConnector(conninfo=url))``, its schema applied with
  ``schema_manager.apply_schema_async()``, an async task, ``defer_async`` one by one and
  ``batch_defer_async`` in batches; ``run_worker_async(concurrency=8, wait=False)``, which
  returns once the queue is empty;
* pgqueuer: ``PsycopgDriver`` on an autocommit ``AsyncConnection``, its schema installed with
  ``Queries.install()``; ``Queries.enqueue`` with one job, and with lists of 1000 for a batch;
  ``PgQueuer.from_psycopg_connection`` (a connection of its own), an async entrypoint, and
  ``run(max_concurrent_tasks=8, batch_size=4)`` (its per-worker cap on jobs at once, which
  must be at least twice the batch size); it is stopped through its ``shutdown`` event once N
  jobs ran;
* saq: ``saq.Queue.from_url(url)``, which is ``saq.queue.postgres.PostgresQueue`` with its own
  pool (4 to 20 connections) and tables, ``Worker(queue, concurrency=8)`` (LISTEN/NOTIFY, no
  polling), stopped once N jobs ran; saq has no batch enqueue;
* floor: raw psycopg 3 in autocommit on one table ``(id bigserial, payload text, state text)``
  with a partial index on the queued rows: one ``INSERT`` per job, ``executemany`` of 1000 in
  one transaction (and ``COPY``, as a second floor); 8 threads, each with its own connection,
  claiming with ``UPDATE ... SET state = 'running' WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED
  LIMIT 1) RETURNING`` and then ``DELETE``: the least an at-least-once queue does, with no
  leases, retries or results; and the same loop claiming 50 rows at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.postgres_server import PostgresServer

from bench._harness import table
from bench._runs import RUNS, mark

BATCH = 1000
#: a run that sees no new job for this long is over (what did not run is reported as lost)
STALL_S = 15.0

#: when the last job ran (perf_counter); the processing time ends there
LAST = [0.0]


def ran(i: int) -> None:
    mark(i)
    LAST[0] = time.perf_counter()


def check(n: int) -> str:
    twice = sum(1 for c in RUNS.values() if c > 1)
    lost = n - len(RUNS)
    return "ok" if not twice and not lost else f"{twice} ran twice, {lost} lost"


def reset() -> None:
    RUNS.clear()
    LAST[0] = 0.0


def processed_s(start: float) -> float:
    if not RUNS:
        raise RuntimeError("no job ran")
    return LAST[0] - start


def _progress() -> tuple[int, float]:
    return len(RUNS), time.monotonic()


async def until_ran(n: int) -> None:
    """Wait until N distinct jobs ran, or until no new one ran for ``STALL_S``."""
    seen, since = _progress()
    while len(RUNS) < n:
        await asyncio.sleep(0.001)
        if len(RUNS) != seen:
            seen, since = _progress()
        elif time.monotonic() - since > STALL_S:
            return


Fresh = Callable[[], str]
Sample = dict[str, Any]


class Unavailable(Exception):
    """The peer cannot be set up here at all (its rows say why)."""


# -- the cluster ------------------------------------------------------------------------------


class Cluster:
    def __init__(self) -> None:
        self.server = PostgresServer()
        self.server.start()
        self.made: list[str] = []
        self.count = 0
        self.version = self.server.psql("SHOW server_version").strip()

    def fresh(self, peer: str) -> str:
        """A new database for one measure; its URL."""
        self.count += 1
        slug = "".join(c if c.isalnum() else "_" for c in peer.lower())[:30]
        name = self.server.create_database(f"bench_{self.count}_{slug}")
        self.made.append(name)
        return str(self.server.url(db=name))

    def drop_all(self) -> None:
        while self.made:
            name = self.made.pop()
            with contextlib.suppress(Exception):
                self.server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def remove(self) -> None:
        self.server.remove()


def chunks(n: int) -> list[range]:
    return [range(s, min(n, s + BATCH)) for s in range(0, n, BATCH)]


# -- peers: each fills a Sample with seconds ("one", "batch", "processed") and a verdict --------


def conveyor_run(fresh: Fresh, n: int) -> Sample:
    from conveyor import TaskQueue

    def open_queue(url: str) -> Any:
        url += "?schema=bench_conveyor"
        try:
            TaskQueue.migrate(url)  # what `conveyor migrate URL` does, before the first open
            return TaskQueue(url)
        except Exception as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

    def define(q: Any) -> Any:
        @q.task(name="noop")
        async def noop(i: int) -> None:
            ran(i)

        return noop

    out: Sample = {}
    q = open_queue(fresh())
    noop = define(q)
    t0 = time.perf_counter()
    for i in range(n):
        noop.enqueue(i)
    out["one"] = time.perf_counter() - t0
    reset()
    t0 = time.perf_counter()
    q.worker(concurrency=8, burst=True, handle_signals=False).run()
    out["processed"] = processed_s(t0)
    out["runs"] = check(n)
    q.close()

    q = open_queue(fresh())
    noop = define(q)
    t0 = time.perf_counter()
    for part in chunks(n):
        q.enqueue_many(noop, [((i,), {}) for i in part])
    out["batch"] = time.perf_counter() - t0
    q.close()
    return out


def procrastinate_run(fresh: Fresh, n: int) -> Sample:
    from procrastinate import App, PsycopgConnector

    def make(url: str) -> tuple[Any, Any]:
        app = App(connector=PsycopgConnector(conninfo=url))

        @app.task(name="noop")
        async def noop(i: int) -> None:
            ran(i)

        return app, noop

    async def go() -> Sample:
        out: Sample = {}
        app, noop = make(fresh())
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            t0 = time.perf_counter()
            for i in range(n):
                await noop.defer_async(i=i)
            out["one"] = time.perf_counter() - t0
            reset()
            t0 = time.perf_counter()
            await app.run_worker_async(concurrency=8, wait=False, install_signal_handlers=False)
            out["processed"] = processed_s(t0)
            out["runs"] = check(n)

        app, noop = make(fresh())
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            t0 = time.perf_counter()
            for part in chunks(n):
                await noop.batch_defer_async(*({"i": i} for i in part))
            out["batch"] = time.perf_counter() - t0
        return out

    return asyncio.run(go())


def pgqueuer_run(fresh: Fresh, n: int) -> Sample:
    import psycopg
    from pgqueuer import PgQueuer, PsycopgDriver, Queries

    async def installed(url: str) -> tuple[Any, Any]:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        queries = Queries(PsycopgDriver(conn))
        await queries.install()
        return conn, queries

    async def go() -> Sample:
        out: Sample = {}
        url = fresh()
        conn, queries = await installed(url)
        t0 = time.perf_counter()
        for i in range(n):
            await queries.enqueue("noop", str(i).encode())
        out["one"] = time.perf_counter() - t0
        await conn.close()

        worker_conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        pgq = PgQueuer.from_psycopg_connection(worker_conn)

        @pgq.entrypoint("noop")
        async def noop(job: Any) -> None:
            ran(int(job.payload))

        reset()
        t0 = time.perf_counter()
        running = asyncio.ensure_future(pgq.run(max_concurrent_tasks=8, batch_size=4))
        await until_ran(n)
        out["processed"] = processed_s(t0)
        pgq.shutdown.set()
        await asyncio.wait_for(running, 30)
        out["runs"] = check(n)
        await worker_conn.close()

        conn, queries = await installed(fresh())
        t0 = time.perf_counter()
        for part in chunks(n):
            k = len(part)
            await queries.enqueue(["noop"] * k, [str(i).encode() for i in part], [0] * k)
        out["batch"] = time.perf_counter() - t0
        await conn.close()
        return out

    return asyncio.run(go())


async def saq_noop(ctx: Any, *, i: int) -> None:
    ran(i)


def saq_run(fresh: Fresh, n: int) -> Sample:
    from saq import Queue, Worker

    async def go() -> Sample:
        out: Sample = {}
        queue = Queue.from_url(fresh())
        await queue.connect()
        t0 = time.perf_counter()
        for i in range(n):
            await queue.enqueue("saq_noop", i=i)
        out["one"] = time.perf_counter() - t0
        reset()
        t0 = time.perf_counter()
        worker = Worker(queue, functions=[saq_noop], concurrency=8)
        running = asyncio.ensure_future(worker.start())
        await until_ran(n)
        out["processed"] = processed_s(t0)
        await worker.stop()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        out["runs"] = check(n)
        await queue.disconnect()
        out["batch"] = "no batch API"
        return out

    return asyncio.run(go())


FLOOR_TABLE = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    payload text NOT NULL,
    state text NOT NULL DEFAULT 'queued'
);
CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued';
"""
CLAIM_ONE = """
UPDATE jobs SET state = 'running'
WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)
RETURNING id, payload
"""
CLAIM_MANY = """
UPDATE jobs SET state = 'running'
WHERE id IN (
    SELECT id FROM jobs WHERE state = 'queued' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %s
)
RETURNING id, payload
"""


def floor_consume(url: str, claim: int) -> float:
    """Run the table's jobs with 8 threads until it is empty; seconds to the last job's run."""
    import psycopg

    conns = [psycopg.connect(url, autocommit=True) for _ in range(8)]
    failures: list[BaseException] = []

    def one(conn: Any) -> None:
        with conn.cursor() as cur:
            while True:
                row = cur.execute(CLAIM_ONE).fetchone()
                if row is None:
                    return
                ran(int(row[1]))
                cur.execute("DELETE FROM jobs WHERE id = %s", (row[0],))

    def many(conn: Any) -> None:
        with conn.cursor() as cur:
            while True:
                rows = cur.execute(CLAIM_MANY, (claim,)).fetchall()
                if not rows:
                    return
                for _, payload in rows:
                    ran(int(payload))
                cur.execute("DELETE FROM jobs WHERE id = ANY(%s)", ([r[0] for r in rows],))

    def work(conn: Any) -> None:
        try:
            (one if claim == 1 else many)(conn)
        except BaseException as exc:
            failures.append(exc)

    reset()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    if failures:
        raise failures[0]
    return processed_s(t0)


def floor_run(fresh: Fresh, n: int) -> Sample:
    import psycopg

    out: Sample = {}
    url = fresh()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FLOOR_TABLE)
        t0 = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO jobs (payload) VALUES (%s)", (str(i),))
        out["one"] = time.perf_counter() - t0
    out["processed"] = floor_consume(url, claim=1)
    out["runs"] = check(n)

    url = fresh()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FLOOR_TABLE)
        t0 = time.perf_counter()
        for part in chunks(n):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO jobs (payload) VALUES (%s)", [(str(i),) for i in part])
        out["batch"] = time.perf_counter() - t0
    out["processed50"] = floor_consume(url, claim=50)
    out["runs50"] = check(n)

    with psycopg.connect(fresh(), autocommit=True) as conn:
        conn.execute(FLOOR_TABLE)
        t0 = time.perf_counter()
        for part in chunks(n):
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy("COPY jobs (payload) FROM STDIN") as copy,
            ):
                for i in part:
                    copy.write_row((str(i),))
        out["copy"] = time.perf_counter() - t0
    return out


PEERS: dict[str, Callable[[Fresh, int], Sample]] = {
    "conveyor": conveyor_run,
    "procrastinate": procrastinate_run,
    "pgqueuer": pgqueuer_run,
    "saq (PostgresQueue)": saq_run,
    "floor: psycopg SKIP LOCKED": floor_run,
}
FLOOR = "floor: psycopg SKIP LOCKED"
FLOOR50 = "floor: psycopg SKIP LOCKED, 50 a claim"


# -- the report -------------------------------------------------------------------------------


@dataclass
class Tally:
    """One row's samples over the runs."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    verdicts50: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def add(self, sample: Sample) -> None:
        for key, value in sample.items():
            if isinstance(value, float):
                self.seconds.setdefault(key, []).append(value)
            elif key == "runs":
                self.verdicts.append(value)
            elif key == "runs50":
                self.verdicts50.append(value)
            else:
                self.notes[key] = value

    def rate(self, n: int, key: str) -> float | None:
        times = self.seconds.get(key)
        return n / statistics.median(times) if times else None

    def verdict(self) -> str:
        bad = [v for v in self.verdicts if v != "ok"]
        if not bad:
            return "ok"
        return f"{'; '.join(sorted(set(bad)))} (in {len(bad)} of {len(self.verdicts)} runs)"


def cell(value: float | None, note: str = "-") -> str:
    return note if value is None else f"{value:,.0f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def report(n: int, repeat: int, version: str, tallies: dict[str, Tally]) -> None:
    keys = ("one", "batch", "processed")
    rates = {name: {k: t.rate(n, k) for k in keys} for name, t in tallies.items()}
    runs = {name: t.seconds.get("processed", []) for name, t in tallies.items()}
    floor_t = tallies.get(FLOOR)
    if floor_t is not None and not floor_t.error:
        rates[FLOOR50] = {"one": None, "batch": None, "processed": floor_t.rate(n, "processed50")}
        runs[FLOOR50] = floor_t.seconds.get("processed50", [])
    floor = rates.get(FLOOR, {})
    conveyor = tallies.get("conveyor")
    failed = {name for name, t in tallies.items() if t.error}

    print(
        f"\nPostgreSQL {version}: one throw-away cluster, fsync=off, synchronous_commit=off, "
        "full_page_writes=off (the same for every peer); a new database per peer and measure"
    )
    rows = []
    for name, r in rates.items():
        t = tallies.get(name)
        if name in failed:
            error = tallies[name].error
            rows.append((name, error if len(error) < 60 else error[:57] + "...", ""))
            continue
        if name == FLOOR50:
            verdict = Tally(verdicts=floor_t.verdicts50).verdict() if floor_t else "ok"
        else:
            verdict = t.verdict() if t else "ok"
        batch_note = t.notes.get("batch", "-") if t else "-"
        cells = f"{cell(r['one'])} / {cell(r['batch'], batch_note)} / {cell(r['processed'])}"
        vs = " / ".join(ratio(r[k], floor.get(k)) for k in keys)
        rows.append((f"{name} [{verdict}]", cells, vs))
    table(
        f"{n:,} no-op jobs, one worker with 8 slots, medians of {repeat} run(s)",
        rows,
        ("peer [runs]", "one by one / batches of 1000 / processed jobs/s", "vs floor"),
    )

    if conveyor is not None and not conveyor.error:
        conv = rates["conveyor"]
        vs_rows = [
            (
                name,
                " / ".join(ratio(r[k], conv.get(k)) for k in keys),
                ", ".join(f"{n / s:,.0f}" for s in runs[name]),
            )
            for name, r in rates.items()
            if name not in failed
        ]
        table(
            "against conveyor",
            vs_rows,
            ("peer", "one / batch / processed vs conveyor", "processed jobs/s, each run"),
        )
    else:
        print(f"\nconveyor: {conveyor.error if conveyor else 'not run (--only)'}")

    if floor_t is not None and not floor_t.error:
        floors = [
            ("INSERT one by one, autocommit", cell(floor_t.rate(n, "one")), ""),
            ("executemany, 1000 a transaction", cell(floor_t.rate(n, "batch")), ""),
            ("COPY, 1000 a transaction", cell(floor_t.rate(n, "copy")), ""),
        ]
        table("psycopg floors: enqueue", floors, ("operation", "jobs/s", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="run only the peers whose name contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    n = args.jobs
    names = [name for name in PEERS if not args.only or args.only in name]
    tallies = {name: Tally() for name in names}
    started = time.monotonic()
    cluster = Cluster()
    try:
        for round_ in range(args.repeat):
            for name in names:
                tally = tallies[name]
                if tally.error:
                    continue
                try:
                    sample = PEERS[name](lambda name=name: cluster.fresh(name), n)
                except Unavailable as exc:
                    tally.error = f"not available: {exc}"
                    print(f"{name}: {tally.error}", file=sys.stderr, flush=True)
                    continue
                except Exception as exc:
                    tally.error = f"fails: {type(exc).__name__}: {exc}"
                    print(f"{name}: {tally.error}", file=sys.stderr, flush=True)
                    continue
                finally:
                    cluster.drop_all()
                tally.add(sample)
                shown = {k: (f"{v:.3f}s" if isinstance(v, float) else v) for k, v in sample.items()}
                print(f"run {round_ + 1}: {name} {shown}", file=sys.stderr, flush=True)
    finally:
        cluster.remove()
    report(n, args.repeat, cluster.version, tallies)
    print(f"\n({time.monotonic() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
