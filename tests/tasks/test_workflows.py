"""Workflows: chain, group and chord on every backend: results flow, a failed step fails the
whole with its error, nothing waits forever, and a worker killed between steps loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    JobAborted,
    Signature,
    TaskFailed,
    TaskQueue,
    chain,
    chord,
    group,
)

from ..conftest import eventually


def drain(q: TaskQueue, **options: Any) -> None:
    q.worker(burst=True, poll_s=0.05, handle_signals=False, concurrency=4, **options).run()


def arithmetic(q: TaskQueue) -> dict[str, Any]:
    @q.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @q.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    @q.task(name="total")
    def total(values: list[int], offset: int = 0) -> int:
        return sum(values) + offset

    @q.task(name="boom", retries=0)
    def boom(x: Any) -> None:
        raise ValueError(f"cannot take {x!r}")

    return {"add": add, "double": double, "total": total, "boom": boom}


def test_a_chain_passes_each_result_on(q: TaskQueue) -> None:
    t = arithmetic(q)
    flow = q.enqueue_workflow(chain(t["add"].s(1, 2), t["double"].s(), t["add"].s(10)))
    assert flow.added and len(flow.ids) == 3
    assert q.stats().waiting == 2 and q.stats().queued == 1
    drain(q)
    assert flow.result(timeout_s=5) == 16  # (1 + 2) * 2 + 10
    assert flow.status() == "done"
    assert [j.status() for j in flow.jobs()] == ["done"] * 3


def test_a_group_gives_every_result_in_order_and_a_chord_hands_them_on(q: TaskQueue) -> None:
    t = arithmetic(q)
    together = group(t["double"].s(i) for i in range(5))
    handle = together.enqueue()
    summed = chord([t["add"].s(i, i) for i in range(4)], t["total"].s(offset=100)).enqueue()
    drain(q)
    assert handle.result(timeout_s=5) == [0, 2, 4, 6, 8]
    assert summed.result(timeout_s=5) == 100 + sum(2 * i for i in range(4))


def test_nested_workflows_flow_as_written(q: TaskQueue) -> None:
    t = arithmetic(q)
    flow = chain(
        t["add"].s(1, 1),  # 2
        group(t["double"].s(), t["add"].s(5)),  # [4, 7]
        t["total"].s(),  # 11
        group(t["double"].s(), chain(t["add"].s(1), t["double"].s())),  # [22, 24]
    ).enqueue()
    drain(q)
    assert flow.result(timeout_s=5) == [22, 24]


def test_a_failed_step_fails_the_workflow_with_its_error_and_the_rest_never_runs(
    q: TaskQueue,
) -> None:
    t = arithmetic(q)
    ran: list[int] = []

    @q.task(name="after")
    def after(x: Any) -> None:
        ran.append(x)

    flow = chain(t["add"].s(1, 2), t["boom"].s(), after.s(), after.s()).enqueue()
    drain(q)
    with pytest.raises(TaskFailed) as failed:
        flow.result(timeout_s=5)
    assert failed.value.job_id == flow.ids[1] and failed.value.task == "boom"
    assert "ValueError: cannot take 3" in failed.value.error
    assert ran == []
    states = [j.status() for j in flow.jobs()]
    assert states == ["done", "dead", "dead", "dead"] and flow.status() == "dead"
    assert q.stats().waiting == 0  # nothing waits for what will never come
    assert "cannot take 3" in (flow.jobs()[3].info().error or "")


def test_a_failed_member_fails_its_chord(q: TaskQueue) -> None:
    t = arithmetic(q)
    flow = chord([t["add"].s(1, 1), t["boom"].s(7), t["add"].s(2, 2)], t["total"].s()).enqueue()
    drain(q)
    with pytest.raises(TaskFailed, match="cannot take 7"):
        flow.result(timeout_s=5)
    assert flow.jobs()[-1].status() == "dead"


def test_cancelling_a_step_fails_what_follows(q: TaskQueue) -> None:
    t = arithmetic(q)
    flow = chain(t["add"].s(1, 2), t["double"].s(), t["double"].s()).enqueue()
    assert q.cancel(flow.ids[1], reason="changed my mind")
    drain(q)
    with pytest.raises(TaskFailed, match="changed my mind"):
        flow.result(timeout_s=5)
    assert [j.status() for j in flow.jobs()] == ["done", "dead", "dead"]


def test_a_workflow_id_makes_enqueueing_it_again_a_no_op(q: TaskQueue) -> None:
    t = arithmetic(q)
    first = chain(t["add"].s(1, 2), t["double"].s()).enqueue(_id="order-7")
    again = chain(t["add"].s(1, 2), t["double"].s()).enqueue(_id="order-7")
    assert first.ids == ["order-7.0", "order-7.1"] and first.added and not again.added
    drain(q)
    assert again.result(timeout_s=5) == 6 and q.stats().done == 2


def test_workflows_are_checked_when_made(q: TaskQueue) -> None:
    t = arithmetic(q)
    other = TaskQueue("memory://another-queue-of-workflows")

    @other.task(name="elsewhere")
    def elsewhere(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="at least one"):
        chain()
    with pytest.raises(ConfigurationError, match="at least one"):
        group([])
    with pytest.raises(ConfigurationError, match="not 3"):
        chain(t["add"].s(1, 2), 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="one queue"):
        chain(t["add"].s(1, 2), elsewhere.s()).enqueue()
    with pytest.raises(ConfigurationError, match="_delay_s does not apply"):
        chain(t["add"].s(1, 2, _delay_s=5)).enqueue()
    with pytest.raises(ConfigurationError, match="missing a required argument"):
        chain(t["add"].s(1, 2), t["add"].s()).enqueue()  # add(previous, ?) lacks y
    with pytest.raises(ConfigurationError, match=r"q\.enqueue_workflow"):
        chain(Signature("add", (1, 2))).enqueue()
    assert q.stats().queued == 0 and q.stats().waiting == 0
    by_name = q.enqueue_workflow(chain(Signature("add", (1, 2)), Signature("double")))
    drain(q)
    assert by_name.result(timeout_s=5) == 6


def test_a_step_queued_again_by_hand_without_its_inputs_is_dead_with_the_reason(
    q: TaskQueue,
) -> None:
    t = arithmetic(q)
    flow = chain(t["boom"].s(1), t["double"].s()).enqueue()
    drain(q)
    assert q.requeue(flow.ids[1])  # dead because boom died: now queued, with nothing to take
    drain(q)
    error = flow.jobs()[1].info().error or ""
    assert "waited for 1 job(s) and has the results of 0" in error


# -- a worker killed between steps ------------------------------------------------------------

APP = """
import os, sys, time
from conveyor import TaskQueue

q = TaskQueue(os.environ["FLOW_URL"])


@q.task(name="first")
def first(x):
    return x + 1


@q.task(name="second")
def second(x):
    once = os.environ["FLOW_MARK"] + ".once"
    first_run = not os.path.exists(once)
    open(once, "w").close()  # before the mark the test waits for: a rerun never hangs
    with open(os.environ["FLOW_MARK"], "a") as f:
        f.write(f"second {x} {os.getpid()}\\n")
    if os.environ.get("FLOW_HANG") and first_run:
        time.sleep(600)  # killed here, mid-step
    return x * 10


@q.task(name="third")
def third(x):
    return x + 3
"""


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_a_worker_killed_mid_workflow_loses_and_doubles_no_step(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from .conftest import queue_url

    url = queue_url(backend, request, tmp_path)
    (tmp_path / "flowapp.py").write_text(APP)
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "FLOW_URL": url,
        "FLOW_MARK": str(mark),
        "FLOW_HANG": "1",
        "PYTHONPATH": str(tmp_path),
    }
    with TaskQueue(url) as q:
        flow = q.enqueue_workflow(
            chain(Signature("first", (1,)), Signature("second"), Signature("third"))
        )

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                # a lease of ten minutes: only finding the killed worker dead (its pid is
                # gone) can run its step again within the test's minute
                [sys.executable, "-m", "conveyor", "worker", "flowapp:q", "--lease-s", "600"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        victim = start()
        try:
            eventually(lambda: mark.exists() and "second" in mark.read_text(), 30)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            survivor = start()
            try:
                assert flow.result(timeout_s=60) == 23  # (1 + 1) * 10 + 3
            finally:
                survivor.send_signal(signal.SIGTERM)
                survivor.wait(30)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        runs = mark.read_text().splitlines()
        assert len(runs) == 2 and {r.split()[1] for r in runs} == {"2"}
        assert [j.info().state for j in flow.jobs()] == ["done", "done", "done"]
        assert flow.jobs()[1].info().lost == 1


def test_an_aborted_step_is_named_as_the_one_that_ended_the_workflow(q: TaskQueue) -> None:
    t = arithmetic(q)
    flow = chain(t["add"].s(1, 2), t["double"].s(), t["double"].s()).enqueue()
    assert q.abort(flow.ids[1], by="alice") == "aborted"
    drain(q)
    with pytest.raises(JobAborted) as aborted:
        flow.result(timeout_s=5)
    assert aborted.value.job_id == flow.ids[1] and aborted.value.by == "alice"


def test_a_workflow_enqueued_again_after_it_failed_adds_nothing_and_waits_for_nothing(
    q: TaskQueue,
) -> None:
    """Its first step is done and kept, a later one dead: enqueued again under the same id,
    it adds no step (a step waiting for one that is done already would wait for ever)."""
    t = arithmetic(q)
    flow = chain(t["add"].s(1, 2), t["boom"].s(), t["double"].s()).enqueue(_id="wf-again")
    drain(q)
    again = chain(t["add"].s(1, 2), t["boom"].s(), t["double"].s()).enqueue(_id="wf-again")
    assert not again.added
    assert [j.status() for j in again.jobs()] == ["done", "dead", "dead"]
    assert q.stats().waiting == 0
    with pytest.raises(TaskFailed, match="cannot take 3"):
        again.result(timeout_s=5)
    assert flow.ids == again.ids
    fresh = chain(t["add"].s(1, 2), t["double"].s()).enqueue(_id="wf-fresh")
    drain(q)
    assert fresh.result(timeout_s=5) == 6
