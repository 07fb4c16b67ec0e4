"""Limits shared by every worker: a task's concurrency and rate, and each key's."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from conveyor import ConfigurationError, ManualClock, TaskQueue

from ..conftest import eventually
from .conftest import Running


class Gauge:
    """How many run at once, and the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.started: list[Any] = []

    def enter(self, what: Any) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.started.append(what)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def test_a_concurrency_limit_holds_across_workers_and_the_end_of_a_run_starts_the_next(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """Two workers of four slots each, a task limited to two at once: two run, the others
    wait in the queue (not in a slot), and each end starts the next at once — the clock never
    moves, so nothing waits out its pause."""
    q, _ = clocked
    gauge = Gauge()
    gate = threading.Event()

    @q.task(name="narrow", concurrency=2)
    def narrow(i: int) -> int:
        gauge.enter(i)
        try:
            gate.wait(30)
        finally:
            gauge.leave()
        return i

    @q.task(name="free")
    def free() -> str:
        return "ran"

    jobs = [narrow.enqueue(i) for i in range(6)]
    runs = [Running(q.worker(handle_signals=False, poll_s=0.05, concurrency=4)) for _ in range(2)]
    try:
        eventually(lambda: gauge.now == 2)
        # the others are handed back, not held in a slot (a claim may be on its way back)
        eventually(lambda: q.stats().running == 2)
        assert free.enqueue().result(timeout_s=10) == "ran"  # the slots are free for others
        gate.set()
        assert [j.result(timeout_s=20) for j in jobs] == list(range(6))
    finally:
        gate.set()
        for run in runs:
            run.stop()
    assert gauge.most == 2
    assert all(run.raised == [] for run in runs)


def test_a_key_limit_counts_each_key_apart(clocked: tuple[TaskQueue, ManualClock]) -> None:
    q, _ = clocked
    per_key: dict[str, Gauge] = {"alice": Gauge(), "bob": Gauge()}
    gate = threading.Event()

    @q.task(name="upload", key_concurrency=2)
    def upload(user: str, n: int) -> str:
        per_key[user].enter(n)
        try:
            gate.wait(30)
        finally:
            per_key[user].leave()
        return f"{user}{n}"

    jobs = [upload.enqueue(u, n, _key=u) for u in ("alice", "bob") for n in range(4)]
    assert all(j.info().key is None for j in jobs)  # a limit's name, not a line
    run = Running(q.worker(handle_signals=False, poll_s=0.05, concurrency=10))
    try:
        eventually(lambda: per_key["alice"].now == 2 and per_key["bob"].now == 2)
        gate.set()
        assert len({j.result(timeout_s=20) for j in jobs}) == 8
    finally:
        gate.set()
        run.stop()
    assert per_key["alice"].most == 2 and per_key["bob"].most == 2


def test_a_rate_limit_lets_its_starts_through_as_time_allows(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    started: list[float] = []

    @q.task(name="metered", rate="2/s")
    def metered(i: int) -> int:
        started.append(q.now())
        return i

    jobs = [metered.enqueue(i) for i in range(5)]
    run = Running(q.worker(handle_signals=False, poll_s=0.05))
    try:
        eventually(lambda: len(started) == 2)  # the bucket holds two
        for n in (3, 4, 5):
            clock.advance(0.5)  # one start each half second
            eventually(lambda n=n: len(started) == n)  # type: ignore[misc]
        assert [j.result(timeout_s=10) for j in jobs] == list(range(5))
    finally:
        run.stop()
    assert [round(t - started[0], 3) for t in started] == [0.0, 0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"key_concurrency": -1}, "key_concurrency"),
        ({"rate": "fast"}, "starts per period"),
        ({"rate": "0/s"}, "starts per period"),
        ({"rate": 5}, "starts per period"),
        ({"key_rate": "5/0s"}, "not positive"),
    ],
)
def test_limits_are_checked_when_the_task_is_registered(
    options: dict[str, Any], match: str
) -> None:
    q = TaskQueue("memory://limits-checked")
    with pytest.raises(ConfigurationError, match=match):
        q.task(name="t", **options)(lambda: None)


def test_rates_read_as_people_write_them() -> None:
    from conveyor.tasks._queue import parse_rate

    assert parse_rate("r", "100/m") == (100, 60.0)
    assert parse_rate("r", "5/s") == (5, 1.0)
    assert parse_rate("r", "1000 / hour") == (1000, 3600.0)
    assert parse_rate("r", "10/30s") == (10, 30.0)
    assert parse_rate("r", "2/d") == (2, 86400.0)
    assert parse_rate("r", None) is None


def test_limits_survive_a_redis_that_forgot_its_scripts(redis_url: str) -> None:
    from conveyor.tasks.backends import Limit

    q = TaskQueue(redis_url)
    q.enqueue("t", _id="one")
    [lease] = q.backend.claim(q.name, "w", 30, q.now())
    q.backend.client.script_flush()  # type: ignore[attr-defined]  # a restart, a flush
    assert q.backend.acquire([Limit("g", concurrency=1)], "one", lease.token, q.now()) is None
    q.close()
