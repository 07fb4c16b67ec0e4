from __future__ import annotations

import threading

import pytest

from conveyor import ClosedResourceError
from conveyor._engine import Buffer, BufferShutdown

from .conftest import eventually


def test_capacity_is_exact_and_put_many_waits_for_room() -> None:
    buf: Buffer[int] = Buffer(3)
    done = threading.Event()

    def producer() -> None:
        buf.put_many([1, 2, 3, 4, 5])
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    eventually(lambda: len(buf) == 3)
    assert not done.is_set()
    assert buf.get_many(2) == [1, 2]
    assert buf.get_many(10) == [3, 4, 5] or len(buf) <= 3
    t.join(5)
    assert done.is_set()


def test_single_puts_gather_into_chunks_and_order_is_kept() -> None:
    buf: Buffer[int] = Buffer(10_000)
    for i in range(1000):
        buf.put(i)
    out: list[int] = []
    while len(out) < 1000:
        got = buf.get_many(333)
        assert got is not None and 1 <= len(got) <= 333
        out.extend(got)
    assert out == list(range(1000))


def test_close_lets_consumers_drain_then_signals_the_end() -> None:
    buf: Buffer[int] = Buffer(10)
    buf.put_many([1, 2])
    buf.close()
    with pytest.raises(ClosedResourceError):
        buf.put(3)
    assert buf.get_many(10) == [1, 2]
    assert buf.get_many(10) is None


def test_get_with_timeout_returns_empty_list() -> None:
    buf: Buffer[int] = Buffer(1)
    assert buf.get_many(1, timeout_s=0.01) == []


def test_shutdown_wakes_every_waiter_and_reports_dropped_items() -> None:
    full: Buffer[int] = Buffer(1)
    full.put(1)
    empty: Buffer[int] = Buffer(1)
    errors: list[type[BaseException]] = []

    def blocked_put() -> None:
        try:
            full.put(2)
        except BaseException as exc:
            errors.append(type(exc))

    def blocked_get() -> None:
        try:
            empty.get_many(1)
        except BaseException as exc:
            errors.append(type(exc))

    threads = [threading.Thread(target=blocked_put), threading.Thread(target=blocked_get)]
    for t in threads:
        t.start()
    eventually(lambda: all(t.is_alive() for t in threads))
    assert full.shutdown() == 1
    empty.shutdown()
    for t in threads:
        t.join(5)
    assert errors == [BufferShutdown, BufferShutdown]


def test_a_buffer_needs_room_for_one_item() -> None:
    with pytest.raises(ValueError):
        Buffer(0)
