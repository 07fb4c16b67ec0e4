"""Task queues on Redis: conveyor against arq, saq, rq, huey, dramatiq, celery and taskiq.

    bench/setup && .bench-venv/bin/python -m bench.redis_queues           # 10k jobs
    .bench-venv/bin/python -m bench.redis_queues --quick                   # 2k jobs

One ``redis-server`` is started for the run (on a free port, no persistence) and flushed
before each peer. Each peer enqueues N no-op jobs one by one, then one worker in this process
with concurrency 8 runs them all; every job records its run, and a peer that runs a job twice
or loses one is reported. Peers, as each is meant to be used:

* conveyor: ``TaskQueue("redis://...")``, a burst worker with concurrency 8 (leases renewed by
  heartbeat, acknowledgements in batches); also with ``enqueue_many`` in batches of 1000;
* arq: ``Worker(max_jobs=8, burst=True)``; saq: ``Worker(concurrency=8)``;
* rq: ``SimpleWorker.work(burst=True)`` (rq runs one job at a time);
* huey: ``RedisHuey`` consumer with 8 threads; dramatiq: ``RedisBroker``, 8 worker threads;
* celery: Redis broker, thread pool of 8; taskiq: ``taskiq_redis.ListQueueBroker``, 8 tasks.

Floors on the same server: ``redis-benchmark`` LPUSH and RPOP; a redis-py client pushing one by
one and pipelined; a minimal redis-py at-least-once loop (LMOVE to a processing list, then
LREM: two round trips per job, no leases, no retries).

``--body call``: each job also makes one call to the server (``INCR``), awaited on a
``redis.asyncio`` client where the job is a coroutine (conveyor, arq, saq, taskiq), blocking
where it runs on a thread; the floor's loop then makes three round trips per job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench._harness import table
from bench._runs import BODY, RUNS, amark, mark, rq_noop


def wait_for(n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(RUNS.values()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(RUNS.values())} of {n} jobs ran")
        time.sleep(0.001)


async def await_runs(n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(RUNS.values()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(RUNS.values())} of {n} jobs ran")
        await asyncio.sleep(0.001)


def check(n: int) -> str:
    twice = sum(1 for c in RUNS.values() if c > 1)
    lost = n - len(RUNS)
    return "ok" if not twice and not lost else f"{twice} ran twice, {lost} lost"


class Server:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is needed for this benchmark (apt install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = tempfile.mkdtemp()
        flags = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--dir", self.folder, *flags],
            stdout=subprocess.DEVNULL,
        )
        import redis

        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        self.client.flushall()
        RUNS.clear()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


# -- peers: each returns (enqueue seconds, processing seconds) ------------------------------------


def conveyor_run(url: str, n: int, batch: bool = False) -> tuple[float, float]:
    from conveyor import TaskQueue

    q = TaskQueue(url)

    @q.task(name="noop")
    async def noop(i: int) -> None:
        await amark(i)

    t0 = time.perf_counter()
    if batch:
        for start in range(0, n, 1000):
            q.enqueue_many("noop", [((i,), {}) for i in range(start, min(n, start + 1000))])
    else:
        for i in range(n):
            q.enqueue("noop", i)
    t1 = time.perf_counter()
    q.worker(concurrency=8, burst=True, handle_signals=False).run()
    t2 = time.perf_counter()
    q.close()
    return t1 - t0, t2 - t1


async def arq_noop(ctx: Any, i: int) -> None:
    await amark(i)


def arq_run(url: str, n: int) -> tuple[float, float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker

    settings = RedisSettings.from_dsn(url)

    async def go() -> tuple[float, float]:
        pool = await create_pool(settings)
        t0 = time.perf_counter()
        for i in range(n):
            await pool.enqueue_job("arq_noop", i)
        t1 = time.perf_counter()
        worker = Worker(
            functions=[arq_noop],
            redis_settings=settings,
            max_jobs=8,
            burst=True,
            handle_signals=False,
            poll_delay=0.01,
        )
        await worker.main()
        t2 = time.perf_counter()
        await worker.close()
        await pool.aclose()
        return t1 - t0, t2 - t1

    return asyncio.run(go())


async def saq_noop(ctx: Any, *, i: int) -> None:
    await amark(i)


def saq_run(url: str, n: int) -> tuple[float, float]:
    from saq import Queue, Worker

    async def go() -> tuple[float, float]:
        queue = Queue.from_url(url)
        await queue.connect()
        t0 = time.perf_counter()
        for i in range(n):
            await queue.enqueue("saq_noop", i=i)
        t1 = time.perf_counter()
        worker = Worker(queue, functions=[saq_noop], concurrency=8)
        running = asyncio.ensure_future(worker.start())
        await await_runs(n)
        t2 = time.perf_counter()
        await worker.stop()
        running.cancel()
        await queue.disconnect()
        return t1 - t0, t2 - t1

    return asyncio.run(go())


def rq_run(url: str, n: int) -> tuple[float, float]:
    from redis import Redis
    from rq import Queue, SimpleWorker

    conn = Redis.from_url(url)
    q = Queue("bench", connection=conn)
    t0 = time.perf_counter()
    for i in range(n):
        q.enqueue(rq_noop, i)
    t1 = time.perf_counter()
    SimpleWorker([q], connection=conn).work(burst=True, logging_level="WARNING")
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def huey_run(url: str, n: int) -> tuple[float, float]:
    from huey import RedisHuey

    huey = RedisHuey("bench", url=url, results=False)

    @huey.task()
    def noop(i: int) -> None:
        mark(i)

    t0 = time.perf_counter()
    for i in range(n):
        noop(i)
    t1 = time.perf_counter()
    consumer = huey.create_consumer(
        workers=8, worker_type="thread", periodic=False, check_worker_health=False
    )
    consumer.start()
    wait_for(n)
    t2 = time.perf_counter()
    consumer.stop(graceful=True)
    return t1 - t0, t2 - t1


def dramatiq_run(url: str, n: int) -> tuple[float, float]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)

    @dramatiq.actor(broker=broker, queue_name="bench", max_retries=0)
    def noop(i: int) -> None:
        mark(i)

    t0 = time.perf_counter()
    for i in range(n):
        noop.send(i)
    t1 = time.perf_counter()
    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()
    wait_for(n)
    t2 = time.perf_counter()
    worker.stop()
    broker.close()
    return t1 - t0, t2 - t1


def celery_run(url: str, n: int) -> tuple[float, float]:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery("bench", broker=url)
    app.conf.worker_hijack_root_logger = False

    @app.task(name="noop")
    def noop(i: int) -> None:
        mark(i)

    t0 = time.perf_counter()
    for i in range(n):
        noop.delay(i)
    t1 = time.perf_counter()
    with start_worker(
        app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"
    ):
        wait_for(n)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def taskiq_run(url: str, n: int) -> tuple[float, float]:
    from taskiq.api import run_receiver_task
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker(url)

    @broker.task
    async def noop(i: int) -> None:
        await amark(i)

    async def go() -> tuple[float, float]:
        await broker.startup()
        t0 = time.perf_counter()
        for i in range(n):
            await noop.kiq(i)
        t1 = time.perf_counter()
        receiver = asyncio.ensure_future(run_receiver_task(broker, max_async_tasks=8))
        await await_runs(n)
        t2 = time.perf_counter()
        receiver.cancel()
        await broker.shutdown()
        return t1 - t0, t2 - t1

    return asyncio.run(go())


def redis_py_floor(url: str, n: int) -> tuple[float, float]:
    """Push one by one; then LMOVE to a processing list and LREM: no leases, no retries."""
    import redis

    r = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    for i in range(n):
        r.lpush("jobs", i)
    t1 = time.perf_counter()
    while True:
        item = r.lmove("jobs", "processing", "RIGHT", "LEFT")
        if item is None:
            break
        mark(int(item))  # with --body call, a round trip more
        r.lrem("processing", 1, item)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def redis_benchmark(port: int, n: int) -> dict[str, float]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    out = subprocess.run(
        [binary, "-p", str(port), "-t", "lpush,rpop", "-n", str(n * 10), "-c", "1", "--csv"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rates = {}
    for line in out.splitlines()[1:]:
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) > 1:
            rates[cells[0]] = float(cells[1])
    return rates


def pipelined_push(url: str, n: int) -> float:
    import redis

    r = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.lpush("pushed", i)
        pipe.execute()
    return n / (time.perf_counter() - t0)


PEERS: dict[str, Callable[[str, int], tuple[float, float]]] = {
    "conveyor": conveyor_run,
    "conveyor (enqueue_many)": lambda url, n: conveyor_run(url, n, batch=True),
    "arq": arq_run,
    "saq": saq_run,
    "rq (SimpleWorker, one at a time)": rq_run,
    "huey (RedisHuey, 8 threads)": huey_run,
    "dramatiq (8 threads)": dramatiq_run,
    "celery (threads, 8)": celery_run,
    "taskiq (taskiq-redis ListQueueBroker)": taskiq_run,
    "floor: redis-py LMOVE + LREM": redis_py_floor,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="run only the peers whose name contains this")
    parser.add_argument(
        "--body",
        choices=("noop", "call"),
        default="noop",
        help="what each job does: nothing, or one call to the Redis server (awaited where "
        "the job is a coroutine)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    n = 2_000 if args.quick else 10_000
    server = Server()
    BODY.update(kind=args.body, url=server.url)
    try:
        results: dict[str, tuple[float, float, str] | str] = {}
        for name, run in PEERS.items():
            if args.only and args.only not in name:
                continue
            server.flush()
            try:
                enqueue_s, process_s = run(server.url, n)
                results[name] = (enqueue_s, process_s, check(n))
            except Exception as exc:
                results[name] = f"fails: {type(exc).__name__}: {exc}"[:90]
            print(name, results[name], file=sys.stderr, flush=True)
        server.flush()
        bench = redis_benchmark(server.port, n)
        pushed = pipelined_push(server.url, n)
    finally:
        server.stop()

    floor = results.get("floor: redis-py LMOVE + LREM")
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, r, ""))
            continue
        enqueue_s, process_s, verdict = r
        cells = f"{n / enqueue_s:,.0f} / {n / process_s:,.0f} / {n / (enqueue_s + process_s):,.0f}"
        ratio = ""
        if isinstance(floor, tuple):
            ratio = f"{floor[0] / enqueue_s:.2f}x / {floor[1] / process_s:.2f}x"
        rows.append((f"{name} [{verdict}]", cells, ratio))
    table(
        f"{n:,} {'no-op jobs' if args.body == 'noop' else 'jobs of one Redis call each'}, one "
        "worker, concurrency 8 (every job checked to run once)",
        rows,
        ("peer [runs]", "enqueue / processed / end-to-end jobs/s", "vs redis-py floor"),
    )
    floor_rows = [(f"redis-benchmark {k} (1 client)", f"{v:,.0f}", "") for k, v in bench.items()]
    floor_rows.append(("redis-py LPUSH, pipelined by 1000", f"{pushed:,.0f}", ""))
    table("floors on the same server", floor_rows, ("operation", "ops/s", ""))


if __name__ == "__main__":
    main()
