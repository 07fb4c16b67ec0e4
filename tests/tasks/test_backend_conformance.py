"""One suite, every backend: each operation of the contract and each race it must survive."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.tasks.backends import (
    ABORTED,
    DEAD,
    DONE,
    HISTORY_ERROR_CHARS,
    PARKED_S,
    QUEUED,
    RUNNING,
    WAITING,
    Backend,
    Limit,
    NewJob,
    ScheduleInfo,
    SQLiteBackend,
)

Q = "q"


def job(i: str, priority: int = 0, key: str | None = None, run_at: float = 0.0) -> NewJob:
    return NewJob(
        id=i, queue=Q, task="t", payload=i.encode(), priority=priority, key=key, run_at=run_at
    )


def claim_ids(b: Backend, now: float, limit: int = 10, lease_s: float = 30.0) -> list[str]:
    return [lease.job.id for lease in b.claim(Q, "w", lease_s, now, limit)]


def test_a_whole_enqueue_adds_all_or_none(backend: Backend) -> None:
    backend.enqueue([job("taken")], now=0)
    out = backend.enqueue([job("a"), job("taken"), job("b")], now=1, whole=True)
    assert [(j.id, added) for j, added in out] == [("a", False), ("taken", False), ("b", False)]
    assert backend.get("a") is None and backend.get("b") is None
    # an id twice in the batch is not "taken": the batch is added, the first one counts
    out = backend.enqueue([job("a"), job("b"), job("a")], now=2, whole=True)
    assert [(j.id, added) for j, added in out] == [("a", True), ("b", True), ("a", False)]
    assert sorted(claim_ids(backend, 3)) == ["a", "b", "taken"]


def test_enqueue_stores_and_dedups_by_id(backend: Backend) -> None:
    [(stored, added)] = backend.enqueue([job("a")], now=1.0)
    assert added and stored.state == QUEUED and stored.attempts == 0
    assert stored.payload == b"a" and stored.enqueued_at == 1.0
    [(again, added)] = backend.enqueue([job("a", priority=9)], now=2.0)
    assert not added and again.priority == 0
    [lease] = backend.claim(Q, "w", 30, 3.0)
    assert not backend.enqueue([job("a")], now=4.0)[0][1]  # running
    assert backend.complete("a", lease.token, b"r", None, 5.0)
    assert not backend.enqueue([job("a")], now=6.0)[0][1]  # done


def test_a_dead_id_can_be_enqueued_again(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [lease] = backend.claim(Q, "w", 30, 1)
    assert backend.fail("a", lease.token, "boom", 2)
    [(fresh, added)] = backend.enqueue([job("a")], now=3)
    assert added and fresh.state == QUEUED and fresh.attempts == 0


def test_a_done_id_whose_result_expired_can_be_enqueued_again(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [lease] = backend.claim(Q, "w", 30, 1)
    assert backend.complete("a", lease.token, None, keep_s=5, now=2)
    assert not backend.enqueue([job("a")], now=6)[0][1]
    assert backend.enqueue([job("a")], now=7)[0][1]


def test_batch_enqueue_is_one_call(backend: Backend) -> None:
    out = backend.enqueue([job(str(i)) for i in range(500)] + [job("7")], now=0)
    assert sum(added for _, added in out) == 500
    assert claim_ids(backend, 1, limit=1000)[:3] == ["0", "1", "2"]


def test_claims_go_by_priority_then_enqueue_order(backend: Backend) -> None:
    backend.enqueue([job("low1"), job("high", priority=5), job("low2"), job("mid", priority=1)], 0)
    assert claim_ids(backend, 1) == ["high", "mid", "low1", "low2"]
    assert claim_ids(backend, 1) == []


def test_delayed_jobs_wait_for_their_time(backend: Backend) -> None:
    backend.enqueue([job("later", run_at=100.0), job("now")], now=0)
    assert claim_ids(backend, 50, lease_s=1000) == ["now"]
    assert backend.next_run_at(Q) == 100.0
    assert claim_ids(backend, 99) == []
    assert claim_ids(backend, 100) == ["later"]


def test_keys_run_one_at_a_time_in_order_and_in_parallel(backend: Backend) -> None:
    backend.enqueue(
        [
            job("a1", key="a"),
            job("a2", key="a"),
            job("b1", key="b"),
            job("a3", key="a"),
            job("free"),
        ],
        now=0,
    )
    first = backend.claim(Q, "w", 30, 1, limit=10)
    assert [lease.job.id for lease in first] == ["a1", "b1", "free"]
    assert claim_ids(backend, 2) == []
    token = {lease.job.id: lease.token for lease in first}
    # a retried keyed job keeps its place: a2 still waits behind a1
    assert backend.retry("a1", token["a1"], run_at=10, error="x", now=3)
    assert claim_ids(backend, 4) == []
    assert claim_ids(backend, 10) == ["a1"]


def test_key_order_continues_after_completion(backend: Backend) -> None:
    backend.enqueue([job("a1", key="a"), job("a2", key="a"), job("a3", key="a")], now=0)
    for expected in ("a1", "a2", "a3"):
        [lease] = backend.claim(Q, "w", 30, 1, limit=10)
        assert lease.job.id == expected
        assert backend.complete(expected, lease.token, None, None, 2)


def test_a_lapsed_lease_is_claimed_again_and_the_old_token_is_refused(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [old] = backend.claim(Q, "w1", lease_s=10, now=0)
    assert old.job.attempts == 1 and old.job.lease_until == 10
    assert claim_ids(backend, 5) == []
    [new] = backend.claim(Q, "w2", lease_s=10, now=11)
    assert new.job.attempts == 2 and new.token != old.token
    stale: tuple[Callable[[], bool], ...] = (
        lambda: backend.heartbeat("a", old.token, 10, 12),
        lambda: backend.complete("a", old.token, b"late", None, 12),
        lambda: backend.retry("a", old.token, 20, "x", 12),
        lambda: backend.fail("a", old.token, "x", 12),
        lambda: backend.release("a", old.token, 12),
    )
    for call in stale:
        assert call() is False
    assert backend.complete("a", new.token, b"ok", None, 13)
    got = backend.get("a")
    assert got is not None and got.state == DONE and got.result == b"ok"


def test_heartbeat_keeps_the_lease(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [lease] = backend.claim(Q, "w", lease_s=10, now=0)
    assert backend.heartbeat("a", lease.token, 10, now=8)
    assert claim_ids(backend, 12) == []
    assert claim_ids(backend, 19) == ["a"]


def test_batch_complete_and_heartbeat_refuse_lost_leases(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b"), job("c")], now=0)
    leases = {lease.job.id: lease for lease in backend.claim(Q, "w", 10, 0, limit=3)}
    assert backend.heartbeat_many(
        [("a", leases["a"].token), ("b", "stale-token"), ("c", leases["c"].token)], 10, now=5
    ) == [True, False, True]
    [retaken] = backend.claim(Q, "w2", 10, now=11)  # b's lease lapsed at 10
    assert retaken.job.id == "b"
    assert backend.complete_many(
        [
            ("a", leases["a"].token, b"ra", None),
            ("b", leases["b"].token, b"old", None),
            ("c", leases["c"].token, None, 60),
        ],
        now=12,
    ) == [True, False, True]
    a, b, c = (backend.get(i) for i in "abc")
    assert a is not None and (a.state, a.result) == (DONE, b"ra")
    assert b is not None and b.state == RUNNING
    assert c is not None and c.keep_until == 72


def test_complete_then_claim_writes_the_outcomes_then_claims(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b"), job("c"), job("d")], now=0)
    leases = {lease.job.id: lease for lease in backend.claim(Q, "w", 10, 0, limit=2)}
    assert set(leases) == {"a", "b"}
    results, claimed = backend.complete_then_claim(
        [("a", leases["a"].token, b"ra", None), ("b", "stale-token", None, None)], Q, "w", 10, 1, 5
    )
    assert results == [True, False]
    assert isinstance(claimed, list) and [lease.job.id for lease in claimed] == ["c", "d"]
    a, b = backend.get("a"), backend.get("b")
    assert a is not None and (a.state, a.result) == (DONE, b"ra")
    assert b is not None and b.state == RUNNING
    # nothing to write: a plain claim; nothing to claim: the outcomes alone
    assert backend.complete_then_claim([], Q, "w", 10, 2, 5) == ([], [])
    tokens = [lease.token for lease in claimed]
    assert backend.complete_then_claim(
        [("c", tokens[0], None, None), ("d", tokens[1], None, 60)], Q, "w", 10, 3, 5
    ) == ([True, True], [])
    d = backend.get("d")
    assert d is not None and d.keep_until == 63


def test_complete_keeps_the_result_for_its_time(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b")], now=0)
    leases = {lease.job.id: lease for lease in backend.claim(Q, "w", 30, 1, limit=2)}
    assert backend.complete("a", leases["a"].token, b"ra", keep_s=10, now=2)
    assert backend.complete("b", leases["b"].token, None, keep_s=None, now=2)
    got = backend.get("a")
    assert got is not None and (got.result, got.finished_at, got.keep_until) == (b"ra", 2, 12)
    assert backend.expire(now=11) == 0
    assert backend.expire(now=12) == 1
    assert backend.get("a") is None and backend.get("b") is not None
    assert backend.enqueue([job("a")], now=13)[0][1]


def test_retry_requeues_later_and_keeps_the_attempt(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [lease] = backend.claim(Q, "w", 30, 0)
    assert backend.retry("a", lease.token, run_at=5, error="Timeout", now=1)
    got = backend.get("a")
    assert got is not None and (got.state, got.attempts, got.error) == (QUEUED, 1, "Timeout")
    assert claim_ids(backend, 4) == []
    [again] = backend.claim(Q, "w", 30, 5)
    assert again.job.attempts == 2


def test_every_attempt_is_kept_with_its_worker_times_and_error(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [first] = backend.claim(Q, "w1", 10, 1.5)
    running = first.job
    assert (running.worker, running.started_at) == ("w1", 1.5)
    assert [(r.number, r.worker, r.outcome) for r in running.runs()] == [(1, "w1", RUNNING)]
    assert backend.retry("a", first.token, run_at=2, error="Traceback...\nKeyError: 'x'", now=2.25)
    [_second] = backend.claim(Q, "w2", 10, 3)  # w2 then dies: its lease lapses at 13
    [third] = backend.claim(Q, "w3", 10, 13.5)
    assert backend.fail("a", third.token, "x" * 10_000 + "ValueError: last", 14)
    got = backend.get("a")
    assert got is not None and got.error == "x" * 10_000 + "ValueError: last"  # whole
    runs = [(r.number, r.worker, r.started_at, r.ended_at, r.outcome) for r in got.runs()]
    assert runs == [
        (1, "w1", 1.5, 2.25, "retried"),
        (2, "w2", 3.0, 13.0, "lost"),
        (3, "w3", 13.5, 14.0, "dead"),
    ]
    errors = [r.error for r in got.runs()]
    assert errors[0] == "Traceback...\nKeyError: 'x'" and errors[1] is None
    assert errors[2] is not None and errors[2].endswith("ValueError: last")
    assert len(errors[2]) == HISTORY_ERROR_CHARS  # the end is kept: where the exception is
    # requeued, it keeps its history and counts again from 1; a success is the last run
    assert backend.requeue("a", 15)
    [fourth] = backend.claim(Q, "w1", 10, 16)
    assert fourth.job.attempts == 1 and len(fourth.job.history) == 3
    assert backend.complete("a", fourth.token, b"ok", None, 17)
    done = backend.get("a")
    assert done is not None
    assert [(r.number, r.outcome, r.ended_at) for r in done.runs()][3:] == [(1, "succeeded", 17)]


def test_history_keeps_any_text_and_tells_attempts_apart_at_one_instant(
    backend: Backend,
) -> None:
    backend.enqueue([job("a")], now=0)
    [first] = backend.claim(Q, "w1", 10, 5)
    # a cut inside a character would be invalid UTF-8 (a byte count on the storage's side)
    error = "é" * 3000 + "\x00 x" + "ü" * 2000 + "ValueError: fin"
    assert backend.retry("a", first.token, run_at=5, error=error, now=5)
    [second] = backend.claim(Q, "w1", 10, 5)  # the same instant as the first
    got = backend.get("a")
    assert got is not None and got.error == error  # the job's own error whole
    assert [(r.number, r.outcome) for r in got.runs()] == [(1, "retried"), (2, RUNNING)]
    kept = got.runs()[0].error
    assert kept is not None and len(kept) == HISTORY_ERROR_CHARS and kept.endswith("fin")
    assert kept == error[-HISTORY_ERROR_CHARS:].replace("\x00", "\ufffd")
    assert [lease.job.id for lease in backend.claim(Q, "w2", 10, 20)] == ["a"]  # still readable
    assert second.token != first.token


def test_a_released_attempt_is_not_kept(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [lease] = backend.claim(Q, "w1", 10, 1)
    assert backend.release("a", lease.token, 2)
    got = backend.get("a")
    assert got is not None and got.history == () and got.runs() == []


def test_fail_and_requeue(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b")], now=0)
    for lease in backend.claim(Q, "w", 30, 0, limit=2):
        assert backend.fail(lease.job.id, lease.token, "bad", 1)
    got = backend.get("a")
    assert got is not None and (got.state, got.error) == (DEAD, "bad")
    assert backend.requeue("a", 2)
    assert not backend.requeue("a", 2)
    assert backend.requeue_dead(Q, 3) == 1
    assert sorted(claim_ids(backend, 4)) == ["a", "b"]


def test_release_gives_the_job_back_at_once_without_counting_it(backend: Backend) -> None:
    backend.enqueue([job("a", run_at=0)], now=0)
    [lease] = backend.claim(Q, "w", 300, 0)
    assert backend.release("a", lease.token, now=1)
    [again] = backend.claim(Q, "w2", 300, 1)
    assert again.job.attempts == 1


def test_finish_and_unfinish(backend: Backend) -> None:
    backend.finish("never-seen", now=0)
    assert not backend.enqueue([job("never-seen")], now=1)[0][1]
    assert backend.unfinish("never-seen")
    assert not backend.unfinish("never-seen")
    assert backend.enqueue([job("never-seen")], now=2)[0][1]
    [lease] = backend.claim(Q, "w", 30, 3)
    backend.finish("never-seen", now=4)  # finished while running: the lease stops holding
    assert not backend.complete("never-seen", lease.token, b"x", None, 5)
    got = backend.get("never-seen")
    assert got is not None and got.state == DONE


def test_finish_a_queued_keyed_job_unblocks_its_key(backend: Backend) -> None:
    backend.enqueue([job("a1", key="a"), job("a2", key="a")], now=0)
    backend.finish("a1", now=1)
    assert claim_ids(backend, 2) == ["a2"]


def test_purge_keeps_running_jobs(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b"), job("c")], now=0)
    [lease] = backend.claim(Q, "w", 30, 0)
    assert backend.purge(Q) == 2
    assert backend.get(lease.job.id) is not None
    assert claim_ids(backend, 1) == []


def test_counts(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b", run_at=50), job("c"), job("d"), job("e")], now=0)
    leases = backend.claim(Q, "w", lease_s=30, now=10, limit=3)
    backend.complete(leases[0].job.id, leases[0].token, None, None, 11)
    backend.fail(leases[1].job.id, leases[1].token, "x", 11)
    c = backend.counts(Q, now=20)
    assert (c.queued, c.delayed, c.running, c.done, c.dead) == (2, 1, 1, 1, 1)
    assert c.oldest_waiting_s == 20
    assert c.leases == ((leases[2].job.id, 20.0),)
    assert backend.counts("other", now=20).queued == 0


def test_next_run_at_sees_delays_and_leases(backend: Backend) -> None:
    assert backend.next_run_at(Q) is None
    backend.enqueue([job("a", run_at=40)], now=0)
    assert backend.next_run_at(Q) == 40
    backend.claim(Q, "w", 5, now=40)
    assert backend.next_run_at(Q) == 45


def test_queues_are_separate(backend: Backend) -> None:
    backend.enqueue([NewJob("x", "other", "t", b"")], now=0)
    assert claim_ids(backend, 1) == []
    assert [lease.job.id for lease in backend.claim("other", "w", 30, 1)] == ["x"]


def test_wait_for_work_returns_when_work_arrives(backend: Backend) -> None:
    woke = threading.Event()

    def waiter() -> None:
        backend.wait_for_work(Q, timeout_s=30)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    # the waiter may start after an enqueue (a missed wake-up costs one wait, by contract);
    # enqueues keep coming until one wakes it, far sooner than its 30 s
    for i in range(250):
        backend.enqueue([job(str(i))], now=0)
        if woke.wait(0.02):
            break
    assert woke.is_set()
    t.join(5)


# -- races ---------------------------------------------------------------------------------------


def test_threads_racing_claim_each_job_once(backend: Backend) -> None:
    backend.enqueue([job(str(i)) for i in range(600)], now=0)
    got: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker() -> None:
        start.wait()
        while True:
            leases = backend.claim(Q, threading.current_thread().name, 30, 1, limit=7)
            if not leases:
                return
            for lease in leases:
                assert backend.complete(lease.job.id, lease.token, None, None, 2)
            with lock:
                got.extend(lease.job.id for lease in leases)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got, key=int) == [str(i) for i in range(600)]


def _key_race_round(backend: Backend, i: int, how: str) -> list[str]:
    """One round: the key's first job is queued again while two claimers race for the key's
    later job; which jobs of the key run at the end."""
    q = f"q{i}"
    change: Callable[[], object]
    if how == "requeued":
        backend.enqueue([NewJob(f"w{i}", q, "t", b"", key="K")], now=1)
        [first] = backend.claim(q, "w", 60, 2)
        assert backend.fail(first.job.id, first.token, "x", 2)
        backend.enqueue([NewJob(f"x{i}", q, "t", b"", key="K")], now=2)
        change = functools.partial(backend.requeue, f"w{i}", 3)
    else:
        backend.enqueue([NewJob(f"w{i}", q, "t", b"", key="K", waits_for=1)], now=1)
        backend.enqueue([NewJob(f"d{i}", "dq", "t", b"", then=((f"w{i}", 0),))], now=1)
        backend.enqueue([NewJob(f"x{i}", q, "t", b"", key="K")], now=1)
        [before] = backend.claim("dq", "w", 60, 2)
        change = functools.partial(backend.complete, before.job.id, before.token, b"", None, 3)
    start = threading.Barrier(3)

    def claimer() -> None:
        start.wait()
        for _ in range(3):
            backend.claim(q, "c", 60, 4, limit=10)

    def changer() -> None:
        start.wait()
        assert change()

    threads = [threading.Thread(target=changer)]
    threads += [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return [j.id for j in backend.jobs(q, RUNNING)]


@pytest.mark.parametrize("how", ["requeued", "let go by a workflow"])
def test_a_job_of_a_key_queued_again_while_another_is_claimed_never_runs_beside_it(
    backend: Backend, how: str
) -> None:
    """The first job of a key becomes queued (requeued from dead, or its workflow step let
    go) while two claimers race for the key's later job: one job of the key runs at most.
    A race: many rounds, each a new chance to lose it."""
    for i in range(400):
        running = _key_race_round(backend, i, how)
        assert len(running) <= 1, f"round {i}: {running} of one key run at once"


def test_two_workers_one_lapsed_job_one_outcome(backend: Backend) -> None:
    backend.enqueue([job("a")], now=0)
    [slow] = backend.claim(Q, "slow", 10, 0)
    [fast] = backend.claim(Q, "fast", 10, 11)  # the slow worker's lease lapsed
    assert backend.complete("a", fast.token, b"fast", None, 12)
    assert not backend.complete("a", slow.token, b"slow", None, 13)
    got = backend.get("a")
    assert got is not None and got.result == b"fast"


def _claim_in_process(path: str, out: multiprocessing.Queue[list[str]]) -> None:
    b = SQLiteBackend(path)
    mine: list[str] = []
    while True:
        leases = b.claim(Q, str(os.getpid()), 30, 1, limit=5)
        if not leases:
            break
        for lease in leases:
            b.complete(lease.job.id, lease.token, None, None, 2)
            mine.append(lease.job.id)
    out.put(mine)
    b.close()


def test_sqlite_processes_racing_claim_each_job_once(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    b = SQLiteBackend(path)
    b.enqueue([job(str(i)) for i in range(2000)], now=0)
    ctx = multiprocessing.get_context("forkserver")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(path, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [x for _ in procs for x in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(got, key=int) == [str(i) for i in range(2000)]
    assert b.counts(Q, 3).done == 2000
    b.close()


def _enqueue_then_die(path: str, n: int) -> None:
    b = SQLiteBackend(path)
    for i in range(n):
        b.enqueue([job(str(i))], now=0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_sqlite_keeps_every_accepted_job_after_a_kill(tmp_path: Path) -> None:
    path = str(tmp_path / "durable.db")
    ctx = multiprocessing.get_context("forkserver")
    p = ctx.Process(target=_enqueue_then_die, args=(path, 300))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    b = SQLiteBackend(path)
    assert b.counts(Q, 1).queued == 300
    assert len(claim_ids(b, 1, limit=1000)) == 300
    b.close()


@pytest.mark.parametrize("n", [1])
def test_running_jobs_survive_reopening_and_lapse(tmp_path: Path, n: int) -> None:
    path = tmp_path / "reopen.db"
    b = SQLiteBackend(path)
    b.enqueue([job("a")], now=0)
    [lease] = b.claim(Q, "w", 10, 0)
    b.close()
    again = SQLiteBackend(path)
    got = again.get("a")
    assert got is not None and got.state == RUNNING and got.token == lease.token
    assert claim_ids(again, 11) == ["a"]
    again.close()


def test_closing_while_another_thread_waits_ends_the_wait_safely(backend: Backend) -> None:
    """A stopped worker may leave a wait under way; closing the backend then must end it, not
    pull a connection from under it."""
    started = threading.Event()
    finished = threading.Event()

    def waiter() -> None:
        started.set()
        backend.wait_for_work(Q, timeout_s=30)
        finished.set()

    t = threading.Thread(target=waiter)
    t.start()
    started.wait(5)
    backend.close()
    assert finished.wait(10)
    t.join(10)


def test_jobs_are_listed_by_queue_state_and_task_in_enqueue_order(backend: Backend) -> None:
    from conveyor import ConfigurationError

    backend.enqueue([job(f"j{i}") for i in range(6)], now=1.0)
    backend.enqueue([NewJob(id="other-task", queue=Q, task="u", payload=b"", priority=0)], now=2.0)
    backend.enqueue([NewJob(id="elsewhere", queue="q2", task="t", payload=b"")], now=2.0)
    leases = backend.claim(Q, "w", 30, 3.0, limit=3)  # j0, j1, j2 run
    assert backend.complete("j0", leases[0].token, b"r", None, 4.0)
    assert backend.fail("j1", leases[1].token, "boom", 4.0)
    everything = backend.jobs(Q, limit=100)
    assert [j.id for j in everything] == [*(f"j{i}" for i in range(6)), "other-task"]
    assert {j.id: j.state for j in everything}["j2"] == RUNNING
    assert [j.id for j in backend.jobs(Q, DONE)] == ["j0"]
    dead = backend.jobs(Q, DEAD)
    assert [j.id for j in dead] == ["j1"] and dead[0].error == "boom"
    assert [j.id for j in backend.jobs(Q, QUEUED)] == ["j3", "j4", "j5", "other-task"]
    assert [j.id for j in backend.jobs(Q, QUEUED, task="u")] == ["other-task"]
    assert [j.id for j in backend.jobs(Q, task="t", limit=2, offset=3)] == ["j3", "j4"]
    assert backend.jobs(Q, limit=5, offset=100) == []
    assert [j.id for j in backend.jobs("q2")] == ["elsewhere"]
    assert backend.jobs("no-such-queue") == []
    for bad in ({"state": "finished"}, {"limit": -1}, {"offset": 1.5}):
        with pytest.raises(ConfigurationError):
            backend.jobs(Q, **bad)
    assert backend.get("j2") is not None and backend.get("j2").state == RUNNING  # type: ignore[union-attr]


def test_workers_are_recorded_and_old_records_forgotten(backend: Backend) -> None:
    from conveyor.tasks.backends.base import WORKER_KEPT_S, WorkerInfo

    def info(worker: str, beat: float, **more: object) -> WorkerInfo:
        fields: dict[str, object] = {
            "id": worker,
            "host": "h",
            "pid": 1,
            "queues": ("q",),
            "concurrency": 4,
            "started_at": 100.0,
            "last_beat": beat,
            "beat_s": 10.0,
        }
        fields.update(more)
        return WorkerInfo(**fields)  # type: ignore[arg-type]

    assert backend.workers() == []
    backend.worker_beat(info("a", 100.0))
    backend.worker_beat(info("b", 110.0, running=2, processed=5, failed=1))
    backend.worker_beat(info("a", 120.0, stopped_at=120.0))
    found = backend.workers()
    assert [w.id for w in found] == ["a", "b"]  # newest beat first
    a, b = found
    assert a.stopped_at == 120.0 and a.state(121.0) == "stopped"
    assert (b.running, b.processed, b.failed, b.queues) == (2, 5, 1, ("q",))
    assert b.state(130.0) == "alive" and b.state(141.0) == "gone"  # three beats missed
    backend.worker_beat(info("c", 120.0 + WORKER_KEPT_S + 1))
    assert [w.id for w in backend.workers()] == ["c"]  # a day without a beat: forgotten


def test_cancel_makes_a_queued_job_dead_and_only_a_queued_one(backend: Backend) -> None:
    backend.enqueue([job("a"), job("b"), job("k1", key="k"), job("k2", key="k")], now=1.0)
    assert backend.cancel("a", "not needed", 2.0)
    dead = backend.get("a")
    assert dead is not None and dead.state == DEAD and dead.error == "not needed"
    assert dead.attempts == 0
    assert not backend.cancel("a", "again", 2.0)  # dead already
    assert not backend.cancel("nosuch", "x", 2.0)
    assert backend.cancel("k1", "x", 2.0)  # the head of a key: the next one is free to run
    assert claim_ids(backend, 3.0) == ["b", "k2"]
    assert not backend.cancel("b", "running", 4.0)
    assert backend.get("b").state == RUNNING  # type: ignore[union-attr]
    assert backend.counts(Q, 5.0).dead == 2
    assert backend.requeue("a", 6.0)
    assert claim_ids(backend, 7.0) == ["a"]


def test_progress_is_stored_only_for_the_lease_that_holds_the_job(backend: Backend) -> None:
    backend.enqueue([job("a")], now=1.0)
    assert not backend.progress("a", "no-token", 0.5, "queued: nobody holds it")
    [lease] = backend.claim(Q, "w", 30, 2.0)
    assert backend.progress("a", lease.token, 0.25, "a quarter")
    assert not backend.progress("a", "stale", 0.9, "a lost lease")
    stored = backend.get("a")
    assert stored is not None and (stored.progress, stored.progress_note) == (0.25, "a quarter")
    assert backend.complete("a", lease.token, None, None, 3.0)
    done = backend.get("a")
    assert done is not None and done.progress == 0.25  # the last word stays with the job


# -- schedules ------------------------------------------------------------------------------


def schedule(through: float = 0.0, **changes: object) -> ScheduleInfo:
    info = ScheduleInfo(name="s", queue=Q, task="t", payload=b"\x00{}", every_s=1.0)
    return ScheduleInfo(**{**info.__dict__, "through": through, **changes})


def test_a_schedule_changes_only_from_what_was_expected(backend: Backend) -> None:
    first = schedule(10.0)
    assert not backend.swap_schedule("s", first, schedule(11.0))  # there is none yet
    assert backend.swap_schedule("s", None, first)
    assert backend.schedules() == [first]  # payload bytes and all, as stored
    assert not backend.swap_schedule("s", None, first)  # there is one now
    assert not backend.swap_schedule("s", schedule(9.0), schedule(12.0), [job("x")], 12.0)
    assert backend.get("x") is None  # a swap refused enqueues nothing
    moved = schedule(12.0, last_tick=12.0, last_job="s@12")
    assert backend.swap_schedule("s", first, moved, [job("s@12", run_at=12.0)], 11.5)
    assert backend.schedules() == [moved]
    ticked = backend.get("s@12")
    assert ticked is not None and ticked.state == QUEUED and ticked.run_at == 12.0
    assert backend.swap_schedule("s", moved, None)
    assert backend.schedules() == []
    other = schedule(name="a", cron="* * * * *", every_s=None, tz="Asia/Tokyo")
    assert backend.swap_schedule("a", None, other)
    assert backend.swap_schedule("s", None, first)
    assert [x.name for x in backend.schedules()] == ["a", "s"]


def test_racing_swaps_of_one_schedule_let_exactly_one_through(backend: Backend) -> None:
    base = schedule(0.0)
    assert backend.swap_schedule("s", None, base)
    won: list[int] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait(10)
        if backend.swap_schedule("s", base, schedule(1.0, last_job=f"by {i}"), [job(f"t{i}")], 1.0):
            won.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1
    assert [backend.get(f"t{i}") is not None for i in range(8)].count(True) == 1
    assert backend.schedules()[0].last_job == f"by {won[0]}"


# -- jobs that wait for others (workflows) --------------------------------------------------


def step(
    i: str, waits_for: int = 0, then: tuple[tuple[str, int], ...] = (), **more: object
) -> NewJob:
    return NewJob(
        id=i,
        queue=Q,
        task="t",
        payload=i.encode(),
        waits_for=waits_for,
        then=then,
        **more,  # type: ignore[arg-type]
    )


def finish_claimed(b: Backend, job_id: str, result: bytes | None, now: float) -> None:
    """Complete ``job_id`` (claiming what is claimable first, if it is not running yet)."""
    found = b.get(job_id)
    if found is not None and found.state != RUNNING:
        b.claim(Q, "w", 30, now, 10)
    held = b.get(job_id)
    assert held is not None and held.token is not None
    assert b.complete(job_id, held.token, result, None, now)


def test_a_waiting_job_is_queued_when_what_it_waits_for_is_done(backend: Backend) -> None:
    stored = backend.enqueue(
        [step("a", then=(("b", 0),)), step("b", 1, (("c", 0),)), step("c", 1)], now=1.0
    )
    assert [job.state for job, _ in stored] == [QUEUED, WAITING, WAITING]
    assert backend.counts(Q, 1.0).waiting == 2
    assert {j.id for j in backend.jobs(Q, WAITING)} == {"b", "c"}
    assert claim_ids(backend, 100.0) == ["a"]  # the others are never claimable while waiting
    assert claim_ids(backend, 100.0) == []
    finish_claimed(backend, "a", b"ra", 2.0)
    b = backend.get("b")
    assert b is not None and b.state == QUEUED and b.inputs == ((0, b"ra"),) and b.waits_for == 0
    assert backend.get("c").state == WAITING  # type: ignore[union-attr]
    finish_claimed(backend, "b", None, 3.0)
    c = backend.get("c")
    assert c is not None and c.state == QUEUED and c.inputs == ((0, None),)
    assert backend.counts(Q, 3.0).waiting == 0


def test_a_job_waiting_for_several_takes_each_result_at_its_place(backend: Backend) -> None:
    backend.enqueue(
        [step("x", then=(("all", 0),)), step("y", then=(("all", 1),)), step("all", 2)], now=1.0
    )
    finish_claimed(backend, "y", b"ry", 2.0)
    waiting = backend.get("all")
    assert waiting is not None and waiting.state == WAITING and waiting.waits_for == 1
    finish_claimed(backend, "x", b"rx", 3.0)
    ready = backend.get("all")
    assert ready is not None and ready.state == QUEUED and ready.inputs == ((0, b"rx"), (1, b"ry"))


def test_a_dead_job_takes_every_job_waiting_behind_it_with_it(backend: Backend) -> None:
    backend.enqueue(
        [
            step("a", then=(("b", 0), ("side", 0))),
            step("b", 1, (("c", 0),)),
            step("c", 1),
            step("side", 1),
            step("other"),
        ],
        now=1.0,
    )
    [lease] = backend.claim(Q, "w", 30, 2.0, 1)
    assert backend.fail("a", lease.token, "Traceback...\nValueError: bad input", 3.0)
    for dep in ("b", "c", "side"):
        job = backend.get(dep)
        assert job is not None and job.state == DEAD and job.finished_at == 3.0
        assert job.error is not None and job.error.startswith("not run: job ")
        assert job.error.endswith("ValueError: bad input")
    assert "job b (t)" in (backend.get("c").error or "")  # type: ignore[union-attr]
    assert backend.get("other").state == QUEUED  # type: ignore[union-attr]
    assert backend.counts(Q, 3.0).waiting == 0 and backend.counts(Q, 3.0).dead == 4


def test_cancel_finish_and_purge_reach_waiting_jobs(backend: Backend) -> None:
    backend.enqueue([step("a", then=(("b", 0),)), step("b", 1, (("c", 0),)), step("c", 1)], 1.0)
    assert backend.cancel("b", "not wanted", 2.0)  # a waiting job can be cancelled
    assert backend.get("c").state == DEAD  # type: ignore[union-attr]
    assert not backend.cancel("b", "again", 2.0)
    backend.enqueue([step("p", then=(("q", 0),)), step("q", 1)], 3.0)
    backend.finish("p", 4.0)  # done by hand: what waits for it goes on, with no result
    q = backend.get("q")
    assert q is not None and q.state == QUEUED and q.inputs == ((0, None),)
    backend.enqueue([step("r", then=(("s", 0),)), step("s", 1)], 5.0)
    assert backend.purge(Q) >= 5
    assert backend.get("s") is None and backend.counts(Q, 5.0).waiting == 0


def test_racing_ends_of_what_a_job_waits_for_queue_it_once(backend: Backend) -> None:
    n = 8
    backend.enqueue([*(step(f"m{i}", then=(("cb", i),)) for i in range(n)), step("cb", n)], now=1.0)
    leases = backend.claim(Q, "w", 30, 2.0, n)
    assert len(leases) == n
    barrier = threading.Barrier(n)

    def end(lease: object) -> None:
        barrier.wait(10)
        assert backend.complete(lease.job.id, lease.token, lease.job.id.encode(), None, 3.0)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=end, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    cb = backend.get("cb")
    assert cb is not None and cb.state == QUEUED
    assert cb.inputs == tuple((i, f"m{i}".encode()) for i in range(n))
    assert claim_ids(backend, 4.0) == ["cb"]
    assert backend.doctor(4.0) == []


def test_a_waiting_job_with_a_key_keeps_its_place_in_the_key_line(backend: Backend) -> None:
    backend.enqueue(
        [step("a", then=(("k1", 0),)), step("k1", 1, key="user"), job("k2", key="user")], 1.0
    )
    assert claim_ids(backend, 2.0) == ["a", "k2"]  # k1 waits: it holds nothing up meanwhile
    finish_claimed(backend, "a", None, 3.0)
    assert claim_ids(backend, 4.0) == []  # k2 of the same key runs: k1 waits its turn
    finish_claimed(backend, "k2", None, 5.0)
    assert claim_ids(backend, 6.0) == ["k1"]


# -- abort ----------------------------------------------------------------------------------


def test_abort_ends_a_queued_job_at_once_and_marks_a_running_one(backend: Backend) -> None:
    backend.enqueue([job("q1"), job("r1"), step("w", then=(("after", 0),)), step("after", 1)], 1.0)
    [lease] = backend.claim(Q, "w", 30, 2.0, 1)
    assert lease.job.id == "q1"
    assert backend.abort("r1", "ops", 3.0) == ABORTED  # queued: never runs
    stopped = backend.get("r1")
    assert stopped is not None and stopped.state == ABORTED and stopped.abort_by == "ops"
    assert stopped.error == "aborted by ops" and stopped.finished_at == 3.0
    assert backend.abort("after", "ops", 3.0) == ABORTED  # waiting, too
    assert backend.abort("q1", "ops", 3.0) == "requested"  # running: its worker stops it
    assert backend.get("q1").state == RUNNING  # type: ignore[union-attr]
    assert backend.abort_requests(["q1", "r1", "nope"]) == {"q1": "ops"}
    assert backend.aborted("q1", lease.token, 4.0)
    ended = backend.get("q1")
    assert ended is not None and ended.state == ABORTED and ended.error == "aborted by ops"
    assert [a.outcome for a in ended.runs()] == ["aborted"]
    assert not backend.aborted("q1", lease.token, 4.0)  # the lease holds nothing now
    assert backend.abort("q1", "ops", 5.0) == ABORTED  # already over: nothing changes
    assert backend.abort("never", "ops", 5.0) == "unknown"
    counts = backend.counts(Q, 5.0)
    assert counts.aborted == 3 and counts.queued == 1  # w
    assert {j.id for j in backend.jobs(Q, ABORTED)} == {"q1", "r1", "after"}
    assert not backend.requeue("r1", 6.0)  # an abort is an end, not a failure
    [(again, added)] = backend.enqueue([job("r1")], 6.0)
    assert added and again.state == QUEUED  # its id is free again
    assert backend.doctor(6.0) == []


def test_an_aborted_job_takes_the_jobs_waiting_for_it_down(backend: Backend) -> None:
    backend.enqueue([step("a", then=(("b", 0),)), step("b", 1)], 1.0)
    [lease] = backend.claim(Q, "w", 30, 2.0, 1)
    assert backend.abort("a", "ops", 3.0) == "requested"
    assert backend.aborted("a", lease.token, 3.0)
    b = backend.get("b")
    assert b is not None and b.state == DEAD and "aborted by ops" in (b.error or "")


def test_an_abort_asked_of_a_job_whose_worker_died_is_still_there_when_it_is_claimed_again(
    backend: Backend,
) -> None:
    backend.enqueue([job("a")], 1.0)
    backend.claim(Q, "w", 5, 2.0, 1)
    assert backend.abort("a", "ops", 3.0) == "requested"
    [again] = backend.claim(Q, "w2", 30, 10.0, 1)  # the first lease lapsed
    assert again.job.abort_by == "ops"  # its new worker does not run it: it records it aborted
    assert backend.aborted("a", again.token, 11.0)


# -- limits shared by every worker ----------------------------------------------------------


def running(b: Backend, n: int, now: float) -> list[tuple[str, str]]:
    """Enqueue and claim ``n`` jobs: their (id, token)."""
    b.enqueue([job(f"L{now}-{i}") for i in range(n)], now)
    return [(x.job.id, x.token) for x in b.claim(Q, "w", 30, now, n)]


def test_a_concurrency_limit_holds_across_runs_and_frees_a_place_however_a_run_ends(
    backend: Backend,
) -> None:
    two = [Limit("t", concurrency=2)]
    (a, ta), (b, tb), (c, tc) = running(backend, 3, 1.0)
    assert backend.acquire(two, a, ta, 1.0) is None
    assert backend.acquire(two, a, ta, 1.0) is None  # taken again by the same run: still one
    assert backend.acquire(two, b, tb, 1.0) is None
    assert backend.acquire(two, c, tc, 1.0) == PARKED_S  # full: c is handed back, to wait
    waiting = backend.get(c)
    assert waiting is not None and waiting.state == QUEUED and waiting.attempts == 0
    assert waiting.run_at == 1.0 + PARKED_S
    assert backend.acquire(two, c, tc, 1.0) == PARKED_S  # that run no longer holds it
    assert backend.complete(a, ta, None, None, 2.0)  # a's run is over: its place is free
    [again] = backend.claim(Q, "w", 30, 1.0 + PARKED_S, 1)
    assert again.job.id == c and backend.acquire(two, c, again.token, 6.0) is None
    ((d, td),) = running(backend, 1, 7.0)
    assert backend.acquire(two, d, td, 7.0) == PARKED_S
    assert backend.fail(b, tb, "boom", 8.0)
    [again] = backend.claim(Q, "w", 30, 7.0 + PARKED_S, 1)
    assert backend.acquire(two, d, again.token, 13.0) is None
    # another group is counted apart
    ((e, te),) = running(backend, 1, 5.0)
    assert backend.acquire([Limit("other", concurrency=1)], e, te, 5.0) is None


def test_a_rate_limit_allows_its_starts_then_says_how_long_to_wait(backend: Backend) -> None:
    three_per_10s = [Limit("r", rate=(3, 10.0))]
    runs = running(backend, 5, 1.0)
    assert [backend.acquire(three_per_10s, i, t, 1.0) for i, t in runs[:3]] == [None] * 3
    wait = backend.acquire(three_per_10s, runs[3][0], runs[3][1], 1.0)
    assert wait is not None and abs(wait - 10 / 3) < 1e-6  # one start each 3.33 s
    later = backend.get(runs[3][0])
    assert later is not None and later.state == QUEUED and abs(later.run_at - 1.0 - wait) < 1e-6
    [again] = backend.claim(Q, "w", 30, 1.0 + 10 / 3 + 1e-6, 1)
    assert backend.acquire(three_per_10s, again.job.id, again.token, 1.0 + 10 / 3) is None
    wait = backend.acquire(three_per_10s, runs[4][0], runs[4][1], 1.0 + 10 / 3)
    assert wait is not None and abs(wait - 10 / 3) < 1e-6


def test_limits_are_taken_all_or_none(backend: Backend) -> None:
    both = [Limit("c1", concurrency=1), Limit("r1", rate=(1, 60.0))]
    (a, ta), (b, tb) = running(backend, 2, 1.0)
    assert backend.acquire([Limit("c1", concurrency=1)], a, ta, 1.0) is None
    assert backend.acquire(both, b, tb, 1.0) == PARKED_S  # c1 is full: r1 is not spent
    [again] = backend.claim(Q, "w", 30, 1.0 + PARKED_S, 1)
    assert backend.acquire([Limit("r1", rate=(1, 60.0))], b, again.token, 6.0) is None


def test_the_end_of_a_run_brings_the_first_job_waiting_for_its_place_forward(
    backend: Backend,
) -> None:
    one = [Limit("solo", concurrency=1)]
    (a, ta), (b, tb), (c, tc) = running(backend, 3, 1.0)
    assert backend.acquire(one, a, ta, 1.0) is None
    for waiting, token in ((b, tb), (c, tc)):
        assert backend.acquire(one, waiting, token, 1.0) == PARKED_S  # handed back, parked
    assert claim_ids(backend, 2.0) == []
    assert backend.complete(a, ta, None, None, 2.0)
    backend.release_places(one, ta, 2.0)
    assert claim_ids(backend, 2.0) == [b]  # brought forward at once, c still waits
    assert claim_ids(backend, 1.0 + PARKED_S) == [c]


def test_jobs_refused_by_a_rate_come_back_one_interval_apart(backend: Backend) -> None:
    """Each refused job holds a start of its own: they do not all come due at the next
    token (and all but one get refused again, and again)."""
    one_per_s = [Limit("paced", rate=(1, 1.0))]
    runs = running(backend, 5, 100.0)
    waits = [backend.acquire(one_per_s, job_id, token, 100.0) for job_id, token in runs]
    assert waits[0] is None
    assert [round(w or 0, 6) for w in waits[1:]] == [1.0, 2.0, 3.0, 4.0]
    # each comes back at its time and starts without being refused again
    for k in range(1, 5):
        [again] = backend.claim(Q, "w", 30, 100.0 + k, 1)
        assert again.job.id == runs[k][0]
        assert backend.acquire(one_per_s, again.job.id, again.token, 100.0 + k) is None
    # a fresh job now waits behind none of them
    ((late, token),) = running(backend, 1, 105.0)
    assert backend.acquire(one_per_s, late, token, 105.0) is None
