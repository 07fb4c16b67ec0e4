"""Aborting jobs: a queued one never runs; a running one is stopped as its kind allows and ends
``aborted`` with who asked; the worker goes on."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conveyor import JobAborted, ManualClock, TaskFailed, TaskQueue, current_job
from conveyor.cli import main

from ..conftest import eventually
from .conftest import Running, next_beat


def test_a_queued_job_aborted_never_runs(q: TaskQueue) -> None:
    ran: list[int] = []

    @q.task(name="note")
    def note(x: int) -> None:
        ran.append(x)

    job = note.enqueue(1)
    other = note.enqueue(2)
    assert job.abort(by="alice") == "aborted"
    q.worker(burst=True, handle_signals=False).run()
    assert ran == [2] and other.status() == "done"
    assert job.status() == "aborted"
    with pytest.raises(JobAborted) as aborted:
        job.result(timeout_s=1)
    assert aborted.value.by == "alice" and isinstance(aborted.value, TaskFailed)
    assert job.abort() == "aborted"  # over already: nothing changes
    assert other.abort() == "done"
    assert q.abort("no-such-job") == "unknown"
    assert q.stats().aborted == 1


def run_until_started(
    q: TaskQueue, clock: ManualClock, started: threading.Event, **options: object
) -> Running:
    run = Running(q.worker(name="w", handle_signals=False, poll_s=0.05, **options))
    assert started.wait(10)
    return run


def test_a_running_coroutine_is_cancelled_where_it_awaits(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    started = threading.Event()
    cancelled: list[bool] = []

    @q.task(name="waits")
    async def waits() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    job = waits.enqueue()
    run = run_until_started(q, clock, started)
    try:
        assert job.abort(by="ops") == "requested"
        next_beat(run, clock)  # the worker looks for aborts at each beat
        eventually(lambda: job.status() == "aborted")
    finally:
        run.stop()
    assert cancelled == [True]
    info = job.info()
    assert info.error == "aborted by ops" and [a.outcome for a in info.runs()] == ["aborted"]
    assert run.raised == []


def test_a_thread_task_sees_the_request_and_returns(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    started = threading.Event()
    seen: list[bool] = []

    @q.task(name="polite")
    def polite() -> str:
        started.set()
        context = current_job()
        assert context is not None
        deadline = time.monotonic() + 30
        while not context.abort_requested and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(context.abort_requested)
        return "stopped early"

    job = polite.enqueue()
    run = run_until_started(q, clock, started)
    try:
        job.abort(by="ops")
        next_beat(run, clock)
        eventually(lambda: job.status() == "aborted")
    finally:
        run.stop()
    assert seen == [True]
    assert job.info().result is None  # what it returned after the request is not kept


def test_a_thread_task_that_ignores_the_request_is_abandoned_after_the_grace(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    started = threading.Event()
    gate = threading.Event()

    @q.task(name="stubborn")
    def stubborn() -> None:
        started.set()
        gate.wait(30)

    @q.task(name="next")
    def nxt() -> str:
        return "ran"

    job = stubborn.enqueue()
    run = run_until_started(q, clock, started, concurrency=1, abort_grace_s=5)
    try:
        job.abort(by="ops")
        next_beat(run, clock)  # asked: the thread is told, and has 5 s
        assert job.status() == "running"
        for _ in range(6):
            next_beat(run, clock)
        eventually(lambda: job.status() == "aborted")
        after = nxt.enqueue()  # the worker's one slot is free again: a fresh thread
        assert after.result(timeout_s=10) == "ran"
    finally:
        gate.set()
        run.stop()
    assert run.raised == []


def test_a_process_task_is_killed_and_its_process_replaced(q: TaskQueue, tmp_path: Path) -> None:
    @q.task(name="sleeper", executor="process")
    def sleeper(path: str) -> None:
        Path(path).write_text("started")
        time.sleep(600)  # the work itself: only the abort (its process killed) ends it

    @q.task(name="quick", executor="process")
    def quick() -> int:
        return 7

    mark = tmp_path / "started"
    job = sleeper.enqueue(str(mark))
    run = Running(q.worker(name="w", handle_signals=False, poll_s=0.05, concurrency=1))
    try:
        eventually(mark.exists, 30)
        assert job.abort(by="ops") == "requested"
        eventually(lambda: job.status() == "aborted", 10)  # within a beat or two
        assert quick.enqueue().result(timeout_s=30) == 7
    finally:
        run.stop()
    assert run.raised == []
    assert job.info().error == "aborted by ops"


def test_a_job_asked_to_abort_whose_worker_died_is_not_run_again(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    ran: list[int] = []

    @q.task(name="note")
    def note() -> None:
        ran.append(1)

    job = note.enqueue()
    q.backend.claim(q.name, "ghost", 5, q.now())  # a worker took it, then died
    assert job.abort(by="ops") == "requested"
    clock.advance(10)  # its lease lapses
    q.worker(burst=True, handle_signals=False).run()
    assert ran == [] and job.status() == "aborted"


def test_conveyor_abort(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with TaskQueue(url) as q:
        job = q.enqueue("t")
        q.enqueue("t", _id="over")
        q.finish("over")
    runner = CliRunner()
    out = runner.invoke(main, ["abort", url, job.id, "--by", "carol"])
    assert out.exit_code == 0 and "aborted (it will not run)" in out.output
    out = runner.invoke(main, ["abort", url, "over", "missing"])
    assert out.exit_code == 1
    assert "over: not aborted: it is done" in out.output
    assert "missing: not aborted: it is unknown" in out.output
    with TaskQueue(url) as q:
        assert q.job(job.id).info().error == "aborted by carol"


def test_a_lost_job_waiting_to_run_alone_is_aborted_without_running(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    gate = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    @q.task(name="hold")
    def hold() -> None:
        started.set()
        gate.wait(30)

    @q.task(name="suspect")
    def suspect() -> None:
        ran.append("suspect")

    hold.enqueue()
    job = suspect.enqueue(_priority=10)
    [taken] = q.backend.claim(q.name, "ghost", 5, q.now())  # a worker that then died
    assert taken.job.id == job.id
    run = Running(q.worker(name="w", handle_signals=False, poll_s=0.05, concurrency=2))
    try:
        assert started.wait(10)
        clock.advance(10)  # the ghost's lease lapses: w takes the job, to run it alone
        eventually(lambda: job.info().worker == "w")
        assert job.abort(by="ops") == "requested"
        next_beat(run, clock)  # the beat sees the request for the job that waits ...
        next_beat(run, clock, 0)  # ... and is over
        gate.set()  # the other job ends: the waiting one would now start
        eventually(lambda: job.status() == "aborted")
    finally:
        gate.set()
        run.stop()
    assert ran == []
