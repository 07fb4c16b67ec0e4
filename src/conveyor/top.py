"""``conveyor top URL``: a live terminal view of a queue and its workers, or of the pipeline
runs behind a ``/metrics`` address (``conveyor[top]``, which brings rich and prometheus-client).

Each refresh reads the queue's counts and the workers' records once; rates are the change of
what the workers say they have done (and set aside as dead) between two refreshes. Given an
``http://`` URL instead — a run started with ``metrics_port``, or any ``/metrics`` that carries
conveyor's stage metrics — each refresh reads that page once and shows every stage of every
run there, with the rate each finishes items at.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import ConfigurationError, TaskQueue


def _rich() -> Any:
    try:
        import rich
    except ImportError as exc:
        raise ConfigurationError(
            "conveyor top needs rich, which is not installed: pip install 'conveyor[top]'"
        ) from exc
    return rich


@dataclass
class Snapshot:
    """What one refresh read."""

    queue: str
    where: str
    at: float
    counts: Any
    workers: list[Any]
    done_per_s: float | None = None
    dead_per_s: float | None = None
    states: dict[str, str] = field(default_factory=dict)


def read(queue: TaskQueue, before: Snapshot | None = None) -> Snapshot:
    """Read the queue once; rates against ``before`` (the previous refresh), if given."""
    now = queue.now()
    snap = Snapshot(queue.name, queue.where, now, queue.stats(), queue.workers())
    snap.states = {w.id: w.state(now) for w in snap.workers}
    if before is not None and now > before.at:
        snap.done_per_s, snap.dead_per_s = worker_rates(
            before.workers, snap.workers, now - before.at
        )
    return snap


def worker_rates(before: Any, after: Any, elapsed_s: float) -> tuple[float, float]:
    """Jobs done and set aside as dead per second, from what the workers said of themselves
    ``elapsed_s`` apart (a worker new since counts from 0; one forgotten since counts no
    more)."""
    done = {w.id: w.processed for w in before}
    dead = {w.id: w.failed for w in before}
    return (
        sum(max(0, w.processed - done.get(w.id, 0)) for w in after) / elapsed_s,
        sum(max(0, w.failed - dead.get(w.id, 0)) for w in after) / elapsed_s,
    )


def render(snap: Snapshot) -> Any:
    """The view of one snapshot, as a rich renderable."""
    _rich()
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c = snap.counts
    rate = (
        "rates after the next refresh"
        if snap.done_per_s is None
        else f"{snap.done_per_s:,.1f} done/s, {snap.dead_per_s or 0:,.1f} dead/s"
    )
    oldest = "-" if c.oldest_waiting_s is None else f"{c.oldest_waiting_s:.1f} s"
    head = Text.assemble(
        ("queue ", "bold"),
        (snap.queue, "bold cyan"),
        f" at {snap.where}    {rate}    oldest waiting {oldest}",
    )
    states = Table(box=None, pad_edge=False)
    for name in ("ready", "delayed", "running", "done", "dead"):
        states.add_column(name, justify="right", style="red" if name == "dead" else None)
    states.add_row(
        *(f"{n:,}" for n in (c.queued - c.delayed, c.delayed, c.running, c.done, c.dead))
    )
    workers = Table(title="workers", title_justify="left", box=None, pad_edge=False)
    for name, justify in (
        ("worker", "left"),
        ("state", "left"),
        ("queues", "left"),
        ("running", "right"),
        ("done", "right"),
        ("dead", "right"),
        ("last beat", "right"),
    ):
        workers.add_column(name, justify=justify)  # type: ignore[arg-type]
    for w in snap.workers:
        state = snap.states.get(w.id, "")
        style = {"alive": "green", "gone": "red"}.get(state, "dim")
        workers.add_row(  # names are text, never markup: a worker may be called "[b]x"
            Text(w.id),
            Text(state, style=style),
            Text(",".join(w.queues)),
            f"{w.running}/{w.concurrency}",
            f"{w.processed:,}",
            f"{w.failed:,}",
            f"{snap.at - w.last_beat:.0f} s ago",
        )
    if not snap.workers:
        workers.add_row("(no worker in the last day)", "", "", "", "", "", "")
    return Group(head, Text(""), states, Text(""), workers)


def run(queue: TaskQueue, interval_s: float = 1.0, once: bool = False) -> None:
    """Refresh in place every ``interval_s`` until Ctrl-C; ``once``: print one view and
    return (for scripts)."""
    _show(lambda before: read(queue, before), render, interval_s, once)


def _show(
    read_one: Callable[[Any], Any], draw: Callable[[Any], Any], interval_s: float, once: bool
) -> None:
    _rich()
    from rich.console import Console
    from rich.live import Live

    console = Console()
    snap = read_one(None)
    if once:
        console.print(draw(snap))
        return
    with Live(draw(snap), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                snap = read_one(snap)
                live.update(draw(snap), refresh=True)
        except KeyboardInterrupt:
            pass


# -- pipeline runs, read from /metrics ---------------------------------------------------------

_STAGE_PREFIX = "conveyor_stage_"


@dataclass
class RunsSnapshot:
    """The stages read from one ``/metrics`` page: ``stages[(pipeline, stage)]`` holds the
    fields of :class:`~conveyor.StageStats` found there; ``finished_per_s`` the rate since
    the previous refresh."""

    url: str
    at: float
    stages: dict[tuple[str, str], dict[str, float]]
    finished_per_s: dict[tuple[str, str], float] | None = None
    error: str | None = None


def _parser() -> Any:
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as exc:
        raise ConfigurationError(
            "conveyor top of a /metrics URL needs prometheus-client, which is not installed: "
            "pip install 'conveyor[top]'"
        ) from exc
    return text_string_to_metric_families


def read_runs(
    url: str, before: RunsSnapshot | None = None, clock: Callable[[], float] = time.monotonic
) -> RunsSnapshot:
    """Read the stage metrics at ``url`` once. A page that does not answer is a snapshot
    with ``error`` set (a live view keeps trying); rates against ``before``, if given."""
    parse = _parser()
    at = clock()
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return RunsSnapshot(url, at, {}, error=f"{type(exc).__name__}: {exc}")
    stages: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for family in parse(text):
            for sample in family.samples:
                name = sample.name
                if not name.startswith(_STAGE_PREFIX) or name.endswith("_created"):
                    continue
                labels = sample.labels
                key = (labels.get("pipeline", ""), labels.get("stage", ""))
                field_name = name[len(_STAGE_PREFIX) :].removesuffix("_total")
                stages.setdefault(key, {})[field_name] = float(sample.value)
    except ValueError as exc:
        return RunsSnapshot(url, at, {}, error=f"not Prometheus text: {exc}")
    snap = RunsSnapshot(url, at, stages)
    if before is not None and at > before.at and before.error is None:
        elapsed = at - before.at
        snap.finished_per_s = {
            key: max(0.0, fields.get("finished", 0) - before.stages[key].get("finished", 0))
            / elapsed
            for key, fields in stages.items()
            if key in before.stages
        }
    return snap


def render_runs(snap: RunsSnapshot) -> Any:
    """The view of the stages of one ``/metrics`` page, as a rich renderable."""
    _rich()
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble(("pipelines ", "bold"), ("at ", ""), (snap.url, "bold cyan"))
    if snap.error is not None:
        return Group(head, Text(""), Text(f"not answering: {snap.error}", style="red"))
    if not snap.stages:
        return Group(head, Text(""), Text("no pipeline stages there (conveyor_stage_* metrics)"))
    parts: list[Any] = [head]
    for pipeline in sorted({p for p, _ in snap.stages}):
        table = Table(title=Text(pipeline), title_justify="left", box=None, pad_edge=False)
        for column in (
            "stage",
            "busy",
            "buffer",
            "received",
            "finished",
            "failed",
            "finished/s",
            "p50",
            "p95",
        ):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for (p, stage), f in snap.stages.items():
            if p != pipeline:
                continue

            def n(name: str, fields: dict[str, float] = f) -> str:
                return f"{int(fields.get(name, 0)):,}"

            def ms(name: str, fields: dict[str, float] = f) -> str:
                value = fields.get(name)
                return "-" if value is None else f"{value * 1000:.1f} ms"

            rate = None if snap.finished_per_s is None else snap.finished_per_s.get((p, stage))
            failed = int(f.get("failed", 0))
            table.add_row(
                Text(stage),
                f"{n('busy_workers')}/{n('workers')}",
                f"{n('queue_depth')}/{n('queue_capacity')}",
                n("received"),
                n("finished"),
                Text(f"{failed:,}", style="red" if failed else ""),
                "-" if rate is None else f"{rate:,.1f}",
                ms("latency_p50_seconds"),
                ms("latency_p95_seconds"),
            )
        parts += [Text(""), table]
    return Group(*parts)


def run_metrics(url: str, interval_s: float = 1.0, once: bool = False) -> None:
    """:func:`run` for the pipeline runs served at ``url`` (``run(metrics_port=...)``)."""
    _show(lambda before: read_runs(url, before), render_runs, interval_s, once)
