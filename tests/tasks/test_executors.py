"""Tasks run on the engine's worker kinds: what a stage gets (time limits that replace a stuck
thread or kill a process, crashes blamed on one job), a task gets."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import ConfigurationError, TaskQueue

#: module-level, so that worker processes import this module and find the decorated task
MODULE_QUEUE = TaskQueue("memory://executors-module")


@MODULE_QUEUE.task(executor="process", retries=0)
def cube(x: int) -> int:
    return x**3


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


def crash_on(x: int) -> int:
    if x == 3:
        os._exit(1)
    time.sleep(0.02)  # the others run beside it
    return x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)  # the work itself (3600: a job stuck until its time limit kills it)
    return seconds


@pytest.fixture(params=["memory", "sqlite"])
def q(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskQueue]:
    url = f"memory://{tmp_path.name}" if request.param == "memory" else f"sqlite:///{tmp_path}/q.db"
    queue = TaskQueue(url)
    yield queue
    queue.close()


def drain(q: TaskQueue, **options: Any) -> None:
    q.worker(burst=True, poll_s=0.05, handle_signals=False, **options).run()


def test_a_process_task_registered_with_the_decorator_at_module_level_runs() -> None:
    jobs = [cube.enqueue(i) for i in range(10)]
    drain(MODULE_QUEUE, concurrency=2)
    assert [j.result(timeout_s=5) for j in jobs] == [i**3 for i in range(10)]


def test_process_tasks_run_in_worker_processes_and_honour_recycling(q: TaskQueue) -> None:
    task = q.task(pid_of, executor="process")
    jobs = [task.enqueue(i) for i in range(12)]
    drain(q, concurrency=1, max_items_per_worker=4, start_method="spawn")
    results = [j.result(timeout_s=5) for j in jobs]
    assert [x for x, _ in results] == list(range(12))
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids and len(pids) >= 3  # a fresh process every four jobs


@pytest.mark.timeout(60)
def test_a_process_task_past_its_time_limit_is_killed_and_its_slot_freed(q: TaskQueue) -> None:
    task = q.task(sleep_for, executor="process", timeout_s=0.5, retries=0)
    stuck = task.enqueue(3600)
    quick = task.enqueue(0)
    drain(q, concurrency=1)  # one slot: the quick job runs only if the stuck one lets go
    assert quick.result(timeout_s=5) == 0
    assert stuck.status() == "dead"
    assert "timeout_s=0.5" in (stuck.info().error or "")


def test_a_process_task_that_kills_its_worker_fails_alone(q: TaskQueue) -> None:
    task = q.task(crash_on, executor="process", retries=0)
    jobs = [task.enqueue(i) for i in range(8)]
    drain(q, concurrency=4)
    assert [j.status() for j in jobs] == ["done"] * 3 + ["dead"] + ["done"] * 4, [
        j.info().error for j in jobs
    ]
    assert "the worker process running it" in (jobs[3].info().error or "")


def test_stuck_thread_tasks_are_replaced_and_later_tasks_still_run(
    q: TaskQueue, gate: threading.Event
) -> None:
    @q.task(timeout_s=0.2, retries=0)
    def stuck() -> None:
        gate.wait()

    @q.task
    def quick(x: int) -> int:
        return x

    stuck_jobs = [stuck.enqueue() for _ in range(4)]
    quick_jobs = [quick.enqueue(i) for i in range(6)]
    drain(q, concurrency=2)
    assert [j.result(timeout_s=5) for j in quick_jobs] == list(range(6))
    assert {j.status() for j in stuck_jobs} == {"dead"}


def test_an_async_task_raising_cancelled_error_fails_its_job_without_a_hang(
    q: TaskQueue,
) -> None:
    @q.task(retries=0)
    async def cancels() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    @q.task
    async def fine() -> str:
        return "ok"

    bad, good = cancels.enqueue(), fine.enqueue()
    drain(q)
    assert good.result(timeout_s=5) == "ok"
    assert bad.status() == "dead" and "CancelledError" in (bad.info().error or "")


def test_a_base_exception_from_a_thread_task_is_that_jobs_failure(q: TaskQueue) -> None:
    @q.task(retries=0)
    def exits() -> None:
        raise SystemExit(3)

    job = exits.enqueue()
    drain(q)
    assert job.status() == "dead" and "SystemExit" in (job.info().error or "")


def test_an_inline_task_cannot_have_a_time_limit(q: TaskQueue) -> None:
    def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match="inline"):
        q.task(f, executor="inline", timeout_s=1)
    inline = q.task(f, executor="inline")
    job = inline.enqueue()
    drain(q)
    assert job.status() == "done"


def test_a_process_task_that_cannot_be_sent_is_refused_at_registration(q: TaskQueue) -> None:
    lock = threading.Lock()

    def holds() -> bool:
        return lock.locked()

    with pytest.raises(ConfigurationError, match="cannot be sent to a worker process"):
        q.task(holds, executor="process")


def test_async_and_process_executors_do_not_mix(q: TaskQueue) -> None:
    async def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match="plain functions"):
        q.task(f, executor="process")
