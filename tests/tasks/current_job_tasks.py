"""Tasks that report the job they run for, importable by worker processes."""

from __future__ import annotations

from typing import Any

from conveyor import current_job


def where_am_i() -> dict[str, Any]:
    job = current_job()
    assert job is not None
    return {"id": job.id, "attempt": job.attempt, "queue": job.queue, "task": job.task}


def halfway() -> bool:
    job = current_job()
    assert job is not None
    return job.progress(0.5, "half of it")
