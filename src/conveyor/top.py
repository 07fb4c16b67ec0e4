"""``conveyor top URL``: a live terminal view of a queue and its workers (``conveyor[top]``,
which brings rich).

Each refresh reads the queue's counts and the workers' records once; rates are the change of
what the workers say they have done (and set aside as dead) between two refreshes.
"""

from __future__ import annotations

import time
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
        elapsed = now - before.at
        done = {w.id: w.processed for w in before.workers}
        dead = {w.id: w.failed for w in before.workers}
        snap.done_per_s = (
            sum(max(0, w.processed - done.get(w.id, 0)) for w in snap.workers) / elapsed
        )
        snap.dead_per_s = sum(max(0, w.failed - dead.get(w.id, 0)) for w in snap.workers) / elapsed
    return snap


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
        workers.add_row(
            w.id,
            Text(state, style=style),
            ",".join(w.queues),
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
    _rich()
    from rich.console import Console
    from rich.live import Live

    console = Console()
    snap = read(queue)
    if once:
        console.print(render(snap))
        return
    with Live(render(snap), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                snap = read(queue, snap)
                live.update(render(snap), refresh=True)
        except KeyboardInterrupt:
            pass
