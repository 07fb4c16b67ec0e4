"""Pipelines joined by a Redis Stream: a real redis-server of the tests' own, and consumers in
other processes that are killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conveyor import ConfigurationError, Pipeline, Skip, StageFailed
from conveyor.cli import main as cli

from .conftest import eventually
from .redis_server import RedisServer

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).parent


@pytest.fixture
def url(redis_server: RedisServer) -> Iterator[str]:
    """The session server, with a database emptied for each test."""
    yield redis_server.url
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()


@pytest.fixture
def r(url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(url)
    yield client
    client.close()


def values(r: Any, name: str) -> list[Any]:
    return [json.loads(fields[b"v"]) for _, fields in r.xrange(name)]


def group(r: Any, name: str, group_name: str = "g") -> dict[str, Any]:
    found: dict[str, Any] = next(
        g for g in r.xinfo_groups(name) if g["name"] == group_name.encode()
    )
    return found


def produce(url: str, items: Any, name: str = "in") -> None:
    Pipeline(items).to_stream(url, name).run(timeout_s=60)


def test_entries_flow_through_stages_and_are_all_acknowledged(url: str, r: Any) -> None:
    produce(url, [{"n": i} for i in range(500)])
    stats = (
        Pipeline.from_stream(url, "in", group="g", burst=True)
        .map(lambda d: d["n"])
        .filter(lambda n: n % 5)
        .flat_map(lambda n: [n, -n])
        .batch(7, within_s=0.05)
        .map(sum, kind="process", workers=2)
        .to_stream(url, "out")
        .run(timeout_s=60)
    )
    assert sum(values(r, "out")) == 0
    assert stats.stream is not None
    assert stats.stream.read == stats.stream.acknowledged == 500
    assert stats.stream.in_flight == 0 and stats.stream.dead_lettered == 0
    g = group(r, "in")
    assert g["pending"] == 0 and g["lag"] == 0


def test_an_entry_is_acknowledged_only_when_its_sink_is_done(
    url: str, r: Any, gate: threading.Event
) -> None:
    produce(url, list(range(10)))
    done: list[int] = []

    def sink(n: int) -> None:
        if n == 3:
            gate.wait(30)
        done.append(n)

    with Pipeline.from_stream(url, "in", group="g", burst=True).each(sink).start() as run:
        eventually(lambda: len(done) == 3)
        # the sink holds entry 3, and the seven after it wait behind it on the one worker:
        # they are not acknowledged (the three before it may be, as their units end)
        stream = run.stats().stream
        assert stream is not None and stream.acknowledged <= 3
        assert group(r, "in")["pending"] == 10 - stream.acknowledged
        gate.set()
    assert group(r, "in")["pending"] == 0
    assert sorted(done) == list(range(10))


def test_filtered_skipped_and_iterated_entries_are_over(url: str, r: Any) -> None:
    produce(url, list(range(20)))

    def picky(n: int) -> int:
        if n % 4 == 0:
            raise ValueError(n)
        return n

    p = (
        Pipeline.from_stream(url, "in", group="g", burst=True)
        .filter(lambda n: n % 2)
        .map(picky, on_error=Skip(log=False))
    )
    seen = sorted(p)
    assert seen == [n for n in range(20) if n % 2]
    assert group(r, "in")["pending"] == 0


def test_a_failed_run_leaves_its_entries_pending_with_their_error(url: str, r: Any) -> None:
    produce(url, list(range(5)))

    def fails_on_two(n: int) -> int:
        if n == 2:
            raise ValueError("two is wrong")
        return n

    p = Pipeline.from_stream(url, "in", group="g", burst=True).map(fails_on_two)
    with pytest.raises(StageFailed) as info:
        p.run(timeout_s=30)
    assert info.value.item == 2
    pending = {row["message_id"] for row in r.xpending_range("in", "g", "-", "+", 10)}
    ids = [entry_id for entry_id, _ in r.xrange("in")]
    assert ids[2] in pending  # not acknowledged: another consumer will try it
    assert b"two is wrong" in r.hget("in:errors", ids[2])


def test_entries_delivered_too_often_go_to_the_dead_letter_stream(url: str, r: Any) -> None:
    produce(url, [1, 2, 3])
    r.xadd("in", {b"v": b"{not json"})
    r.xadd("in", {b"other": b"field"})
    # a consumer that takes the first three and dies without a word
    r.xgroup_create("in", "g", id="0")
    r.xreadgroup("g", "ghost", {"in": ">"}, count=3)
    r.hset("in:errors", r.xrange("in")[0][0], "ValueError: it broke")

    stats = (
        Pipeline.from_stream(url, "in", group="g", lease_s=0.05, max_deliveries=1, burst=True)
        .map(lambda n: n)
        .run(timeout_s=30)
    )
    assert stats.stream is not None and stats.stream.dead_lettered == 5
    dead = r.xrange("in:dead")
    errors = [fields[b"error"].decode() for _, fields in dead]
    assert sum("delivered 2 times" in e for e in errors) == 3
    assert any("last error: ValueError: it broke" in e for e in errors)
    assert sum("cannot be decoded" in e for e in errors) == 2
    assert group(r, "in")["pending"] == 0

    listed = CliRunner().invoke(cli, ["stream", "dead", url, "in", "--json"])
    assert listed.exit_code == 0, listed.output
    records = [json.loads(line) for line in listed.output.splitlines()]
    assert len(records) == 5 and records[0]["group"] == "g"

    broke = next(rec["dead_id"] for rec in records if "it broke" in rec["error"])
    moved = CliRunner().invoke(cli, ["stream", "requeue", url, "in", broke])
    assert moved.exit_code == 0 and "requeued 1 entry" in moved.output
    assert r.xlen("in:dead") == 4
    again = Pipeline.from_stream(url, "in", group="g", burst=True).map(lambda n: n)
    assert list(again) == [1]
    refused = CliRunner().invoke(cli, ["stream", "requeue", url, "in"])
    assert refused.exit_code != 0 and "--all" in refused.output


def test_a_consumer_restarted_under_its_name_finishes_what_it_held(url: str, r: Any) -> None:
    """Its own pending entries come first, each once, counted as delivered again: one
    delivered too often goes to the dead letters instead of running once more."""
    produce(url, list(range(20)))
    r.xgroup_create("in", "g", id="0")
    r.xreadgroup("g", "c1", {"in": ">"}, count=15)  # c1 held 15 when it died
    first = r.xrange("in", count=1)[0][0]
    r.xclaim("in", "g", "c1", 0, [first])  # and the first had been delivered twice already
    calls: list[int] = []

    def work(n: int) -> int:
        calls.append(n)
        return n

    p = Pipeline.from_stream(
        url, "in", group="g", consumer="c1", max_deliveries=2, count=4, burst=True
    ).map(work)
    assert sorted(p) == list(range(1, 20))
    assert sorted(calls) == list(range(1, 20))  # each once
    g = group(r, "in")
    assert g["pending"] == 0 and g["lag"] == 0
    dead = r.xrange("in:dead")
    assert len(dead) == 1 and b"delivered 3 times" in dead[0][1][b"error"]


def test_a_long_item_keeps_its_entry_by_renewing_it(
    url: str, r: Any, gate: threading.Event
) -> None:
    produce(url, [1])
    started = threading.Event()

    def slow(n: int) -> int:
        started.set()
        gate.wait(30)
        return n

    lease_s = 0.5
    p = Pipeline.from_stream(url, "in", group="g", lease_s=lease_s, burst=True).each(slow)
    with p.start():
        assert started.wait(10)
        # the item takes longer than three leases; a thief that takes what is idle for a
        # lease finds nothing, and the entry has been delivered once
        t0 = time.monotonic()
        eventually(lambda: time.monotonic() - t0 > 3 * lease_s, timeout_s=10)
        stolen = r.xautoclaim("in", "g", "thief", int(lease_s * 1000), count=10)
        assert stolen[1] == []
        row = r.xpending_range("in", "g", "-", "+", 1)[0]
        assert row["times_delivered"] == 1 and row["time_since_delivered"] < lease_s * 1000
        gate.set()
    assert group(r, "in")["pending"] == 0


def test_max_lag_holds_the_producer_until_the_group_catches_up(url: str, r: Any) -> None:
    r.xgroup_create("in", "g", id="0", mkstream=True)
    feed = Pipeline().to_stream(url, "in", max_lag=4, batch=2, within_s=0.01)
    with feed.start() as run:
        for i in range(10):
            run.put(i)
        eventually(lambda: r.xlen("in") == 4)
        assert run.stats().stage("to_stream").busy_workers == 1  # waiting, not done
        # a consumer takes and acknowledges two: two more may be written
        got = r.xreadgroup("g", "c", {"in": ">"}, count=2)
        r.xack("in", "g", *[entry_id for entry_id, _ in got[0][1]])
        eventually(lambda: r.xlen("in") == 6)
        got = r.xreadgroup("g", "c", {"in": ">"}, count=6)
        r.xack("in", "g", *[entry_id for entry_id, _ in got[0][1]])
        eventually(lambda: r.xlen("in") >= 8)
        drain = r.xreadgroup("g", "c", {"in": ">"}, count=10)
        r.xack("in", "g", *[entry_id for entry_id, _ in drain[0][1]])
        run.stop(drain=True, wait=False)
        eventually(lambda: r.xlen("in") == 10)
    assert values(r, "in") == list(range(10))


def test_bad_options_are_refused_where_they_are_given(url: str) -> None:
    with pytest.raises(ConfigurationError, match="nats"):
        Pipeline.from_stream("nats://127.0.0.1:4222", "in", group="g")
    with pytest.raises(ConfigurationError, match="url"):
        Pipeline.from_stream("localhost:6379", "in", group="g")
    with pytest.raises(ConfigurationError, match="max_deliveries"):
        Pipeline.from_stream(url, "in", group="g", max_deliveries=0)
    with pytest.raises(ConfigurationError, match="serializer"):
        Pipeline([1]).to_stream(url, "out", serializer="yaml")
    with pytest.raises(ConfigurationError, match="max_lag"):
        Pipeline([1]).to_stream(url, "out", max_lag=-1)
    secret = "redis://user:hunter2@127.0.0.1:1/0"
    assert "hunter2" not in repr(Pipeline.from_stream(secret, "in", group="g")._source)
    with pytest.raises(StageFailed, match="JSON"):
        Pipeline([object()]).to_stream(url, "out").run(timeout_s=30)


def _consumer(url: str, name: str, lease_s: float) -> subprocess.Popen[str]:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, str(HERE / "stream_consumer.py"), url, name, str(lease_s)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_consumer_killed_mid_run_loses_nothing(url: str, r: Any) -> None:
    """Two consumer processes share the group; one is killed with SIGKILL while it holds
    entries. The other takes them over after the lease: every entry comes out, and the only
    duplicates are of entries the dead one held unacknowledged."""
    n = 6000
    produce(url, list(range(n)))
    r.xgroup_create("in", "g", id="0")
    victim = _consumer(url, "victim", 1.0)
    survivor: subprocess.Popen[str] | None = None
    try:

        def holding(name: bytes) -> bool:
            return any(c["name"] == name and c["pending"] > 0 for c in r.xinfo_consumers("in", "g"))

        eventually(lambda: holding(b"victim") and r.xlen("out") > 0, timeout_s=30)
        survivor = _consumer(url, "survivor", 1.0)
        eventually(lambda: holding(b"survivor") and holding(b"victim"), timeout_s=30)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        held = next(c["pending"] for c in r.xinfo_consumers("in", "g") if c["name"] == b"victim")
        out, _ = survivor.communicate(timeout=90)
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
    assert survivor.returncode == 0
    counts = json.loads(out.strip().splitlines()[-1])
    written = values(r, "out")
    assert set(written) == {2 * i for i in range(n)}
    duplicates = len(written) - n
    assert 0 <= duplicates <= held
    assert counts["reclaimed"] == held
    g = group(r, "in")
    assert g["pending"] == 0 and g["lag"] == 0
