"""What metrics and traces cost a task worker: processed jobs/s with each on and off.

    python -m bench.observability            # 20k no-op jobs per run, 5 rounds
    python -m bench.observability --quick

Needs ``conveyor[metrics,otel]`` and opentelemetry-sdk (the development environment has
them). Each round runs every variant once, in turn, on a fresh ``memory://`` queue (no
storage I/O, so the cost of observing is as visible as it can be), on SQLite, and on memory
with jobs that await 1 ms and 10 ms (closer to real work); medians over rounds, and each variant's
ratio to the plain worker of the same table:

* plain: no observer;
* metrics: ``Metrics().watch(worker)`` (counters, gauge, histogram per attempt);
* traces, no SDK: ``tracing=True`` with the API's no-op provider (what a library user pays
  when the application has not set up OpenTelemetry);
* traces, SDK: a ``TracerProvider`` with a ``BatchSpanProcessor`` whose exporter drops each
  batch it is given (spans made and handed over as to a real exporter; no network);
* traces, SDK 1/10: the same SDK with a sampler that records one trace in ten
  (``ParentBased(TraceIdRatioBased(0.1))``, the usual production set-up);
* both: metrics and SDK traces (every span recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._harness import table

VARIANTS = ("plain", "metrics", "traces, no SDK", "traces, SDK", "traces, SDK 1/10", "both")


def one_run(url: str, n: int, variant: str, work_s: float = 0.0) -> float:
    from conveyor import TaskQueue
    from conveyor.metrics import Metrics
    from conveyor.tracing import Tracing

    tracing: Any = False
    if variant == "traces, no SDK":
        tracing = True
    elif variant in ("traces, SDK", "traces, SDK 1/10", "both"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Discard(SpanExporter):
            """Takes each batch and drops it, as an exporter that sent it would."""

            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        sampled = variant.endswith("1/10")
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)) if sampled else None)
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        tracing = Tracing(tracer_provider=provider)
    q = TaskQueue(url, tracing=tracing)

    @q.task(name="noop")
    async def noop(i: int) -> None:
        if work_s:
            await asyncio.sleep(work_s)

    for start in range(0, n, 1000):
        q.enqueue_many("noop", [((i,), {}) for i in range(start, min(n, start + 1000))])
    w = q.worker(concurrency=8, burst=True, poll_s=0.05, handle_signals=False)
    if variant in ("metrics", "both"):
        Metrics().watch(w)
    t0 = time.perf_counter()
    w.run()
    took = time.perf_counter() - t0
    assert q.stats().done == n, q.stats()
    q.close()
    return n / took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    total, rounds = (3000, 3) if args.quick else (20000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        for storage, work_s in (
            ("memory", 0.0),
            ("sqlite", 0.0),
            ("memory", 0.001),
            ("memory", 0.01),
        ):
            # 10 ms jobs: a fifth as many, or a round takes minutes
            n = total if work_s < 0.01 else total // 5
            rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(rounds):
                for i, variant in enumerate(VARIANTS):
                    if storage == "memory":
                        url = f"memory://bench-{work_s}-{r}-{i}"
                    else:
                        url = f"sqlite:///{Path(tmp) / f'{r}-{i}.db'}"
                    rates[variant].append(one_run(url, n, variant, work_s))
            plain = statistics.median(rates["plain"])
            rows = []
            for variant in VARIANTS:
                med = statistics.median(rates[variant])
                rows.append((variant, f"{med:,.0f} jobs/s", f"{med / plain:.2f}x plain"))
            what = f"jobs awaiting {work_s * 1000:g} ms" if work_s else "no-op jobs"
            table(
                f"{storage}: {n:,} {what}, concurrency 8, median of {rounds}",
                rows,
                ("variant", "processed", "ratio"),
            )


if __name__ == "__main__":
    main()
