"""OpenTelemetry spans of a traced queue, read back from the SDK's in-memory exporter."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import ConfigurationError, TaskQueue
from conveyor.tracing import Tracing, error_type

from .current_job_tasks import my_span


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


def traced_queue(url: str, exporter: InMemorySpanExporter) -> TaskQueue:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TaskQueue(url, tracing=Tracing(tracer_provider=provider))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_enqueue_and_each_attempt_are_spans_linked_by_the_job(
    kind: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    url = f"memory://{tmp_path.name}" if kind == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    q = traced_queue(url, exporter)

    @q.task(name="flaky", retries=1, backoff_s=0)
    def flaky(n: int) -> int:
        if n == 0:
            raise KeyError("first try")
        return n

    @q.task(name="fine")
    def fine() -> None:
        return None

    bad = flaky.enqueue(0)
    ok = fine.enqueue()
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0).run()
    q.close()
    spans = exporter.get_finished_spans()
    sends = [s for s in spans if s.name == "send default"]
    processes = [s for s in spans if s.name == "process default"]
    assert len(sends) == 2 and len(processes) == 3  # flaky twice (tried, then dead), fine once
    for span in sends:
        assert span.kind == trace.SpanKind.PRODUCER
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "conveyor"
        assert span.attributes["messaging.destination.name"] == "default"
        assert span.attributes["messaging.operation.type"] == "send"
    send_of = {s.attributes["messaging.message.id"]: s for s in sends if s.attributes}
    assert set(send_of) == {bad.id, ok.id}
    for span in processes:
        assert span.kind == trace.SpanKind.CONSUMER
        assert span.attributes is not None
        job_id = span.attributes["messaging.message.id"]
        # linked to the enqueue, not its child: a trace of its own
        assert span.parent is None
        [link] = span.links
        assert link.context.span_id == send_of[job_id].context.span_id
        assert link.context.trace_id == send_of[job_id].context.trace_id
    failed = [
        s for s in processes if s.attributes and s.attributes["messaging.message.id"] == bad.id
    ]
    assert [s.attributes["error.type"] for s in failed if s.attributes] == ["KeyError", "KeyError"]
    assert [s.attributes["conveyor.outcome"] for s in failed if s.attributes] == ["retried", "dead"]
    [good] = [
        s for s in processes if s.attributes and s.attributes["messaging.message.id"] == ok.id
    ]
    assert good.status.is_ok and "error.type" not in (good.attributes or {})


@pytest.mark.parametrize("executor", ["thread", "process", "inline", "async"])
def test_spans_a_task_makes_are_children_of_its_attempt(
    executor: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    q = traced_queue(f"sqlite:///{tmp_path / 'q.db'}", exporter)
    if executor == "async":

        @q.task(name="mine")
        async def mine() -> list[str]:
            return my_span()
    else:
        q.task(my_span, name="mine", executor=executor)
    handle = q.enqueue("mine")
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    seen = handle.result(timeout_s=10)
    q.close()
    [attempt] = [s for s in exporter.get_finished_spans() if s.name == "process default"]
    assert attempt.context is not None
    assert seen == [
        format(attempt.context.trace_id, "032x"),
        format(attempt.context.span_id, "016x"),
    ]


def test_a_task_that_raises_a_base_exception_leaves_no_span_current_behind(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    q = traced_queue(f"memory://{tmp_path.name}", exporter)

    @q.task(name="exits", retries=0)
    def exits() -> None:
        raise SystemExit("the task's own exit")

    q.task(my_span, name="mine", executor="thread")
    first = q.enqueue("exits")
    second = q.enqueue("mine")
    q.worker(concurrency=1, burst=True, poll_s=0.05, burst_horizon_s=0).run()
    assert first.status() == "dead" and "SystemExit" in (first.info().error or "")
    seen = second.result(timeout_s=10)
    [mine] = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "process default"
        and s.attributes
        and s.attributes.get("messaging.message.id") == second.id
    ]
    assert mine.context is not None
    assert seen == [format(mine.context.trace_id, "032x"), format(mine.context.span_id, "016x")]
    assert my_span() == ["0" * 32, "0" * 16]  # and nothing is left on this thread either
    q.close()


def test_outside_a_task_and_untraced_the_current_span_is_not_a_job_s(tmp_path: Path) -> None:
    q = TaskQueue(f"memory://{tmp_path.name}")  # not traced: nothing is attached
    q.task(my_span, name="mine", executor="thread")
    handle = q.enqueue("mine")
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert handle.result(timeout_s=10) == ["0" * 32, "0" * 16]
    assert my_span() == ["0" * 32, "0" * 16]
    q.close()


def test_a_batch_enqueue_is_one_send_span(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    q = traced_queue(f"memory://{tmp_path.name}", exporter)

    @q.task(name="t")
    def t(i: int) -> int:
        return i

    handles = q.enqueue_many("t", [((i,), {}) for i in range(5)])
    [send] = exporter.get_finished_spans()
    assert send.attributes is not None and send.attributes["messaging.batch.message_count"] == 5
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0).run()
    processes = [s for s in exporter.get_finished_spans() if s.name == "process default"]
    assert len(processes) == len(handles) == 5
    assert all(s.links[0].context.span_id == send.context.span_id for s in processes)
    q.close()


def test_untraced_queues_carry_nothing(tmp_path: Path) -> None:
    q = TaskQueue(f"memory://{tmp_path.name}")
    handle = q.enqueue("x", 1)
    job = q.backend.get(handle.id)
    assert job is not None and b"trace" not in job.payload
    q.close()


def test_error_type_is_the_exception_class_or_other() -> None:
    text = 'Traceback (most recent call last):\n  File "x.py", line 1\nmod.Boom: no\n'
    assert error_type(text) == "mod.Boom"
    assert error_type("KeyError") == "KeyError"
    assert error_type("no worker knows task 'x'") == "_OTHER"
    assert error_type(None) == "_OTHER"


def test_without_opentelemetry_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[otel\]"):
        TaskQueue("memory://", tracing=True)
