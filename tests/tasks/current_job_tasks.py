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


def my_span() -> list[str]:
    """The trace and span id the task's code sees as current (its spans' parent)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return [format(context.trace_id, "032x"), format(context.span_id, "016x")]
