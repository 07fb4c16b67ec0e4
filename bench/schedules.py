"""Scheduler precision: how late each tick's job starts, and that each tick runs once.

    bench/setup && .bench-venv/bin/python -m bench.schedules            # 100 ticks a second apart
    .bench-venv/bin/python -m bench.schedules --ticks 20                 # quicker

conveyor: ``@q.periodic(every_s=1)`` with two workers on the same queue (so each tick must be
enqueued once, not twice), on SQLite and on Redis. arq: ``cron(fn, second=<every second>)``
in one worker (arq's cron runs in each worker; two would need ``unique`` jobs). Each job
notes when it started; lateness is that minus the second it was due at. One ``redis-server``
per run, on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench._harness import table
from bench.redis_queues import Server


def lateness(starts: list[tuple[float, float]]) -> str:
    late = sorted(max(0.0, started - due) * 1000 for due, started in starts)
    if not late:
        return "no tick ran"
    p95 = late[min(len(late) - 1, int(len(late) * 0.95))]
    return f"median {statistics.median(late):.1f} ms, p95 {p95:.1f} ms, max {late[-1]:.1f} ms"


def conveyor_run(url: str, ticks: int) -> tuple[list[tuple[float, float]], Counter[float]]:
    """Two workers on one queue, a tick a second; the (due, started) of each run."""
    from conveyor import TaskQueue, current_job

    q = TaskQueue(url)
    starts: list[tuple[float, float]] = []
    runs: Counter[float] = Counter()
    lock = threading.Lock()

    @q.periodic(every_s=1, name="tick")
    def tick() -> None:
        started = time.time()
        context = current_job()
        assert context is not None
        job = q.get(context.id)
        assert job is not None
        with lock:
            starts.append((job.run_at, started))
            runs[job.run_at] += 1

    workers = [q.worker(handle_signals=False, concurrency=2) for _ in range(2)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + ticks + 30
    while len(runs) < ticks + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in workers:
        w.stop()
    for t in threads:
        t.join(30)
    q.close()
    first = min(runs, default=0.0)  # the first tick may fall while the workers start
    return [s for s in starts if s[0] != first][:ticks], runs


def arq_run(url: str, ticks: int) -> tuple[list[tuple[float, float]], Counter[float]]:
    from arq import cron
    from arq.connections import RedisSettings
    from arq.worker import Worker

    starts: list[tuple[float, float]] = []
    runs: Counter[float] = Counter()

    async def tick(ctx: dict[str, object]) -> None:
        started = time.time()
        due = float(int(started))  # arq's cron fires on whole seconds
        starts.append((due, started))
        runs[due] += 1

    async def main() -> None:
        worker = Worker(
            functions=[],
            cron_jobs=[cron(tick, second=set(range(60)), run_at_startup=False)],  # type: ignore[arg-type]
            redis_settings=RedisSettings.from_dsn(url),
            handle_signals=False,
        )
        task = asyncio.ensure_future(worker.async_run())
        deadline = time.monotonic() + ticks + 30
        while len(runs) < ticks + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        await worker.close()

    asyncio.run(main())
    first = min(runs, default=0.0)
    return [s for s in starts if s[0] != first][:ticks], runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=100)
    args = parser.parse_args()
    rows = []
    folder = Path(tempfile.mkdtemp())
    peers = {
        "conveyor, SQLite, 2 workers": lambda _url: conveyor_run(
            f"sqlite:///{folder / 'ticks.db'}", args.ticks
        ),
        "conveyor, Redis, 2 workers": lambda url: conveyor_run(url, args.ticks),
        "arq cron, 1 worker": lambda url: arq_run(url, args.ticks),
    }
    for name, run in peers.items():
        server = Server()
        try:
            starts, runs = run(server.url)
        except Exception as exc:
            rows.append((name, f"fails: {type(exc).__name__}: {exc}"[:80], ""))
            continue
        finally:
            server.stop()
        twice = sum(1 for n in runs.values() if n > 1)
        rows.append((name, lateness(starts), f"{len(starts)} ticks, {twice} ran twice"))
    table(
        f"a tick a second, {args.ticks} ticks: how late each tick's job started",
        rows,
        ("scheduler", "lateness (start - due)", "runs"),
    )


if __name__ == "__main__":
    main()
