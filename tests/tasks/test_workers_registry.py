"""Workers are visible: each writes its record to its storage as it starts, with every
heartbeat and as it stops; one that stops beating is shown as gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from click.testing import CliRunner

from conveyor import ManualClock, TaskQueue
from conveyor.cli import main

from ..conftest import eventually
from .conftest import Running, held_task


def test_a_worker_says_who_it_is_while_it_runs_and_when_it_stops(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    gate = threading.Event()
    hold, started = held_task(q, gate)
    hold.enqueue()
    run = Running(q.worker(concurrency=3, lease_s=30, name="w-1", handle_signals=False))
    started.wait(10)
    [me] = q.backend.workers()
    assert (me.id, me.pid, me.queues, me.concurrency) == ("w-1", os.getpid(), ("default",), 3)
    assert me.state(q.now()) == "alive" and me.stopped_at is None
    first_beat = me.last_beat
    # the next heartbeat (a third of lease_s) writes the record again: one job running
    eventually(lambda: clock.sleepers() >= 1)
    clock.advance(10)
    eventually(lambda: q.backend.workers()[0].last_beat > first_beat)
    assert q.backend.workers()[0].running == 1
    gate.set()
    run.stop()
    [me] = q.backend.workers()
    assert me.state(q.now()) == "stopped" and me.processed == 1 and me.running == 0


APP = """
from conveyor import TaskQueue
import threading

queue = TaskQueue({url!r})


@queue.task
def forever():
    threading.Event().wait(60)
"""


def test_a_killed_worker_is_shown_as_gone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / "regapp.py").write_text(textwrap.dedent(APP.format(url=url)))
    q = TaskQueue(url)
    q.enqueue("regapp.forever")
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "regapp:queue", "--lease-s", "0.6"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
    )
    runner = CliRunner()

    def states() -> list[dict[str, object]]:
        out = runner.invoke(main, ["workers", url, "--json"])
        assert out.exit_code == 0, out.output
        return [json.loads(line) for line in out.output.splitlines()]

    try:
        eventually(lambda: [w["state"] for w in states()] == ["alive"], 30)
        eventually(lambda: states()[0]["running"] == 1, 30)
        [record] = states()
        assert record["pid"] == proc.pid and record["queues"] == ["default"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # three beats of 0.2 s missed
        eventually(lambda: states()[0]["state"] == "gone", 30)
        out = runner.invoke(main, ["workers", url])
        assert "gone" in out.output.splitlines()[1] and "1/10" in out.output
    finally:
        proc.kill()
        proc.wait(10)
        q.close()
