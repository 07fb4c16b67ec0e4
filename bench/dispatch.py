"""The dispatcher: conveyor against ate-dispatcher, blinker and a hand-written floor.

    bench/setup && .bench-venv/bin/python -m bench.dispatch [--quick]

Two producers and two listeners on one topic; every request is answered by both producers and
every answer reaches both listeners (4 listener calls per request).

* burst: N requests made as fast as the caller can, timed until every listener call is done;
  latency is from the request to the listener call (p50, p99);
* one at a time: one request, wait for its 4 listener calls, the next (p50 latency).

Peers: conveyor ``Dispatcher``; ate-dispatcher's ``ATEDispatcher`` (threads and queues, as on
its page); blinker (synchronous signals: producers and listeners run in the caller's thread, a
reference for the cost of the calls alone); floor: one ``queue.SimpleQueue`` and thread per
producer and per listener, no deadlines, no counts.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench._harness import table


class Sink:
    """Records listener latencies (``list.append`` is atomic); ``wait(n)`` until n calls."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        # no wake-ups until someone waits: a listener call then costs the same in every peer
        self.target = sys.maxsize
        self.done = threading.Event()

    def hit(self, started: float) -> None:
        self.lat.append(time.perf_counter() - started)
        if len(self.lat) >= self.target:
            self.done.set()

    def wait(self, n: int, timeout_s: float = 120) -> None:
        self.target = n
        if len(self.lat) >= n:
            return
        deadline = time.monotonic() + timeout_s
        while len(self.lat) < n:
            self.done.clear()
            if len(self.lat) >= n:
                return
            if not self.done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{len(self.lat)} of {n} listener calls")


def conveyor_setup(sink: Sink) -> tuple[Callable[[float], None], Callable[[], None]]:
    from conveyor import Dispatcher

    d = Dispatcher(maxsize=1 << 20)
    for _ in range(2):
        d.register_producer("t", lambda topic, started: started)
    for _ in range(2):
        d.subscribe("t", lambda topic, started: sink.hit(started))
    return (lambda started: d.request("t", started)), d.stop


def ate_setup(sink: Sink) -> tuple[Callable[[float], None], Callable[[], None]]:
    from ate_dispatcher import ATEDispatcher, Producer, ResultListener

    class P(Producer):  # type: ignore[misc]
        def produce_dispatcher_output(self, topic: str, started: float) -> float:
            return started

    class L(ResultListener):  # type: ignore[misc]
        def process_dispatcher_result(self, topic: str, started: float) -> None:
            sink.hit(started)

    d = ATEDispatcher()
    d.start()
    for _ in range(2):
        p = P()
        p.start()
        d.register_result_producer(p, "t")
    for _ in range(2):
        listener = L()
        listener.start()
        d.register_result_listener(listener, "t")
    return (lambda started: d.send_request("t", started, ttl=600_000)), d.stop


def blinker_setup(sink: Sink) -> tuple[Callable[[float], None], Callable[[], None]]:
    from blinker import Signal

    request, answer = Signal(), Signal()
    for _ in range(2):
        # distinct lambdas: blinker keeps one connection per receiver object
        request.connect(lambda started: answer.send(started), weak=False)  # noqa: PLW0108
    for _ in range(2):
        answer.connect(lambda started: sink.hit(started), weak=False)  # noqa: PLW0108
    return (request.send), (lambda: None)


def floor_setup(sink: Sink) -> tuple[Callable[[float], None], Callable[[], None]]:
    listeners = [queue.SimpleQueue[Any]() for _ in range(2)]
    producers = [queue.SimpleQueue[Any]() for _ in range(2)]

    def produce(q: queue.SimpleQueue[Any]) -> None:
        while (item := q.get()) is not None:
            for lq in listeners:
                lq.put(item)

    def listen(q: queue.SimpleQueue[Any]) -> None:
        while (item := q.get()) is not None:
            sink.hit(item)

    threads = [threading.Thread(target=produce, args=(q,), daemon=True) for q in producers]
    threads += [threading.Thread(target=listen, args=(q,), daemon=True) for q in listeners]
    for t in threads:
        t.start()

    def request(started: float) -> None:
        for q in producers:
            q.put(started)

    def stop() -> None:
        for q in [*producers, *listeners]:
            q.put(None)

    return request, stop


PEERS = {
    "conveyor Dispatcher": conveyor_setup,
    "ate-dispatcher": ate_setup,
    "blinker (synchronous)": blinker_setup,
    "floor: SimpleQueue fan-out": floor_setup,
}


def burst(setup: Any, n: int) -> tuple[float, float, float]:
    sink = Sink()
    request, stop = setup(sink)
    t0 = time.perf_counter()
    for _ in range(n):
        request(time.perf_counter())
    sink.wait(4 * n)
    elapsed = time.perf_counter() - t0
    stop()
    lat = sorted(sink.lat)
    return n / elapsed, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def one_at_a_time(setup: Any, n: int) -> float:
    sink = Sink()
    request, stop = setup(sink)
    for i in range(n):
        request(time.perf_counter())
        sink.wait(4 * (i + 1))
    stop()
    return statistics.median(sink.lat[3::4])  # the last of each request's four calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 20_000 if args.quick else 100_000
    rows = []
    floor = None
    results = {}
    for name, setup in PEERS.items():
        try:
            rate, p50, p99 = statistics.median_high([burst(setup, n) for _ in range(3)])
            single = one_at_a_time(setup, 2_000)
            results[name] = (rate, p50, p99, single)
        except Exception as exc:
            results[name] = f"fails: {type(exc).__name__}: {exc}"[:80]
    floor = results.get("floor: SimpleQueue fan-out")
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, r, ""))
            continue
        rate, p50, p99, single = r
        ratio = f"{rate / floor[0]:.2f}x" if isinstance(floor, tuple) else ""
        rows.append(
            (
                name,
                f"{rate:,.0f} req/s ({ratio} floor); burst p50 {p50 * 1e3:.1f} ms, "
                f"p99 {p99 * 1e3:.1f} ms",
                f"{single * 1e6:.0f} us",
            )
        )
    table(
        f"2 producers x 2 listeners, {n:,} requests in a burst (median of 3)",
        rows,
        ("peer", "burst", "one at a time, p50"),
    )


if __name__ == "__main__":
    main()
