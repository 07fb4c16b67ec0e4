"""Faults of the task queue, on every backend where they apply: bad input at the door, retries
that cannot overflow, jobs that kill their worker, a worker that loses and retakes its own
lease, clocks that disagree, and background loops that must not die unnoticed."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from typing import Any

import pytest

from conveyor import (
    BackendUnavailable,
    ConfigurationError,
    ManualClock,
    Pipeline,
    Retry,
    StageFailed,
    TaskQueue,
)
from conveyor._engine.clock import SystemClock
from conveyor._engine.policy import backoff_delay

from ..conftest import eventually
from .conftest import BACKENDS, START, Running, held_task, queue_url


def _deep(levels: int) -> list[Any]:
    top: list[Any] = []
    level = top
    for _ in range(levels):
        inner: list[Any] = []
        level.append(inner)
        level = inner
    return top


BAD_ENQUEUES: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("int and str keys", ({1: "a", "1": "b"},), {}, "key of type int"),
    ("a tuple key", (), {"x": {(1, 2): 3}}, "key of type tuple"),
    ("a key deep inside", ([{"ok": [{2: 0}]}],), {}, "key of type int"),
    ("100,000 levels", (_deep(100_000),), {}, "nests deeper than"),
    ("nan delay", (), {"_delay_s": math.nan}, "_delay_s"),
    ("infinite delay", (), {"_delay_s": math.inf}, "_delay_s"),
    ("negative delay", (), {"_delay_s": -1}, "_delay_s"),
    ("text delay", (), {"_delay_s": "3"}, "_delay_s"),
    ("nan eta", (), {"_eta": math.nan}, "_eta"),
    ("huge priority", (), {"_priority": 2**70}, "_priority"),
    ("priority at the limit", (), {"_priority": 2**31}, "_priority"),
    ("bool priority", (), {"_priority": True}, "_priority"),
    ("int id", (), {"_id": 5}, "_id"),
    ("empty id", (), {"_id": ""}, "_id"),
    ("NUL in a key", (), {"_key": "a\x00b"}, "_key"),
    ("huge id", (), {"_id": "x" * 5000}, "_id"),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [case[1:] for case in BAD_ENQUEUES],
    ids=[case[0] for case in BAD_ENQUEUES],
)
def test_bad_input_is_refused_before_anything_is_written(
    q: TaskQueue, args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    @q.task
    def f(*a: Any, **k: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match=named):
        f.enqueue(*args, **kwargs)
    with pytest.raises(ConfigurationError, match=named):
        f.enqueue_many([(args, dict(kwargs))])
    stats = q.stats()
    assert (stats.queued, stats.running, stats.done, stats.dead) == (0, 0, 0, 0)
    # what is at the edge of the rules is fine
    f.enqueue({"1": "b"}, _delay_s=0, _priority=2**31 - 1, _id="y" * 1024)
    f.enqueue(_deep(150), _priority=-(2**31) + 1)
    assert q.stats().queued == 2


def test_pickled_arguments_may_have_any_keys_but_not_endless_depth(tmp_path: Any) -> None:
    with TaskQueue(f"sqlite:///{tmp_path / 'p.db'}", serializer="pickle") as q:

        @q.task
        def f(x: Any) -> Any:
            return x

        job = f.enqueue({1: "a", "1": "b", (2, 3): 4})
        q.worker(burst=True).run()
        assert job.result(timeout_s=5) == {1: "a", "1": "b", (2, 3): 4}
        with pytest.raises(ConfigurationError, match="nests deeper"):
            f.enqueue(_deep(100_000))


def test_a_task_priority_out_of_range_is_refused_at_registration() -> None:
    q = TaskQueue("memory://")
    with pytest.raises(ConfigurationError, match="priority"):

        @q.task(priority=2**40)
        def f() -> None:
            return None


def test_backoff_of_a_late_attempt_is_the_cap_not_an_overflow() -> None:
    assert backoff_delay(5000, 1.0, 300.0, 0.0) == 300.0
    assert backoff_delay(10**9, 0.5, 30.0, 0.0) == 30.0
    assert backoff_delay(3, 1.0, 300.0, 0.0) == 4.0


def test_a_pipeline_retry_of_5000_attempts_runs_them_all_and_then_fails() -> None:
    calls = 0

    def always_fails(x: int) -> int:
        nonlocal calls
        calls += 1
        raise ValueError(x)

    policy = Retry(attempts=5000, backoff_s=0.0, max_backoff_s=0.0, jitter=0.0)
    with pytest.raises(StageFailed):
        Pipeline([1]).map(always_fails, on_error=policy).run()
    assert calls == 5000


def test_a_job_whose_worker_died_max_crashes_times_is_dead_without_running_again(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    runs: list[int] = []

    @q.task(retries=5, max_crashes=2)
    def crashes_its_worker() -> None:
        runs.append(1)

    job = crashes_its_worker.enqueue(_key="k")
    for attempt in (1, 2):
        # a worker claims it and dies: nothing is written, the lease lapses
        [lease] = q.backend.claim(q.name, f"doomed-{attempt}", 10, q.now())
        assert lease.job.attempts == attempt
        clock.advance(11)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    info = job.info()
    assert runs == [] and info.state == "dead" and info.lost == 2 and info.attempts == 3
    assert info.error is not None and "died 2 times" in info.error
    assert "max_crashes=2" in info.error
    q.requeue(job.id)
    assert (job.info().attempts, job.info().lost) == (0, 0)


def test_crashes_are_counted_apart_from_retries(clocked: tuple[TaskQueue, ManualClock]) -> None:
    """A task without retries still runs again after its worker died (twice here, under the
    default max_crashes=3); its own failure then ends it, as retries=0 says."""
    q, clock = clocked
    runs: list[int] = []

    @q.task(retries=0)
    def fails() -> None:
        runs.append(1)
        raise ValueError("its own failure")

    job = fails.enqueue()
    for attempt in (1, 2):
        q.backend.claim(q.name, f"doomed-{attempt}", 10, q.now())
        clock.advance(11)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    info = job.info()
    assert runs == [1] and info.state == "dead" and info.lost == 2
    assert info.error is not None and "its own failure" in info.error
    assert [a.outcome for a in info.runs()] == ["lost", "lost", "dead"]


def test_max_crashes_is_checked_at_registration(q: TaskQueue) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="max_crashes"):
            q.task(max_crashes=bad)(lambda: None)  # type: ignore[arg-type]


def test_a_worker_that_retakes_its_own_lapsed_job_keeps_the_second_run_alive(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """Its heartbeats fail long enough for the lease to lapse (a pause, an outage); it claims
    the job again itself. The first run ending must not end the second run's heartbeats."""
    q, clock = clocked
    gates = [threading.Event(), threading.Event()]
    started: list[int] = []

    @q.task
    def hold() -> int:
        n = len(started)
        started.append(n)
        gates[n].wait(30)
        return n

    beats_fail = threading.Event()
    renew = q.backend.heartbeat_many

    def heartbeat_many(*args: Any) -> list[bool]:
        if beats_fail.is_set():
            raise BackendUnavailable("storage away")
        return renew(*args)

    q.backend.heartbeat_many = heartbeat_many  # type: ignore[method-assign,assignment]
    job = hold.enqueue()
    worker = q.worker(concurrency=2, lease_s=30, poll_s=0.05, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        eventually(lambda: started == [0])
        beats_fail.set()
        eventually(lambda: clock.sleepers() >= 1)
        clock.advance(31)  # the lease lapses; the worker's next look claims the job again
        eventually(lambda: started == [0, 1])
        second = job.info().token
        beats_fail.clear()
        gates[0].set()  # the first run ends: its outcome is refused (its lease is gone)
        eventually(lambda: len(worker._running) == 1)
        for _ in range(9):  # three leases' worth of time: the second run's lease is renewed
            eventually(lambda: clock.sleepers() >= 1)  # the heartbeat waits for its time
            clock.advance(10)
            eventually(lambda: clock.sleepers() >= 1)  # ... and has done its round
            info = job.info()
            assert info.token == second and info.lease_until is not None
            assert info.lease_until > q.now()
        assert started == [0, 1]
        gates[1].set()
        assert job.result(timeout_s=10) == 1
    finally:
        for gate in gates:
            gate.set()
        worker.stop()
        thread.join(10)
    assert job.info().attempts == 2 and job.info().lost == 1


class Flaky:
    """Wraps a backend method: raises ``error`` while ``failing`` is set, counting the calls."""

    def __init__(self, real: Any, error: Exception) -> None:
        self.real = real
        self.error = error
        self.failing = threading.Event()
        self.failing.set()
        self.refused = 0

    def __call__(self, *args: Any) -> Any:
        if self.failing.is_set():
            self.refused += 1
            raise self.error
        return self.real(*args)


@pytest.mark.parametrize(
    "error",
    [BackendUnavailable("locked"), RuntimeError("a bug, or a storage error not mapped")],
    ids=["outage", "unexpected"],
)
def test_a_heartbeat_that_fails_for_a_while_keeps_beating_afterwards(
    clocked: tuple[TaskQueue, ManualClock], gate: threading.Event, error: Exception
) -> None:
    q, clock = clocked
    hold, started = held_task(q, gate)
    flaky = Flaky(q.backend.heartbeat_many, error)
    q.backend.heartbeat_many = flaky  # type: ignore[method-assign,assignment]
    job = hold.enqueue()
    running = Running(q.worker(lease_s=30, poll_s=0.05, handle_signals=False))
    worker, thread = running.worker, running.thread
    try:
        assert started.wait(10)
        for _ in range(2):  # two beats refused (20 s of the 30 s lease)
            eventually(lambda: clock.sleepers() >= 1)
            clock.advance(10)
        eventually(lambda: flaky.refused == 2)
        flaky.failing.clear()
        renewed = job.info().lease_until
        assert renewed is not None
        # the loop beats again before the lease ends (10 s are left): step there a second at
        # a time, not in one jump that lands on the lease's end
        for _ in range(9):
            if (job.info().lease_until or 0.0) > renewed:
                break
            eventually(lambda: clock.sleepers() >= 1)
            clock.advance(1)
            with contextlib.suppress(AssertionError):
                eventually(lambda: (job.info().lease_until or 0.0) > renewed, timeout_s=0.2)
        assert (job.info().lease_until or 0.0) > renewed, "no beat within the lease"
        for _ in range(4):
            eventually(lambda: clock.sleepers() >= 1)
            clock.advance(10)
            eventually(lambda: clock.sleepers() >= 1)
        info = job.info()
        assert renewed is not None and info.lease_until is not None
        assert info.lease_until > renewed and info.lease_until > q.now()  # still beating
        assert info.attempts == 1 and thread.is_alive()
    finally:
        gate.set()
        worker.stop()
        thread.join(10)
    assert job.result(timeout_s=5) == "held" and worker.failure is None


def test_a_loop_that_keeps_failing_stops_the_worker_cleanly_and_run_raises(
    clocked: tuple[TaskQueue, ManualClock], gate: threading.Event
) -> None:
    q, clock = clocked
    hold, started = held_task(q, gate)
    flaky = Flaky(q.backend.heartbeat_many, RuntimeError("never works"))
    q.backend.heartbeat_many = flaky  # type: ignore[method-assign,assignment]
    job = hold.enqueue()
    running = Running(q.worker(lease_s=30, poll_s=0.05, shutdown_grace_s=0, handle_signals=False))
    try:
        assert started.wait(10)
        running.advance_until_it_stops(clock, 5)  # beats and back-offs, failing for a lease
    finally:
        gate.set()
    raised = running.raised
    assert [str(e) for e in raised] == ["never works"] and running.worker.failure is raised[0]
    # handed back, not left leased: claimable at once (if its lease lapsed while the loop was
    # failing, the worker may have taken it again first: then that run was handed back)
    [lease] = q.backend.claim(q.name, "next", 30, q.now())
    assert lease.job.id == job.id


def test_outcomes_that_cannot_be_written_for_a_while_are_written_once_storage_is_back(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    runs: list[int] = []

    @q.task
    def work(i: int) -> int:
        runs.append(i)
        return i * 2

    flaky = Flaky(q.backend.complete_many, BackendUnavailable("database is locked"))
    q.backend.complete_many = flaky  # type: ignore[method-assign,assignment]
    both = q.backend.complete_then_claim

    def complete_then_claim(done: Any, *claim: Any) -> Any:
        # the outcomes that ride on a claim are refused too (the claim itself goes through)
        if flaky.failing.is_set():
            flaky.refused += 1
            return flaky.error, q.backend.claim(*claim)
        return both(done, *claim)

    q.backend.complete_then_claim = complete_then_claim  # type: ignore[method-assign,assignment]
    jobs = [work.enqueue(i) for i in range(5)]
    running = Running(q.worker(lease_s=30, poll_s=0.05, handle_signals=False))
    worker, thread = running.worker, running.thread
    try:
        eventually(lambda: len(runs) == 5 and flaky.refused >= 1)
        # the heartbeat sleeps its 10 s on the clock; the writer of outcomes backs off on it
        for _ in range(3):  # back-offs of 0.5, 1 and 2 s, each followed by a refused write
            eventually(lambda: clock.sleepers() >= 2)
            refused = flaky.refused
            clock.advance(2)
            eventually(functools.partial(lambda before: flaky.refused > before, refused))
        flaky.failing.clear()
        eventually(lambda: clock.sleepers() >= 2)
        clock.advance(5)
        assert [j.result(timeout_s=10) for j in jobs] == [0, 2, 4, 6, 8]
    finally:
        worker.stop()
        thread.join(10)
    assert sorted(runs) == [0, 1, 2, 3, 4] and worker.processed == 5


class Ahead(SystemClock):
    """A machine whose clock is five seconds fast."""

    def time(self) -> float:
        return time.time() + 5.0


def test_a_worker_whose_clock_is_ahead_does_not_take_a_live_job(
    request: pytest.FixtureRequest, tmp_path: Any, backend_kind: str
) -> None:
    url = queue_url(backend_kind, request, tmp_path)
    with TaskQueue(url) as healthy, TaskQueue(url, clock=Ahead()) as fast:
        healthy.enqueue("t", 1)
        [held] = healthy.backend.claim(healthy.name, "healthy", 3.0, healthy.now())
        # five seconds ahead, its own clock says the 3 s lease lapsed long ago; the
        # storage's clock says it has not
        assert abs(fast.now() - healthy.now()) < 0.5
        assert fast.backend.claim(fast.name, "fast", 3.0, fast.now()) == []
        job = fast.enqueue("t", 2)
        assert abs(job.info().enqueued_at - time.time()) < 0.5  # stored on the storage's time
        assert healthy.backend.complete(held.job.id, held.token, None, None, healthy.now())


def test_a_manual_clock_is_taken_as_it_is(clocked: tuple[TaskQueue, ManualClock]) -> None:
    q, clock = clocked
    assert q.now() == START
    clock.advance(3600)
    assert q.now() == START + 3600


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def test_a_worker_reads_the_storages_clock_off_its_event_loop() -> None:
    with TaskQueue("memory://skew-off-loop") as q:
        where: list[str] = []
        real = q.backend.storage_time

        def storage_time() -> float:
            where.append(threading.current_thread().name)
            return real()

        q.backend.storage_time = storage_time  # type: ignore[method-assign]

        @q.task
        def one() -> int:
            return 1

        job = one.enqueue()  # a producer: on its own thread, the first use measures
        q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
        assert job.result(timeout_s=5) == 1
        assert where[0] == threading.current_thread().name
        assert len(where) >= 2 and all(name.startswith("conveyor:queue-io") for name in where[1:])


def test_a_job_that_ends_while_its_lease_is_renewed_is_not_said_lost(
    clocked: tuple[TaskQueue, ManualClock], gate: threading.Event, caplog: Any
) -> None:
    """The heartbeat names the leases to renew, then the job returns and its outcome is
    written before the renewal reaches the storage: the renewal finds the lease ended, which
    is no lost lease."""
    q, clock = clocked
    hold, started = held_task(q, gate)
    real = q.backend.heartbeat_many
    job = hold.enqueue()

    def heartbeat_many(held: Any, lease_s: float, now: float) -> list[bool]:
        if [job_id for job_id, _ in held] == [job.id]:
            gate.set()  # the job returns, and its outcome is written meanwhile
            eventually(lambda: job.info().state == "done")
        return real(held, lease_s, now)

    q.backend.heartbeat_many = heartbeat_many  # type: ignore[method-assign]
    running = Running(q.worker(lease_s=30, poll_s=0.05, handle_signals=False))
    try:
        assert started.wait(10)
        eventually(lambda: clock.sleepers() >= 1)
        clock.advance(10)  # a third of the lease: the leases are renewed
        assert job.result(timeout_s=10) == "held"
    finally:
        running.stop()
    assert "lease lost" not in caplog.text
