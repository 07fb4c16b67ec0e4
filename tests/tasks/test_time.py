"""Leases, heartbeats, retries and delays on a manual clock: time moves when the test says."""

from __future__ import annotations

import threading

from conveyor import ManualClock, TaskQueue

from ..conftest import eventually
from .conftest import START, held_task


def test_a_heartbeat_renews_the_lease_each_third_of_it(
    clocked: tuple[TaskQueue, ManualClock], gate: threading.Event
) -> None:
    q, clock = clocked
    hold, started = held_task(q, gate)
    job = hold.enqueue()
    worker = q.worker(lease_s=30, poll_s=0.05, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert started.wait(10)
        assert job.info().lease_until == START + 30
        for beat in (1, 2, 3):
            eventually(lambda: clock.sleepers() >= 1)  # the heartbeat waits for its time
            clock.advance(10)
            expected = START + 10 * beat + 30

            def renewed(expected: float = expected) -> bool:
                return job.info().lease_until == expected

            eventually(renewed)
    finally:
        gate.set()
        worker.stop()
        thread.join(10)
    assert job.status() == "done"


def test_a_retry_waits_its_backoff_on_the_queues_clock(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    tries: list[float] = []

    @q.task(retries=1, backoff_s=60, jitter=0)
    def flaky() -> str:
        tries.append(q.now())
        if len(tries) == 1:
            raise ConnectionError("down")
        return "up"

    job = flaky.enqueue()
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()  # the retry is 60 s away
    info = job.info()
    assert (info.state, info.attempts, info.run_at) == ("queued", 1, START + 60)
    clock.advance(59)
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert job.status() == "queued" and tries == [START]  # not yet due
    clock.advance(1)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    assert job.result(timeout_s=5) == "up" and tries == [START, START + 60]


def test_a_delayed_job_runs_when_its_time_comes(clocked: tuple[TaskQueue, ManualClock]) -> None:
    q, clock = clocked

    @q.task
    def later() -> float:
        return q.now()

    job = later.enqueue(_delay_s=3600)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    assert job.status() == "queued"
    clock.advance(3600)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    assert job.result(timeout_s=5) == START + 3600


def test_a_lapsed_lease_is_claimed_by_another_worker_only_once_its_time_has_passed(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    backend = q.backend

    @q.task
    def work() -> str:
        return "done"

    job = work.enqueue()
    [held] = backend.claim(q.name, "gone-worker", 30, q.now())  # a worker that then vanished
    clock.advance(29)
    assert backend.claim(q.name, "other", 30, q.now()) == []  # its lease still holds
    clock.advance(2)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    assert job.result(timeout_s=5) == "done" and job.info().attempts == 2
    assert not backend.complete(job.id, held.token, None, None, q.now())  # the old lease is void
