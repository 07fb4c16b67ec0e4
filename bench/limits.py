"""What global limits cost: jobs/s with no limit, with a rate just above what is reached, and
with a concurrency limit equal to the worker's.

    .bench-venv/bin/python -m bench.limits            # 5,000 no-op jobs per run
    .bench-venv/bin/python -m bench.limits --jobs 1000

Each run enqueues N no-op jobs in one batch, then one burst worker (concurrency 8) runs them
all; the figure is jobs/s of that processing. The rate run sets ``rate`` to 1.25 times the
rate measured without a limit, so the limit itself is not what slows it: what is lost is the
limiter's own cost (one more round trip to the storage per job). Same on SQLite and on Redis
(a ``redis-server`` of its own, on a free port). The peers have no limit of this kind shared
by all workers except dramatiq's rate limiters (Redis), called by hand in the actor; they are
not compared here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench._harness import table
from bench.redis_queues import Server


def run(url: str, n: int, **limits: object) -> float:
    from conveyor import TaskQueue

    with TaskQueue(url, name=f"limits-{time.monotonic_ns()}") as q:

        @q.task(name="noop", **limits)  # type: ignore[call-overload]
        def noop(i: int) -> int:
            return i

        q.enqueue_many(noop, [((i,), {}) for i in range(n)])
        t0 = time.perf_counter()
        q.worker(concurrency=8, burst=True, handle_signals=False, poll_s=0.01).run()
        took = time.perf_counter() - t0
        assert q.stats().done == n, q.stats()
    return n / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    rows = []
    server = Server()
    try:
        for name, url in (
            ("SQLite", f"sqlite:///{folder / 'limits.db'}"),
            ("Redis", server.url),
        ):
            free = statistics.median(run(url, args.jobs) for _ in range(args.rounds))
            rate = f"{int(free * 1.25)}/s"
            limited = statistics.median(run(url, args.jobs, rate=rate) for _ in range(args.rounds))
            narrow = statistics.median(
                run(url, args.jobs, concurrency=8) for _ in range(args.rounds)
            )
            rows.append((f"{name}: no limit", f"{free:,.0f}", "1.00x"))
            rows.append((f"{name}: rate={rate}", f"{limited:,.0f}", f"{limited / free:.2f}x"))
            rows.append((f"{name}: concurrency=8", f"{narrow:,.0f}", f"{narrow / free:.2f}x"))
    finally:
        server.stop()
    table(
        f"{args.jobs:,} no-op jobs, one worker of 8 slots (median of {args.rounds})",
        rows,
        ("limit", "processed jobs/s", "vs no limit"),
    )


if __name__ == "__main__":
    main()
