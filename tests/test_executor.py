"""Stages on a ``concurrent.futures.Executor``: the stage's bounds, order, keys, policies, time
limits and statistics hold, whoever runs the calls."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    DeadLetter,
    Failure,
    ItemTimeout,
    Pipeline,
    Skip,
    Stage,
)

from .conftest import eventually


class CountingExecutor(Executor):
    """A thread pool that remembers how many calls were submitted and not finished at most."""

    def __init__(self, threads: int = 16) -> None:
        self._pool = ThreadPoolExecutor(threads)
        self._lock = threading.Lock()
        self.unfinished = 0
        self.most = 0
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.unfinished += 1
            self.submitted += 1
            self.most = max(self.most, self.unfinished)
        fut = self._pool.submit(fn, *args, **kwargs)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, _fut: Future[Any]) -> None:
        with self._lock:
            self.unfinished -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


def test_no_more_calls_are_submitted_than_the_stage_has_workers() -> None:
    first = threading.Barrier(3, timeout=10)  # the first three calls meet: three at once

    def work(x: int) -> int:
        if x < 3:
            first.wait()
        return x * 2

    with CountingExecutor() as ex:
        out = list(Pipeline(range(500)).map(work, kind="executor", executor=ex, workers=3))
    assert sorted(out) == [x * 2 for x in range(500)]
    assert ex.most == 3 and ex.submitted == 500


def test_ordered_output_while_calls_end_out_of_order() -> None:
    ended: list[int] = []

    def work(x: int) -> int:
        if x == 0:  # the first item ends last
            eventually(lambda: len(ended) >= 20)
        ended.append(x)
        return x

    with ThreadPoolExecutor(8) as ex:
        p = Pipeline(range(40), ordered=True).map(work, kind="executor", executor=ex, workers=8)
        assert list(p) == list(range(40))
    assert ended[0] != 0


def test_items_of_one_key_run_one_at_a_time_in_order() -> None:
    seen: dict[int, list[int]] = defaultdict(list)
    running: set[int] = set()
    overlap: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            if x % 3 in running:
                overlap.append(x)
            running.add(x % 3)
            seen[x % 3].append(x)
        with lock:
            running.discard(x % 3)
        return x

    with ThreadPoolExecutor(8) as ex:
        p = Pipeline(range(300)).map(
            work, kind="executor", executor=ex, workers=6, key=lambda x: x % 3
        )
        assert sorted(p) == list(range(300))
    assert overlap == []
    assert all(v == sorted(v) and len(v) == 100 for v in seen.values())


def test_failures_go_to_the_stages_policy_base_exceptions_included() -> None:
    def work(x: int) -> int:
        if x == 3:
            raise ValueError("bad item")
        if x == 4:
            raise SystemExit(4)  # raised where the executor runs it: the item's failure
        return x

    dead: list[Failure] = []
    with ThreadPoolExecutor(4) as ex:
        run = (
            Pipeline(range(10))
            .map(work, kind="executor", executor=ex, workers=4, on_error=DeadLetter(dead))
            .start()
        )
        out = sorted(run)
        stats = run.stats().stage("work")
    assert out == [0, 1, 2, 5, 6, 7, 8, 9]
    assert {f.item: type(f.error) for f in dead} == {3: ValueError, 4: SystemExit}
    assert stats.kind == "executor" and stats.dead_lettered == 2 and stats.received == 10

    with ThreadPoolExecutor(2) as ex:
        p = Pipeline(range(10)).map(work, kind="executor", executor=ex, on_error=Skip())
        assert sorted(p) == [0, 1, 2, 5, 6, 7, 8, 9]


@pytest.mark.timeout(30)
def test_a_call_past_its_time_limit_is_cancelled_and_counted(gate: threading.Event) -> None:
    def work(x: int) -> int:
        if x == 2:
            gate.wait(20)  # stuck until the test ends: only the time limit ends its item
        return x

    dead: list[Failure] = []
    with ThreadPoolExecutor(4) as ex:
        run = (
            Pipeline(range(6))
            .map(
                work,
                kind="executor",
                executor=ex,
                workers=2,
                timeout_s=0.2,
                on_error=DeadLetter(dead),
            )
            .start()
        )
        assert sorted(run) == [0, 1, 3, 4, 5]
        assert [f.item for f in dead] == [2] and isinstance(dead[0].error, ItemTimeout)
        assert run.stats().stage("work").dead_lettered == 1
        gate.set()


def test_calls_not_yet_run_are_cancelled_when_the_run_is_cancelled(gate: threading.Event) -> None:
    started: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        gate.wait(20)
        return x

    with ThreadPoolExecutor(2) as ex:
        run = Pipeline(range(1000)).map(work, kind="executor", executor=ex, workers=2).start()
        eventually(lambda: len(started) == 2)
        run.cancel()
        gate.set()
        ex.shutdown(wait=True)
    assert len(started) <= 4  # the two under way, and at most the next ones as they ended


def test_what_an_executor_stage_cannot_run_is_refused_when_built() -> None:
    class Doubler(Stage[int, int]):
        def process(self, item: int) -> int:
            return item * 2

    async def coro(x: int) -> int:
        return x

    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(ConfigurationError, match="give Doubler as a function"):
            Pipeline(range(3)).map(Doubler, kind="executor", executor=ex)
        with pytest.raises(ConfigurationError, match="async def"):
            Pipeline(range(3)).map(coro, kind="executor", executor=ex)
    with pytest.raises(ConfigurationError, match="needs executor="):
        Pipeline(range(3)).map(abs, kind="executor")
    with pytest.raises(ConfigurationError, match="needs executor="):
        bad: Any = "threads"
        Pipeline(range(3)).map(abs, kind="executor", executor=bad)
    with pytest.raises(ConfigurationError, match="not kind='thread'"):
        Pipeline(range(3)).map(abs, executor=ThreadPoolExecutor(1))
    with pytest.raises(ConfigurationError, match="needs address="):
        Pipeline(range(3)).map(abs, kind="dask")
