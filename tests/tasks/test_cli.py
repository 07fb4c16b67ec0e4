"""The ``conveyor`` command, driven through click's runner and as a real process."""

from __future__ import annotations

import json
import sqlite3
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
    out = runner.invoke(main, ["worker", "conveyor:nope"])
    assert out.exit_code == 2 and "has no 'nope'" in out.output


def test_worker_options_are_checked_before_it_starts() -> None:
    runner = CliRunner()
    target = "tests.tasks.app:queue"
    for option in ("--unknown-task-s", "--abort-grace-s"):
        out = runner.invoke(main, ["worker", target, option, "-1"])
        assert out.exit_code == 1 and option.strip("-").replace("-", "_") in out.output


def test_commands_that_look_never_create_storage(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "no" / "such" / "dir" / "typo.db"
    for args in (
        ["info", f"sqlite:///{missing}"],
        ["jobs", f"sqlite:///{missing}"],
        ["job", f"sqlite:///{missing}", "x"],
        ["requeue", f"sqlite:///{missing}", "--dead"],
        ["purge", f"sqlite:///{missing}", "--yes"],
        ["doctor", f"sqlite:///{missing}"],
    ):
        out = runner.invoke(main, args)
        assert out.exit_code == 1, (args, out.output)
        assert "does not exist (nothing was created)" in out.output
    assert not (tmp_path / "no").exists()
    not_ours = tmp_path / "other.db"
    sqlite3.connect(not_ours).close()
    out = runner.invoke(main, ["info", f"sqlite:///{not_ours}"])
    assert out.exit_code == 1 and "not a conveyor queue" in out.output
    out = runner.invoke(main, ["jobs", "memory://"])
    assert out.exit_code == 1 and "inside one process" in out.output


def test_jobs_and_job_show_what_is_stored(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, q = make_queue(tmp_path, request)

    @q.task(name="ok")
    def ok(x: str) -> str:
        return x * 2

    bad = q.enqueue("boom")
    good = [q.enqueue("ok", f"<b>{i}</b>") for i in range(3)]
    q.worker(burst=True, poll_s=0.05, burst_horizon_s=0).run()
    runner = CliRunner()
    out = runner.invoke(main, ["jobs", url])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "TASK", "TRIES"]
    assert [line.split()[0] for line in lines[1:]] == [bad.id, *(h.id for h in good)]
    assert "ValueError: no" in lines[1]
    out = runner.invoke(main, ["jobs", url, "--state", "dead", "--json"])
    [record] = [json.loads(line) for line in out.output.splitlines()]
    assert record["id"] == bad.id and record["state"] == "dead" and record["attempts"] == 1
    assert "Traceback" in record["error"] and record["arguments"] == {"args": [], "kwargs": {}}
    out = runner.invoke(main, ["jobs", url, "--task", "ok", "--limit", "1", "--offset", "1"])
    assert [line.split()[0] for line in out.output.splitlines()[1:]] == [good[1].id]
    out = runner.invoke(main, ["jobs", url, "--state", "finished"])
    assert out.exit_code == 2
    out = runner.invoke(main, ["job", url, good[0].id])
    assert out.exit_code == 0, out.output
    assert "state         done" in out.output and '"<b>0</b><b>0</b>"' in out.output
    out = runner.invoke(main, ["job", url, bad.id])
    assert "ValueError: no" in out.output and out.output.index("error:") > 0
    out = runner.invoke(main, ["job", url, "no-such-id"])
    assert out.exit_code == 1 and "no job 'no-such-id'" in out.output


def test_job_shows_every_attempt(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, q = make_queue(tmp_path, request)
    tries: list[int] = []

    @q.task(name="flaky", retries=2, backoff_s=0)
    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise KeyError(f"try {len(tries)}")
        return "fine"

    handle = q.enqueue("flaky")
    worker = q.worker(burst=True, poll_s=0.01, burst_horizon_s=0)
    worker.run()
    assert handle.result(timeout_s=5) == "fine"
    runner = CliRunner()
    out = runner.invoke(main, ["job", url, handle.id])
    assert out.exit_code == 0, out.output
    runs = out.output.split("runs:\n", 1)[1].split("last error:")[0].splitlines()
    assert [line.split()[:2] for line in runs] == [
        ["#1", "retried"],
        ["#2", "retried"],
        ["#3", "succeeded"],
    ]
    assert "KeyError: 'try 1'" in runs[0] and "KeyError: 'try 2'" in runs[1]
    assert all(worker.id in line for line in runs)
    record = json.loads(runner.invoke(main, ["job", url, handle.id, "--json"]).output)
    assert [r["outcome"] for r in record["runs"]] == ["retried", "retried", "succeeded"]
    assert "Traceback" in record["runs"][0]["error"] and record["runs"][2]["error"] is None
    assert record["worker"] == worker.id


def test_requeue_of_an_unknown_or_live_job_fails(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url, q = make_queue(tmp_path, request)
    queued = q.enqueue("boom")
    out = CliRunner().invoke(main, ["requeue", url, "--id", "nosuchjob", "--id", queued.id])
    assert out.exit_code == 1
    assert "nosuchjob: no such job" in out.output and f"{queued.id}: queued, not dead" in out.output


def test_help_and_module_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("worker", "info", "requeue", "purge"):
        assert command in done.stdout
