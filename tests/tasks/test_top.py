"""conveyor top: what one refresh reads and how it shows, read from rich's recorded screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from conveyor import ManualClock, Pipeline, TaskQueue
from conveyor.cli import main
from conveyor.metrics import Metrics
from conveyor.tasks.backends.base import WorkerInfo
from conveyor.top import read, read_runs, render, render_runs

from ..conftest import eventually
from .conftest import START


def screen(renderable: object) -> str:
    console = Console(record=True, width=140, color_system=None)
    console.print(renderable)
    return console.export_text()


def worker(id_: str, beat: float, processed: int, failed: int = 0) -> WorkerInfo:
    return WorkerInfo(
        id=id_,
        host="h",
        pid=1,
        queues=("default",),
        concurrency=8,
        started_at=START,
        last_beat=beat,
        beat_s=10.0,
        running=3,
        processed=processed,
        failed=failed,
    )


def test_a_refresh_shows_states_rates_and_workers(tmp_path: Path) -> None:
    clock = ManualClock(START)
    q = TaskQueue(f"sqlite:///{tmp_path / 'q.db'}", clock=clock)
    for i in range(4):
        q.enqueue("t", i)
    q.enqueue("t", 9, _delay_s=60)
    q.backend.worker_beat(worker("vm:1:a", START, processed=100))
    q.backend.worker_beat(worker("vm:2:b", START - 100, processed=5))  # stopped beating
    first = read(q)
    text = screen(render(first))
    assert "rates after the next refresh" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "ready" in line and "delayed" in line)
    assert lines[header + 1].split() == ["4", "1", "0", "0", "0"]
    assert "vm:1:a" in text and "alive" in text and "3/8" in text
    assert "gone" in [line.split()[1] for line in lines if line.startswith("vm:2:b")]
    clock.advance(2)
    q.backend.worker_beat(worker("vm:1:a", START + 2, processed=150, failed=4))
    second = read(q, first)
    assert second.done_per_s == 25.0 and second.dead_per_s == 2.0
    assert "25.0 done/s, 2.0 dead/s" in screen(render(second))
    q.close()


def test_the_command_prints_one_view_with_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = TaskQueue(url)
    q.enqueue("t", 1)
    q.close()
    out = CliRunner().invoke(main, ["top", url, "--once"])
    assert out.exit_code == 0, out.output
    assert "queue default" in out.output and "(no worker in the last day)" in out.output
    out = CliRunner().invoke(main, ["top", f"sqlite:///{tmp_path / 'none.db'}", "--once"])
    assert out.exit_code == 1 and "nothing was created" in out.output


def test_the_live_view_refreshes_in_place_in_a_terminal(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is missing: the live view cannot be driven")
        pytest.skip("TERMINAL TEST NOT RUN: no tmux")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = TaskQueue(url)
    q.enqueue("t", 0)
    session = f"conveyor-top-{os.getpid()}"
    command = f"{sys.executable} -m conveyor top {url} --interval-s 0.2"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "30", command],
        check=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )

    def ready_count() -> str:
        shown = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()
        for i, line in enumerate(shown):
            if "ready" in line and "delayed" in line and i + 1 < len(shown):
                return shown[i + 1].split()[0]
        return ""

    try:
        eventually(lambda: ready_count() == "1", 30)
        for i in range(1, 3):
            q.enqueue("t", i)
        eventually(lambda: ready_count() == "3", 30)  # the same screen, read again
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        q.close()


def test_a_running_pipeline_is_read_from_its_metrics_page(gate: threading.Event) -> None:
    def slow(x: int) -> int:
        gate.wait(30)
        return x

    run = Pipeline(range(100)).map(lambda x: x + 1, name="inc").map(slow, name="slow").start()
    metrics = Metrics()
    metrics.watch_run("orders", run.stats)
    server = metrics.serve(0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    ticks = iter([10.0, 12.0])
    try:
        eventually(lambda: run.stats().stages[1].busy_workers >= 1)
        first = read_runs(url, clock=lambda: next(ticks))
        assert first.error is None and set(first.stages) == {("orders", "inc"), ("orders", "slow")}
        assert first.stages["orders", "slow"]["finished"] == 0
        text = screen(render_runs(first))
        assert "orders" in text and "finished/s" in text
        slow_row = next(line for line in text.splitlines() if line.startswith("slow"))
        assert slow_row.split()[1].startswith("1/")  # one busy worker
        gate.set()
        for _ in run:
            pass
        second = read_runs(url, first, clock=lambda: next(ticks))
        assert second.stages["orders", "slow"]["finished"] == 100
        assert second.finished_per_s is not None
        assert second.finished_per_s["orders", "slow"] == 50.0  # 100 in 2 s
        assert "50.0" in screen(render_runs(second))
        out = CliRunner().invoke(main, ["top", url, "--once"])
        assert out.exit_code == 0, out.output
        assert "pipelines at" in out.output and "inc" in out.output
    finally:
        server.close()


def test_names_from_the_page_are_shown_as_text_not_markup() -> None:
    from conveyor.top import RunsSnapshot

    stages = {("[bold]p", "parse[/json]"): {"finished": 3.0, "received": 3.0}}
    text = screen(render_runs(RunsSnapshot("http://x/metrics", 0.0, stages)))
    assert "parse[/json]" in text and "[bold]p" in text
    snap_worker = worker("[red]w[/red]", START, processed=1)
    q = TaskQueue("memory://markup", clock=ManualClock(START))
    q.backend.worker_beat(snap_worker)
    assert "[red]w[/red]" in screen(render(read(q)))
    q.close()


def test_a_metrics_url_that_does_not_answer_is_said(tmp_path: Path) -> None:
    gone = read_runs("http://127.0.0.1:1/metrics")
    assert gone.error is not None and "not answering" in screen(render_runs(gone))
    out = CliRunner().invoke(main, ["top", "http://127.0.0.1:1/metrics", "--once"])
    assert out.exit_code == 1 and "nothing readable at http://127.0.0.1:1/metrics" in out.output
