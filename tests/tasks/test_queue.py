"""TaskQueue and Worker in one process, on every backend."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import (
    BackendUnavailable,
    CancelTask,
    ConfigurationError,
    JobNotFound,
    ManualClock,
    RetryTask,
    TaskFailed,
    TaskQueue,
)

from .conftest import queue_url


def drain(q: TaskQueue, **options: Any) -> None:
    q.worker(burst=True, poll_s=0.05, **options).run()


def test_async_sync_and_process_tasks_run_and_return(q: TaskQueue) -> None:
    @q.task
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    @q.task
    def mul(a: int, b: int) -> int:
        return a * b

    jobs = [add.enqueue(i, 1) for i in range(20)] + [mul.enqueue(i, 2) for i in range(20)]
    drain(q, concurrency=4)
    assert [j.result(timeout_s=5) for j in jobs] == [i + 1 for i in range(20)] + [
        i * 2 for i in range(20)
    ]
    assert jobs[0].status() == "done"
    assert q.stats().done == 40


def test_async_code_awaits_results_while_a_worker_runs_beside_it(q: TaskQueue) -> None:
    """The async API: an event loop enqueues and awaits results (``aresult``) while a
    worker runs the jobs, without blocking the loop."""

    @q.task
    async def double(x: int) -> int:
        return 2 * x

    worker = q.worker(poll_s=0.05, handle_signals=False)
    thread = threading.Thread(target=worker.run)
    thread.start()

    async def main() -> list[int]:
        jobs = [double.enqueue(i) for i in range(5)]
        ticks = 0

        async def tick() -> None:  # the loop keeps running while results are awaited
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.ensure_future(tick())
        got = await asyncio.gather(*(j.aresult(timeout_s=10) for j in jobs))
        ticker.cancel()
        assert ticks > 0
        return list(got)

    try:
        assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    finally:
        worker.stop(now=True)
        thread.join(10)


def test_process_executor(q: TaskQueue) -> None:
    task = q.task(_square, executor="process", name="square")
    job = task.enqueue(7)
    drain(q, concurrency=2)
    assert job.result(timeout_s=5) == 49


def _square(x: int) -> int:
    return x * x


def test_json_payloads_are_checked_at_enqueue_naming_the_argument(q: TaskQueue) -> None:
    @q.task
    def f(a: Any, b: Any = None) -> None: ...

    with pytest.raises(ConfigurationError, match=r"argument .b. of task .*set.*JSON"):
        f.enqueue(1, b={1, 2})
    with pytest.raises(ConfigurationError, match="argument 0"):
        f.enqueue(object())
    with pytest.raises(ConfigurationError, match="unknown enqueue option"):
        f.enqueue(1, _delay=3)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="missing a required argument"):
        f.enqueue()  # type: ignore[call-overload]


def test_pickle_payloads_when_asked(tmp_path: Path) -> None:
    with TaskQueue(f"sqlite:///{tmp_path / 'p.db'}", serializer="pickle") as q:

        @q.task
        def size(s: set[int]) -> frozenset[int]:
            return frozenset(s)

        job = size.enqueue({1, 2})
        drain(q)
        assert job.result() == frozenset({1, 2})


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis", "postgres"])
def test_msgpack_payloads_keep_bytes_and_non_string_keys(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with TaskQueue(queue_url(backend, request, tmp_path), serializer="msgpack") as q:

        @q.task
        def echo(blob: bytes, table: dict[int, str], pair: tuple[int, int]) -> Any:
            return [blob, table, pair]

        job = echo.enqueue(b"\x00\xff", {1: "a", 2: "b"}, (3, 4))
        drain(q)
        assert job.result(timeout_s=5) == [b"\x00\xff", {1: "a", 2: "b"}, [3, 4]]
        with pytest.raises(ConfigurationError, match=r"argument 0 .*set.*MessagePack"):
            echo.enqueue({1}, {}, (0, 0))  # type: ignore[call-overload]
        with pytest.raises(ConfigurationError, match=r"argument 0 .*MessagePack"):
            echo.enqueue(2**70, {}, (0, 0))  # type: ignore[call-overload]


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_keys_that_would_not_come_back_are_refused_in_arguments_and_results(
    serializer: str,
) -> None:
    q = TaskQueue(f"memory://keys-{serializer}", serializer=serializer)

    @q.task(name="give")
    def give(table: dict[Any, str]) -> int:
        return len(table)

    @q.task(name="back", retries=3)
    def back(kind: str) -> Any:
        return {(1, 2): "pair"} if kind == "tuple" else {1: "one", "1": "uno"}

    with pytest.raises(ConfigurationError, match=r"argument 0 .*key of type tuple"):
        give.enqueue({(1, 2): "x"})
    pair = back.enqueue("tuple")
    mixed = back.enqueue("mixed")
    drain(q)
    # a result that would not come back as returned is not stored: dead at once, no retries
    assert pair.status() == "dead" and pair.info().attempts == 1
    assert "cannot be stored" in (pair.info().error or "")
    if serializer == "json":
        assert mixed.status() == "dead" and "key of type int" in (mixed.info().error or "")
    else:
        assert mixed.result(timeout_s=5) == {1: "one", "1": "uno"}  # MessagePack keeps both


def test_msgpack_without_its_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(ConfigurationError, match=r"conveyor\[msgpack\]"):
        TaskQueue(serializer="msgpack")


def test_a_payload_over_max_payload_bytes_is_refused_with_its_size(q: TaskQueue) -> None:
    @q.task
    def take(text: str) -> int:
        return len(text)

    with pytest.raises(
        ConfigurationError, match=r"2,097,177 bytes as json.*max_payload_bytes=1,048,576"
    ):
        take.enqueue("x" * (2 << 20))
    with pytest.raises(ConfigurationError, match="max_payload_bytes"):
        q.enqueue_many(take, [(("a",), {}), (("x" * (2 << 20),), {})])
    assert q.stats().queued == 0  # nothing of a refused batch is stored
    ok = take.enqueue("x" * ((1 << 20) - 100))
    drain(q)
    assert ok.result(timeout_s=5) == (1 << 20) - 100


def test_max_payload_bytes_can_be_raised_or_lifted(tmp_path: Path) -> None:
    with TaskQueue(f"sqlite:///{tmp_path / 'big.db'}", max_payload_bytes=None) as q:
        job = q.enqueue("anything", "x" * (3 << 20))
        assert len(job.info().payload) > 3 << 20
    small = TaskQueue(max_payload_bytes=10)
    with pytest.raises(ConfigurationError, match="bytes as json"):
        small.enqueue("anything", "twelve chars")
    for bad in (0, -1, 1.5, True, "1MB"):
        with pytest.raises(ConfigurationError, match="max_payload_bytes"):
            TaskQueue(max_payload_bytes=bad)  # type: ignore[arg-type]


def test_ids_dedup_finish_and_unfinish(q: TaskQueue) -> None:
    runs: list[str] = []

    @q.task
    def note(x: str) -> None:
        runs.append(x)

    first = note.enqueue("a", _id="job-1")
    again = note.enqueue("b", _id="job-1")
    assert first.added and not again.added
    drain(q)
    assert runs == ["a"]
    assert not note.enqueue("c", _id="job-1").added  # done: still a no-op
    assert q.unfinish("job-1")
    assert note.enqueue("d", _id="job-1").added
    q.finish("job-2")  # chihuo's task_finish: never enqueued, now refused
    assert not note.enqueue("e", _id="job-2").added
    drain(q)
    assert runs == ["a", "d"]


def test_priorities_and_delays(q: TaskQueue) -> None:
    order: list[str] = []

    @q.task
    def note(x: str) -> None:
        order.append(x)

    start = time.time()
    note.enqueue("late", _delay_s=0.3)
    note.enqueue("low")
    note.enqueue("high", _priority=5)
    drain(q, concurrency=1)
    assert order == ["high", "low", "late"]
    assert time.time() - start >= 0.3


def test_keyed_jobs_run_in_order_and_keys_in_parallel(q: TaskQueue) -> None:
    seen: dict[str, list[int]] = {}
    b_ran = threading.Event()
    lock = threading.Lock()

    @q.task
    def work(key: str, n: int) -> None:
        if (key, n) == ("a", 0):
            assert b_ran.wait(5), "key b did not run while key a was busy"
        with lock:
            seen.setdefault(key, []).append(n)
        if key == "b":
            b_ran.set()

    for n in range(5):
        work.enqueue("a", n, _key="a")
    work.enqueue("b", 0, _key="b")
    drain(q, concurrency=4)
    assert seen == {"a": [0, 1, 2, 3, 4], "b": [0]}


def test_retries_back_off_then_succeed_or_die(q: TaskQueue) -> None:
    tries: dict[str, int] = {}

    @q.task(retries=2, backoff_s=0.01)
    def flaky(name: str, fail_times: int) -> str:
        tries[name] = tries.get(name, 0) + 1
        if tries[name] <= fail_times:
            raise ConnectionError(f"try {tries[name]}")
        return name

    ok = flaky.enqueue("ok", 2)
    bad = flaky.enqueue("bad", 5)
    drain(q)
    assert ok.result() == "ok" and tries["ok"] == 3
    with pytest.raises(TaskFailed, match="ConnectionError: try 3") as info:
        bad.result()
    assert tries["bad"] == 3 and "Traceback" in info.value.error


def test_retry_task_and_cancel_task_signals(q: TaskQueue) -> None:
    calls: list[str] = []

    @q.task(retries=3)
    def steer(what: str) -> str:
        calls.append(what)
        if what == "again" and calls.count("again") == 1:
            raise RetryTask(delay_s=0.01)
        if what == "stop":
            raise CancelTask("not needed any more")
        return what

    again = steer.enqueue("again")
    stop = steer.enqueue("stop")
    drain(q)
    assert again.result() == "again" and calls.count("again") == 2
    with pytest.raises(TaskFailed, match="cancelled by the task"):
        stop.result()
    assert calls.count("stop") == 1


def test_changed_arguments_go_dead_and_an_unknown_task_waits_for_a_worker_that_knows_it(
    q: TaskQueue,
) -> None:
    @q.task(name="known")
    def known(a: int) -> int:
        return a

    ghost = q.enqueue("nobody.knows", 1)
    changed = q.enqueue("known", 1, 2)  # by name: the signature is checked when it runs
    drain(q)
    with pytest.raises(TaskFailed, match="no longer match"):
        changed.result()
    # handed back for a worker that knows it (a rolling deploy), the attempt not counted; a
    # burst worker leaves it beyond its horizon, so it does not wait for it
    info = ghost.info()
    assert info.state == "queued" and info.attempts == 0 and info.run_at > q.now() + 5


def test_an_unknown_task_runs_on_a_worker_that_knows_it_and_is_dead_after_unknown_task_s(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked
    ghost = q.enqueue("newer.task", 2)
    doomed = q.enqueue("newer.task", 3)
    q.worker(burst=True, poll_s=0.05, handle_signals=False).run()
    assert ghost.status() == "queued" and doomed.status() == "queued"
    # a newer worker, on the same storage, knows the task: it runs the job once it is due
    newer = TaskQueue(q.url, clock=clock)
    try:

        @newer.task(name="newer.task")
        def double(x: int) -> int:
            return 2 * x

        newer.cancel(doomed.id)  # kept for the old worker below
        clock.advance(30)
        newer.worker(burst=True, poll_s=0.05, handle_signals=False).run()
        assert ghost.result(timeout_s=5) == 4
        assert ghost.info().attempts == 1  # the hand-back was not counted
    finally:
        newer.close()
    q.requeue(doomed.id)
    clock.advance(3600)  # past unknown_task_s, which counts from the enqueue
    q.worker(burst=True, poll_s=0.05, handle_signals=False, unknown_task_s=3600).run()
    with pytest.raises(TaskFailed, match=r"no worker that knows task 'newer\.task' took it"):
        doomed.result(timeout_s=5)


@pytest.mark.parametrize("kind", ["async", "thread"])
def test_a_task_past_its_timeout_fails(q: TaskQueue, kind: str) -> None:
    release = threading.Event()
    if kind == "async":

        @q.task(timeout_s=0.05, retries=1, backoff_s=0.01, name="slow")
        async def slow() -> None:
            await asyncio.sleep(60)

    else:

        @q.task(timeout_s=0.05, retries=1, backoff_s=0.01, name="slow")
        def slow() -> None:
            release.wait(10)

    job = q.enqueue("slow")
    try:
        drain(q)
        with pytest.raises(TaskFailed, match=r"timeout_s=0\.05"):
            job.result()
    finally:
        release.set()


def test_stop_returns_running_jobs_to_the_queue_at_once(q: TaskQueue) -> None:
    # the queue's time stands still: no lease can lapse, so only a release frees the job
    q.clock = ManualClock(q.now())
    started = threading.Event()
    runs: list[int] = []

    @q.task(name="hold")
    async def hold(n: int) -> int:
        runs.append(n)
        started.set()
        await asyncio.sleep(60)
        return n

    job = q.enqueue("hold", 1)

    async def main() -> None:
        worker = q.worker(shutdown_grace_s=0.05, poll_s=0.05, lease_s=60)
        running = asyncio.ensure_future(worker.arun())
        await asyncio.to_thread(started.wait, 5)
        worker.stop()
        await asyncio.wait_for(running, 5)

    asyncio.run(main())
    info = job.info()
    assert info.state == "queued" and info.attempts == 0  # released, not counted

    # another worker (here with a quick version of the task) takes it at once: its 60 s lease
    # would never lapse on this clock
    del q.tasks["hold"]
    q.task(lambda n: n, name="hold")
    drain(q)
    assert job.result(timeout_s=5) == 1


def test_several_queues_on_one_event_loop(tmp_path: Path) -> None:
    qa = TaskQueue(f"memory://{tmp_path.name}-a", name="a")
    qb = TaskQueue(f"sqlite:///{tmp_path / 'b.db'}", name="b")
    seen: list[str] = []

    @qa.task
    async def ta(x: int) -> None:
        seen.append(f"a{x}")

    @qb.task
    async def tb(x: int) -> None:
        seen.append(f"b{x}")

    for i in range(3):
        ta.enqueue(i)
        tb.enqueue(i)

    async def main() -> None:
        await asyncio.gather(
            qa.worker(burst=True, poll_s=0.05).arun(), qb.worker(burst=True, poll_s=0.05).arun()
        )

    asyncio.run(main())
    qb.close()
    assert sorted(seen) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_result_waits_for_the_job(q: TaskQueue) -> None:
    gate = threading.Event()

    @q.task
    def later() -> str:
        gate.wait(5)
        return "done"

    job = later.enqueue()
    worker = threading.Thread(target=drain, args=(q,))
    worker.start()
    with pytest.raises(TimeoutError):
        job.result(timeout_s=0.05)
    gate.set()
    assert job.result(timeout_s=5) == "done"
    worker.join(5)


def test_bad_worker_and_task_options(q: TaskQueue) -> None:
    with pytest.raises(ConfigurationError):
        q.worker(concurrency=0)
    with pytest.raises(ConfigurationError):
        q.task(lambda: None, retries=-1)
    with pytest.raises(ConfigurationError):
        q.task(lambda: None, executor="gpu")
    with pytest.raises(ConfigurationError, match="unknown queue URL"):
        TaskQueue("ftp://x")


def test_a_second_signal_stops_at_once_and_hands_jobs_back(q: TaskQueue) -> None:
    import os
    import signal

    started = threading.Event()

    @q.task(name="stubborn")
    async def stubborn() -> None:
        started.set()
        await asyncio.sleep(3600)

    job = q.enqueue("stubborn")

    async def main() -> float:
        worker = q.worker(shutdown_grace_s=3600, poll_s=0.05)
        running = asyncio.ensure_future(worker.arun())
        await asyncio.to_thread(started.wait, 5)
        os.kill(os.getpid(), signal.SIGTERM)  # first: finish running jobs (for up to an hour)
        while not worker.stopping:  # the handler runs on the loop: yield until it has
            await asyncio.sleep(0)
        assert not running.done()
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # second: stop now
        await asyncio.wait_for(running, 5)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0
    assert job.status() == "queued" and job.info().attempts == 0


def test_results_are_kept_for_keep_result_s(q: TaskQueue) -> None:
    clock = ManualClock(1000.0)
    q.clock = clock

    @q.task(name="brief", keep_result_s=10)
    def brief() -> str:
        return "r"

    job = q.enqueue("brief", _id="same")
    drain(q)
    assert job.result() == "r"
    clock.advance(5)
    assert not q.enqueue("brief", _id="same").added  # its result is still kept
    clock.advance(10)
    assert q.enqueue("brief", _id="same").added  # kept 10 s, then the id is free again


def test_a_result_kept_half_a_second_is_unknown_once_it_expired_swept_or_not(
    clocked: tuple[TaskQueue, ManualClock],
) -> None:
    q, clock = clocked

    @q.task(name="brief", keep_result_s=0.5)
    def brief() -> str:
        return "r"

    job = q.enqueue("brief", _id="short")
    drain(q)
    assert job.status() == "done" and job.result() == "r"
    clock.advance(0.5)
    # not swept yet: the stored job is still there, but it is expired to every reader
    assert q.backend.get("short") is not None
    assert job.status() == "unknown" and q.get("short") is None
    with pytest.raises(JobNotFound):
        job.result(timeout_s=0)
    assert q.job("short").task == ""
    # a worker of a queue that keeps results briefly sweeps as often (here: as it starts)
    q.worker(burst=True, handle_signals=False).run()
    assert q.backend.get("short") is None


@pytest.mark.timeout(30)
def test_a_burst_worker_returns_when_its_last_job_ends_not_after_a_poll(q: TaskQueue) -> None:
    """A job that ends while the worker is about to wait ends that wait: with poll_s an hour,
    any round that missed the end would hang here until the timeout."""

    @q.task
    def one(x: int) -> int:
        return x

    @q.task
    async def two(x: int) -> int:
        return x

    for i in range(30):
        jobs = [one.enqueue(i), two.enqueue(i), one.enqueue(i + 1)]
        q.worker(burst=True, poll_s=3600, concurrency=4, handle_signals=False).run()
        assert [j.status() for j in jobs] == ["done"] * 3


def run_noops(q: TaskQueue, n: int) -> tuple[list[int], list[Any]]:
    """``n`` jobs that return their argument, run by a burst worker of 4 slots."""
    runs: list[int] = []

    @q.task
    async def noop(i: int) -> int:
        runs.append(i)
        return i

    handles = q.enqueue_many(noop, [((i,), {}) for i in range(n)])
    drain(q, concurrency=4, handle_signals=False)
    return runs, handles


def test_outcomes_ride_on_the_next_claim_and_no_job_runs_twice(q: TaskQueue) -> None:
    """Jobs that end make room for more: their outcomes are written by the claim that fills
    the room, in one call; with the outcome of every fifth call's writes refused once (kept
    and written again by the acknowledgement loop), still every job runs once and ends done."""
    combined: list[int] = []
    real = q.backend.complete_then_claim

    def complete_then_claim(done: Any, *args: Any) -> Any:
        combined.append(len(done))
        if len(combined) % 5 == 0:
            refused = BackendUnavailable("the outcomes were refused")
            return refused, q.backend.claim(*args)
        return real(done, *args)

    q.backend.complete_then_claim = complete_then_claim  # type: ignore[method-assign,assignment]

    runs, handles = run_noops(q, 300)
    assert sorted(runs) == list(range(300))
    assert len(combined) >= 5 and sum(combined) > 0
    assert [h.result(timeout_s=5) for h in handles] == list(range(300))


def test_outcomes_are_kept_when_the_combined_call_raises(q: TaskQueue) -> None:
    """A backend whose combined call raises instead of returning its errors loses no outcome:
    they go back to the acknowledgement loop, and every job ends done, once."""
    raised: list[int] = []
    tried = threading.Event()
    real = q.backend.complete_then_claim

    def complete_then_claim(done: Any, *args: Any) -> Any:
        if not raised:
            raised.append(len(done))
            tried.set()
            raise BackendUnavailable("the call broke")
        return real(done, *args)

    real_many = q.backend.complete_many

    def complete_many(outcomes: Any, now: float) -> Any:
        # the acknowledgement loop's first write waits for the combined call: the outcomes
        # that end meanwhile wait for the next claim, which has room, for 6 jobs leave at
        # least 2 of the 4 slots free once the held outcomes' jobs are set aside
        tried.wait(timeout=30)
        return real_many(outcomes, now)

    q.backend.complete_then_claim = complete_then_claim  # type: ignore[method-assign,assignment]
    q.backend.complete_many = complete_many  # type: ignore[method-assign,assignment]

    runs, handles = run_noops(q, 6)
    assert raised and sorted(runs) == list(range(6))
    assert [h.result(timeout_s=5) for h in handles] == list(range(6))
