"""os-m3-engine's documented API on conveyor.compat.os_m3_engine, including its examples."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from conveyor.compat.os_m3_engine.core.backend import Backend
from conveyor.compat.os_m3_engine.core.frontend import Frontend
from conveyor.compat.os_m3_engine.core.transport import Transport
from conveyor.compat.os_m3_engine.launcher import create

RESULTS: list[Any] = []
LOCK = threading.Lock()


class CustomFrontend(Frontend):
    def produce(self) -> Iterator[str]:
        yield "Hello world!"


class CountFrontend(Frontend):
    def produce(self) -> Iterator[int]:
        yield from range(self.config.n)


class CustomTransport(Transport):
    def transport(self, data: Any) -> Any:
        return data


class UpperTransport(Transport):
    def transport(self, data: Any) -> Any:
        return data.upper()


class CollectBackend(Backend):
    def process(self, data: Any) -> None:
        with LOCK:
            RESULTS.append(data)


class CustomBackend(Backend):
    def setup(self) -> None:
        print("Setup")

    def cleanup(self) -> None:
        print("Cleanup")

    def process(self, data: Any) -> None:
        print(data)


@pytest.fixture(autouse=True)
def _clear() -> None:
    RESULTS.clear()


def test_default_engine_reads_stdin_and_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\n")))
    with caplog.at_level(logging.INFO):
        create().start()
    transport = [r.getMessage() for r in caplog.records if r.name == "LogTransport"]
    backend = [r.getMessage() for r in caplog.records if r.name == "LogBackend"]
    assert sorted(transport) == sorted(backend) == ["b'one\\n'", "b'two\\n'"]


def test_custom_stages_given_as_classes_or_dotted_paths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = create(
        frontend_cls=CustomFrontend,
        transport_cls=f"{__name__}.CustomTransport",
        backend_cls=f"{__name__}.CustomBackend",
    )
    engine.start()
    assert capsys.readouterr().out.splitlines() == ["Setup", "Hello world!", "Cleanup"]
    assert engine.stopped()


def test_thread_num_setup_and_cleanup_per_thread(capsys: pytest.CaptureFixture[str]) -> None:
    config = SimpleNamespace(thread_num=3)
    create(
        frontend_cls=CountFrontend,
        transport_cls=None,
        backend_cls=CustomBackend,
        app_config=SimpleNamespace(n=50),
        engine_backend_config=config,
    ).start()
    out = capsys.readouterr().out.splitlines()
    assert sorted(int(x) for x in out if x.isdigit()) == list(range(50))
    assert 1 <= out.count("Setup") == out.count("Cleanup") <= 3


def test_app_config_reaches_every_stage() -> None:
    create(
        frontend_cls=CountFrontend,
        transport_cls=None,
        backend_cls=CollectBackend,
        app_config=SimpleNamespace(n=100),
    ).start()
    assert sorted(RESULTS) == list(range(100))


def test_each_frontend_thread_has_its_own_stage_producing_its_own_items() -> None:
    """ "Each of the stage can be multi-thread": thread_num = 2 runs two frontends at once,
    each its own instance with its own setup, produce() and cleanup, on its own thread. The
    engine ends when both have finished, with everything they yielded through."""
    lives: list[tuple[str, int, int]] = []
    both = threading.Barrier(2, timeout=10)

    class Tagged(Frontend):
        def setup(self) -> None:
            with LOCK:
                lives.append(("setup", id(self), threading.get_ident()))

        def produce(self) -> Iterator[tuple[int, int]]:
            both.wait()  # the two run at the same time, or this times out
            for i in range(self.config.n):
                yield (id(self), i)

        def cleanup(self) -> None:
            with LOCK:
                lives.append(("cleanup", id(self), threading.get_ident()))

    create(
        frontend_cls=Tagged,
        transport_cls=CustomTransport,
        backend_cls=CollectBackend,
        app_config=SimpleNamespace(n=200),
        engine_frontend_config=SimpleNamespace(thread_num=2),
        engine_transport_config=SimpleNamespace(thread_num=10),
    ).start()
    setups = [(who, thread) for what, who, thread in lives if what == "setup"]
    cleanups = [(who, thread) for what, who, thread in lives if what == "cleanup"]
    assert len(setups) == 2 and sorted(setups) == sorted(cleanups)
    assert len({who for who, _ in setups}) == 2 and len({t for _, t in setups}) == 2
    for who, _ in setups:  # every item of each frontend, once
        assert sorted(i for w, i in RESULTS if w == who) == list(range(200))
    assert len(RESULTS) == 400


def test_a_failing_method_loses_only_its_item(caplog: pytest.LogCaptureFixture) -> None:
    class Fragile(Transport):
        def transport(self, data: Any) -> Any:
            if data == 5:
                raise ValueError("five")
            return data

    with caplog.at_level(logging.ERROR):
        create(
            frontend_cls=CountFrontend,
            transport_cls=Fragile,
            backend_cls=CollectBackend,
            app_config=SimpleNamespace(n=10),
        ).start()
    assert sorted(RESULTS) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert "five" in caplog.text


def test_transport_only_engine() -> None:
    class Keep(Transport):
        def transport(self, data: Any) -> Any:
            with LOCK:
                RESULTS.append(data)
            return data

    create(
        frontend_cls=CountFrontend,
        transport_cls=Keep,
        backend_cls=None,
        app_config=SimpleNamespace(n=20),
    ).start()
    assert sorted(RESULTS) == list(range(20))


def test_stop_from_a_signal_handler_drains_and_returns() -> None:
    produced = []

    class Endless(Frontend):
        def produce(self) -> Iterator[int]:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1

    engine = create(frontend_cls=Endless, transport_cls=CustomTransport, backend_cls=CollectBackend)

    def stop(signum: int, frame: Any) -> None:
        engine.stop()

    def send_when_busy() -> None:
        while len(RESULTS) < 100:
            threading.Event().wait(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Thread(target=send_when_busy, daemon=True).start()
        engine.start()  # blocks until stopped and drained
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert engine.stopped()
    # every item the frontend handed over went through; at most the one it was
    # producing when the stop came was never handed over
    assert sorted(RESULTS) == list(range(len(RESULTS)))
    assert len(produced) - len(RESULTS) <= 1


def test_start_twice_and_stop_before_start_are_refused() -> None:
    engine = create(
        frontend_cls=CustomFrontend, transport_cls=CustomTransport, backend_cls=CollectBackend
    )
    with pytest.raises(RuntimeError):
        engine.stop()
    engine.start()
    with pytest.raises(RuntimeError):
        engine.start()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        create(frontend_cls=None)
    with pytest.raises(ValueError):
        create(transport_cls=None, backend_cls=None)
    with pytest.raises(TypeError):
        create(frontend_cls=CustomTransport)
    with pytest.raises(ModuleNotFoundError):
        create(frontend_cls="no.such.module.Frontend")
