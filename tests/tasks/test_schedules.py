"""Schedules: each tick enqueued once however many look, missed ticks by the catch-up policy,
cron in a time zone, schedules changed while workers run."""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import ConfigurationError, ManualClock, TaskQueue
from conveyor.cli import main

from ..conftest import eventually
from .conftest import START, Running, next_beat, queue_url

MINUTE = 60.0


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_each_tick_is_enqueued_once_with_an_id_from_the_tick(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    ran: list[str] = []

    @q.periodic(every_s=MINUTE, name="sweep", args=("floor",))
    def sweep(where: str) -> str:
        ran.append(where)
        return where

    q.publish_schedules()  # as a worker does when it starts: ticks from now on
    assert q.run_schedules() == []
    first = (START // MINUTE + 1) * MINUTE
    clock.advance(first - START)
    ids = q.run_schedules()
    expected = "sweep@" + datetime.fromtimestamp(first, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids == [expected]
    assert q.run_schedules() == []  # the same tick is not enqueued twice
    job = q.job(expected).info()
    assert (job.run_at, job.task) == (first, "sweep")
    [info] = q.schedules()
    assert (info.last_tick, info.last_job, info.through) == (first, expected, first)
    q.worker(burst=True, handle_signals=False).run()
    assert ran == ["floor"]


def test_ticks_are_enqueued_ahead_with_run_at_at_the_tick(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, _ = clocked
    q.schedule("beat", None, "t", every_s=10)
    first = (START // 10 + 1) * 10
    ids = q.run_schedules(lookahead_s=first - START + 25)  # three ticks ahead
    assert len(ids) == 3
    assert [q.job(i).info().run_at for i in ids] == [first, first + 10, first + 20]
    assert q.stats().delayed == 3


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis", "postgres"])
def test_many_schedulers_at_once_enqueue_each_tick_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    url = queue_url(backend, request, tmp_path)
    queues = [TaskQueue(url, clock=clock) for _ in range(6)]
    if backend == "memory":  # one process: one memory store under one name
        assert all(q.backend is queues[0].backend for q in queues)
    queues[0].schedule("often", None, "t", every_s=1)
    enqueued: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(queues))

    def scheduler(q: TaskQueue) -> None:
        for _ in range(20):
            barrier.wait(10)
            if q is queues[0]:
                clock.advance(1)
            barrier.wait(10)
            ids = q.run_schedules()
            with lock:
                enqueued.extend(ids)

    threads = [threading.Thread(target=scheduler, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(enqueued) == len(set(enqueued)) == 20
    assert queues[0].stats().queued == 20
    for q in queues:
        q.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("last", [9]), ("all", list(range(10))), ("none", [9])],
)
def test_missed_ticks_follow_catch_up(
    clocked: tuple[TaskQueue, ManualClock], policy: str, expected: list[int]
) -> None:
    """Ten minutes with no worker, a tick a minute: the policy says which run. Under "none"
    only the tick that is less than a minute late runs."""
    q, clock = clocked
    q.schedule("m", None, "t", every_s=MINUTE, catch_up=policy)
    first = (START // MINUTE + 1) * MINUTE
    clock.advance(first - START + 9 * MINUTE + 30)  # 30 s after the tenth tick
    ids = q.run_schedules()
    assert [round((q.job(i).info().run_at - first) / MINUTE) for i in ids] == expected
    assert q.run_schedules() == []


@pytest.mark.parametrize("policy", ["last", "none"])
def test_after_days_without_a_worker_one_beat_makes_the_schedule_current(
    clocked: tuple[TaskQueue, ManualClock], policy: str
) -> None:
    """Two days of a tick a second missed: ``last`` runs the latest once, ``none`` runs only
    what is under a minute late, and both are current at the first pass, not 172 passes
    (of a thousand ticks) later."""
    q, clock = clocked
    q.schedule("often", None, "t", every_s=1, catch_up=policy)
    clock.advance(2 * 86400 + 0.5)
    ids = q.run_schedules(lookahead_s=2)
    runs = [q.job(i).info().run_at for i in ids]
    now = q.now()
    if policy == "last":
        assert runs == [float(int(now)), float(int(now)) + 1, float(int(now)) + 2]
    else:
        assert len(runs) == 62 and min(runs) >= now - 60 and max(runs) <= now + 2
    [info] = q.schedules()
    assert info.through == max(runs)
    clock.advance(1)
    assert len(q.run_schedules(lookahead_s=2)) == 1  # current: one new tick a second


def test_catch_up_all_works_off_a_long_gap_a_thousand_ticks_a_pass(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    q.schedule("often", None, "t", every_s=1, catch_up="all")
    clock.advance(2500.5)
    assert [len(q.run_schedules()) for _ in range(4)] == [1000, 1000, 500, 0]


def test_catch_up_none_skips_every_tick_that_is_over_a_minute_late(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    q.schedule("hourly", "0 * * * *", "t", catch_up="none")
    clock.advance(3 * 3600 + 120)  # every tick is at least two minutes late now
    assert q.run_schedules() == []
    [info] = q.schedules()
    assert info.through > START and info.last_tick is None


def test_cron_is_read_in_its_time_zone_across_a_change_of_offset(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    clock.advance(at("2026-03-27T12:00:00") - clock.now())  # before Paris moves to summer time
    q.schedule("breakfast", "0 7 * * *", "t", tz="Europe/Paris")
    clock.advance(3 * 86400)
    ids = q.run_schedules()  # catch_up="last": the latest of the three mornings
    [info] = q.schedules()
    runs = [q.job(i).info().run_at for i in ids]
    assert runs == [at("2026-03-30T05:00:00")]  # 07:00 at +02:00
    assert q.next_tick(info) == at("2026-03-31T05:00:00")
    q.schedule("breakfast", "0 7 * * *", "t", tz="Europe/Paris", catch_up="all")
    assert q.run_schedules() == []  # a changed plan keeps how far it had got


def test_schedules_are_added_changed_and_removed_while_workers_run(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    seen: list[int] = []

    @q.task(name="count")
    def count(n: int) -> None:
        seen.append(n)

    run = Running(q.worker(name="w", handle_signals=False, poll_s=0.05))
    try:
        q.schedule("c", None, count, [1], every_s=1)
        for _ in range(4):  # each beat enqueues the ticks of the next two seconds
            next_beat(run, clock)
        eventually(lambda: len(seen) >= 3)
        q.schedule("c", None, count, [2], every_s=1)  # new arguments from the next tick on
        for _ in range(3):
            next_beat(run, clock)
        eventually(lambda: 2 in seen)
        assert q.unschedule("c") and not q.unschedule("c")
        next_beat(run, clock, 0)  # a beat that began before the removal has ended
        # ticks not yet due (one that is due may wait for the worker on a loaded machine)
        left = sum(1 for job in q.jobs("queued", limit=1000) if job.run_at > q.now())
        assert left <= 3  # at most the ticks of two seconds ahead (and one at the edge)
        for _ in range(5):
            next_beat(run, clock)
        # once removed, nothing more is enqueued: what was queued ahead runs, and no more
        eventually(lambda: q.stats().queued == 0 and q.stats().running == 0)
        assert q.stats().done == len(seen)
        assert seen == sorted(seen) and set(seen) == {1, 2}
    finally:
        run.stop()
    assert run.raised == []


def test_a_burst_worker_writes_its_periodic_schedules_and_runs_what_is_due(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    ran: list[float] = []

    @q.periodic(every_s=MINUTE, name="tidy")
    def tidy() -> None:
        ran.append(q.now())

    q.worker(burst=True, handle_signals=False).run()  # writes the schedule: nothing due yet
    assert [s.name for s in q.schedules()] == ["tidy"] and ran == []
    clock.advance(2 * MINUTE)
    q.worker(burst=True, handle_signals=False).run()
    assert len(ran) == 1
    again = TaskQueue(q.url, clock=clock)
    again.periodic(every_s=MINUTE, name="tidy")(lambda: None)
    again.publish_schedules()  # the same plan from another process: it keeps its place
    [info] = q.schedules()
    assert info.last_tick is not None and info.through >= info.last_tick


def test_schedules_are_checked_when_made() -> None:
    q = TaskQueue("memory://checked-schedules")
    for cron, options, match in [
        (None, {}, "one of the two"),
        ("* * * * *", {"every_s": 5}, "one of the two"),
        ("every minute", {}, "bad cron expression"),
        ("61 * * * *", {}, "bad cron expression"),
        (None, {"every_s": 0}, "every_s"),
        (None, {"every_s": float("nan")}, "every_s"),
        (None, {"every_s": True}, "every_s"),
        ("* * * * *", {"tz": "Mars/Olympus"}, "unknown time zone"),
        ("* * * * *", {"catch_up": "some"}, "catch_up"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            q.schedule("s", cron, "t", **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a schedule's name"):
        q.schedule("", None, "t", every_s=1)
    with pytest.raises(ConfigurationError, match="cannot be sent as JSON"):
        q.schedule("s", None, "t", [{1, 2}], every_s=1)
    with pytest.raises(ConfigurationError, match="_options"):
        q.schedule("s", None, "t", kwargs={"_delay_s": 1}, every_s=1)
    assert q.schedules() == []


def test_a_schedule_name_belongs_to_one_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with TaskQueue(url, name="a") as a, TaskQueue(url, name="b") as b:
        a.schedule("shared", None, "t", every_s=1)
        with pytest.raises(ConfigurationError, match="belongs to queue 'a'"):
            b.schedule("shared", None, "t", every_s=1)
        assert [s.name for s in b.schedules(all_queues=True)] == ["shared"]
        assert b.schedules() == []


def test_cron_without_cronsim_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[cron\]"):
        TaskQueue("memory://no-cronsim").schedule("s", "* * * * *", "t")
    TaskQueue("memory://no-cronsim").schedule("s", None, "t", every_s=1)  # needs nothing


def test_conveyor_schedules_lists_and_removes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    clock = ManualClock(START)
    with TaskQueue(url, clock=clock) as q:
        q.schedule("nightly", "0 3 * * *", "t", tz="Europe/Paris")
        q.schedule("often", None, "t", every_s=30)
        clock.advance(31)
        q.run_schedules()
    runner = CliRunner()
    out = runner.invoke(main, ["schedules", url])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["NAME", "QUEUE", "WHEN", "NEXT", "LAST", "JOB"]
    assert lines[1].startswith("nightly") and "0 3 * * * Europe/Paris" in lines[1]
    assert lines[2].startswith("often") and "every 30 s" in lines[2] and "often@" in lines[2]
    out = runner.invoke(main, ["schedules", url, "--json"])
    records = [json.loads(line) for line in out.output.splitlines()]
    assert [r["name"] for r in records] == ["nightly", "often"]
    assert "payload" not in records[0] and records[0]["next_tick"].endswith("+00:00")
    out = runner.invoke(main, ["schedules", url, "--remove", "often"])
    assert out.exit_code == 0 and "removed" in out.output
    out = runner.invoke(main, ["schedules", url, "--remove", "often"])
    assert out.exit_code != 0 and "no schedule named 'often'" in out.output


def corrupt(q: TaskQueue, name: str, text: str) -> None:
    """Write ``text`` as the stored record of schedule ``name``, behind conveyor's back."""
    backend: Any = q.backend
    if hasattr(backend, "client"):  # Redis
        backend.client.hset(backend.prefix + "schedules", name, text)
    elif hasattr(backend, "libpq_url"):  # PostgreSQL
        import psycopg

        with psycopg.connect(backend.libpq_url, autocommit=True) as conn:
            conn.execute(
                f'INSERT INTO "{backend.schema}".schedules VALUES (%s, %s) '
                "ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                (name, text),
            )
    else:
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(backend.path)) as db, db:
            db.execute("INSERT OR REPLACE INTO schedules VALUES (?, ?)", (name, text))


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"name": "aaa", "queue": "default", "task": "t", "payload": "e30=", "every_s": "1"}',
        '{"name": "aaa", "queue": "default", "task": "t", "payload": "e30=", "every_s": 1,'
        ' "through": null}',
        '{"name": "aaa", "queue": "default", "task": "t", "payload": "e30=", "cron": "61 * * * *"}',
        '{"name": "aaa", "queue": "default", "task": "t", "payload": "e30=", "cron": 5}',
    ],
)
def test_a_record_that_cannot_be_read_or_run_stops_no_other_schedule_and_can_be_removed(
    backend: str, text: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    url = queue_url(backend, request, tmp_path)
    with TaskQueue(url, clock=clock) as q:
        q.schedule("zzz", None, "t", every_s=1)
        corrupt(q, "aaa", text)
        clock.advance(1)
        assert len(q.run_schedules()) == 1  # zzz ticks; aaa is skipped, said once
        names = {s.name: s for s in q.schedules(all_queues=True)}
        assert set(names) == {"aaa", "zzz"}
        out = CliRunner().invoke(main, ["schedules", url])
        assert out.exit_code == 0 and "aaa" in out.output and "zzz" in out.output
        if names["aaa"].problem is not None:
            assert "cannot be read" in out.output
        assert q.unschedule("aaa")
        assert [s.name for s in q.schedules()] == ["zzz"]
        corrupt(q, "aaa", text)
        q.schedule("aaa", None, "t", every_s=5)  # a broken record is replaced whole
        [fixed] = [s for s in q.schedules() if s.name == "aaa"]
        assert fixed.problem is None and fixed.every_s == 5
        corrupt(q, "bbb", text)
        out = CliRunner().invoke(main, ["schedules", url, "--remove", "bbb"])
        assert out.exit_code == 0, out.output


def test_a_schedules_pass_that_fails_is_logged_and_tried_again_at_the_next_beat(
    clocked: tuple[TaskQueue, ManualClock], caplog: pytest.LogCaptureFixture
) -> None:
    from conveyor import BackendUnavailable

    q, clock = clocked
    ran: list[int] = []

    @q.task(name="count")
    def count() -> None:
        ran.append(1)

    q.schedule("c", None, count, every_s=1)
    real = q.run_schedules
    failures = [BackendUnavailable("storage away")] * 2

    def flaky(lookahead_s: float = 0.0) -> list[str]:
        if failures:
            raise failures.pop()
        return real(lookahead_s)

    q.run_schedules = flaky  # type: ignore[method-assign]
    run = Running(q.worker(name="w", handle_signals=False, poll_s=0.05))
    try:
        for _ in range(4):
            next_beat(run, clock)
        eventually(lambda: len(ran) >= 1)
    finally:
        run.stop()
    assert run.raised == [] and not failures
    assert sum("could not run the schedules" in r.getMessage() for r in caplog.records) == 2
