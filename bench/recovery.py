"""Recovery from SIGKILL: seconds from killing a worker mid-task to the task running again.

    bench/setup && .bench-venv/bin/python -m bench.recovery              # about 15 minutes
    .bench-venv/bin/python -m bench.recovery --only conveyor --rounds 5

Every library runs with its DEFAULT settings and its own command-line worker, as deployed:
conveyor on SQLite and on Redis (``conveyor worker``), arq, dramatiq (``RedisBroker``), celery
(Redis broker) with ``task_acks_late=True`` and with its default early acknowledgement, rq, saq
and huey (``RedisHuey``). Each library that uses Redis gets a ``redis-server`` of its own, on a
free loopback port, flushed before each round.

A round: start worker A in a session of its own; 3 s later, enqueue one task that appends
``started <attempt> <pid>`` to a file, then sleeps for an hour; wait until the file says it
started; SIGKILL A's process group (the worker and its children: celery's pool, dramatiq's
processes) and the group of the process that wrote the line (rq's work horse leaves its worker's
group); start worker B; time from the kill until the file says the task started again. B's
start-up counts, for every library alike. A task not started again within ``--limit-s`` is
reported as not re-run, with where it was at the limit: held for a later redelivery, lost
(nothing left to run), or failed (kept as failed, never retried).

A library runs ``--rounds`` rounds (the median is shown), but stops after a round that did not
re-run or took longer than 30 s: the slow peers run once.

This module is also the task module every worker imports: ``bench.recovery:conveyor_queue``,
``bench.recovery.arq_settings`` and the others are built on first use (see ``__getattr__``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench._harness import table

ROOT = Path(__file__).resolve().parents[1]
#: the bench venv's console scripts (arq, celery, ...), next to its interpreter
BIN = Path(sys.executable).parent
URL_ENV = "BENCH_RECOVERY_URL"
LOG_ENV = "BENCH_RECOVERY_LOG"
TASK = "recovery_record"
#: far beyond any limit: the first attempt never ends by itself
HOLD_S = 3600.0
#: how long worker A may take to start and take the task (celery and dramatiq boot slowly)
START_TIMEOUT_S = 60.0
#: worker A's time to finish starting before the task exists, as a worker in service has had:
#: saq's sweep at a worker's start can catch the job that worker is taking at that moment,
#: and take it out of the active list, where no later sweep looks
SETTLE_S = 3.0
#: a library whose round took longer runs no more rounds
LONG_ROUND_S = 30.0


def peer(module: str) -> Any:
    """A peer's module, untyped: the peers live in .bench-venv only, not in the environment
    mypy runs in."""
    return importlib.import_module(module)


def redis_client(url: str) -> Any:
    # untyped too: redis-py's replies are typed as "awaitable or anything"
    return peer("redis").Redis.from_url(url)


# -- the task, and each library's app around it -----------------------------------------------


def note_start() -> None:
    """Append ``started <attempt> <pid>``: the attempt is one more than the lines so far."""
    with open(os.environ[LOG_ENV], "a+") as log:
        log.seek(0)
        attempt = len(log.read().splitlines()) + 1
        log.write(f"started {attempt} {os.getpid()}\n")  # one write with O_APPEND: never mixed


def record() -> None:
    note_start()
    time.sleep(HOLD_S)


async def arecord(ctx: Any) -> None:
    """``record`` for the asyncio peers (arq and saq pass a context)."""
    note_start()
    await asyncio.sleep(HOLD_S)


def build_conveyor(url: str) -> Any:
    from conveyor import TaskQueue

    queue = TaskQueue(url)
    queue.task(record, name=TASK)
    return queue


def build_arq(url: str) -> dict[str, Any]:
    functions = [peer("arq.worker").func(arecord, name=TASK)]
    return {"functions": functions, "redis_settings": arq_redis(url)}


def arq_redis(url: str) -> Any:
    return peer("arq.connections").RedisSettings.from_dsn(url)


def build_dramatiq(url: str) -> Any:
    """The actor; its ``broker`` is what the worker's command line names."""
    broker = peer("dramatiq.brokers.redis").RedisBroker(url=url)
    return peer("dramatiq").actor(record, broker=broker, actor_name=TASK)


def build_celery(url: str, acks_late: bool = False) -> Any:
    app = peer("celery").Celery("recovery", broker=url)
    if acks_late:
        app.conf.task_acks_late = True
    app.task(name=TASK)(record)
    return app


def build_saq(url: str) -> dict[str, Any]:
    return {"queue": peer("saq").Queue.from_url(url), "functions": [(TASK, arecord)]}


def build_huey(url: str) -> Any:
    """The task; its ``huey`` is what the consumer's command line names. huey names a task by
    module and name, so it is registered from this module in the benchmark too (see the end)."""
    return peer("huey").RedisHuey("recovery", url=url).task(name=TASK)(record)


#: what the workers' command lines name in this module, each built from its URL
APPS: dict[str, Callable[[str], Any]] = {
    "conveyor_queue": build_conveyor,
    "arq_settings": build_arq,
    "dramatiq_broker": lambda url: build_dramatiq(url).broker,
    "celery_app": build_celery,
    "celery_late_app": lambda url: build_celery(url, acks_late=True),
    "saq_settings": build_saq,
    "huey_app": lambda url: build_huey(url).huey,
}


def __getattr__(name: str) -> Any:
    """The app a worker's command line names, built once, from the URL in its environment."""
    if name not in APPS or URL_ENV not in os.environ:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = globals()[name] = APPS[name](os.environ[URL_ENV])
    return app


# -- each library: enqueue the task, and say where it is when it did not re-run ---------------
# A probe returns (verdict, where). The verdict is HELD (to be run again later), LOST (gone:
# nothing left to run) or FAILS (kept, but as failed: never run again without an operator).

HELD, LOST, FAILS = "held", "lost", "fails"


def conveyor_enqueue(url: str) -> str:
    with build_conveyor(url) as queue:
        return str(queue.enqueue(TASK).id)


def conveyor_probe(url: str, job_id: str) -> tuple[str, str]:
    with build_conveyor(url) as queue:
        info = queue.job(job_id).info()
    never = info.state in ("dead", "aborted")
    return FAILS if never else HELD, f"{info.state} after {info.attempts} attempt(s)"


def arq_enqueue(url: str) -> str:
    async def go() -> str:
        pool = await peer("arq").create_pool(arq_redis(url))
        job = await pool.enqueue_job(TASK)
        await pool.aclose()
        return str(job.job_id)

    return asyncio.run(go())


def arq_probe(url: str, job_id: str) -> tuple[str, str]:
    r = redis_client(url)
    if r.zscore("arq:queue", job_id) is None:
        return LOST, "no longer queued"
    left_ms = r.pttl(f"arq:in-progress:{job_id}")
    return HELD, f"still queued; its in-progress key lapses in {left_ms / 1000:.0f} s"


def dramatiq_enqueue(url: str) -> str:
    actor = build_dramatiq(url)
    message = actor.send()
    actor.broker.close()
    return str(message.options["redis_message_id"])  # its id in Redis, not message_id


def dramatiq_probe(url: str, message_id: str) -> tuple[str, str]:
    r = redis_client(url)
    if any(r.sismember(key, message_id) for key in r.scan_iter("dramatiq:__acks__.*")):
        return HELD, "still unacked by the killed worker"
    if r.hexists("dramatiq:default.msgs", message_id):
        return HELD, "back in the queue, not yet run"
    return LOST, "gone"


def celery_enqueue(url: str) -> str:
    app = build_celery(url)
    task_id = str(app.send_task(TASK).id)
    app.close()
    return task_id


def celery_probe(url: str, task_id: str) -> tuple[str, str]:
    r = redis_client(url)
    taken = r.zrange("unacked_index", 0, 0, withscores=True)  # scored by when it was taken
    if taken:
        left_s = taken[0][1] + 3600 - time.time()
        return HELD, f"unacked; the visibility timeout restores it in {left_s:.0f} s"
    if r.llen("celery"):
        return HELD, "queued again, not yet run"
    return LOST, "acknowledged when it was taken, nothing left in Redis"


def rq_enqueue(url: str) -> str:
    return str(peer("rq").Queue("recovery", connection=redis_client(url)).enqueue(record).id)


def rq_probe(url: str, job_id: str) -> tuple[str, str]:
    job = peer("rq.job").Job.fetch(job_id, connection=redis_client(url))
    status = str(getattr(job.get_status(), "value", job.get_status()))
    if status in ("started", "failed") and not job.retries_left:
        return FAILS, f"{status!r} with no retries left: bound for FailedJobRegistry"
    return HELD, f"{status!r}"


def saq_enqueue(url: str) -> str:
    async def go() -> str:
        queue = peer("saq").Queue.from_url(url)
        job = await queue.enqueue(TASK)
        await queue.disconnect()
        return str(job.key)

    return asyncio.run(go())


def saq_probe(url: str, key: str) -> tuple[str, str]:
    async def go() -> Any:
        queue = peer("saq").Queue.from_url(url)
        job = await queue.job(key)
        # a sweep under way waits up to 5 s for the (dead) worker to abort the job before it
        # settles it: wait for that too
        for _ in range(100):
            if job.status != "aborting":
                break
            await asyncio.sleep(0.1)
            job = await queue.job(key)
        await queue.disconnect()
        return job

    job = asyncio.run(go())
    status = str(getattr(job.status, "value", job.status))
    where = f"{status!r} after {job.attempts} of {job.retries} attempt(s)"
    if status == "aborting":  # a sweep left it so: out of every list, no sweep finds it again
        return LOST, where
    return FAILS if status in ("aborted", "failed") or not job.retryable else HELD, where


def huey_enqueue(url: str) -> str:
    build_huey(url)()
    return ""


def huey_probe(url: str, _: str) -> tuple[str, str]:
    app = build_huey(url).huey
    waiting = app.pending_count() + app.scheduled_count()
    if waiting:
        return HELD, f"{waiting} task(s) waiting"
    return LOST, "popped when it was taken, nothing left in Redis"


@dataclass(frozen=True)
class Library:
    name: str
    package: str
    redis: bool
    #: the worker's command line, given the URL
    worker: Callable[[str], list[str]]
    #: enqueue the task; its id, for the probe
    enqueue: Callable[[str], str]
    probe: Callable[[str, str], tuple[str, str]]
    #: what the library's default does with the task of a killed worker (docs and source)
    default: str


def conveyor_worker(url: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", "worker", "bench.recovery:conveyor_queue"]


def script(name: str, *args: str) -> Callable[[str], list[str]]:
    """A worker started by one of the bench venv's console scripts."""
    return lambda url: [str(BIN / name), *args]


LIBRARIES = [
    Library(
        "conveyor (sqlite)",
        "conveyor",
        False,
        conveyor_worker,
        conveyor_enqueue,
        conveyor_probe,
        "each worker's 1 s beat ends at once the leases of workers on its host whose pid no "
        "longer runs (other hosts: three missed beats; at worst lease_s, 30 s)",
    ),
    Library(
        "conveyor (redis)",
        "conveyor",
        True,
        conveyor_worker,
        conveyor_enqueue,
        conveyor_probe,
        "as on SQLite",
    ),
    Library(
        "arq",
        "arq",
        True,
        script("arq", "bench.recovery.arq_settings"),
        arq_enqueue,
        arq_probe,
        "pessimistic execution: the job stays queued, but no worker runs it while its "
        "in-progress key lives, job_timeout (300 s) + 10 s from its start",
    ),
    Library(
        "dramatiq (RedisBroker)",
        "dramatiq",
        True,
        script("dramatiq", "bench.recovery:dramatiq_broker"),
        dramatiq_enqueue,
        dramatiq_probe,
        "a dead worker's unacked messages are requeued by maintenance, which runs on 1 broker "
        "call in 1000 (maintenance_chance), once its heartbeat is 60 s old (heartbeat_timeout)",
    ),
    Library(
        "celery (redis, task_acks_late=True)",
        "celery",
        True,
        script("celery", "-A", "bench.recovery:celery_late_app", "worker"),
        celery_enqueue,
        celery_probe,
        "an unacknowledged message is restored once visibility_timeout (3600 s on Redis) has "
        "passed since it was taken; workers look about every 100 s",
    ),
    Library(
        "celery (redis, default)",
        "celery",
        True,
        script("celery", "-A", "bench.recovery:celery_app", "worker"),
        celery_enqueue,
        celery_probe,
        "task_acks_late=False: the message is acknowledged as the task starts, so a task "
        "whose worker is killed is not run again",
    ),
    Library(
        "rq",
        "rq",
        True,
        lambda url: [str(BIN / "rq"), "worker", "--url", url, "recovery"],
        rq_enqueue,
        rq_probe,
        "no retries by default: a worker's registry cleanup (at its start, then every 10 min) "
        "moves a job whose heartbeat TTL (about 90 s) lapsed to FailedJobRegistry, not back "
        "to the queue",
    ),
    Library(
        "saq",
        "saq",
        True,
        script("saq", "bench.recovery.saq_settings"),
        saq_enqueue,
        saq_probe,
        "a sweep (every 60 s, by one worker at a time) aborts an active job past its timeout "
        "(10 s); retries=1 means one attempt in all, so it is not run again",
    ),
    Library(
        "huey (RedisHuey)",
        "huey",
        True,
        script("huey_consumer", "bench.recovery.huey_app"),
        huey_enqueue,
        huey_probe,
        "a task is popped from Redis as the consumer takes it, with no acknowledgement: a "
        "killed task is gone",
    ),
]


# -- one round ------------------------------------------------------------------------------


def started_pids(log: Path) -> list[int]:
    return [int(line.split()[2]) for line in log.read_text().splitlines()]


class Workers:
    """The worker processes of one round, each in a session of its own (so its process group
    is all of it); whatever still runs is killed on leaving."""

    def __init__(self, argv: list[str], env: dict[str, str], folder: Path, log: Path) -> None:
        self.argv, self.env, self.folder, self.log = argv, env, folder, log
        self.outputs: dict[int, Path] = {}
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        output = self.folder / f"worker-{name}.out"
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.outputs[proc.pid] = output
        self.running.append(proc)
        return proc

    def wait_starts(self, proc: subprocess.Popen[bytes], n: int, timeout_s: float) -> bool:
        """Whether the task has started ``n`` times within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while len(started_pids(self.log)) < n:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}): {self.said(proc)}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def said(self, proc: subprocess.Popen[bytes]) -> str:
        lines = self.outputs[proc.pid].read_text(errors="replace").strip().splitlines()
        return lines[-1][:100] if lines else "nothing"

    def kill(self, proc: subprocess.Popen[bytes], task_pids: Iterable[int]) -> None:
        """SIGKILL the worker's process group and the group of each process that ran the task
        (one that left the worker's group), then reap the worker."""
        groups = {proc.pid}
        for pid in task_pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())  # never this benchmark's own
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        proc.wait(10)
        self.running.remove(proc)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in list(self.running):
            self.kill(proc, started_pids(self.log))


def worker_env(url: str, log: Path) -> dict[str, str]:
    # the console scripts' own folder heads sys.path, not the checkout: name it
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, URL_ENV: url, LOG_ENV: str(log), "PYTHONPATH": path}


def one_round(
    lib: Library, url: str, folder: Path, limit_s: float
) -> tuple[float | None, tuple[str, str] | None]:
    """Seconds from the SIGKILL to the second start; or, when there was none within
    ``limit_s``, the probe's (verdict, where)."""
    log = folder / "started.log"
    log.touch()
    with Workers(lib.worker(url), worker_env(url, log), folder, log) as workers:
        first = workers.start("a")
        time.sleep(SETTLE_S)
        job_id = lib.enqueue(url)
        if not workers.wait_starts(first, 1, START_TIMEOUT_S):
            raise RuntimeError(f"worker A did not start the task: {workers.said(first)}")
        t0 = time.monotonic()
        workers.kill(first, started_pids(log))
        second = workers.start("b")
        if workers.wait_starts(second, 2, limit_s):
            return time.monotonic() - t0, None
        return None, lib.probe(url, job_id)


@dataclass
class Outcome:
    times: list[float] = field(default_factory=list)
    #: (verdict, where) of the round in which the task was not started again
    missed: tuple[str, str] | None = None
    error: str | None = None


def run_library(lib: Library, rounds: int, limit_s: float) -> Outcome:
    # the Redis benchmark's server, imported by name: mypy would check that module, peers and
    # all, along with this one
    server = peer("bench.redis_queues").Server() if lib.redis else None
    outcome = Outcome()
    try:
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                if server is not None:
                    server.flush()
                url = server.url if server is not None else f"sqlite:///{folder / 'jobs.db'}"
                took, outcome.missed = one_round(lib, url, folder, limit_s)
            if took is None:
                break
            outcome.times.append(took)
            if took > LONG_ROUND_S:
                break
    finally:
        if server is not None:
            server.stop()
    return outcome


# -- the report -----------------------------------------------------------------------------


NEVER = {LOST: "lost", FAILS: "failed, no retry"}


def cells(outcome: Outcome, limit_s: float, reference: float | None) -> tuple[str, str]:
    """The time cell and the ratio cell of one library."""
    if outcome.error is not None:
        return outcome.error, ""
    if outcome.missed is not None:
        verdict, _ = outcome.missed
        if verdict != HELD:  # it will never run again: no ratio to give
            return f"> {limit_s:.0f} s (not re-run): {NEVER[verdict]}", "never"
        ratio = f"> {limit_s / reference:.0f}x" if reference else ""
        return f"> {limit_s:.0f} s (not re-run)", ratio
    median = statistics.median(outcome.times)
    each = " / ".join(f"{t:.2f}" for t in outcome.times)
    ratio = f"{median / reference:.2f}x" if reference else ""
    return f"{median:.2f} s ({each})", ratio


def report(results: dict[Library, Outcome], limit_s: float) -> None:
    ref = next((o for lib, o in results.items() if lib.name == "conveyor (redis)"), None)
    reference = statistics.median(ref.times) if ref is not None and ref.times else None
    rows = []
    for lib, outcome in results.items():
        took, ratio = cells(outcome, limit_s, reference)
        rows.append((f"{lib.name} {version(lib.package)}", took, ratio))
    table(
        f"SIGKILL of a worker mid-task -> the task started on another worker (defaults, "
        f"limit {limit_s:.0f} s)",
        rows,
        ("library / backend", "seconds (median; each round)", "vs conveyor (redis)"),
    )
    print("\n## what each default does with a killed worker's task\n")
    for lib, outcome in results.items():
        at_limit = f" At the limit: {outcome.missed[1]}." if outcome.missed else ""
        print(f"- {lib.name}: {lib.default}.{at_limit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per library (default 3)")
    parser.add_argument(
        "--limit-s", type=float, default=120.0, help="wait at most this for a re-run"
    )
    parser.add_argument("--only", help="run only the libraries whose name contains this")
    args = parser.parse_args()
    results: dict[Library, Outcome] = {}
    for lib in LIBRARIES:
        if args.only and args.only not in lib.name:
            continue
        try:
            results[lib] = run_library(lib, args.rounds, args.limit_s)
        except Exception as exc:
            results[lib] = Outcome(error=f"fails: {type(exc).__name__}: {exc}"[:100])
        print(lib.name, *cells(results[lib], args.limit_s, None), file=sys.stderr, flush=True)
    report(results, args.limit_s)


if __name__ == "__main__":
    # Run as bench.recovery, the module the workers import, not as __main__: huey and rq name
    # a task by its module, which must be the same here and in the workers.
    importlib.import_module("bench.recovery").main()
