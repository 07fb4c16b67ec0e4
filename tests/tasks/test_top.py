"""conveyor top: what one refresh reads and how it shows, read from rich's recorded screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from conveyor import ManualClock, TaskQueue
from conveyor.cli import main
from conveyor.tasks.backends.base import WorkerInfo
from conveyor.top import read, render

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
