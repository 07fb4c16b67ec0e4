"""OpenTelemetry traces of task queues (``pip install 'conveyor[otel]'``: opentelemetry-api
only; the SDK, its exporters and their set-up are the application's).

``TaskQueue(url, tracing=True)`` makes a ``send {queue}`` span (PRODUCER) around each enqueue
and carries its context in the job; each attempt a worker makes is a ``process {queue}`` span
(CONSUMER), *linked* to the enqueue's context rather than its child (the attempt may run
hours later, and a job may be tried several times), following the messaging semantic
conventions: ``messaging.system=conveyor``, ``messaging.destination.name``,
``messaging.message.id``, ``messaging.operation.type``/``name``, and ``error.type`` when it
fails. Without an SDK configured, the API makes no spans and costs next to nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._errors import ConfigurationError

SYSTEM = "conveyor"
#: the last line of a Python traceback: ``pkg.Class: words``
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")
#: a W3C ``traceparent`` of version 00: trace id, span id, flags
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            "tracing needs opentelemetry-api, which is not installed: pip install 'conveyor[otel]'"
        ) from exc
    return trace


def error_type(error: str | None) -> str:
    """A low-cardinality name for why an attempt failed: the exception's class, when the
    error is a traceback; ``_OTHER`` otherwise (words such as "no worker knows task")."""
    if not error:
        return "_OTHER"
    last = error.strip().splitlines()[-1].strip() if error.strip() else ""
    found = _EXCEPTION_LINE.match(last)
    return found.group(1) if found else "_OTHER"


class Tracing:
    """Spans for one or more queues. ``tracer_provider``: the SDK's provider to use (default:
    the global one, as set by ``opentelemetry.trace.set_tracer_provider``)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        trace = _api()
        from opentelemetry import propagate

        try:
            version = importlib.metadata.version("conveyor")
        except importlib.metadata.PackageNotFoundError:  # run from a source tree
            version = ""
        self._trace = trace
        self._propagate = propagate
        self.tracer = trace.get_tracer("conveyor", version, tracer_provider=tracer_provider)
        self._attempts = _Attempts(self)

    @contextmanager
    def sending(
        self, queue: str, count: int
    ) -> Iterator[tuple[dict[str, str], Callable[[Sequence[str]], None]]]:
        """A ``send {queue}`` span around an enqueue of ``count`` jobs: yields the carrier to
        store in each job, and a function to name the jobs' ids once they are known."""
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": queue,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        with self.tracer.start_as_current_span(
            f"send {queue}", kind=self._trace.SpanKind.PRODUCER, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            self._propagate.inject(carrier)

            def named(ids: Sequence[str]) -> None:
                if len(ids) == 1:
                    span.set_attribute("messaging.message.id", ids[0])

            yield carrier, named

    def watch(self, queue: Any) -> None:
        """Make a span of each attempt at ``queue``'s jobs (a ``TaskQueue``), through its
        hooks, linked to the span that enqueued the job."""
        attempts = self._attempts
        serializer, name = queue.serializer, queue.name

        def started(job: Any) -> None:
            try:
                body = serializer.loads(job.payload)
            except Exception:  # the worker fails the job on it: the span says so
                body = None
            carrier = body.get("trace") if isinstance(body, dict) else None
            attempts.job_started(name, job, carrier)

        def ended(job: Any, outcome: str, duration_s: float, error: str | None) -> None:
            attempts.job_ended(name, job, outcome, duration_s, error)

        queue.before_attempt(started)
        queue.after_attempt(ended)

    def context_of(self, job: Any, portable: bool) -> Any:
        """The context of ``job``'s attempt span, for the task's code (see ``_Attempts``)."""
        return self._attempts.context_of(job, portable)


class _Attempts:
    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing
        self._spans: dict[str, Any] = {}

    def _link(self, carrier: Any) -> list[Any]:
        if not isinstance(carrier, dict):
            return []
        trace = self._tracing._trace
        parent = carrier.get("traceparent")
        if isinstance(parent, str) and len(carrier) == 1:
            # the W3C header alone (what the default propagator writes): read it here, a
            # fifth of the cost of the propagators, which a link does not need (no baggage)
            found = _TRACEPARENT.fullmatch(parent)
            if found is not None:
                trace_id, span_id = int(found.group(1), 16), int(found.group(2), 16)
                if trace_id and span_id:
                    span_context = trace.SpanContext(
                        trace_id,
                        span_id,
                        is_remote=True,
                        trace_flags=trace.TraceFlags(int(found.group(3), 16)),
                    )
                    return [trace.Link(span_context)]
        context = self._tracing._propagate.extract(carrier)
        span_context = trace.get_current_span(context).get_span_context()
        return [trace.Link(span_context)] if span_context.is_valid else []

    def job_started(self, queue: str, job: Any, carrier: Any = None) -> None:
        trace = self._tracing._trace
        span = self._tracing.tracer.start_span(
            f"process {queue}",
            kind=trace.SpanKind.CONSUMER,
            links=self._link(carrier),
            attributes={
                "messaging.system": SYSTEM,
                "messaging.destination.name": queue,
                "messaging.message.id": job.id,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "conveyor.task": job.task,
                "conveyor.attempt": job.attempts,
            },
        )
        self._spans[job.token or job.id] = span

    def context_of(self, job: Any, portable: bool) -> Any:
        """The context of ``job``'s attempt span, for the task's code: an OpenTelemetry
        context, or (``portable``: for another process) its W3C headers. None when no span
        is made (no SDK)."""
        span = self._spans.get(job.token or job.id)
        if span is None or not span.get_span_context().is_valid:
            return None
        context = self._tracing._trace.set_span_in_context(span)
        if not portable:
            return context
        headers: dict[str, str] = {}
        self._tracing._propagate.inject(headers, context=context)
        return headers

    def job_ended(
        self, queue: str, job: Any, outcome: str, duration_s: float, error: str | None = None
    ) -> None:
        span = self._spans.pop(job.token or job.id, None)
        if span is None:
            return
        span.set_attribute("conveyor.outcome", outcome)
        if outcome != "succeeded":
            kind = error_type(error) if error else "_OTHER"
            span.set_attribute("error.type", kind)
            status = self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR, kind)
            span.set_status(status)
        span.end()
