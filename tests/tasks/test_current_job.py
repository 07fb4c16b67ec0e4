"""current_job(): the job a task runs for, in every kind of task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor import JobContext, RetryTask, TaskQueue, current_job

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


@pytest.mark.parametrize("executor", ["thread", "process", "async"])
def test_a_task_says_how_far_it_is(executor: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from conveyor import ConfigurationError
    from conveyor.cli import main

    from .current_job_tasks import halfway

    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = TaskQueue(url)
    if executor == "async":

        @q.task(name="half")
        async def half() -> bool:
            return halfway()
    else:
        q.task(halfway, name="half", executor=executor)
    handle = q.enqueue("half")
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert handle.result(timeout_s=10) is True
    info = handle.info()
    assert (info.progress, info.progress_note) == (0.5, "half of it")
    out = CliRunner().invoke(main, ["job", url, handle.id])
    assert "progress      0.5" in out.output and "half of it" in out.output
    context = JobContext(id="x", queue="q", task="t", attempt=1, enqueued_at=0, lease_until=None)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ConfigurationError):
            context.progress(bad)  # type: ignore[arg-type]
    assert "url" not in repr(context) and "token" not in repr(context)
    q.close()


def failing_in_a_process() -> None:
    raise KeyError("deep in the task")


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_dead_jobs_traceback_shows_the_tasks_frames_not_the_workers(
    executor: str, tmp_path: Path
) -> None:
    import conveyor

    q = TaskQueue(f"sqlite:///{tmp_path / 'q.db'}")
    q.task(failing_in_a_process, name="fails", executor=executor, retries=0)
    handle = q.enqueue("fails")
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    error = handle.info().error or ""
    assert "KeyError: 'deep in the task'" in error
    assert __file__ in error and "failing_in_a_process" in error
    assert str(Path(conveyor.__file__).parent) not in error  # no frame of conveyor's
    q.close()
