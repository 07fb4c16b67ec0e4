"""Every example of jobq's page, with its printed output, on conveyor.compat.jobq."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from conveyor.compat import jobq

from .conftest import eventually


def add1(args: int) -> int:
    return args + 1


def multi2(args: int) -> int:
    return args * 2


def printarg(args: Any) -> None:
    print(args)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.split()


def test_two_workers(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run([0, 1, 2], [add1, printarg])
    assert lines(capsys) == ["1", "2", "3"]


def test_three_workers_on_a_tuple(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run((0, 1, 2), [add1, multi2, printarg])
    assert lines(capsys) == ["2", "4", "6"]


def test_two_threads_for_one_worker_may_reorder(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run(range(3), [add1, (multi2, 2), printarg])
    assert sorted(lines(capsys), key=int) == ["2", "4", "6"]


def test_keep_order_with_several_threads(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run(range(3), [add1, (multi2, 2), printarg], keep_order=True)
    assert lines(capsys) == ["2", "4", "6"]
    jobq.run(range(500), [add1, (multi2, 8), printarg], keep_order=True)
    assert lines(capsys) == [str((i + 1) * 2) for i in range(500)]


def test_empty_rst_passes_nothing_on(capsys: pytest.CaptureFixture[str]) -> None:
    def drop_even_number(i: int) -> Any:
        if i % 2 == 0:
            return jobq.EmptyRst
        return i

    jobq.run(range(10), [drop_even_number, printarg])
    assert lines(capsys) == ["1", "3", "5", "7", "9"]


def test_none_is_passed_on(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run([1], [lambda x: None, printarg])
    assert lines(capsys) == ["None"]


def test_generator_worker_passes_every_element(capsys: pytest.CaptureFixture[str]) -> None:
    def worker_iter(args: list[int]) -> Any:
        yield from args

    jobq.run([[1, 2], [3]], [worker_iter, printarg])
    assert lines(capsys) == ["1", "2", "3"]


def test_dispatcher_keeps_order_per_thread_and_overall(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()

    def record(args: int) -> int:
        with lock:
            seen.setdefault(args % 3, []).append(args)
        return args

    def dispatch(args: int) -> int:
        return args % 3

    jobq.run(range(60), [(record, 3, dispatch), printarg])
    assert lines(capsys) == [str(i) for i in range(60)]
    assert all(v == sorted(v) for v in seen.values())


def test_a_failing_worker_logs_and_drops_only_that_item(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    def fragile(args: int) -> int:
        if args == 2:
            raise ValueError("two")
        return args

    with caplog.at_level(logging.ERROR):
        jobq.run(range(5), [fragile, printarg])
    assert lines(capsys) == ["0", "1", "3", "4"]
    assert "two" in caplog.text


def test_timeout_returns_while_work_is_stuck() -> None:
    release = threading.Event()
    try:
        jobq.run(range(10), [lambda x: release.wait()], timeout=0.1)
    finally:
        release.set()


def test_probe_and_stat() -> None:
    probe: dict[str, Any] = {}
    jobq.run(range(10), [add1, (multi2, 2), printarg], probe=probe, keep_order=True)
    st = jobq.stat(probe)
    assert (st["in"], st["out"], st["doing"]) == (30, 30, 0)
    assert [w["name"] for w in st["workers"]] == [
        f"{__name__}.add1",
        f"{__name__}.multi2",
        f"{__name__}.printarg",
    ]
    assert st["workers"][1]["nr_worker"] == 2
    assert st["workers"][0]["input"] == {"size": 0, "capa": 1024}
    assert "coordinator" in st["workers"][0]


def test_stat_works_from_the_first_job() -> None:
    """The probe is complete before any worker runs: a worker may read it at once."""
    probe: dict[str, Any] = {}
    seen: list[dict[str, Any]] = []

    def look(x: int) -> int:
        seen.append(jobq.stat(probe))
        return x

    for _ in range(20):  # the first job may start the moment run() starts the session
        seen.clear()
        jobq.run(range(3), [look], probe=probe)
        assert len(seen) == 3 and all(s["workers"][0]["nr_worker"] == 1 for s in seen)


def test_limit_job_speed_is_a_worker_in_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    jobq.run(range(5), [(jobq.limit_job_speed(1000, 1), 1), printarg])
    assert lines(capsys) == ["0", "1", "2", "3", "4"]
    speed = [500.0]
    jobq.run(range(3), [jobq.limit_job_speed(lambda: speed[0], 2), printarg])
    assert lines(capsys) == ["0", "1", "2"]


def test_job_manager_put_join(capsys: pytest.CaptureFixture[str]) -> None:
    def _echo(args: int) -> int:
        print(args)
        return args

    jm = jobq.JobManager([_echo])
    for i in range(3):
        jm.put(i)
    jm.join()
    assert lines(capsys) == ["0", "1", "2"]


def test_job_manager_never_fills_up_without_join() -> None:
    jm = jobq.JobManager([add1, add1], queue_size=4)
    for i in range(20_000):
        jm.put(i)
    jm.join()
    assert jm.stat()["out"] == 40_000


def test_set_thread_num_on_the_fly() -> None:
    barrier = threading.Barrier(3, timeout=5)

    def meet(args: int) -> int:
        barrier.wait()
        return args

    jm = jobq.JobManager([meet, add1])
    jm.set_thread_num(meet, 3)
    for i in range(3):
        jm.put(i)
    eventually(lambda: jm.stat()["out"] >= 3)
    jm.set_thread_num(meet, 1)
    with pytest.raises(jobq.JobWorkerNotFound):
        jm.set_thread_num(multi2, 2)
    with pytest.raises(ValueError):
        jm.set_thread_num(meet, 0)
    jm.join()
    jm.set_thread_num(meet, 5)  # after join: silently nothing


def test_dispatcher_groups_cannot_be_resized() -> None:
    jm = jobq.JobManager([(add1, 2, lambda x: x)])
    with pytest.raises(jobq.JobWorkerError):
        jm.set_thread_num(add1, 3)
    jm.join()


def test_bad_thread_numbers() -> None:
    with pytest.raises(TypeError):
        jobq.run([1], [(add1, "2")])
    with pytest.raises(ValueError):
        jobq.run([1], [(add1, 0)])
