"""Process stages: the same behaviour as the other kinds, and faults that must not hang."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conveyor import (
    ConfigurationError,
    DeadLetter,
    Failure,
    ItemNotSendable,
    ItemTimeout,
    ManualClock,
    Pipeline,
    Retry,
    Skip,
    Stage,
    StageFailed,
    WorkerCrashed,
)
from conveyor.testing import crash

from .conftest import alive, eventually


def square(x: int) -> int:
    return x * x


def test_map_filter_flat_map_each_over_processes() -> None:
    seen: list[int] = []
    p = (
        Pipeline(range(1000))
        .map(square, workers=2, kind="process")
        .filter(lambda x: x % 2 == 0, kind="process")
        .flat_map(lambda x: [x, -x], workers=2, kind="process")
        .each(seen.append)
    )
    p.run()
    evens = [x * x for x in range(1000) if (x * x) % 2 == 0]
    assert sorted(seen) == sorted(evens + [-x for x in evens])


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_lambdas_and_closures_travel_under_every_start_method(method: str) -> None:
    offset = 10

    def shift(x: int) -> int:
        return x + offset

    p = Pipeline(range(50), ordered=True).map(shift, workers=2, kind="process", start_method=method)
    assert list(p.map(lambda x: x * 2, kind="process", start_method=method)) == [
        (x + 10) * 2 for x in range(50)
    ]


def test_order_and_keys_hold_across_processes() -> None:
    out = list(Pipeline(range(3000), ordered=True).map(square, workers=2, kind="process"))
    assert out == [x * x for x in range(3000)]
    keyed = list(
        Pipeline([(i % 3, i) for i in range(300)], ordered=True).map(
            lambda kv: kv, workers=2, kind="process", key=lambda kv: kv[0]
        )
    )
    assert keyed == [(i % 3, i) for i in range(300)]


class Journal(Stage[int, int]):
    """Writes a file per setup and per teardown, named by process id, in ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self) -> None:
        Path(self.folder, f"setup-{os.getpid()}").touch()

    def process(self, item: int) -> int:
        return item

    def teardown(self) -> None:
        Path(self.folder, f"teardown-{os.getpid()}").touch()


def journal(folder: Path) -> tuple[set[str], set[str]]:
    names = [p.name for p in folder.iterdir()]
    setups = {n.split("-")[1] for n in names if n.startswith("setup")}
    teardowns = {n.split("-")[1] for n in names if n.startswith("teardown")}
    return setups, teardowns


def test_setup_and_teardown_once_per_process(tmp_path: Path) -> None:
    out = list(Pipeline(range(500)).map(Journal(str(tmp_path)), workers=3, kind="process"))
    assert sorted(out) == list(range(500))
    setups, teardowns = journal(tmp_path)
    assert len(setups) == 3 and setups == teardowns


def test_shrinking_tears_down_the_retiring_processes(tmp_path: Path) -> None:
    with Pipeline().map(Journal(str(tmp_path)), name="j", workers=3, kind="process").start() as run:
        eventually(lambda: len(journal(tmp_path)[0]) == 3)
        run.stage("j").resize(1)
        eventually(lambda: len(journal(tmp_path)[1]) == 2)
        for i in range(10):
            run.put(i)
    setups, teardowns = journal(tmp_path)
    assert setups == teardowns and len(setups) == 3


def test_recycling_replaces_workers_without_losing_or_repeating(tmp_path: Path) -> None:
    p = Pipeline(range(400)).map(
        Journal(str(tmp_path)), workers=2, kind="process", max_items_per_worker=50
    )
    out = list(p)
    assert sorted(out) == list(range(400))
    setups, teardowns = journal(tmp_path)
    assert len(setups) >= 400 // 50 and setups == teardowns


def test_something_that_cannot_be_sent_is_refused_at_build_time() -> None:
    lock = threading.Lock()
    with pytest.raises(ConfigurationError, match="lock"):
        Pipeline([1]).map(lambda x: (lock, x), kind="process")


def test_bad_process_options_are_refused_at_build_time() -> None:
    with pytest.raises(ConfigurationError, match="start_method"):
        Pipeline([1]).map(square, kind="process", start_method="teleport")
    with pytest.raises(ConfigurationError, match="max_items_per_worker"):
        Pipeline([1]).map(square, kind="process", max_items_per_worker=0)


def test_an_item_that_cannot_be_sent_fails_alone_naming_its_type() -> None:
    def gen() -> Any:
        yield 1

    dead: list[Failure] = []
    items: list[Any] = [1, gen(), 3]
    out = list(Pipeline(items).map(str, kind="process", on_error=DeadLetter(dead)))
    assert sorted(out) == ["1", "3"]
    assert isinstance(dead[0].error, ItemNotSendable) and "generator" in str(dead[0].error)


def test_a_result_that_cannot_be_sent_fails_its_item() -> None:
    def make(x: int) -> Any:
        return threading.Lock() if x == 2 else x

    with pytest.raises(StageFailed) as info:
        Pipeline(range(5)).map(make, kind="process").run(timeout_s=30)
    assert info.value.item == 2
    assert isinstance(info.value.error, ItemNotSendable) and "lock" in str(info.value.error)


def _line_of(text: str) -> int:
    """The line of this file that holds ``text`` (so the tests need no line numbers)."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def _shows_user_code(traceback_text: str, source: str, filename: str = __file__) -> None:
    assert "in the worker process" in traceback_text
    assert f'File "{filename}", line {_line_of(source)}' in traceback_text, traceback_text
    assert source in traceback_text, traceback_text
    assert "<dynamic-code>" not in traceback_text


def _lambda_parse() -> Any:
    return lambda x: int(x, 16)  # lambda-line


def _closure_parse() -> Any:
    base = 10

    def parse(x: str) -> int:
        return int(x, base)  # closure-line

    return parse


class _NestedStage:
    """Holds a Stage subclass defined inside a function (so it travels by value)."""

    @staticmethod
    def make() -> type[Stage[Any, Any]]:
        class Parse(Stage[Any, Any]):
            def process(self, item: Any) -> Any:
                return int(item)  # stage-line

        return Parse

    @staticmethod
    def instance() -> Stage[Any, Any]:
        return _NestedStage.make()()


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_an_exception_in_a_worker_keeps_its_type_and_traceback(method: str) -> None:
    def parse(x: str) -> int:
        return int(x)  # nested-line

    with pytest.raises(StageFailed) as info:
        Pipeline(["1", "x"]).map(parse, kind="process", start_method=method).run(timeout_s=30)
    err = info.value
    assert (err.stage, err.item) == ("parse", "x")
    assert isinstance(err.error, ValueError)
    _shows_user_code(err.traceback, "return int(x)  # nested-line")


@pytest.mark.parametrize(
    ("make", "source"),
    [
        (_lambda_parse, "return lambda x: int(x, 16)  # lambda-line"),
        (_closure_parse, "return int(x, base)  # closure-line"),
        (_NestedStage.make, "return int(item)  # stage-line"),
        (_NestedStage.instance, "return int(item)  # stage-line"),
    ],
    ids=["lambda", "closure", "stage-class", "stage-instance"],
)
def test_tracebacks_from_a_worker_point_at_the_users_line(make: Any, source: str) -> None:
    with pytest.raises(StageFailed) as info:
        Pipeline(["x"]).map(make(), kind="process", start_method="spawn").run(timeout_s=30)
    _shows_user_code(info.value.traceback, source)


def test_a_script_run_as_main_gets_its_own_lines_in_tracebacks(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """\
            from conveyor import Pipeline, StageFailed

            def parse(x):
                return int(x)  # main-line

            if __name__ == "__main__":
                for method in ("spawn", "forkserver"):
                    try:
                        Pipeline(["x"]).map(parse, kind="process", start_method=method).run()
                    except StageFailed as exc:
                        print(exc.traceback)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.count(f'File "{script}", line 4, in parse') == 2, out
    assert out.count("return int(x)  # main-line") == 2, out


def test_retry_and_skip_in_processes() -> None:
    def odd_fails(x: int) -> int:
        if x % 2:
            raise KeyError(x)
        return x

    p = Pipeline(range(100), ordered=True).map(
        odd_fails, workers=2, kind="process", on_error=Skip()
    )
    assert list(p) == list(range(0, 100, 2))
    flaky = crash(square, when=lambda x: x == 3, how="raise", times=1)
    p = Pipeline(range(6), ordered=True).map(flaky, kind="process", on_error=Retry(2, backoff_s=0))
    assert list(p) == [x * x for x in range(6)]


def test_setup_failure_in_a_worker_fails_the_run() -> None:
    class NoDb(Stage[int, int]):
        def setup(self) -> None:
            raise ConnectionError("no database")

        def process(self, item: int) -> int:
            return item

    with pytest.raises(StageFailed) as info:
        Pipeline(range(3)).map(NoDb, kind="process").run(timeout_s=30)
    assert isinstance(info.value.error, ConnectionError)


# -- faults that must not hang ----------------------------------------------------------------


def test_sigkill_under_raise_reports_stage_item_and_signal_quickly() -> None:
    fn = crash(square, when=lambda x: x == 7, how="sigkill")
    p = Pipeline(range(50)).map(fn, name="sq", workers=2, kind="process")
    run = p.start()
    pids = run.stage("sq").pids()
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        run.wait()
    assert time.monotonic() - t0 < 5
    err = info.value
    assert (err.stage, err.item) == ("sq", 7)
    assert isinstance(err.error, WorkerCrashed) and "SIGKILL" in str(err)
    eventually(lambda: not any(alive(pid) for pid in pids + run.stage("sq").pids()))


@pytest.mark.parametrize("how", ["sigkill", "exit", "segfault"])
def test_a_dying_worker_under_retry_loses_and_repeats_nothing(how: Any) -> None:
    fn = crash(square, when=lambda x: x in (5, 60), how=how, times=2)
    out = Counter(
        Pipeline(range(100)).map(
            fn, workers=2, kind="process", on_error=Retry(attempts=3, backoff_s=0)
        )
    )
    assert out == Counter(x * x for x in range(100))


def test_a_dead_worker_under_skip_drops_only_its_item() -> None:
    fn = crash(square, when=lambda x: x == 4, how="sigkill")
    dead: list[Failure] = []
    p = Pipeline(range(10), ordered=True).map(fn, kind="process", on_error=DeadLetter(dead))
    assert list(p) == [x * x for x in range(10) if x != 4]
    assert [f.item for f in dead] == [4]


def test_an_endless_loop_past_timeout_is_killed_and_replaced() -> None:
    fn = crash(square, when=lambda x: x == 2, how="hang")
    dead: list[Failure] = []
    p = Pipeline(range(6), ordered=True).map(
        fn, workers=2, kind="process", timeout_s=0.5, on_error=DeadLetter(dead)
    )
    t0 = time.monotonic()
    assert list(p) == [0, 1, 9, 16, 25]
    assert time.monotonic() - t0 < 10
    assert isinstance(dead[0].error, ItemTimeout)


def test_rate_is_shared_by_the_processes_of_a_stage() -> None:
    clock = ManualClock()
    Pipeline(range(30), clock=clock).map(square, workers=2, kind="process", rate=10).run()
    assert clock.now() == pytest.approx(2.9, abs=0.11)


def test_ctrl_c_kills_every_child_within_two_seconds() -> None:
    import _thread

    fn = crash(square, when=lambda x: True, how="hang", times=2)
    run = Pipeline(range(10)).map(fn, name="h", workers=2, kind="process").start()
    eventually(lambda: run.stats().stage("h").busy_workers == 2)
    pids = run.stage("h").pids()
    assert len(pids) == 2
    threading.Timer(0.05, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    t0 = time.monotonic()
    eventually(lambda: not any(alive(p) for p in pids), timeout_s=2)
    assert time.monotonic() - t0 < 2


def test_workers_leave_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading, time
            from conveyor import Pipeline

            def slow(x):
                threading.Event().wait()  # blocks until the process is killed

            if __name__ == "__main__":
                run = Pipeline(range(4)).map(slow, name="s", workers=2, kind="process").start()
                while len(run.stage("s").pids()) < 2 or run.stats().stages[0].busy_workers < 2:
                    time.sleep(0.01)
                print(*run.stage("s").pids(), flush=True)
                threading.Event().wait()  # until the test kills this process
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        eventually(lambda: not any(alive(p) for p in pids), timeout_s=5)
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_full_buffers_hold_back_a_process_stage_and_the_source(tmp_path: Path) -> None:
    from .conftest import Counting

    gate = tmp_path / "gate"
    source = Counting(5000)

    def wait_for_gate(x: int) -> int:
        while not gate.exists():
            threading.Event().wait(0.01)
        return x

    p = Pipeline(source).map(square, kind="process", maxsize=8).map(wait_for_gate, maxsize=8)
    with p.start() as run:
        # the thread stage waits on the gate: its inbox fills, the process stage cannot hand
        # on its outputs, its own inbox fills, and the source stops being read
        eventually(lambda: run.stats().stages[0].queue_depth == 8, timeout_s=20)
        eventually(lambda: run.stats().stages[1].queue_depth == 8, timeout_s=20)
        taken = source.taken
        # two inboxes of 8, what the process stage's driver holds (two units of at most its
        # inbox), the gated item, and the one the feeder holds
        assert taken <= 8 + 8 + 2 * 8 + 1 + 1
        gate.touch()
    assert source.taken == 5000


class TwoArgError(Exception):
    """Pickles (its args are kept) but cannot be rebuilt: __init__ wants two arguments."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(f"{code}: {why}")


class Unloadable:
    """Pickles, and raises when unpickled."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def _refuse() -> Any:
    raise ValueError("this object cannot be unpickled")


def raise_two_arg(x: int) -> int:
    if x == 3:
        raise TwoArgError(x, "no")
    return x


def unloadable_result(x: int) -> Any:
    return Unloadable() if x == 3 else x


def raise_base(x: int, what: str) -> int:
    if x == 3:
        if what == "exit":
            raise SystemExit(4)
        if what == "interrupt":
            raise KeyboardInterrupt
        raise GeneratorExit
    return x


def test_an_exception_that_cannot_be_rebuilt_fails_its_item_naming_its_type() -> None:
    dead: list[Failure] = []
    p = Pipeline(range(8), ordered=True).map(
        raise_two_arg, kind="process", on_error=DeadLetter(dead)
    )
    assert list(p) == [0, 1, 2, 4, 5, 6, 7]
    assert "TwoArgError" in str(dead[0].error) and dead[0].item == 3


def test_a_result_that_cannot_be_unpickled_fails_its_item_alone() -> None:
    dead: list[Failure] = []
    p = Pipeline(range(8), ordered=True).map(
        unloadable_result, kind="process", on_error=DeadLetter(dead)
    )
    assert list(p) == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(dead[0].error, ItemNotSendable) and dead[0].item == 3
    assert "Unloadable" in str(dead[0].error)


def test_an_item_that_cannot_be_unpickled_in_the_worker_fails_alone() -> None:
    items: list[Any] = [0, 1, Unloadable(), 3]
    dead: list[Failure] = []
    p = Pipeline(items, ordered=True).map(str, kind="process", on_error=DeadLetter(dead))
    assert list(p) == ["0", "1", "3"]
    assert isinstance(dead[0].error, ItemNotSendable) and dead[0].item is items[2]


@pytest.mark.parametrize("what", ["exit", "interrupt", "generator-exit"])
def test_a_base_exception_from_the_users_function_fails_only_its_item(what: str) -> None:
    dead: list[Failure] = []
    fn = functools.partial(raise_base, what=what)
    p = Pipeline(range(6), ordered=True).map(fn, kind="process", on_error=DeadLetter(dead))
    assert list(p) == [0, 1, 2, 4, 5]
    kinds = {"exit": SystemExit, "interrupt": KeyboardInterrupt, "generator-exit": GeneratorExit}
    assert isinstance(dead[0].error, kinds[what])
    with pytest.raises(StageFailed) as info:
        Pipeline(range(6)).map(fn, kind="process").run(timeout_s=30)
    assert isinstance(info.value.error, kinds[what])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_ordered_process_stage_with_two_workers_never_deadlocks() -> None:
    for _ in range(3):
        out = list(Pipeline(range(200_000), ordered=True).map(square, kind="process", workers=2))
        assert out == [x * x for x in range(200_000)]


def slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def test_shrinking_a_busy_process_stage_takes_effect_before_its_input_ends() -> None:
    with Pipeline(range(2000)).map(slow_square, kind="process", workers=3).start() as run:
        stage = run.stage("slow_square")
        eventually(lambda: len(stage.pids()) == 3 and run.stats().stages[0].finished > 30, 30)
        at_resize = run.stats().stages[0].finished
        stage.resize(1)
        eventually(lambda: len(stage.pids()) == 1, 10)
        # the retiring workers finished what they had in flight (a unit or two of ~5 items
        # each), not everything they could take meanwhile
        assert run.stats().stages[0].finished - at_resize < 150
        run.cancel()


def _what_i_see(_: int) -> tuple[str | None, bool, str]:
    return os.environ.get("CONVEYOR_SEEN"), "/nowhere/on/purpose" in sys.path, os.getcwd()


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_workers_see_the_environment_of_when_the_stage_started(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a subprocess started then would: the variables, the import path and the working
    directory the parent had when the stage started, not the forkserver's from long ago."""
    monkeypatch.setenv("CONVEYOR_SEEN", "set after the forkserver started")
    monkeypatch.setattr(sys, "path", [*sys.path, "/nowhere/on/purpose"])
    monkeypatch.chdir(tmp_path)
    seen = list(Pipeline(range(4)).map(_what_i_see, kind="process", workers=2, start_method=method))
    assert set(seen) == {("set after the forkserver started", True, str(tmp_path))}
