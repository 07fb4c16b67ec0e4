"""The dispatcher: fan-out, deadlines, bounded buffers, and registration under traffic."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import weakref
from collections import Counter
from typing import Any

import pytest

from conveyor import ClosedResourceError, ConfigurationError, Dispatcher, ManualClock

from .conftest import eventually


def test_every_producer_answers_and_every_subscriber_hears() -> None:
    heard: dict[str, list[Any]] = {"a": [], "b": []}
    with Dispatcher() as d:
        d.register_producer("price", lambda topic, sym: (topic, sym, 1), workers=2)
        d.register_producer("price", lambda topic, sym: (topic, sym, 2))
        d.subscribe("price", lambda topic, r: heard["a"].append(r))
        d.subscribe("price", lambda topic, r: heard["b"].append(r))
        req = d.request("price", "EURUSD", ttl_s=5)
        assert req.wait(5)
        assert sorted(req.results()) == [("price", "EURUSD", 1), ("price", "EURUSD", 2)]
        assert (req.answered, req.expired, req.dropped, req.failed) == (2, 0, 0, 0)
        eventually(lambda: len(heard["a"]) == 2 and len(heard["b"]) == 2)
        assert sorted(heard["a"]) == sorted(heard["b"]) == sorted(req.results())
        stats = d.stats()
        assert (stats.requests, stats.answered, stats.delivered) == (1, 2, 4)
        assert d.topics() == {"price": (2, 2)}


def test_a_request_with_no_producer_is_done_at_once() -> None:
    with Dispatcher() as d:
        req = d.request("nobody", ttl_s=10)
        assert req.done and req.results(timeout_s=0) == []


def test_a_call_not_started_before_the_deadline_is_skipped(gate: threading.Event) -> None:
    started: list[int] = []

    def slow(topic: str, n: int) -> int:
        started.append(n)
        gate.wait(10)
        return n

    with Dispatcher() as d:
        d.register_producer("t", slow, workers=1)
        first = d.request("t", 1, ttl_s=30)
        eventually(lambda: started == [1])
        second = d.request("t", 2, ttl_s=0.05)  # waits behind the first
        assert second.results() == []  # returns at its deadline
        gate.set()
        assert first.wait(5) and second.wait(5)
        assert (second.expired, second.answered) == (1, 0)
        assert started == [1]  # the skipped call never ran
        assert d.stats().expired == 1


def test_a_late_answer_is_dropped_and_no_listener_sees_it(gate: threading.Event) -> None:
    heard: list[Any] = []
    with Dispatcher() as d:
        d.register_producer("t", lambda topic: gate.wait(10) and "late")
        d.subscribe("t", lambda topic, r: heard.append(r))
        req = d.request("t", ttl_s=0.05)
        assert req.results() == []
        gate.set()
        assert req.wait(5)
        assert (req.dropped, req.answered) == (1, 0)
        # a later answer is delivered: the listener thread is alive, and still heard nothing late
        d.register_producer("u", lambda topic: "on time")
        d.subscribe("u", lambda topic, r: heard.append(r))
        assert d.request("u").wait(5)
        eventually(lambda: heard == ["on time"])
        assert d.stats().dropped == 1


def test_a_slow_or_failing_listener_neither_stalls_nor_breaks_the_others(
    gate: threading.Event,
) -> None:
    fast: list[int] = []
    slow: list[int] = []

    def stuck(topic: str, r: int) -> None:
        gate.wait(10)
        slow.append(r)

    def broken(topic: str, r: int) -> None:
        raise RuntimeError("listener bug")

    with Dispatcher() as d:
        d.register_producer("t", lambda topic, n: n)
        d.subscribe("t", stuck, maxsize=2)
        d.subscribe("t", broken)
        d.subscribe("t", lambda topic, r: fast.append(r))
        requests = [d.request("t", i) for i in range(20)]
        eventually(lambda: fast == list(range(20)))
        assert all(r.wait(5) for r in requests)
        eventually(lambda: d.stats().listener_failed == 20)
        assert d.stats().overflowed >= 20 - 2 - 1  # 2 buffered, 1 in the stuck call
        gate.set()
        eventually(lambda: len(slow) == 20 - d.stats().overflowed)


def test_async_producers_and_listeners() -> None:
    heard: list[Any] = []

    async def produce(topic: str, x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def listen(topic: str, r: int) -> None:
        await asyncio.sleep(0)
        heard.append(r)

    with Dispatcher() as d:
        d.register_producer("t", produce, workers=4)
        d.subscribe("t", listen)
        reqs = [d.request("t", i) for i in range(50)]
        assert all(r.wait(5) for r in reqs)
        eventually(lambda: sorted(heard) == [i * 2 for i in range(50)])


def test_a_failing_producer_loses_only_its_answer() -> None:
    def bad(topic: str) -> None:
        raise ValueError("producer bug")

    with Dispatcher() as d:
        d.register_producer("t", bad)
        d.register_producer("t", lambda topic: "ok")
        req = d.request("t")
        assert req.wait(5)
        assert (req.failed, req.answered, req.results()) == (1, 1, ["ok"])


def test_registration_and_removal_from_many_threads_under_traffic() -> None:
    """Listeners come and go while requests fly: none hears an answer twice, and none is called
    after its close() returned."""
    stop = threading.Event()
    problems: list[str] = []
    counts: list[Counter[Any]] = []

    with Dispatcher(maxsize=100_000) as d:
        d.register_producer("t", lambda topic, n: n, workers=2)

        def churn(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                heard: Counter[Any] = Counter()
                closed = threading.Event()

                def listen(topic: str, r: Any, heard: Any = heard, closed: Any = closed) -> None:
                    if closed.is_set():
                        problems.append("called after close")
                    heard[r] += 1

                sub = d.subscribe("t", listen)
                # each churning thread's extra producer answers its own way: two producers
                # giving equal answers would look like one answer heard twice
                extra = d.register_producer("t", lambda topic, n, s=seed: ("extra", s, n))
                for _ in range(rng.randint(1, 50)):
                    d.request("t", rng.random())
                d.deregister_producer("t", extra)
                sub.close()
                closed.set()
                counts.append(heard)

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                d.request("t", ("main", i))
                i += 1

        threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
        threads.append(threading.Thread(target=traffic))
        for t in threads:
            t.start()
        eventually(lambda: len(counts) >= 200, timeout_s=30)
        stop.set()
        for t in threads:
            t.join(10)
    assert problems == []
    assert all(max(c.values(), default=1) == 1 for c in counts)


def test_stop_closes_it_and_options_are_checked() -> None:
    d = Dispatcher()
    with d:
        pass
    with pytest.raises(ClosedResourceError):
        d.request("t")
    with pytest.raises(ClosedResourceError):
        d.subscribe("t", print)
    with pytest.raises(ConfigurationError):
        Dispatcher(ttl_s=0)
    with Dispatcher() as d2, pytest.raises(ConfigurationError):
        d2.register_producer("t", print, workers=0)


def test_a_full_producer_queue_holds_requests_back_only_until_their_deadline(
    gate: threading.Event,
) -> None:
    """Bounded memory: a producer's queue never grows past maxsize; a request that finds it
    full waits for room, and at its deadline counts the call as expired instead of hanging."""
    started: list[int] = []

    def slow(topic: str, n: int) -> int:
        started.append(n)
        gate.wait(10)
        return n

    with Dispatcher() as d:
        producer = d.register_producer("t", slow, workers=1, maxsize=2)
        first = d.request("t", 0, ttl_s=30)
        eventually(lambda: started == [0])  # the worker is busy with it
        queued = [d.request("t", i, ttl_s=30) for i in (1, 2)]  # fill the queue
        assert producer.pending() == 2
        late = d.request("t", 3, ttl_s=0.05)  # returns at its deadline, not when room comes
        assert late.done and late.expired == 1
        assert producer.pending() == 2
        gate.set()
        assert all(r.wait(5) for r in [first, *queued])
        assert started == [0, 1, 2]
        assert d.stats().expired == 1


def test_an_async_producers_queue_never_grows_past_maxsize(gate: threading.Event) -> None:
    async def slow(topic: str, n: int) -> int:
        while not gate.is_set():
            await asyncio.sleep(0.001)
        return n

    with Dispatcher() as d:
        producer = d.register_producer("t", slow, maxsize=10)
        requests = [d.request("t", i, ttl_s=0.05) for i in range(30)]
        assert producer.pending() <= 10
        gate.set()
        assert all(r.wait(5) for r in requests)
        stats = d.stats()
        assert stats.expired >= 19 and stats.answered + stats.expired + stats.dropped == 30


@pytest.mark.parametrize("raised", [asyncio.CancelledError, SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_producer_raising_a_base_exception_fails_that_call_only(
    raised: type[BaseException], kind: str
) -> None:
    def bad(topic: str, n: int) -> int:
        if n == 1:
            raise raised
        return n

    async def abad(topic: str, n: int) -> int:
        return bad(topic, n)

    with Dispatcher() as d:
        d.register_producer("t", bad if kind == "thread" else abad)
        reqs = [d.request("t", n, ttl_s=10) for n in range(4)]
        assert all(r.wait(5) for r in reqs)
        assert [r.failed for r in reqs] == [0, 1, 0, 0]
        assert [r.results() for r in reqs] == [[0], [], [2], [3]]


def test_requests_racing_a_deregistration_all_settle() -> None:
    stop = threading.Event()
    requests: list[Any] = []

    with Dispatcher(maxsize=100_000) as d:

        def churn() -> None:
            while not stop.is_set():
                p = d.register_producer("t", lambda topic, n: n)
                d.deregister_producer("t", p)

        t = threading.Thread(target=churn)
        t.start()
        try:
            for i in range(5000):
                requests.append(d.request("t", i, ttl_s=5))
        finally:
            stop.set()
            t.join(10)
        assert all(r.wait(5) for r in requests)


def test_stop_returns_even_when_a_listener_never_does(gate: threading.Event) -> None:
    entered = threading.Event()

    def stuck(topic: str, result: Any) -> None:
        entered.set()
        gate.wait()

    d = Dispatcher()
    d.register_producer("t", lambda topic: 1)
    d.subscribe("t", stuck)
    d.request("t")
    assert entered.wait(5)
    d.stop(timeout_s=0.2)  # returns: the stuck listener thread is left behind


def test_removed_producers_and_subscriptions_are_not_kept() -> None:
    refs: list[weakref.ref[Any]] = []
    with Dispatcher() as d:
        d.register_producer("t", lambda topic: 1)
        for _ in range(300):
            heard = threading.Event()

            def listen(topic: str, r: Any, heard: threading.Event = heard) -> None:
                heard.set()

            sub = d.subscribe("t", listen)
            producer = d.register_producer("u", lambda topic: 2)
            refs += [weakref.ref(sub), weakref.ref(producer)]
            d.request("t")
            assert heard.wait(5)
            sub.close()
            d.deregister_producer("u", producer)
        del sub, producer

        def kept() -> int:
            gc.collect()
            return sum(r() is not None for r in refs)

        eventually(lambda: kept() <= 4, timeout_s=10)
        assert d.stats().delivered == 300


def test_deadlines_follow_the_dispatchers_clock(gate: threading.Event) -> None:
    clock = ManualClock()
    started: list[int] = []

    def slow(topic: str, n: int) -> int:
        started.append(n)
        gate.wait(10)
        return n

    with Dispatcher(clock=clock) as d:
        d.register_producer("t", slow)
        first = d.request("t", 1, ttl_s=10)
        eventually(lambda: started == [1])
        second = d.request("t", 2, ttl_s=1)
        clock.advance(20)  # both deadlines pass while the first call runs
        gate.set()
        assert first.wait(5) and second.wait(5)
        assert (first.dropped, second.expired) == (1, 1)  # late answer dropped; call skipped
        assert started == [1]


def test_one_listener_on_several_topics_hears_in_arrival_order_one_at_a_time() -> None:
    heard: list[tuple[str, int]] = []
    inside = threading.Lock()
    overlaps: list[int] = []

    def listen(topic: str, n: int) -> None:
        if not inside.acquire(blocking=False):
            overlaps.append(n)
            return
        try:
            heard.append((topic, n))
        finally:
            inside.release()

    with Dispatcher() as d:
        d.register_producer("a", lambda topic, n: n)
        d.register_producer("b", lambda topic, n: n)
        d.subscribe(["a", "b"], listen)
        for i in range(200):
            d.request("a" if i % 2 else "b", i, ttl_s=10).wait(5)
        eventually(lambda: len(heard) == 200)
    assert heard == [("a" if i % 2 else "b", i) for i in range(200)] and overlaps == []


def test_a_waiter_never_sleeps_through_the_last_answer() -> None:
    """Settling takes no lock: a waiter that arrives as the last producer answers still wakes,
    and the statistics already count what it waited for."""
    with Dispatcher() as d:
        for _ in range(3):
            d.register_producer("t", lambda topic, n: n)
        for i in range(2000):
            req = d.request("t", i)
            assert req.wait(5), req
            assert req.results() == [i, i, i] and req.answered == 3
        assert d.stats().answered == 6000


def test_a_failing_listener_is_logged_with_its_topic(caplog: pytest.LogCaptureFixture) -> None:
    def listener(topic: str, answer: Any) -> None:
        raise ValueError(answer)

    with Dispatcher() as d:
        d.register_producer("weather", lambda topic, n: n)
        sub = d.subscribe("weather", listener)
        assert d.request("weather", 1).wait(5)
        eventually(lambda: d.stats().listener_failed == 1)
        sub.close()
    assert "listener" in caplog.text and "of topic 'weather' failed" in caplog.text
