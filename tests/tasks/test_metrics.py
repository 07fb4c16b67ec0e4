"""Prometheus metrics of a worker and of a pipeline run, as a scraper reads them."""

from __future__ import annotations

import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import ConfigurationError, Pipeline, TaskQueue
from conveyor.metrics import Metrics

from ..conftest import eventually
from .conftest import Running, held_task


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_workers_attempts_are_counted_by_outcome(q: TaskQueue) -> None:
    @q.task(name="ok")
    def ok(x: int) -> int:
        return x

    @q.task(name="bad", retries=1, backoff_s=0)
    def bad() -> None:
        raise ValueError("no")

    for i in range(3):
        ok.enqueue(i)
    bad.enqueue()
    metrics = Metrics()
    w = q.worker(burst=True, poll_s=0.05, burst_horizon_s=0)
    metrics.watch(w)
    w.run()
    got = samples(metrics.text())
    ok_labels = (("queue", "default"), ("task", "ok"))
    bad_labels = (("queue", "default"), ("task", "bad"))
    assert got["conveyor_jobs_received_total", ok_labels] == 3
    assert got["conveyor_jobs_succeeded_total", ok_labels] == 3
    assert got["conveyor_jobs_received_total", bad_labels] == 2  # the try and the retry
    assert got["conveyor_jobs_retried_total", bad_labels] == 1
    assert got["conveyor_jobs_dead_total", bad_labels] == 1
    assert got["conveyor_jobs_failed_total", bad_labels] == 2
    assert got["conveyor_jobs_in_progress", ok_labels] == 0
    assert got["conveyor_job_duration_seconds_count", ok_labels] == 3
    assert got["conveyor_queue_jobs", (("queue", "default"), ("state", "dead"))] == 1
    assert got["conveyor_queue_jobs", (("queue", "default"), ("state", "done"))] == 3
    assert got["conveyor_queue_up", (("queue", "default"),)] == 1


def test_a_running_worker_serves_metrics_on_loopback(q: TaskQueue) -> None:
    gate = threading.Event()
    hold, started = held_task(q, gate)
    hold.enqueue()
    hold.enqueue(_delay_s=3600)
    run = Running(q.worker(metrics_port=0, handle_signals=False))
    try:
        started.wait(10)
        eventually(lambda: getattr(run.worker, "metrics_server", None) is not None)
        server = run.worker.metrics_server
        assert server._server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            got = samples(answer.read())
        task = (("queue", "default"), ("task", hold.name))
        assert got["conveyor_jobs_in_progress", task] == 1
        assert got["conveyor_queue_jobs", (("queue", "default"), ("state", "delayed"))] == 1
    finally:
        gate.set()
        run.stop()
    with pytest.raises(OSError):  # the endpoint went with the worker
        urllib.request.urlopen(url, timeout=2)


def test_a_pipeline_runs_stages_are_metrics() -> None:
    handle = Pipeline(range(100)).map(lambda x: x + 1, name="inc").map(str, name="text")
    stats = handle.run()
    metrics = Metrics()
    metrics.watch_run("p", lambda: stats)
    got = samples(metrics.text())
    inc = (("pipeline", "p"), ("stage", "inc"))
    assert got["conveyor_stage_received_total", inc] == 100
    assert got["conveyor_stage_emitted_total", inc] == 100
    assert ("conveyor_stage_workers", inc) in got  # a gauge: 0 once the run is over
    before = threading.active_count()
    Pipeline(range(10)).map(str).run(metrics_port=0)  # serves while it runs, then stops
    assert threading.active_count() <= before


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[metrics\]"):
        Metrics()
