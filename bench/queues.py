"""Task queues on SQLite: conveyor against huey and persist-queue, with a raw sqlite3 floor.

    .bench-venv/bin/python -m bench.queues            # 10k jobs, and the flatness check
    .bench-venv/bin/python -m bench.queues --quick

Each peer gets a fresh database file. N no-op jobs are enqueued one by one (and, for conveyor,
also in one batch), then processed with concurrency 8 (``--concurrency``):

* conveyor: ``TaskQueue("sqlite:///...")``, a burst worker with concurrency 8 (leases, acks);
* huey: ``SqliteHuey`` with its consumer, 8 worker threads;
* persist-queue: ``SQLiteAckQueue``, 4 threads doing get + ack;
* floor: raw sqlite3 in WAL with synchronous=NORMAL, one transaction per insert and one per
  claim-and-delete (no leases, no retries: the least any durable queue must do).

Then conveyor again with 200k jobs, to show that finished rows do not slow the queue down.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._harness import table


def conveyor_run(folder: Path, n: int, batch: bool = False) -> tuple[float, float]:
    from conveyor import TaskQueue

    q = TaskQueue(f"sqlite:///{folder / 'conveyor.db'}")

    @q.task(name="noop")
    async def noop(i: int) -> None:
        return None

    t0 = time.perf_counter()
    if batch:
        step = 1000
        for start in range(0, n, step):
            q.enqueue_many("noop", [((i,), {}) for i in range(start, min(n, start + step))])
    else:
        for i in range(n):
            q.enqueue("noop", i)
    enqueue_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q.worker(concurrency=SLOTS[0], burst=True, poll_s=0.05, handle_signals=False).run()
    process_s = time.perf_counter() - t0
    assert q.stats().done == n, q.stats()
    q.close()
    return n / enqueue_s, n / process_s


def huey_run(folder: Path, n: int) -> tuple[float, float]:
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=str(folder / "huey.db"))
    done = [0]
    lock = threading.Lock()

    @huey.task()
    def noop(i: int) -> None:
        with lock:
            done[0] += 1

    t0 = time.perf_counter()
    for i in range(n):
        noop(i)
    enqueue_s = time.perf_counter() - t0
    consumer = huey.create_consumer(
        workers=SLOTS[0],
        worker_type="thread",
        periodic=False,
        check_worker_health=False,
        initial_delay=0.001,
        backoff=1.0,
        max_delay=0.01,
    )
    t0 = time.perf_counter()
    consumer.start()
    while done[0] < n:
        time.sleep(0.001)
    process_s = time.perf_counter() - t0
    consumer.stop(graceful=True)
    return n / enqueue_s, n / process_s


def persist_queue_run(folder: Path, n: int) -> tuple[float, float]:
    import persistqueue

    q = persistqueue.SQLiteAckQueue(str(folder / "pq"), multithreading=True, auto_commit=True)
    t0 = time.perf_counter()
    for i in range(n):
        q.put({"task": "noop", "args": [i]})
    enqueue_s = time.perf_counter() - t0
    done = [0]
    lock = threading.Lock()

    def work() -> None:
        while True:
            try:
                item = q.get(block=False)
            except persistqueue.exceptions.Empty:
                return
            q.ack(item)
            with lock:
                done[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    process_s = time.perf_counter() - t0
    assert done[0] == n
    return n / enqueue_s, n / process_s


def floor_run(folder: Path, n: int) -> tuple[float, float]:
    db = sqlite3.connect(str(folder / "floor.db"), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload BLOB)")
    t0 = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO jobs (payload) VALUES (?)", (str(i).encode(),))
        db.execute("COMMIT")
    enqueue_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT id, payload FROM jobs ORDER BY id LIMIT 1").fetchone()
        if row is None:
            db.execute("COMMIT")
            break
        db.execute("DELETE FROM jobs WHERE id = ?", (row[0],))
        db.execute("COMMIT")
    process_s = time.perf_counter() - t0
    return n / enqueue_s, n / process_s


#: the worker's slots (conveyor's concurrency, huey's worker threads): ``--concurrency``
SLOTS = [8]

PEERS: dict[str, Any] = {
    "conveyor": conveyor_run,
    "conveyor (batch enqueue)": lambda f, n: conveyor_run(f, n, batch=True),
    "huey (SqliteHuey consumer)": huey_run,
    "persist-queue (SQLiteAckQueue)": persist_queue_run,
    "floor (raw sqlite3)": floor_run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--sizes", help="the queue sizes of the flatness check, comma-separated (10000,200000)"
    )
    args = parser.parse_args()
    SLOTS[0] = args.concurrency
    n = 2_000 if args.quick else 10_000
    results: dict[str, tuple[float, float] | str] = {}
    for name, run in PEERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[name] = run(Path(tmp), n)
            except Exception as exc:
                results[name] = f"fails: {type(exc).__name__}: {exc}"[:80]
    floor = results["floor (raw sqlite3)"]
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, r, ""))
            continue
        ratio = (
            "" if isinstance(floor, str) else (f"{r[0] / floor[0]:.2f}x / {r[1] / floor[1]:.2f}x")
        )
        rows.append((name, f"{r[0]:,.0f} / {r[1]:,.0f}", ratio))
    table(
        f"{n:,} no-op jobs, concurrency {SLOTS[0]}",
        rows,
        ("peer", "enqueue / processed jobs/s", "vs floor"),
    )

    rows = []
    sizes = (2_000, 20_000) if args.quick else (10_000, 200_000)
    if args.sizes:
        sizes = tuple(int(x) for x in args.sizes.split(","))
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            enq, proc = conveyor_run(Path(tmp), size, batch=True)
        rows.append((f"conveyor, {size:,} jobs", f"{enq:,.0f}", f"{proc:,.0f}"))
    table(
        "flatness: the same queue, ten and more times the jobs",
        rows,
        ("run", "batch enqueue jobs/s", "processed jobs/s"),
    )


if __name__ == "__main__":
    main()
