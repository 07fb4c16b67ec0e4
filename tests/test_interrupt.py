"""Ctrl-C during a run reaches the caller within a second, and the run stops."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from conveyor import Pipeline, PipelineClosed


@pytest.mark.parametrize("how", ["run", "iterate"])
def test_keyboard_interrupt_stops_the_run_quickly(how: str, gate: threading.Event) -> None:
    started = threading.Event()

    def stuck(x: int) -> int:
        started.set()
        gate.wait()
        return x

    def interrupt_when_busy() -> None:
        started.wait(5)
        _thread.interrupt_main()

    p = Pipeline(range(100)).map(stuck, workers=2).map(lambda x: x)
    threading.Thread(target=interrupt_when_busy).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        if how == "run":
            p.run()
        else:
            for _ in p:
                pass
    assert time.monotonic() - t0 < 1.0


def test_keyboard_interrupt_in_a_started_run_cancels_it(gate: threading.Event) -> None:
    started = threading.Event()

    def stuck(x: int) -> int:
        started.set()
        gate.wait()
        return x

    runs = []

    def interrupt() -> None:
        started.wait(5)
        _thread.interrupt_main()

    threading.Thread(target=interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        runs.append(Pipeline(range(10)).map(stuck).start())
        runs[0].wait()
    if runs:  # the interrupt may land before start() returned
        assert runs[0].state == "stopped"


def test_stop_from_a_signal_handler_while_the_main_thread_is_putting() -> None:
    import os
    import signal

    done: list[int] = []
    run = Pipeline().each(done.append, maxsize=4).start()

    def handler(signum: int, frame: object) -> None:
        # may land while this thread holds the first buffer's lock inside put()
        run.stop(drain=True, wait=False)

    def signal_when_busy() -> None:
        while len(done) < 1000:
            threading.Event().wait(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    accepted = 0
    try:
        threading.Thread(target=signal_when_busy, daemon=True).start()
        with pytest.raises(PipelineClosed):
            for i in range(10**9):
                run.put(i)
                accepted += 1
        run.wait()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert done == list(range(accepted))
