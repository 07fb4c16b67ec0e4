"""The behaviours of each worker kind, under each of its users.

A kind (thread, process, async, executor) keeps its promises whoever gives it the work: a
pipeline stage, a task queue's worker, a dispatcher's producer. Each test here runs one
behaviour for every (user, kind) pair that has it: every item's outcome once, a failing item
failing alone (``BaseException`` included), a late item stopped while the others go on, a
crashing process failing only its own item.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from conveyor import DeadLetter, Dispatcher, Failure, Pipeline, TaskQueue

# -- the work: module-level, so that worker processes find it -------------------------------------

FAIL, EXIT, LATE, CRASH = 3, 4, 5, 6


def work(x: int) -> int:
    if x == FAIL:
        raise ValueError(f"bad item {x}")
    if x == EXIT:
        raise SystemExit(x)
    if x == LATE:
        time.sleep(3600)  # stuck: only its time limit ends it (not a wait that orders work)
    if x == CRASH:
        os._exit(1)
    return x * 2


async def awork(x: int) -> int:
    if x == LATE:
        await asyncio.sleep(3600)
    await asyncio.sleep(0)
    return work(x)


def produce(topic: str, x: int) -> int:
    return work(x)


async def aproduce(topic: str, x: int) -> int:
    return await awork(x)


@dataclass
class Outcome:
    results: dict[int, Any] = field(default_factory=dict)
    #: item -> the failure's text (its error type is named in it)
    failures: dict[int, str] = field(default_factory=dict)


# -- the users ----------------------------------------------------------------------------------


def as_stage(kind: str, items: list[int], timeout_s: float | None) -> Outcome:
    dead: list[Failure] = []
    fn: Any = awork if kind == "async" else work
    with contextlib.ExitStack() as stack:
        options: dict[str, Any] = {}
        if kind == "executor":
            forkserver = multiprocessing.get_context("forkserver")
            options["executor"] = stack.enter_context(ProcessPoolExecutor(2, mp_context=forkserver))
        p = Pipeline(items, ordered=True).map(
            fn, kind=kind, workers=2, timeout_s=timeout_s, on_error=DeadLetter(dead), **options
        )
        outs = list(p)
    out = Outcome()
    good = [x for x in items if x not in {f.item for f in dead}]
    out.results = dict(zip(good, outs, strict=True))
    out.failures = {f.item: f"{type(f.error).__name__}: {f.error}" for f in dead}
    return out


def as_task(kind: str, items: list[int], timeout_s: float | None) -> Outcome:
    with TaskQueue(f"memory://kinds-{kind}-{os.getpid()}-{time.monotonic_ns()}") as q:
        if kind == "async":
            task = q.task(awork, name="w", retries=0, timeout_s=timeout_s)
        else:
            task = q.task(work, name="w", retries=0, timeout_s=timeout_s, executor=kind)
        jobs = {x: task.enqueue(x) for x in items}
        q.worker(burst=True, concurrency=2, poll_s=0.05, handle_signals=False).run()
        out = Outcome()
        for x, job in jobs.items():
            info = job.info()
            if info.state == "done":
                out.results[x] = job.result()
            else:
                assert info.state == "dead", info
                out.failures[x] = info.error or ""
        return out


def as_producer(kind: str, items: list[int], timeout_s: float | None) -> Outcome:
    assert timeout_s is None  # producers have deadlines, not time limits
    fn: Any = aproduce if kind == "async" else produce
    out = Outcome()
    with Dispatcher() as d:
        d.register_producer("t", fn, workers=2, maxsize=len(items) + 1)
        requests = {x: d.request("t", x, ttl_s=60) for x in items}
        for x, req in requests.items():
            assert req.wait(30)
            if req.failed:
                out.failures[x] = "failed"
            else:
                (out.results[x],) = req.results()
    return out


User = Callable[[str, list[int], "float | None"], Outcome]
USERS: dict[str, User] = {"stage": as_stage, "task": as_task, "producer": as_producer}
KINDS = {
    "stage": ["thread", "process", "async", "executor"],
    "task": ["thread", "process", "async"],
}
KINDS["producer"] = ["thread", "async"]
PAIRS = [(user, kind) for user, kinds in KINDS.items() for kind in kinds]


@pytest.mark.parametrize(("user", "kind"), PAIRS)
def test_every_item_has_its_outcome_once(user: str, kind: str) -> None:
    items = [x for x in range(300) if x not in (FAIL, EXIT, LATE, CRASH)]
    out = USERS[user](kind, items, None)
    assert out.results == {x: x * 2 for x in items} and out.failures == {}


@pytest.mark.parametrize(("user", "kind"), PAIRS)
def test_a_failing_item_fails_alone_base_exceptions_included(user: str, kind: str) -> None:
    items = [0, 1, 2, FAIL, EXIT, 7, 8]
    out = USERS[user](kind, items, None)
    assert out.results == {x: x * 2 for x in (0, 1, 2, 7, 8)}
    assert set(out.failures) == {FAIL, EXIT}
    if user != "producer":
        assert "ValueError" in out.failures[FAIL] and "SystemExit" in out.failures[EXIT]


@pytest.mark.timeout(60)
# an executor's late call is left to the executor (tests/test_executor.py)
@pytest.mark.parametrize(
    ("user", "kind"), [p for p in PAIRS if p[0] != "producer" and p[1] != "executor"]
)
def test_a_late_item_is_stopped_and_the_others_go_on(user: str, kind: str) -> None:
    items = [0, 1, LATE, 7, 8, 9]
    out = USERS[user](kind, items, 0.5)
    assert out.results == {x: x * 2 for x in (0, 1, 7, 8, 9)}
    assert set(out.failures) == {LATE}
    assert "timeout" in out.failures[LATE].lower()


@pytest.mark.parametrize(("user", "kind"), [("stage", "process"), ("task", "process")])
def test_a_process_that_dies_fails_only_its_own_item(user: str, kind: str) -> None:
    items = [0, 1, 2, CRASH, 7, 8, 9, 10, 11]
    out = USERS[user](kind, items, None)
    assert out.results == {x: x * 2 for x in items if x != CRASH}
    assert set(out.failures) == {CRASH}
