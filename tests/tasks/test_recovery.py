"""A worker found dead has its leases ended at once: its jobs run again within seconds, not
after ``lease_s``, and still only one outcome is kept."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

from conveyor import ManualClock, TaskQueue
from conveyor.tasks._liveness import host_key, process_started, why_gone
from conveyor.tasks.backends.base import WorkerInfo

from ..conftest import eventually
from .conftest import Running, next_beat


def ghost(
    q: TaskQueue, job_lease_s: float = 600.0, claim: bool = True, **record: object
) -> tuple[str, WorkerInfo]:
    """A worker that claimed one job under a long lease (the one queued, or a new one) and
    wrote its record, then died: the job's id ("" with ``claim=False``), and the record
    (``record`` changes it: another host, another pid)."""
    job_id = ""
    if claim:
        leases = q.backend.claim(q.name, "ghost", job_lease_s, q.now())
        if not leases:
            q.enqueue("echo", 0)
            leases = q.backend.claim(q.name, "ghost", job_lease_s, q.now())
        [lease] = leases
        job_id = lease.job.id
    now = q.now()
    info = WorkerInfo(
        id="ghost",
        host="elsewhere",
        pid=1,
        queues=(q.name,),
        concurrency=1,
        started_at=now,
        last_beat=now,
        beat_s=1.0,
        host_key="another machine",
    )
    info = dataclasses.replace(info, **record)  # type: ignore[arg-type]
    q.backend.worker_beat(info)
    return job_id, info


def echo_task(q: TaskQueue) -> None:
    @q.task(name="echo")
    def echo(x: int) -> int:
        return x


def test_a_worker_on_another_host_that_stopped_beating_has_its_jobs_run_at_once(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    echo_task(q)
    job = q.enqueue("echo", 7)
    job_id, _ = ghost(q)
    run = Running(q.worker(name="live", handle_signals=False, poll_s=0.05))
    try:
        # beats a second apart, each looking at the others: after three missed beats of the
        # ghost's (and a look that follows a look a beat before), its lease is ended
        for _ in range(6):
            next_beat(run, clock)
            if job.status() == "done":
                break
        assert job.result(timeout_s=10) == 7
    finally:
        run.stop()
    info = q.backend.get(job_id)
    assert info is not None and (info.attempts, info.lost) == (2, 1)
    assert [(a.worker, a.outcome) for a in info.runs()] == [
        ("ghost", "lost"),
        ("live", "succeeded"),
    ]
    [record] = [w for w in q.workers() if w.id == "ghost"]
    assert record.reclaimed_at is not None and record.state(q.now()) == "gone"
    assert run.raised == []


def test_a_worker_whose_clock_jumped_looks_again_before_it_judges_by_beats(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """A jump of the clock (a machine that slept, a step of NTP) makes every record look
    old at once: the first look after it does not count missed beats."""
    q, clock = clocked
    echo_task(q)
    job_id, _ = ghost(q)
    run = Running(q.worker(name="live", handle_signals=False, poll_s=0.05))
    try:
        next_beat(run, clock, 100)  # the ghost looks 100 s silent, but so would anyone now
        next_beat(run, clock, 0)  # that look is over (the clock has not moved since)
        info = q.backend.get(job_id)
        assert info is not None and info.worker == "ghost" and info.state == "running"
        next_beat(run, clock)
        # the ghost's record still has no new beat a second later: now it is judged
        eventually(lambda: [w.reclaimed_at for w in q.workers() if w.id == "ghost"] != [None])
    finally:
        run.stop()


def test_a_worker_on_this_machine_whose_process_runs_keeps_its_jobs_however_late_its_beats(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """Paused or busy, a process that runs is alive: its leases alone decide."""
    q, clock = clocked
    echo_task(q)
    job_id, _ = ghost(
        q,
        host_key=host_key(),
        pid=os.getpid(),
        pid_started=process_started(os.getpid()) or 0,
    )
    run = Running(q.worker(name="live", handle_signals=False, poll_s=0.05))
    try:
        for _ in range(10):
            next_beat(run, clock)
        next_beat(run, clock, 0)
        info = q.backend.get(job_id)
        assert info is not None and info.worker == "ghost" and info.state == "running"
    finally:
        run.stop()


def test_a_worker_on_this_machine_whose_process_is_gone_is_found_at_the_first_look(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, _ = clocked
    echo_task(q)
    job = q.enqueue("echo", 3)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    ghost(q, host_key=host_key(), pid=child.pid, pid_started=12345)
    # a burst worker looks as it starts: the job is claimable, it runs, the worker returns
    q.worker(burst=True, handle_signals=False, poll_s=0.05).run()
    assert job.result(timeout_s=5) == 3


def test_a_pid_taken_by_another_process_does_not_keep_a_dead_worker_alive() -> None:
    me = process_started(os.getpid())
    assert me is not None and me > 0
    record = WorkerInfo(
        id="old",
        host="here",
        pid=os.getpid(),
        queues=("default",),
        concurrency=1,
        started_at=0.0,
        last_beat=0.0,
        beat_s=1.0,
        host_key=host_key(),
        pid_started=me + 1,
    )
    why = why_gone(record, "me", 0.0, judge_beats=False)
    assert why is not None and "another's" in why
    alive = dataclasses.replace(record, pid_started=me)
    assert why_gone(alive, "me", 1e9, judge_beats=True) is None
    # stopped cleanly (its jobs were handed back), or already found dead: nothing to do
    assert why_gone(dataclasses.replace(record, stopped_at=0.0), "me", 0.0, False) is None
    found = dataclasses.replace(record, reclaimed_at=0.0)
    assert why_gone(found, "me", 0.0, False) is None


def test_a_zombie_does_not_run() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        eventually(lambda: process_started(child.pid) is None)  # exited, not yet reaped
        assert child.poll() is None or child.returncode == 0
    finally:
        child.wait()


def test_a_ghost_that_comes_back_keeps_its_job_if_no_one_took_it_first(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    """Ending a lease is a heartbeat of no length under the ghost's own token: if the ghost
    was only slow and renews before anyone claims, the job stays its own; once claimed by
    another, the ghost's token holds nothing and its outcome is refused."""
    q, _ = clocked
    echo_task(q)
    job_id, record = ghost(q)
    token = q.backend.get(job_id).token  # type: ignore[union-attr]
    assert token is not None
    from conveyor.tasks._worker import _end_leases_of

    assert _end_leases_of(q.backend, record, q.now()) == 1
    assert q.backend.heartbeat(job_id, token, 30, q.now())  # back in time: still its own
    assert _end_leases_of(q.backend, record, q.now()) == 1
    [lease] = q.backend.claim(q.name, "other", 30, q.now())
    assert lease.job.id == job_id and lease.job.lost == 1
    assert not q.backend.complete(job_id, token, None, None, q.now())
    assert q.backend.complete(job_id, lease.token, None, None, q.now())


def test_many_workers_finding_the_same_dead_worker_end_its_leases_once(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, _ = clocked
    echo_task(q)
    for i in range(5):
        q.enqueue("echo", i)
    leases = q.backend.claim(q.name, "ghost", 600, q.now(), limit=5)
    assert len(leases) == 5
    _, record = ghost(q, claim=False)
    from conveyor.tasks._worker import _end_leases_of

    ended: list[int] = []
    threads = [
        threading.Thread(target=lambda: ended.append(_end_leases_of(q.backend, record, q.now())))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ended) == 4 and all(0 < n <= 5 for n in ended)
    claimed = q.backend.claim(q.name, "other", 30, q.now(), limit=10)
    assert sorted(lease.job.id for lease in claimed) == sorted(lease.job.id for lease in leases)
    assert all(lease.job.lost == 1 for lease in claimed)
