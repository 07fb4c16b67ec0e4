"""Nothing outlives its owner: run each part 50 times and count what the process holds.

After a warm-up round (which may start what lives for the whole process: the forkserver, the
resource tracker), every further round must leave open file descriptors, threads, child
processes and open SQLite connections where they were. Threads and children are given a
moment to finish leaving (they are told to go when their owner closes, and exit just after).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from conveyor import Dispatcher, Pipeline, TaskQueue
from conveyor.channels import open_channel

from .conftest import eventually
from .leak_work import add, echo, slow_square, square

ROUNDS = 50


class Held(NamedTuple):
    fds: int
    threads: frozenset[tuple[int | None, str]]
    os_threads: frozenset[int]
    children: frozenset[int]
    sqlite: int

    def within(self, before: Held) -> bool:
        """Nothing here that was not there before (what was may have ended since)."""
        return (
            self.fds <= before.fds
            and self.threads <= before.threads
            and self.os_threads <= before.os_threads
            and self.children <= before.children
            and self.sqlite <= before.sqlite
        )


def _children() -> frozenset[int]:
    """Our child processes, zombies included (a child never reaped is a leak too)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            found.append(int(entry))
    return frozenset(found)


def _open_sqlite() -> int:
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            try:
                obj.in_transaction  # noqa: B018 - raises once the connection is closed
            except sqlite3.ProgrammingError:
                continue
            count += 1
    return count


def held() -> Held:
    return Held(
        fds=len(os.listdir("/proc/self/fd")),
        threads=frozenset((t.ident, t.name) for t in threading.enumerate()),
        os_threads=frozenset(int(t) for t in os.listdir("/proc/self/task")),
        children=_children(),
        sqlite=_open_sqlite(),
    )


def pipelines(tmp: Path, redis_url: str) -> None:
    out = list(
        Pipeline(range(200))
        .map(square, workers=2)
        .map(slow_square, kind="async", workers=4)
        .map(square, kind="process", workers=2)
        .batch(16)
    )
    assert sum(len(b) for b in out) == 200
    with Pipeline().map(square, workers=2).start() as run:
        run.put(3)
        run.stop(drain=True)
        run.wait()


def queues_and_workers(tmp: Path, redis_url: str) -> None:
    for url in ("memory://leaks", f"sqlite:///{tmp / 'leaks.db'}", redis_url):
        with TaskQueue(url) as q:
            # process tasks on one backend: each worker's processes cost a start-up
            executor = "process" if url.startswith("memory") else "thread"
            padd = q.task(add, name="padd", executor=executor)

            @q.task
            def tadd(x: int, y: int) -> int:
                return x + y

            @q.task
            async def aadd(x: int, y: int) -> int:
                return x + y

            jobs = [t.enqueue(i, 1) for t in (tadd, aadd, padd) for i in range(4)]
            q.worker(burst=True, concurrency=2, handle_signals=False).run()
            assert [j.result(timeout_s=5) for j in jobs] == [1, 2, 3, 4] * 3


def dispatchers(tmp: Path, redis_url: str) -> None:
    heard: list[Any] = []
    with Dispatcher() as d:

        def quote(topic: str, x: int) -> int:
            return x * x

        d.register_producer("sq", quote, workers=2)
        sub = d.subscribe("sq", lambda topic, result: heard.append(result))
        for i in range(10):
            d.request("sq", i, ttl_s=5).wait()
        sub.close()
        d.deregister_producer("sq", quote)


def channels(tmp: Path, redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    for kind in ("pipe", "queue"):
        parent, child = open_channel(kind)
        p = ctx.Process(target=echo, args=(child,))
        p.start()
        for i in range(5):
            parent.send("DO", i)
        assert sorted(parent.receive(timeout_s=10).data for _ in range(5)) == list(range(5))
        parent.close()
        child.close()
        p.join(10)
        p.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "part", [pipelines, queues_and_workers, dispatchers, channels], ids=lambda f: f.__name__
)
def test_fifty_rounds_leave_nothing_behind(
    part: Callable[[Path, str], None], tmp_path: Path, redis_url: str
) -> None:
    part(tmp_path, redis_url)  # warm-up: what starts once per process
    before = held()
    for _ in range(ROUNDS):
        part(tmp_path, redis_url)

    try:
        eventually(lambda: held().within(before), timeout_s=10)
    except AssertionError:
        pytest.fail(f"after {ROUNDS} rounds of {part.__name__}: {held()} (before: {before})")


def test_threads_that_end_hold_no_sqlite_connection(tmp_path: Path) -> None:
    start = _open_sqlite()
    with TaskQueue(f"sqlite:///{tmp_path / 'threads.db'}") as q:
        for i in range(30):
            t = threading.Thread(target=q.enqueue, args=("some.task", i))
            t.start()
            t.join()
        # what is left is the queue's small shelf of idle connections, not one per thread
        assert _open_sqlite() - start <= 4
    assert _open_sqlite() == start
