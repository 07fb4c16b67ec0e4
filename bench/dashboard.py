"""How long the dashboard's pages take with 100k jobs in the queue.

    python -m bench.dashboard            # 100k jobs on SQLite (and on Redis if redis-server)
    python -m bench.dashboard --quick    # 10k

A SQLite file gets N queued jobs (enqueued in batches) and 1,000 dead ones (claimed and
failed through the backend); the dashboard serves it on a free loopback port and each page is
fetched 5 times over HTTP (urllib, one connection per fetch): medians. No peer is measured
here: rq-dashboard and Flower need their own brokers and workers to show anything.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench._harness import table


def fill(url: str, n: int) -> str:
    from conveyor import TaskQueue

    q = TaskQueue(url)
    q.enqueue_many("bad", [((i,), {}) for i in range(1000)])  # first: claimed and failed
    now = q.now()
    dead_id = ""
    for lease in q.backend.claim(q.name, "bench", 30, now, limit=1000):
        q.backend.fail(lease.job.id, lease.token, "Traceback ...\nValueError: no", now)
        dead_id = lease.job.id
    for start in range(0, n, 5000):
        q.enqueue_many("work", [((i, "x" * 40), {}) for i in range(start, min(n, start + 5000))])
    q.close()
    return dead_id


def main() -> None:
    from conveyor import TaskQueue
    from conveyor.dashboard import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'q.db'}"
        t0 = time.perf_counter()
        dead_id = fill(url, n)
        print(f"filled {n:,} queued + 1,000 dead in {time.perf_counter() - t0:.1f} s")
        q = TaskQueue(url)
        server = serve(q, port=0, token="t")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.port}"
        pages = [
            ("/ (counts, workers)", "/"),
            ("/jobs?state=queued (first page)", "/jobs?state=queued"),
            ("/jobs?state=queued (last page)", f"/jobs?state=queued&offset={n - 50}"),
            ("/jobs?state=dead", "/jobs?state=dead"),
            ("/jobs?task=bad", "/jobs?task=bad"),
            ("/job/ID (a dead job)", f"/job/{dead_id}"),
            ("/api/jobs?state=queued", "/api/jobs?state=queued"),
            ("/health", "/health"),
        ]
        rows = []
        for label, path in pages:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                with urllib.request.urlopen(base + path, timeout=60) as answer:
                    answer.read()
                times.append(time.perf_counter() - t)
            rows.append(
                (
                    label,
                    f"{statistics.median(times) * 1000:,.1f} ms",
                    f"{max(times) * 1000:,.1f} ms",
                )
            )
        server.shutdown()
        server.server_close()
        q.close()
    table(
        f"dashboard pages, SQLite, {n:,} queued + 1,000 dead jobs", rows, ("page", "median", "max")
    )


if __name__ == "__main__":
    main()
