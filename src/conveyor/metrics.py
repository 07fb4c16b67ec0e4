"""Prometheus metrics for task workers and pipeline runs (``pip install 'conveyor[metrics]'``).

``conveyor worker MODULE:QUEUE --metrics-port 9191`` (or ``queue.worker(metrics_port=9191)``)
and ``pipeline.run(metrics_port=9192)`` serve ``/metrics`` on 127.0.0.1. Every metric is
listed in ``docs/operations.md``. Counts are kept in the worker's (or the run's) own process:
jobs that run in worker processes report their outcome back to it, so one endpoint per worker
is the whole truth about that worker, without prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._engine.stats import RunStats

log = logging.getLogger("conveyor.metrics")

#: job durations, seconds: from a millisecond to ten minutes
DURATION_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1, 2.5, 5, 10, 30, 60, 300, 600),
)

_OUTCOME_COUNTER = {
    "succeeded": "succeeded",
    "retried": "retried",
    "dead": "dead",
    "postponed": "postponed",
    "aborted": "aborted",
    "not kept": "not_kept",
}


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "metrics need prometheus-client, which is not installed: "
            "pip install 'conveyor[metrics]'"
        ) from exc
    return prometheus_client


class Metrics:
    """The metrics of one worker or one run, on a registry of their own (``registry``)."""

    def __init__(self, registry: Any = None) -> None:
        pc = _client()
        self._pc = pc
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        labels = ("queue", "task")

        def counter(name: str, what: str) -> Any:
            return pc.Counter(name, what, labels, registry=self.registry)

        self.received = counter("conveyor_jobs_received", "Attempts started")
        self.succeeded = counter("conveyor_jobs_succeeded", "Attempts that succeeded")
        self.failed = counter(
            "conveyor_jobs_failed", "Attempts that did not succeed (retried or dead)"
        )
        self.retried = counter("conveyor_jobs_retried", "Attempts that failed and will run again")
        self.dead = counter("conveyor_jobs_dead", "Jobs set aside as dead (dead-lettered)")
        self.postponed = counter(
            "conveyor_jobs_postponed",
            "Attempts handed back, uncounted, for a worker that knows the task",
        )
        self.aborted = counter(
            "conveyor_jobs_aborted", "Attempts stopped because an abort was asked"
        )
        self.not_kept = counter(
            "conveyor_jobs_not_kept",
            "Attempts whose outcome was not kept (the lease was lost, or the storage failed)",
        )
        self.in_progress = pc.Gauge(
            "conveyor_jobs_in_progress", "Attempts running now", labels, registry=self.registry
        )
        self.duration = pc.Histogram(
            "conveyor_job_duration_seconds",
            "How long attempts took, seconds",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], dict[str, Any]] = {}
        self._queues: list[Any] = []  # TaskQueue (a part above: not imported here)
        self._runs: list[tuple[str, Callable[[], RunStats]]] = []
        self.registry.register(_Live(self))

    # -- what a worker tells ------------------------------------------------------------------
    def _of(self, queue: str, task: str) -> dict[str, Any]:
        """The labelled children of every metric for one (queue, task): found once, kept
        (``labels()`` takes a lock and checks its arguments on each call)."""
        children = self._children.get((queue, task))
        if children is None:
            children = self._children[queue, task] = {
                name: getattr(self, name).labels(queue, task)
                for name in (
                    "received",
                    "succeeded",
                    "failed",
                    "retried",
                    "dead",
                    "postponed",
                    "aborted",
                    "not_kept",
                    "in_progress",
                    "duration",
                )
            }
        return children

    def job_started(self, queue: str, job: Any, carrier: Any = None) -> None:
        children = self._of(queue, job.task)
        children["received"].inc()
        children["in_progress"].inc()

    def job_ended(
        self, queue: str, job: Any, outcome: str, duration_s: float, error: str | None = None
    ) -> None:
        children = self._of(queue, job.task)
        children["in_progress"].dec()
        children["duration"].observe(duration_s)
        children[_OUTCOME_COUNTER.get(outcome, "not_kept")].inc()
        if outcome in ("retried", "dead"):
            children["failed"].inc()

    def watch(self, worker: Any) -> None:
        """Count the attempts at ``worker``'s queues (through their hooks: once per queue,
        however many workers share it), and show their depth at each scrape."""
        for queue in worker.queues:
            if queue in self._queues:
                continue
            self._queues.append(queue)
            name = queue.name
            queue.before_attempt(lambda job, name=name: self.job_started(name, job))
            queue.after_attempt(
                lambda job, outcome, took, error, name=name: self.job_ended(
                    name, job, outcome, took, error
                )
            )

    def watch_run(self, name: str, stats: Callable[[], RunStats]) -> None:
        """Show a pipeline run's stages (``stats`` is read at each scrape)."""
        self._runs.append((name, stats))

    # -- serving ------------------------------------------------------------------------------
    def text(self) -> bytes:
        """What ``/metrics`` answers, in Prometheus's text format."""
        data: bytes = self._pc.generate_latest(self.registry)
        return data

    def serve(self, port: int, addr: str = "127.0.0.1") -> _Server:
        """Serve ``/metrics`` on ``addr:port`` (loopback unless told otherwise) until the
        returned server is closed. Port 0 picks a free one (``server.port``)."""
        server, thread = self._pc.start_http_server(port, addr=addr, registry=self.registry)
        return _Server(server, thread)


class _Server:
    def __init__(self, server: Any, thread: Any) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Live:
    """What is read at each scrape: queue depths, and the stages of watched runs."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # read live: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self._metrics
        if metrics._queues:
            depth = GaugeMetricFamily(
                "conveyor_queue_jobs", "Jobs in the queue, per state", labels=["queue", "state"]
            )
            oldest = GaugeMetricFamily(
                "conveyor_queue_oldest_waiting_seconds",
                "Age of the oldest job that could run now",
                labels=["queue"],
            )
            up = GaugeMetricFamily(
                "conveyor_queue_up",
                "1 if the queue's storage answered this scrape",
                labels=["queue"],
            )
            for queue in metrics._queues:
                try:
                    counts = queue.stats()
                except Exception as exc:  # the storage is away: say so, keep the rest
                    log.warning("metrics: %s did not answer (%s)", queue.where, exc)
                    up.add_metric([queue.name], 0)
                    continue
                up.add_metric([queue.name], 1)
                for state, value in (
                    ("ready", counts.queued - counts.delayed),
                    ("delayed", counts.delayed),
                    ("running", counts.running),
                    ("done", counts.done),
                    ("dead", counts.dead),
                    ("waiting", counts.waiting),
                    ("aborted", counts.aborted),
                ):
                    depth.add_metric([queue.name, state], value)
                if counts.oldest_waiting_s is not None:
                    oldest.add_metric([queue.name], counts.oldest_waiting_s)
            yield from (depth, oldest, up)
        if metrics._runs:
            yield from _stage_families(metrics._runs, CounterMetricFamily, GaugeMetricFamily)


# the fields of StageStats, as metrics: (field, metric name, help, is a counter)
_STAGE_FIELDS = (
    ("received", "conveyor_stage_received", "Items a stage took", True),
    ("emitted", "conveyor_stage_emitted", "Items a stage passed on", True),
    ("failed", "conveyor_stage_failed", "Items whose processing failed", True),
    ("retried", "conveyor_stage_retried", "Tries made again", True),
    ("skipped", "conveyor_stage_skipped", "Items skipped (Skip, or on_error='skip')", True),
    ("dead_lettered", "conveyor_stage_dead_lettered", "Items sent to the dead letters", True),
    ("finished", "conveyor_stage_finished", "Items whose processing ended", True),
    ("queue_depth", "conveyor_stage_queue_depth", "Items waiting in the stage's buffer", False),
    ("queue_capacity", "conveyor_stage_queue_capacity", "The buffer's size (maxsize)", False),
    ("workers", "conveyor_stage_workers", "Workers of the stage", False),
    ("busy_workers", "conveyor_stage_busy_workers", "Workers busy now", False),
    ("latency_p50_s", "conveyor_stage_latency_p50_seconds", "Median item latency", False),
    ("latency_p95_s", "conveyor_stage_latency_p95_seconds", "95th percentile latency", False),
    ("latency_p99_s", "conveyor_stage_latency_p99_seconds", "99th percentile latency", False),
)


def _stage_families(
    runs: list[tuple[str, Callable[[], RunStats]]], counter: Any, gauge: Any
) -> Iterator[Any]:
    families = {
        field: (counter if is_counter else gauge)(name, what, labels=["pipeline", "stage"])
        for field, name, what, is_counter in _STAGE_FIELDS
    }
    for run_name, stats in runs:
        for stage in stats().stages:
            for field, family in families.items():
                value = getattr(stage, field)
                if value is not None:
                    family.add_metric([run_name, stage.name], value)
    yield from families.values()
