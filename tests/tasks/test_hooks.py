"""The queue's hooks: told of each enqueue, attempt and death, in order, whatever a hook does."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from conveyor import ManualClock, RetryTask, TaskQueue
from conveyor.tasks.backends.base import Job


def drain(q: TaskQueue, **options: Any) -> None:
    q.worker(burst=True, poll_s=0.05, handle_signals=False, **options).run()


def test_each_hook_hears_of_what_it_is_for(q: TaskQueue) -> None:
    heard: list[tuple[Any, ...]] = []
    q.on_enqueue(lambda job: heard.append(("enqueued", job.id, job.state)))
    q.before_attempt(lambda job: heard.append(("before", job.id, job.attempts)))

    @q.after_attempt
    def after(job: Job, outcome: str, duration_s: float, error: str | None) -> None:
        assert duration_s >= 0
        heard.append(("after", job.id, outcome, error is not None))

    @q.on_dead
    def dead(job: Job, error: str) -> None:
        heard.append(("dead", job.id, error.splitlines()[-1]))

    @q.task(name="flaky", retries=1, backoff_s=0)
    def flaky(fail: bool) -> str:
        if fail:
            raise ValueError("no")
        return "yes"

    flaky.enqueue(False, _id="good")
    flaky.enqueue(False, _id="good")  # already there: no hook
    flaky.enqueue(True, _id="bad")
    drain(q)
    assert heard[:2] == [("enqueued", "good", "queued"), ("enqueued", "bad", "queued")]
    of_good = [h for h in heard[2:] if h[1] == "good"]
    of_bad = [h for h in heard[2:] if h[1] == "bad"]
    assert of_good == [("before", "good", 1), ("after", "good", "succeeded", False)]
    # each attempt's hooks in order; the retry may start before the first attempt's
    # after_attempt is called (the retry is written first), so only that pair may swap
    first = [("before", "bad", 1), ("after", "bad", "retried", True)]
    second = [
        ("before", "bad", 2),
        ("after", "bad", "dead", True),
        ("dead", "bad", "ValueError: no"),
    ]
    assert sorted(of_bad, key=str) == sorted(first + second, key=str)
    assert [e for e in of_bad if e in first] == first
    assert [e for e in of_bad if e in second] == second


def test_enqueue_many_and_cancel_tell_their_hooks(q: TaskQueue) -> None:
    enqueued: list[str] = []
    dead: list[tuple[str, str]] = []
    q.on_enqueue(lambda job: enqueued.append(job.id))
    q.on_dead(lambda job, error: dead.append((job.id, error)))
    q.enqueue("t", _id="a")
    q.enqueue_many("t", [((), {"_id": "a"}), ((), {"_id": "b"}), ((), {"_id": "c"})])
    assert enqueued == ["a", "b", "c"]
    assert q.cancel("b", reason="not wanted")
    assert not q.cancel("b")  # already dead: no second word
    assert dead == [("b", "not wanted")]


def test_a_job_handed_on_for_a_worker_that_knows_it_is_postponed(q: TaskQueue) -> None:
    outcomes: list[str] = []
    q.after_attempt(lambda job, outcome, took, error: outcomes.append(outcome))
    q.on_dead(lambda job, error: outcomes.append("on_dead"))
    q.enqueue("not.known.here")
    drain(q)
    assert outcomes == ["postponed"]


@pytest.mark.parametrize("raised", [ValueError, SystemExit, KeyboardInterrupt])
def test_a_hook_that_raises_changes_nothing(
    q: TaskQueue, raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    later: list[str] = []

    def broken(*args: Any) -> None:
        raise raised("hook bug")

    for register in (q.on_enqueue, q.before_attempt, q.after_attempt, q.on_dead):
        register(broken)
    q.after_attempt(lambda job, outcome, took, error: later.append(outcome))
    q.on_dead(lambda job, error: later.append("on_dead"))

    @q.task(name="ok")
    def ok() -> int:
        return 1

    @q.task(name="bad", retries=0)
    def bad() -> None:
        raise RuntimeError("task bug")

    with caplog.at_level(logging.ERROR, logger="conveyor.tasks"):
        good = ok.enqueue()
        failing = bad.enqueue()
        drain(q)
    assert good.result(timeout_s=5) == 1
    assert failing.status() == "dead" and "task bug" in (failing.info().error or "")
    assert sorted(later) == ["dead", "on_dead", "succeeded"]
    # two enqueues, two attempts begun and ended, one death: each logged, none let through
    assert sum("broken raised" in r.getMessage() for r in caplog.records) == 7


def test_retried_on_request_is_retried_for_the_hooks(q: TaskQueue) -> None:
    outcomes: list[str] = []
    q.after_attempt(lambda job, outcome, took, error: outcomes.append(outcome))
    runs = []

    @q.task(name="again")
    def again() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RetryTask()

    again.enqueue()
    drain(q)
    assert outcomes == ["retried", "succeeded"]


def test_a_job_that_cannot_run_is_written_dead_before_the_hooks_hear_of_it(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """A slow hook can hold up a worker's loop; it cannot hold up the end of a job that must
    not run (here: its worker died under it as often as max_crashes allows)."""
    q, clock = clocked

    @q.task(name="fragile", max_crashes=1)
    def fragile() -> None: ...

    job = fragile.enqueue()
    q.backend.claim(q.name, "ghost", 5, q.now())
    clock.advance(10)  # that worker's lease lapses: the next claim counts it lost
    seen: list[tuple[str, str]] = []
    q.before_attempt(lambda j: seen.append(("before", q.backend.get(j.id).state)))  # type: ignore[union-attr]
    q.after_attempt(lambda j, outcome, took, error: seen.append(("after", outcome)))
    q.worker(burst=True, handle_signals=False).run()
    assert seen == [("before", "dead"), ("after", "dead")]
    assert job.status() == "dead"
