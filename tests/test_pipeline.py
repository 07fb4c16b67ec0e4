"""Pipelines on thread and async workers: results, order, keys, backpressure, policies, limits."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    DeadLetter,
    Failure,
    ItemTimeout,
    ManualClock,
    Pipeline,
    PipelineClosed,
    PipelineError,
    Retry,
    RunTimeout,
    Skip,
    Stage,
    StageFailed,
)

from .conftest import Counting, eventually


def inc(x: int) -> int:
    return x + 1


async def ainc(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


KINDS = [("thread", inc), ("async", ainc)]


@pytest.mark.parametrize(("kind", "fn"), KINDS)
def test_map_over_many_workers_keeps_every_item(kind: str, fn: Any) -> None:
    out = list(Pipeline(range(5000)).map(fn, workers=8, kind=kind))
    assert sorted(out) == list(range(1, 5001))


@pytest.mark.parametrize(("kind", "fn"), KINDS)
def test_ordered_output_follows_input_order(kind: str, fn: Any) -> None:
    out = list(Pipeline(range(3000), ordered=True).map(fn, workers=8, kind=kind))
    assert out == list(range(1, 3001))


def test_filter_flat_map_each_and_batch() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def record(x: list[int]) -> None:
        with lock:
            seen.extend(x)

    def pairs(x: int) -> Any:
        yield x
        yield -x

    p = Pipeline(range(10)).filter(lambda x: x % 2 == 0).flat_map(pairs).batch(4).each(record)
    stats = p.run()
    assert sorted(seen) == sorted([0, 0, 2, -2, 4, -4, 6, -6, 8, -8])
    assert stats.state == "finished"
    assert [s.name for s in stats.stages] == ["<lambda>", "pairs", "batch", "record"]
    assert stats.stage("pairs").emitted == 10
    assert stats.stage("batch").emitted == 3


def test_batch_emits_a_partial_list_after_within_s() -> None:
    with Pipeline().batch(100, within_s=0.05).start() as run:
        run.put(1)
        run.put(2)
        first = next(iter(run))
        assert first == [1, 2]


def test_flat_map_of_a_large_generator_streams_in_bounded_pieces() -> None:
    def many(n: int) -> Any:
        yield from range(n)

    out = Pipeline([50_000]).flat_map(many, maxsize=16).map(inc, maxsize=16)
    assert sum(1 for _ in out) == 50_000


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_stage_instances_set_up_and_torn_down_once_per_worker(kind: str) -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    class Counter(Stage[int, int]):
        def setup(self) -> None:
            with lock:
                events.append(("setup", id(self)))
            self.n = 0

        def teardown(self) -> None:
            with lock:
                events.append(("teardown", id(self)))

    class SyncCounter(Counter):
        def process(self, item: int) -> int:
            self.n += 1
            return item

    class AsyncCounter(Counter):
        async def process(self, item: int) -> int:
            await asyncio.sleep(0)
            self.n += 1
            return item

    cls = SyncCounter if kind == "thread" else AsyncCounter
    out = list(Pipeline(range(200)).map(cls, workers=3, kind=kind))
    assert sorted(out) == list(range(200))
    setups = [i for e, i in events if e == "setup"]
    teardowns = [i for e, i in events if e == "teardown"]
    assert 1 <= len(setups) <= 3
    assert sorted(setups) == sorted(teardowns)
    assert len(set(setups)) == len(setups)


def test_key_keeps_per_key_order_and_runs_keys_in_parallel() -> None:
    a_started = threading.Event()
    b_done = threading.Event()
    order: dict[str, list[int]] = defaultdict(list)
    lock = threading.Lock()

    def work(item: tuple[str, int]) -> tuple[str, int]:
        key, n = item
        if item == ("a", 0):
            a_started.set()
            # only finishes if key "b" can run while "a" is busy
            assert b_done.wait(5)
        with lock:
            order[key].append(n)
        if key == "b" and n == 9:
            b_done.set()
        return item

    items = [("a", i) for i in range(10)] + [("b", i) for i in range(10)]
    out = list(Pipeline(items).map(work, workers=4, key=lambda it: it[0]))
    assert len(out) == 20
    assert order["a"] == list(range(10))
    assert order["b"] == list(range(10))


def test_full_buffers_stop_the_source(gate: threading.Event) -> None:
    source = Counting(20_000)
    p = Pipeline(source).map(inc, maxsize=4).map(lambda x: gate.wait(), maxsize=4)
    with p.start() as run:
        eventually(lambda: run.stats().stage("<lambda>").queue_depth == 4)
        snapshot = source.taken
        # nothing downstream moves, so the source cannot run ahead: two buffers of 4, what the
        # first worker holds (at most its inbox's size), the second worker's item, and the one
        # the feeder holds
        assert snapshot <= 4 + 4 + 4 + 1 + 1
        gate.set()
    assert source.taken == 20_000


def test_ordered_window_stops_intake_while_the_oldest_item_is_slow(
    gate: threading.Event,
) -> None:
    source = Counting(10_000)

    def slow_first(x: int) -> int:
        if x == 0:
            gate.wait()
        return x

    p = Pipeline(source, ordered=True).map(slow_first, workers=4, maxsize=16)
    with p.start() as run:
        eventually(lambda: run.stats().stages[0].received == 16)
        assert run.stats().stages[0].received == 16
        assert source.taken <= 16 + 16 + 1
        gate.set()
        assert list(run) == list(range(10_000))


def test_raise_stops_every_worker_and_reports_the_item() -> None:
    torn_down = threading.Event()

    class Boom(Stage[int, int]):
        def process(self, item: int) -> int:
            if item == 7:
                raise ValueError("bad item")
            return item

        def teardown(self) -> None:
            torn_down.set()

    with pytest.raises(StageFailed) as info:
        Pipeline(range(100)).map(Boom, name="boom").map(inc).run()
    err = info.value
    assert (err.stage, err.item, err.attempt) == ("boom", 7, 1)
    assert isinstance(err.error, ValueError) and err.__cause__ is err.error
    assert "ValueError: bad item" in err.traceback
    assert "stage 'boom' failed on item 7" in str(err)
    assert torn_down.wait(5)


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_skip_and_dead_letter_settle_failures(kind: str) -> None:
    def bad(x: int) -> int:
        if x % 10 == 0:
            raise KeyError(x)
        return x

    async def abad(x: int) -> int:
        return bad(x)

    fn = bad if kind == "thread" else abad
    dead: list[Failure] = []
    out = list(Pipeline(range(100)).map(fn, kind=kind, workers=3, on_error=DeadLetter(dead)))
    assert len(out) == 90
    assert sorted(f.item for f in dead) == list(range(0, 100, 10))
    assert all(f.stage == fn.__name__ and isinstance(f.error, KeyError) for f in dead)

    p = Pipeline(range(100)).map(fn, kind=kind, on_error=Skip())
    with p.start() as run:
        assert len(list(run)) == 90
        stats = run.stats().stages[0]
    assert (stats.failed, stats.skipped, stats.received, stats.finished) == (10, 10, 100, 100)


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_retry_runs_an_item_again_until_it_succeeds(kind: str) -> None:
    tries: dict[int, int] = defaultdict(int)

    def flaky(x: int) -> int:
        tries[x] += 1
        if tries[x] < 3:
            raise ConnectionError
        return x

    async def aflaky(x: int) -> int:
        return flaky(x)

    fn: Any = flaky if kind == "thread" else aflaky
    p = Pipeline(range(20)).map(
        fn, kind=kind, on_error=Retry(attempts=3, backoff_s=0.001, on=(ConnectionError,))
    )
    with p.start() as run:
        assert sorted(run) == list(range(20))
        assert run.stats().stages[0].retried == 40


def test_retry_gives_up_after_its_attempts() -> None:
    def always(x: int) -> int:
        raise OSError("down")

    with pytest.raises(StageFailed) as info:
        Pipeline([1]).map(always, on_error=Retry(attempts=2, backoff_s=0)).run()
    assert info.value.attempt == 2


def test_dead_letter_sink_that_fails_fails_the_run() -> None:
    def sink(failure: Failure) -> None:
        raise RuntimeError("sink down")

    with pytest.raises(StageFailed) as info:
        Pipeline([1]).map(lambda x: 1 / 0, on_error=DeadLetter(sink)).run()
    assert isinstance(info.value.error, RuntimeError)


def test_thread_item_timeout_abandons_the_thread_and_goes_on(gate: threading.Event) -> None:
    def stuck_on_three(x: int) -> int:
        if x == 3:
            gate.wait()
        return x

    dead: list[Failure] = []
    p = Pipeline(range(10)).map(stuck_on_three, workers=2, timeout_s=0.1, on_error=DeadLetter(dead))
    assert sorted(p) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [f.item for f in dead] == [3]
    assert isinstance(dead[0].error, ItemTimeout)


def test_thread_item_timeout_retried_on_a_fresh_thread(gate: threading.Event) -> None:
    calls: dict[int, int] = defaultdict(int)

    def first_try_hangs(x: int) -> int:
        calls[x] += 1
        if x == 1 and calls[x] == 1:
            gate.wait()
        return x

    p = Pipeline(range(4), ordered=True).map(
        first_try_hangs, timeout_s=0.1, on_error=Retry(attempts=2, backoff_s=0)
    )
    assert list(p) == [0, 1, 2, 3]
    assert calls[1] == 2


@pytest.mark.parametrize("kind", ["thread", "process", "async"])
def test_timed_stages_of_every_kind_pass_every_item_once(kind: str) -> None:
    p = Pipeline(range(20_000)).map(_identity_for(kind), kind=kind, timeout_s=5)
    with p.start() as run:
        assert sorted(run) == list(range(20_000))
        assert run.stats().stages[0].finished == 20_000


def _ident(x: int) -> int:
    return x


async def _aident(x: int) -> int:
    return x


def _identity_for(kind: str) -> Any:
    return _aident if kind == "async" else _ident


def test_a_late_item_in_the_middle_of_a_unit_is_settled_and_the_rest_go_on(
    gate: threading.Event,
) -> None:
    """Fast items share a unit; one of them hangs: it alone times out, the items after it in
    its unit run on the replacement thread, and every other output comes out once."""

    def stuck_on(x: int) -> int:
        if x == 700:
            gate.wait()
        return x

    dead: list[Failure] = []
    p = Pipeline(range(5000), ordered=True).map(stuck_on, timeout_s=0.3, on_error=DeadLetter(dead))
    assert list(p) == [x for x in range(5000) if x != 700]
    assert [f.item for f in dead] == [700] and isinstance(dead[0].error, ItemTimeout)


def test_a_cancelled_error_raised_by_an_async_stage_fails_its_item() -> None:
    async def cancels(x: int) -> int:
        if x == 2:
            raise asyncio.CancelledError
        return x

    dead: list[Failure] = []
    p = Pipeline(range(5), ordered=True).map(cancels, kind="async", on_error=DeadLetter(dead))
    assert list(p) == [0, 1, 3, 4]
    assert isinstance(dead[0].error, asyncio.CancelledError)
    with pytest.raises(StageFailed):
        Pipeline(range(5)).map(cancels, kind="async").run(timeout_s=30)


def test_async_item_timeout_cancels_the_coroutine() -> None:
    cancelled = threading.Event()

    async def slow(x: int) -> int:
        if x == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return x

    out = list(Pipeline(range(3)).map(slow, kind="async", timeout_s=0.05, on_error=Skip()))
    assert sorted(out) == [0, 2]
    assert cancelled.is_set()


def test_run_timeout_stops_everything(gate: threading.Event) -> None:
    with pytest.raises(RunTimeout):
        Pipeline(range(10)).map(lambda x: gate.wait()).run(timeout_s=0.1)


def test_rate_is_shared_by_all_workers_of_a_stage() -> None:
    clock = ManualClock()
    Pipeline(range(50), clock=clock).map(inc, workers=4, rate=10).run()
    # 50 items at 10/s: the 50th slot starts 4.9 s after the first, on the injected clock
    assert clock.now() == pytest.approx(4.9, abs=0.11)


def test_put_fed_pipeline_is_closed_by_stop_drain() -> None:
    results: list[int] = []
    p = Pipeline().map(inc, workers=2).each(results.append)
    run = p.start()
    for i in range(100):
        run.put(i)
    run.stop(drain=True)
    assert sorted(results) == list(range(1, 101))
    assert run.state == "finished"
    with pytest.raises(PipelineClosed):
        run.put(1)


def test_put_is_only_for_pipelines_without_a_source() -> None:
    with Pipeline([1]).map(inc).start() as run, pytest.raises(PipelineError):
        run.put(2)


def test_stop_without_drain_stops_at_once(gate: threading.Event) -> None:
    run = Pipeline(range(1000)).map(lambda x: gate.wait()).start()
    eventually(lambda: run.stats().stages[0].busy_workers == 1)
    run.stop(drain=False)
    assert run.state == "stopped"


def test_resize_grows_at_once_and_shrinks_through_teardown() -> None:
    barrier = threading.Barrier(3, timeout=5)
    torn = []

    class Meet(Stage[int, int]):
        def process(self, item: int) -> int:
            if item < 3:
                barrier.wait()  # passes only with three workers at once
            return item

        def teardown(self) -> None:
            torn.append(1)

    with Pipeline().map(Meet, name="meet").start() as run:
        run.stage("meet").resize(3)
        for i in range(3):
            run.put(i)
        assert sorted(next(iter(run)) for _ in range(3)) == [0, 1, 2]
        run.stage("meet").resize(1)
        eventually(lambda: run.stage("meet").stats().workers == 1)
        for i in range(3, 10):
            run.put(i)
    assert len(torn) == 3


def test_resize_checks_its_argument() -> None:
    with Pipeline().map(inc, name="m").start() as run:
        with pytest.raises(ConfigurationError):
            run.stage("m").resize(0)
        with pytest.raises(KeyError):
            run.stage("nope")


def test_a_failing_source_fails_the_run() -> None:
    def source() -> Any:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(StageFailed) as info:
        Pipeline(source()).map(inc).run()
    assert info.value.stage == "source"


def test_stats_report_latency_and_throughput() -> None:
    stats = Pipeline(range(1000)).map(inc, workers=2).run()
    stage = stats.stages[0]
    assert stage.received == stage.emitted == stage.finished == 1000
    assert stage.latency_p50_s is not None and stage.latency_p99_s is not None
    assert stage.latency_p50_s <= stage.latency_p99_s
    assert stats.items_in == 1000 and stats.throughput > 0


def test_progress_callable_sees_the_run() -> None:
    seen: list[int] = []
    Pipeline(range(100)).map(inc).run(progress=lambda s: seen.append(s.stages[0].finished))
    assert seen and seen[-1] == 100


def test_progress_bar_draws(capsys: pytest.CaptureFixture[str]) -> None:
    Pipeline(range(100)).map(inc).run(progress=True)
    assert "100/100" in capsys.readouterr().err


def test_async_iteration_runs_async_stages_on_the_callers_loop() -> None:
    loops: set[int] = set()

    async def where(x: int) -> int:
        loops.add(id(asyncio.get_running_loop()))
        return x

    async def main() -> list[int]:
        me = id(asyncio.get_running_loop())
        out = [x async for x in Pipeline(range(100)).map(where, kind="async", workers=10)]
        assert loops == {me}
        stats = await Pipeline(range(10)).map(where, kind="async").arun()
        assert stats.stages[0].finished == 10
        return out

    assert sorted(asyncio.run(main())) == list(range(100))


def test_async_source() -> None:
    async def numbers() -> Any:
        for i in range(50):
            yield i

    assert sorted(Pipeline(numbers()).map(inc)) == list(range(1, 51))


def test_breaking_out_of_iteration_stops_the_run(gate: threading.Event) -> None:
    p = Pipeline(range(10_000)).map(inc, workers=2)
    it = iter(p)
    assert next(it) in range(1, 10_001)
    it.close()  # what a `break` does


def test_pipelines_are_reusable_and_extending_does_not_change_the_original() -> None:
    base = Pipeline([1, 2, 3]).map(inc)
    longer = base.map(inc)
    assert sorted(base) == [2, 3, 4]
    assert sorted(longer) == [3, 4, 5]
    assert "map" in repr(longer)
