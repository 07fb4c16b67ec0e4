"""Redis faults: keys of the wrong type under the prefix, a full server, a failover. A change
of state is one script, and Redis does not roll back a script that fails midway: every script
must fail whole, before its first write, or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import BackendError, BackendUnavailable, ManualClock, TaskQueue
from conveyor.tasks.backends import Backend, NewJob, ScheduleInfo

from ..conftest import eventually
from ..redis_server import RedisServer
from .conftest import Running

redis = pytest.importorskip("redis")
OutOfMemoryError = redis.exceptions.OutOfMemoryError

Q = "q"


def job(i: str, key: str | None = None) -> NewJob:
    return NewJob(id=i, queue=Q, task="t", payload=b"x", key=key)


@pytest.fixture
def redis_backend(redis_url: str) -> Iterator[Any]:
    from conveyor.tasks.backends.redis import RedisBackend

    b = RedisBackend(redis_url)
    yield b
    b.close()


def snapshot(b: Any) -> dict[bytes, bytes]:
    """Every key under the prefix, dumped: what a failed call must leave as it was."""
    r = b.client
    return {k: r.dump(k) for k in r.scan_iter(match=b.prefix + "*", count=1000)}


def setup_jobs(b: Backend) -> dict[str, str]:
    """Jobs in every state: keyed and not, queued, delayed, running, done, dead."""
    b.enqueue([job("run", key="user"), job("next", key="user"), job("free")], now=1.0)
    b.enqueue([NewJob(id="later", queue=Q, task="t", payload=b"x", run_at=500.0)], now=1.0)
    b.enqueue([job("bye"), job("gone")], now=1.0)
    tokens = {lease.job.id: lease.token for lease in b.claim(Q, "w", 30, 2.0, 10)}
    assert set(tokens) == {"run", "free", "bye", "gone"}
    assert b.complete("bye", tokens["bye"], b"r", 100.0, 3.0)
    assert b.fail("gone", tokens["gone"], "boom", 3.0)
    return tokens


CORRUPTIONS = [
    "j:next",
    "j:free",
    "seq",
    "expiry",
    "q:q:runat",
    "q:q:ready",
    "q:q:delayed",
    "q:q:leases",
    "q:q:done",
    "q:q:dead",
    "q:q:krun",
    "q:q:kplaced",
    "q:q:k:user",
    "schedules",
]

#: a schedule whose swap enqueues a keyed tick (every key a tick may touch is then checked)
SCHEDULE = ScheduleInfo(name="s", queue=Q, task="t", payload=b"{}", every_s=1.0)


def operations(b: Backend, tokens: dict[str, str]) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("enqueue", lambda: b.enqueue([job("new"), job("new2", key="user")], now=4.0)),
        ("enqueue over dead", lambda: b.enqueue([job("gone")], now=4.0)),
        ("claim", lambda: b.claim(Q, "w2", 30, 600.0, 10)),
        ("heartbeat", lambda: b.heartbeat_many([("run", tokens["run"])], 30, 4.0)),
        ("complete", lambda: b.complete_many([("run", tokens["run"], b"r", None)], 4.0)),
        ("retry", lambda: b.retry("free", tokens["free"], 10.0, "again", 4.0)),
        ("fail", lambda: b.fail("run", tokens["run"], "boom", 4.0)),
        ("release", lambda: b.release("run", tokens["run"], 4.0)),
        ("finish", lambda: b.finish("next", 4.0)),
        ("unfinish", lambda: b.unfinish("bye")),
        ("requeue", lambda: b.requeue_dead(Q, 4.0)),
        ("expire", lambda: b.expire(1000.0)),
        ("purge", lambda: b.purge(Q)),
        ("swap schedule", lambda: b.swap_schedule("s", None, SCHEDULE, [job("tick")], 4.0)),
        ("abort queued", lambda: b.abort("next", "ops", 4.0)),
        ("abort running", lambda: b.abort("run", "ops", 4.0)),
        ("aborted", lambda: b.aborted("run", tokens["run"], 4.0)),
        (
            "swap schedule, keyed tick",
            lambda: b.swap_schedule("s", None, SCHEDULE, [job("tick2", key="user")], 4.0),
        ),
    ]


@pytest.mark.parametrize("part", CORRUPTIONS)
def test_a_key_of_the_wrong_type_fails_every_change_whole(redis_backend: Any, part: str) -> None:
    b = redis_backend
    r = b.client
    tokens = setup_jobs(b)
    key = b.prefix + part
    r.delete(key)
    if part == "seq":
        r.rpush(key, "not a counter")
    else:
        r.set(key, "written by another program")
    for name, call in operations(b, tokens):
        before = snapshot(b)
        try:
            call()
        except BackendError as exc:
            assert not isinstance(exc, BackendUnavailable), name
            assert key in str(exc) or "wrong kind" in str(exc), (name, str(exc))
            assert snapshot(b) == before, f"{name} changed something and then failed"
    # once the stray key is gone, the same prefix works again from scratch
    r.delete(*list(r.scan_iter(match=b.prefix + "*")))
    tokens = setup_jobs(b)
    assert b.complete("run", tokens["run"], None, None, 5.0)
    assert b.complete("free", tokens["free"], None, None, 5.0)
    [lease] = b.claim(Q, "w", 30, 6.0, 10)
    assert lease.job.id == "next"


# -- a full server, a failover: the worker rides them out -----------------------------------


class Held:
    """A task queue whose task ``hold`` runs until its gate opens (and counts its runs)."""

    def __init__(self, url: str) -> None:
        self.queue = TaskQueue(url)
        self.runs: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()

        @self.queue.task
        def hold(name: str) -> str:
            self.runs.append(name)
            self.started.set()
            self.gate.wait(30)
            return name

        @self.queue.task
        def quick(name: str) -> str:
            self.runs.append(name)
            return name

        self.hold = hold
        self.quick = quick
        self.worker = self.queue.worker(lease_s=30, poll_s=0.05, handle_signals=False)
        self.thread = threading.Thread(target=self.worker.run)

    def close(self) -> None:
        self.gate.set()
        self.worker.stop()
        self.thread.join(10)
        self.queue.close()


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "full", extra=("--maxmemory-policy", "noeviction"))
    server.start()
    yield server
    server.kill()


def refusals(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the worker was refused and said it would try again."""
    return sum("trying again" in r.getMessage() for r in caplog.records)


def test_a_full_server_refuses_changes_whole_and_the_worker_finishes_once_it_has_room(
    full_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    held = Held(f"{full_server.url}?retry_s=0.3")
    r = redis.Redis(port=full_server.port)
    try:
        job = held.hold.enqueue("long")
        held.thread.start()
        assert held.started.wait(10)
        # another program fills it past a lowered limit: every write is refused from here on
        for i in range(100):
            r.set(f"filler:{i}", b"x" * 100_000)
        r.config_set("maxmemory", "4mb")
        with pytest.raises(OutOfMemoryError):
            r.set("one-more", "x")
        before = {k: r.dump(k) for k in r.scan_iter(match="conveyor:*")}
        with pytest.raises(BackendUnavailable, match="refuses writes"):
            held.quick.enqueue("refused")
        held.gate.set()  # the job ends while its outcome cannot be written
        seen = refusals(caplog)
        eventually(lambda: refusals(caplog) >= seen + 3, timeout_s=20)  # it keeps trying
        assert {k: r.dump(k) for k in r.scan_iter(match="conveyor:*")} == before
        assert job.status() == "running" and held.thread.is_alive()
        r.delete(*list(r.scan_iter(match="filler:*")))
        assert job.result(timeout_s=20) == "long"
        after = held.quick.enqueue("after")
        assert after.result(timeout_s=20) == "after"
        assert held.runs == ["long", "after"] and held.worker.failure is None
    finally:
        held.close()
        r.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica")
    primary.start()
    replica.start()
    replica.command("REPLICAOF", "127.0.0.1", str(primary.port))
    yield primary, replica
    replica.kill()
    primary.kill()


def wait_in_sync(r: Any) -> None:
    """Until every write so far has reached the one replica."""
    assert r.execute_command("WAIT", 1, 10_000) == 1


def test_a_failover_makes_the_worker_wait_not_exit_and_every_job_runs_once(
    pair: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    primary, replica = pair
    held = Held(f"{primary.url}?retry_s=0.3")
    p = redis.Redis(port=primary.port)
    try:
        jobs = [held.quick.enqueue(f"q{i}") for i in range(50)]
        long = held.hold.enqueue("long")
        held.thread.start()
        assert held.started.wait(10)
        wait_in_sync(p)
        # the replica is promoted, the old primary follows it: read-only for its clients
        replica.command("REPLICAOF", "NO", "ONE")
        primary.command("REPLICAOF", "127.0.0.1", str(replica.port))
        held.gate.set()
        with pytest.raises(BackendUnavailable):
            held.quick.enqueue("refused")
        seen = refusals(caplog)
        eventually(lambda: refusals(caplog) >= seen + 3, timeout_s=20)  # refused, backing off
        assert held.thread.is_alive()
        # ... and back: the old primary is promoted again (with the data it followed)
        primary.command("REPLICAOF", "NO", "ONE")
        replica.command("REPLICAOF", "127.0.0.1", str(primary.port))
        assert long.result(timeout_s=30) == "long"
        assert [j.result(timeout_s=30) for j in jobs] == [f"q{i}" for i in range(50)]
        assert sorted(held.runs) == sorted(["long", *(f"q{i}" for i in range(50))])
        assert held.worker.failure is None
    finally:
        held.close()
        p.close()


# -- conveyor doctor: what is out of step, found and put right --------------------------------


def test_doctor_finds_and_repairs_what_a_change_failing_midway_would_leave(
    redis_url: str,
) -> None:
    with TaskQueue(redis_url) as q:
        b: Any = q.backend
        r, p = b.client, b.prefix

        @q.task
        def work(name: str) -> str:
            return name

        keyed = [work.enqueue(f"k{i}", _key="user") for i in range(3)]
        plain = work.enqueue("plain")
        assert b.doctor(q.now()) == []
        # an enqueue that wrote its record and stopped: the job is in no index
        ghost = work.enqueue("ghost")
        r.zrem(p + "q:default:runat", ghost.id)
        r.zrem(
            p + "q:default:ready",
            *[m for m in r.zrange(p + "q:default:ready", 0, -1) if m.endswith(ghost.id.encode())],
        )
        # a complete that wrote "done" and stopped: still leased, not in done
        [lease] = b.claim("default", "w", 30, q.now(), 1)
        assert lease.job.id == keyed[0].id
        r.hset(p + "j:" + lease.job.id, mapping={"state": "done", "result": b'"k0"'})
        # an index entry naming no job, and a key marked running that nothing runs
        r.sadd(p + "q:default:dead", "no-such-job")
        r.sadd(p + "q:default:krun", "nobody")
        # and something conveyor did not write
        r.set(p + "q:other:ready", "a string")
        found = b.doctor(q.now())
        text = "\n".join(found)
        assert f"job {ghost.id}: queued, but missing from runat, missing from ready" in text
        assert f"job {lease.job.id}: done, but left in leases, missing from done" in text
        assert "dead names job no-such-job, which does not exist" in text
        assert "key nobody is marked running" in text
        assert "q:other:ready: a string, where conveyor keeps a zset" in text
        assert b.doctor(q.now()) == found  # looking changes nothing
        repaired = b.doctor(q.now(), repair=True)
        assert [line for line in repaired if not line.endswith("; put right")] == [
            line for line in found if "not conveyor's" in line
        ]
        assert [line for line in b.doctor(q.now()) if "not conveyor's" not in line] == []
        r.delete(p + "q:other:ready")
        q.worker(burst=True, poll_s=0.05, handle_signals=False).run()  # returns: no ghost
        assert ghost.result(timeout_s=5) == "ghost" and plain.result(timeout_s=5) == "plain"
        assert [j.result(timeout_s=5) for j in keyed] == ["k0", "k1", "k2"]
        assert b.doctor(q.now()) == []


def test_doctor_cli_says_what_is_wrong_and_exits_1_until_repaired(redis_url: str) -> None:
    from click.testing import CliRunner

    from conveyor.cli import main

    with TaskQueue(redis_url) as q:
        b: Any = q.backend
        job = q.enqueue("t", 1)
        b.client.zrem(b.prefix + "q:default:runat", job.id)
        runner = CliRunner()
        looked = runner.invoke(main, ["doctor", redis_url])
        assert looked.exit_code == 1 and f"job {job.id}: queued, but missing from runat" in (
            looked.output
        )
        mended = runner.invoke(main, ["doctor", redis_url, "--repair"])
        assert mended.exit_code == 0 and "1 thing(s) put right" in mended.output
        clean = runner.invoke(main, ["doctor", redis_url])
        assert clean.exit_code == 0 and "nothing out of step" in clean.output


def test_a_burst_worker_facing_a_stray_key_stops_with_the_error_instead_of_hanging(
    redis_url: str,
) -> None:
    clock = ManualClock(1_000_000.0)
    with TaskQueue(redis_url, clock=clock) as q:
        b: Any = q.backend
        q.enqueue("t", 1)
        b.client.delete(b.prefix + "q:default:leases")
        b.client.set(b.prefix + "q:default:leases", "another program's")
        running = Running(q.worker(burst=True, lease_s=10, poll_s=0.05, handle_signals=False))
        running.advance_until_it_stops(clock, 1)  # its back-offs, until a lease has passed
        raised = running.raised
        assert len(raised) == 1 and isinstance(raised[0], BackendError)
        assert "q:default:leases" in str(raised[0])


def test_conveyor_worker_exits_1_with_the_reason_when_a_loop_cannot_recover(
    redis_url: str,
) -> None:
    with TaskQueue(redis_url) as q:
        b: Any = q.backend
        q.enqueue("record", "x")
        b.client.delete(b.prefix + "q:default:leases")
        b.client.set(b.prefix + "q:default:leases", "another program's")
        done = subprocess.run(
            [
                *(sys.executable, "-m", "conveyor", "worker", "tests.tasks.app:queue"),
                *("--burst", "--lease-s", "1", "--poll-s", "0.05"),
            ],
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "CONVEYOR_TEST_QUEUE": redis_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: worker ") and "q:default:leases" in last


def test_outcomes_and_a_claim_in_one_round_trip_fail_apart(redis_backend: Any) -> None:
    """The outcomes and the claim that follows them travel together, but each script is its
    own change: a claim refused leaves the outcomes written, and a server that forgot the
    scripts (restarted, flushed) gets them again."""
    b = redis_backend
    b.enqueue([job("a"), job("b"), job("c")], now=1.0)
    [a] = b.claim(Q, "w", 30, 2.0, 1)
    b.client.delete(b.prefix + "q:q:ready")
    b.client.set(b.prefix + "q:q:ready", "written by another program")
    results, claimed = b.complete_then_claim([("a", a.token, b"r", None)], Q, "w", 30, 3.0, 5)
    assert results == [True] and b.get("a").state == "done"
    assert isinstance(claimed, BackendError) and "q:q:ready" in str(claimed)
    # the stray key gone (b and c with it), and every script forgotten by the server
    b.client.delete(b.prefix + "q:q:ready")
    b.enqueue([job("d"), job("e")], now=4.0)
    [d] = b.claim(Q, "w", 30, 5.0, 1)
    b.client.script_flush()
    results, claimed = b.complete_then_claim([("d", d.token, None, None)], Q, "w", 30, 6.0, 5)
    assert results == [True] and [lease.job.id for lease in claimed] == ["e"]
