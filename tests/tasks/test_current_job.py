"""current_job(): the job a task runs for, in every kind of task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor import RetryTask, TaskQueue, current_job

from .current_job_tasks import where_am_i


@pytest.mark.parametrize("executor", ["thread", "process", "inline", "async"])
def test_a_task_knows_its_job(executor: str, tmp_path: Path) -> None:
    q = TaskQueue(f"sqlite:///{tmp_path / 'q.db'}")
    if executor == "async":

        @q.task(name="where")
        async def where() -> dict[str, Any]:
            return where_am_i()
    else:
        q.task(where_am_i, name="where", executor=executor)
    handle = q.enqueue("where")
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert handle.result(timeout_s=10) == {
        "id": handle.id,
        "attempt": 1,
        "queue": "default",
        "task": "where",
    }
    q.close()


def test_the_attempt_counts_retries_and_outside_a_task_there_is_none(tmp_path: Path) -> None:
    q = TaskQueue(f"memory://{tmp_path.name}")
    seen: list[int] = []

    @q.task(name="twice", retries=1, backoff_s=0)
    def twice() -> int:
        job = current_job()
        assert job is not None and job.lease_until is not None and job.enqueued_at > 0
        seen.append(job.attempt)
        if job.attempt == 1:
            raise RetryTask(delay_s=0)
        return job.attempt

    handle = twice.enqueue()
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert handle.result(timeout_s=10) == 2 and seen == [1, 2]
    assert current_job() is None
    q.close()
