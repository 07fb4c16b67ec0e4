"""Stages on a Dask cluster: a ``distributed.LocalCluster`` of worker processes on loopback,
started by these tests. A Dask worker killed mid-run costs nothing: every item comes out once."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import BrokenResourceError, DeadLetter, Failure, ItemTimeout, Pipeline, StageFailed
from conveyor._engine import executor
from conveyor._engine.executor import DaskPool

from .conftest import eventually
from .redis_server import server_missing

distributed: Any
try:
    import distributed
except ImportError:  # pragma: no cover - the test set installs it
    distributed = None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    if distributed is None:
        server_missing(
            "DASK TESTS NOT RUN: distributed is not installed (pip install 'conveyor[dask]')"
        )
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as c:
        yield c


@pytest.fixture
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as c:
        yield c


def runs_threads() -> set[threading.Thread]:
    """The threads of conveyor's runs now: not Dask's pools, which live as long as the process,
    nor the process's one control thread (started on first use)."""
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("conveyor") and t.name != "conveyor:control"
    }


def clients_of(client: Any) -> int:
    """How many clients the scheduler knows now (this one included)."""
    return int(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients)))


@pytest.mark.timeout(120)
def test_a_dask_stage_runs_on_the_cluster_and_closes_its_client(cluster: Any, client: Any) -> None:
    def where(x: int) -> tuple[int, int]:
        return x * x, os.getpid()

    before = clients_of(client)
    run = (
        Pipeline(range(200), ordered=True)
        .map(where, kind="dask", address=cluster.scheduler_address, workers=8)
        .start()
    )
    out = list(run)
    assert [sq for sq, _pid in out] == [x * x for x in range(200)]
    worker_pids = set(client.run(os.getpid).values())
    assert {pid for _sq, pid in out} <= worker_pids and os.getpid() not in worker_pids
    stats = run.stats().stage("where")
    assert stats.kind == "dask" and stats.received == 200 and stats.emitted == 200
    assert clients_of(client) == before  # closed before the run's end, not left to the collector
    gc.collect()  # a client closed too late would warn here of a close never awaited


@pytest.mark.timeout(120)
def test_a_cancelled_dask_run_ends_and_closes_its_client(cluster: Any, client: Any) -> None:
    def slow(x: int) -> int:
        time.sleep(0.05)
        return x

    before = clients_of(client)
    run = Pipeline(range(10_000)).map(
        slow, kind="dask", address=cluster.scheduler_address, workers=4
    )
    started = run.start()
    first = next(iter(started))
    started.cancel()
    assert isinstance(first, int)
    eventually(lambda: clients_of(client) == before, timeout_s=30)
    gc.collect()


@pytest.mark.timeout(120)
def test_equal_items_are_separate_calls(cluster: Any, tmp_path: Path) -> None:
    def mark(x: int) -> int:
        with open(tmp_path / f"{time.monotonic_ns()}-{os.getpid()}", "w"):
            pass
        return x

    out = list(Pipeline([5] * 20).map(mark, kind="dask", address=cluster.scheduler_address))
    assert out == [5] * 20
    assert len(list(tmp_path.iterdir())) == 20


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["dask", "executor"])
def test_a_worker_killed_mid_run_loses_no_item(
    cluster: Any, client: Any, tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / "victim"

    def work(x: int) -> int:
        if x == 7:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # run again after its worker was killed: this time it ends
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(60)  # held here until the test kills this worker
        return x * 3

    options: dict[str, Any] = (
        {"address": cluster.scheduler_address}
        if kind == "dask"
        else {"executor": client.get_executor(pure=False)}
    )
    run = Pipeline(range(100)).map(work, kind=kind, workers=8, **options).start()
    eventually(lambda: marker.exists() and marker.read_text() != "", timeout_s=60)
    victim = int(marker.read_text())
    assert victim in client.run(os.getpid).values()
    os.kill(victim, signal.SIGKILL)
    out = list(run)
    assert sorted(out) == [x * 3 for x in range(100)]  # each item once, none lost
    stats = run.stats().stage("work")
    assert stats.failed == 0 and stats.emitted == 100
    assert victim not in client.run(os.getpid).values()


@pytest.mark.timeout(120)
def test_failures_and_time_limits_on_the_cluster_go_to_the_stages_policy(
    cluster: Any, tmp_path: Path
) -> None:
    """Each item has one outcome. A time limit counts from the call's submission: a call queued
    on the cluster behind the stuck one may run out of time too, and says so."""
    release = tmp_path / "release"

    def work(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        if x == 5:  # stuck until the test ends: only its time limit ends its item
            deadline = time.monotonic() + 30
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return x

    dead: list[Failure] = []
    run = (
        Pipeline(range(10))
        .map(
            work,
            kind="dask",
            address=cluster.scheduler_address,
            workers=2,
            timeout_s=2,
            on_error=DeadLetter(dead),
        )
        .start()
    )
    try:
        out = sorted(run)
    finally:
        release.touch()  # the stuck call ends and frees its worker for the next tests
    errors = {f.item: type(f.error) for f in dead}
    assert sorted([*out, *errors]) == list(range(10))  # every item once: an output or a failure
    assert errors[3] is KeyError and errors[5] is ItemTimeout
    assert set(errors.values()) <= {KeyError, ItemTimeout} and {0, 1, 2} <= set(out)
    assert run.stats().stage("work").dead_lettered == len(dead)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["here", "there"])
def test_an_item_that_cannot_be_sent_fails_alone(cluster: Any, where: str) -> None:
    """An item that does not pickle here, or does not unpickle on the cluster (the scheduler
    then refuses its whole batch), fails alone; the rest of its batch comes out."""
    bad = threading.Lock() if where == "here" else Unloadable()
    items: list[Any] = [*range(20), bad, *range(20, 40)]  # in one batch
    dead: list[Failure] = []
    out = list(
        Pipeline(items).map(
            lambda x: x,
            kind="dask",
            address=cluster.scheduler_address,
            workers=40,
            on_error=DeadLetter(dead),
        )
    )
    assert sorted(out) == list(range(40))
    assert [f.item for f in dead] == [items[20]]


@pytest.mark.timeout(120)
def test_a_dask_stage_under_async_for(cluster: Any) -> None:
    async def main() -> list[int]:
        p = Pipeline(range(30), ordered=True).map(
            lambda x: x + 1, kind="dask", address=cluster.scheduler_address, workers=4
        )
        return [x async for x in p]

    assert asyncio.run(main()) == list(range(1, 31))


@pytest.mark.timeout(120)
def test_an_unreachable_scheduler_fails_the_stage_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DaskPool, "connect_timeout_s", 1.0)
    before = runs_threads()
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    p = Pipeline(range(100)).map(abs, workers=2).map(abs, kind="dask", address=address)
    with pytest.raises(StageFailed) as info:
        list(p)
    assert isinstance(info.value.error, BrokenResourceError) and address in str(info.value)
    eventually(lambda: runs_threads() <= before, timeout_s=10)


@pytest.mark.timeout(180)
def test_a_lost_scheduler_fails_every_item_still_to_come_and_the_run_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DaskPool, "connect_timeout_s", 2.0)  # how long the client retries
    lost = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )

    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    skipped: list[Failure] = []
    run = (
        Pipeline(range(400))
        .map(slow, kind="dask", address=lost.scheduler_address, on_error=DeadLetter(skipped))
        .start()
    )
    out: list[int] = []
    it = iter(run)
    out.append(next(it))
    lost.close()  # the scheduler and its worker go away mid-run
    out.extend(it)  # ends: nothing waits for a scheduler that is gone
    assert sorted(out + [f.item for f in skipped]) == list(range(400))
    assert skipped and all(
        isinstance(f.error, BrokenResourceError | asyncio.CancelledError | OSError)
        or "cancel" in type(f.error).__name__.lower()
        for f in skipped
    ), {type(f.error) for f in skipped}


class Unloadable:
    """Pickles here, and cannot be unpickled where it is sent."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def _refuse() -> Any:
    raise ValueError("this object cannot be unpickled")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An address that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"
    # Dask drops the socket of a handshake it gave up on without closing it: collected here,
    # in the test that caused it, rather than in whichever test the collector runs next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.timeout(60)
def test_a_scheduler_that_never_answers_fails_the_stage_in_time(
    monkeypatch: pytest.MonkeyPatch, silent_server: str
) -> None:
    monkeypatch.setattr(DaskPool, "connect_timeout_s", 1.0)
    p = Pipeline(range(10)).map(abs, kind="dask", address=silent_server)
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        list(p)
    assert isinstance(info.value.error, BrokenResourceError) and time.monotonic() - t0 < 20


@pytest.mark.timeout(60)
def test_a_run_cancelled_while_its_client_connects_ends_at_once(
    monkeypatch: pytest.MonkeyPatch, silent_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(DaskPool, "connect_timeout_s", 30.0)
    before = runs_threads()
    run = Pipeline(range(10)).map(abs, kind="dask", address=silent_server, workers=4).start()
    run.cancel()
    eventually(lambda: runs_threads() <= before, timeout_s=5)
    assert "did not leave in time" not in caplog.text
    gc.collect()  # a client left half open would warn here of a close never awaited


@pytest.mark.timeout(120)
def test_a_bookkeeping_task_that_dies_fails_the_calls_it_held_and_is_said(
    cluster: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Any) -> None:
        raise RuntimeError("a bug in the fetch")

    monkeypatch.setattr(executor._DaskCalls, "_fetch", broken)
    dead: list[Failure] = []
    out = list(
        Pipeline(range(20)).map(
            abs,
            kind="dask",
            address=cluster.scheduler_address,
            workers=4,
            on_error=DeadLetter(dead),
        )
    )
    assert out == [] and sorted(f.item for f in dead) == list(range(20))  # none waits for ever
    assert "bookkeeping failed" in caplog.text
