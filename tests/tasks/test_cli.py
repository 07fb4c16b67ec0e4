"""The ``conveyor`` command, driven through click's runner and as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conveyor import TaskQueue
from conveyor.cli import main


def make_queue(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, TaskQueue]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    q = TaskQueue(url)
    request.addfinalizer(q.close)

    @q.task(name="boom", retries=0)
    def boom() -> None:
        raise ValueError("no")

    return url, q


def test_info_requeue_and_purge(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, q = make_queue(tmp_path, request)
    bad = q.enqueue("boom")
    q.enqueue("boom", _delay_s=3600)
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0).run()
    runner = CliRunner()
    out = runner.invoke(main, ["info", url])
    assert out.exit_code == 0, out.output
    assert "dead               1" in out.output and "queued (delayed)   1" in out.output
    out = runner.invoke(main, ["requeue", url, "--id", bad.id])
    assert out.exit_code == 0 and "requeued 1 job(s)" in out.output
    assert bad.status() == "queued"
    out = runner.invoke(main, ["requeue", url])
    assert out.exit_code != 0 and "--dead" in out.output
    out = runner.invoke(main, ["purge", url, "--yes"])
    assert out.exit_code == 0 and "deleted 2 job(s)" in out.output


def test_purge_asks_first(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, _ = make_queue(tmp_path, request)
    out = CliRunner().invoke(main, ["purge", url], input="n\n")
    assert out.exit_code != 0


def test_worker_target_errors_are_clear() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["worker", "no_colon"])
    assert out.exit_code == 2 and "MODULE:QUEUE" in out.output
    out = runner.invoke(main, ["worker", "no_such_module_here:q"])
    assert out.exit_code == 2 and "cannot import" in out.output
    out = runner.invoke(main, ["worker", "conveyor:Pipeline"])
    assert out.exit_code == 2 and "not a TaskQueue" in out.output


def test_help_and_module_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("worker", "info", "requeue", "purge"):
        assert command in done.stdout
