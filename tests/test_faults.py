"""Tries to break the pipeline promises: nothing hangs, nothing accepted is lost, workers go."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from conveyor import Pipeline, Skip, Stage, StageFailed

from .conftest import Counting, eventually


def conveyor_threads() -> list[threading.Thread]:
    """conveyor's threads, but the control thread, which lives as long as the process."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("conveyor") and t.name != "conveyor:control"
    ]


def test_every_thread_leaves_after_a_failure() -> None:
    before = set(conveyor_threads())

    def boom(x: int) -> int:
        if x == 500:
            raise RuntimeError("boom")
        return x

    p = (
        Pipeline(range(100_000))
        .map(boom, workers=8)
        .map(lambda x: x, workers=8)
        .map(lambda x: x, workers=8)
    )
    with pytest.raises(StageFailed):
        p.run()
    eventually(lambda: set(conveyor_threads()) <= before)


def test_every_thread_and_the_loop_leave_after_a_normal_run() -> None:
    before = set(conveyor_threads())

    async def ainc(x: int) -> int:
        return x + 1

    out = list(Pipeline(range(1000)).map(ainc, kind="async", workers=50).map(str, workers=4))
    assert len(out) == 1000
    eventually(lambda: set(conveyor_threads()) <= before)


def test_async_failure_raises_and_tears_every_worker_down() -> None:
    torn = []

    class Fails(Stage[int, int]):
        async def setup(self) -> None:
            await asyncio.sleep(0)

        async def process(self, item: int) -> int:
            if item == 30:
                raise ValueError("thirty")
            await asyncio.sleep(0.001)
            return item

        async def teardown(self) -> None:
            torn.append(1)

    with pytest.raises(StageFailed) as info:
        Pipeline(range(1000)).map(Fails, kind="async", workers=10).run()
    assert info.value.item == 30 and info.value.stage == "Fails"
    eventually(lambda: len(torn) == 10)


def test_setup_failure_fails_the_run_naming_the_stage() -> None:
    class BadSetup(Stage[int, int]):
        def setup(self) -> None:
            raise ConnectionError("no database")

        def process(self, item: int) -> int:
            return item

    with pytest.raises(StageFailed) as info:
        Pipeline(range(10)).map(BadSetup, workers=3).run(timeout_s=5)
    assert info.value.stage == "BadSetup" and info.value.item is None
    assert isinstance(info.value.error, ConnectionError)


def test_a_failing_key_function_fails_the_run() -> None:
    with pytest.raises(StageFailed) as info:
        Pipeline([{"k": 1}, {}]).map(lambda x: x, key=lambda d: d["k"]).run(timeout_s=5)
    assert info.value.item == {}


def test_an_unhashable_key_fails_the_run() -> None:
    with pytest.raises(StageFailed) as info:
        Pipeline([[1]]).map(lambda x: x, key=lambda x: x).run(timeout_s=5)
    assert isinstance(info.value.error, TypeError)


def test_put_after_a_failure_raises_that_failure() -> None:
    run = Pipeline().map(lambda x: 1 / x).start()
    run.put(0)
    with pytest.raises(StageFailed):
        run.wait()
    with pytest.raises(StageFailed):
        run.put(1)


def test_order_survives_mixed_kinds_flat_map_and_batches() -> None:
    async def slow_odd(x: int) -> int:
        await asyncio.sleep(0.002 if x % 2 else 0)
        return x

    def twice(x: int) -> list[int]:
        return [x, x]

    p = (
        Pipeline(range(400), ordered=True)
        .map(slow_odd, kind="async", workers=16)
        .flat_map(twice, workers=4)
        .batch(7)
        .map(sum, workers=3)
    )
    expected_flat = [x for i in range(400) for x in (i, i)]
    expected = [sum(expected_flat[i : i + 7]) for i in range(0, len(expected_flat), 7)]
    assert list(p) == expected


def test_async_key_keeps_per_key_order() -> None:
    seen: dict[int, list[int]] = {}

    async def record(x: tuple[int, int]) -> None:
        key, n = x
        await asyncio.sleep(0.001 * ((n * 7) % 3))
        seen.setdefault(key, []).append(n)

    items = [(i % 4, i) for i in range(200)]
    Pipeline(items).each(record, kind="async", workers=16, key=lambda x: x[0]).run()
    for key, ns in seen.items():
        assert ns == sorted(ns), key
    assert sum(len(v) for v in seen.values()) == 200


def test_async_resize_grows_and_shrinks_with_teardown() -> None:
    torn = []
    started = []

    class Pair(Stage[int, int]):
        async def process(self, item: int) -> int:
            started.append(item)
            return item

        def teardown(self) -> None:
            torn.append(1)

    with Pipeline().map(Pair, kind="async", name="pair", workers=1).start() as run:
        run.stage("pair").resize(4)
        eventually(lambda: run.stage("pair").stats().workers == 4)
        for i in range(20):
            run.put(i)
        run.stage("pair").resize(2)
        eventually(lambda: run.stage("pair").stats().workers == 2)
        assert len(torn) == 2
    assert sorted(started) == list(range(20))
    assert len(torn) == 4


def test_slow_async_stage_holds_back_a_fast_thread_stage(gate: threading.Event) -> None:
    source = Counting(20_000)

    async def wait_for_gate(x: int) -> int:
        while not gate.is_set():
            await asyncio.sleep(0.001)
        return x

    p = Pipeline(source).map(lambda x: x, maxsize=8).map(wait_for_gate, kind="async", maxsize=8)
    with p.start() as run:
        eventually(lambda: run.stats().stages[1].queue_depth == 8)
        # two inboxes of 8, a unit of at most 8 in the thread worker, the async worker's item
        # and its queue of one, and the item the feeder holds
        assert source.taken <= 8 + 8 + 8 + 2 + 1
        gate.set()
    assert source.taken == 20_000


def test_stop_with_drain_on_a_source_finishes_what_was_accepted() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def record(x: int) -> None:
        with lock:
            done.append(x)

    run = Pipeline(iter(range(10**9))).each(record, workers=2, maxsize=16).start()
    eventually(lambda: len(done) > 100)
    run.stop(drain=True)
    stats = run.stats()
    # everything taken from the source went through: nothing accepted was dropped
    assert stats.state == "finished"
    assert len(done) == stats.stages[0].received == stats.items_in


def test_skip_keeps_every_other_item_under_load() -> None:
    def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError
        return x

    out = list(Pipeline(range(20_000)).map(odd_fails, workers=4, on_error=Skip()))
    assert sorted(out) == list(range(0, 20_000, 2))


def test_a_watchdog_that_fails_fails_the_run_instead_of_leaving_it_untimed(
    monkeypatch: pytest.MonkeyPatch, gate: threading.Event
) -> None:
    """No background loop may die unnoticed: a fault of ours in the thread kind's watchdog
    ends the run with that error, where time limits would otherwise stop without a word."""
    from conveyor._engine import threads

    def broken(*_: Any) -> float:
        raise RuntimeError("the watchdog's own bug")

    monkeypatch.setattr(threads, "timeout_of", broken)

    def stuck(x: int) -> int:
        gate.wait(30)
        return x

    with pytest.raises(RuntimeError, match="watchdog's own bug"):
        Pipeline(range(3)).map(stuck, timeout_s=0.05).run(timeout_s=20)
