"""Redis faults: keys of the wrong type under the prefix, a full server, a failover. A change
of state is one script, and Redis does not roll back a script that fails midway: every script
must fail whole, before its first write, or not at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor import BackendError, BackendUnavailable
from conveyor.tasks.backends import Backend, NewJob

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
]


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
