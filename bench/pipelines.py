"""Pipelines: conveyor against its peers, in one run, medians of 3, ratios printed.

    .bench-venv/bin/python -m bench.pipelines            # the full set (a few minutes)
    .bench-venv/bin/python -m bench.pipelines --quick    # smaller inputs, for a smoke run

Set up the bench environment with ``bench/setup`` (the peers are installed there only).

Workloads:

1. three thread stages of ``lambda x: x``, 4 workers each, 200k items: items/s, against a
   hand-written floor (threads joined by unbounded ``queue.SimpleQueue``);
2. one stage sleeping 2 ms per item with 64 workers: share of the ideal time N * 2 ms / 64;
3. one async stage awaiting ``asyncio.sleep(0.01)`` with 256 workers: share of the ideal;
4. ordered output, 4 workers, item 0 takes 3 s and the rest are instant: peak memory growth
   (tracemalloc, in a fresh process) for 50k and 200k items, and the time against a
   hand-written 64-item reorder window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench._harness import count, median_time, run_child, table

# -- workload 1: three identity stages ----------------------------------------------------


def ident(x: Any) -> Any:
    return x


def chain_conveyor(n: int) -> int:
    from conveyor import Pipeline

    p = Pipeline(range(n)).map(ident, workers=4).map(ident, workers=4).map(ident, workers=4)
    return count(p)


def chain_floor(n: int) -> int:
    """Three stages of 4 threads joined by unbounded SimpleQueues: no backpressure at all."""
    stop = object()
    qs: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(4)]

    def worker(inq: queue.SimpleQueue[Any], outq: queue.SimpleQueue[Any]) -> None:
        get, put = inq.get, outq.put
        while True:
            x = get()
            if x is stop:
                put(stop)
                return
            put(ident(x))

    threads = [
        threading.Thread(target=worker, args=(qs[s], qs[s + 1]), daemon=True)
        for s in range(3)
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    put = qs[0].put
    for x in range(n):
        put(x)
    for _ in range(4):
        put(stop)
    got, stops = 0, 0
    get = qs[3].get
    while stops < 4:
        if get() is stop:
            stops += 1
        else:
            got += 1
    return got


def chain_bounded_queue(n: int) -> int:
    """The same chain with queue.Queue(1000): the per-item lock-and-condition handoff."""
    stop = object()
    qs: list[queue.Queue[Any]] = [queue.Queue(1000) for _ in range(4)]

    def worker(inq: queue.Queue[Any], outq: queue.Queue[Any]) -> None:
        while True:
            x = inq.get()
            if x is stop:
                outq.put(stop)
                return
            outq.put(ident(x))

    for s in range(3):
        for _ in range(4):
            threading.Thread(target=worker, args=(qs[s], qs[s + 1]), daemon=True).start()

    def feed() -> None:
        for x in range(n):
            qs[0].put(x)
        for _ in range(4):
            qs[0].put(stop)

    threading.Thread(target=feed, daemon=True).start()
    got, stops = 0, 0
    while stops < 4:
        if qs[3].get() is stop:
            stops += 1
        else:
            got += 1
    return got


def chain_k3jobq(n: int) -> int:
    import k3jobq

    done = [0]
    lock = threading.Lock()

    def tally(x: Any) -> None:
        with lock:
            done[0] += 1

    k3jobq.run(range(n), [(ident, 4), (ident, 4), (ident, 4), tally])
    return done[0]


def chain_os_m3_engine(n: int) -> int:
    from os_m3_engine.core.backend import Backend
    from os_m3_engine.core.frontend import Frontend
    from os_m3_engine.core.transport import Transport
    from os_m3_engine.launcher import create

    class Front(Frontend):
        def produce(self) -> Iterator[int]:
            yield from range(n)

    class Mid(Transport):
        def transport(self, data: Any) -> Any:
            return data

    class Back(Backend):
        def process(self, data: Any) -> None:
            pass

    create(frontend_cls=Front, transport_cls=Mid, backend_cls=Back).start()
    return n


def chain_pypeln(n: int) -> int:
    import pypeln as pl

    s = pl.thread.map(ident, range(n), workers=4, maxsize=1000)
    s = pl.thread.map(ident, s, workers=4, maxsize=1000)
    s = pl.thread.map(ident, s, workers=4, maxsize=1000)
    return count(s)


def chain_mpire(n: int) -> int:
    from mpire import WorkerPool

    with (
        WorkerPool(4, start_method="threading") as a,
        WorkerPool(4, start_method="threading") as b,
        WorkerPool(4, start_method="threading") as c,
    ):
        s = a.imap_unordered(ident, range(n), iterable_len=n)
        s = b.imap_unordered(ident, s, iterable_len=n)
        s = c.imap_unordered(ident, s, iterable_len=n)
        return count(s)


def chain_streamable(n: int) -> int:
    from streamable import Stream

    s = Stream(range(n)).map(ident, concurrency=4).map(ident, concurrency=4)
    return count(s.map(ident, concurrency=4))


def chain_thread_pool(n: int) -> int:
    with ThreadPoolExecutor(4) as a, ThreadPoolExecutor(4) as b, ThreadPoolExecutor(4) as c:
        return count(c.map(ident, b.map(ident, a.map(ident, range(n)))))


CHAIN: dict[str, Callable[[int], int]] = {
    "conveyor": chain_conveyor,
    "floor (SimpleQueue, unbounded)": chain_floor,
    "queue.Queue(1000) chain": chain_bounded_queue,
    "k3jobq": chain_k3jobq,
    "os-m3-engine 0.1.2": chain_os_m3_engine,
    "pypeln.thread": chain_pypeln,
    "mpire (threading)": chain_mpire,
    "streamable": chain_streamable,
    "ThreadPoolExecutor.map": chain_thread_pool,
}


# -- workloads 2 and 3: waiting stages ------------------------------------------------------


def sleep2ms(x: Any) -> Any:
    time.sleep(0.002)
    return x


async def asleep10ms(x: Any) -> Any:
    await asyncio.sleep(0.01)
    return x


def sleepers_conveyor(n: int) -> int:
    from conveyor import Pipeline

    return count(Pipeline(range(n)).map(sleep2ms, workers=64))


def sleepers_thread_pool(n: int) -> int:
    with ThreadPoolExecutor(64) as ex:
        return count(ex.map(sleep2ms, range(n)))


def sleepers_pypeln(n: int) -> int:
    import pypeln as pl

    return count(pl.thread.map(sleep2ms, range(n), workers=64, maxsize=1000))


def sleepers_k3jobq(n: int) -> int:
    import k3jobq

    k3jobq.run(range(n), [(sleep2ms, 64)])
    return n


def async_conveyor(n: int) -> int:
    from conveyor import Pipeline

    return count(Pipeline(range(n)).map(asleep10ms, kind="async", workers=256))


def async_semaphore(n: int) -> int:
    async def main() -> int:
        sem = asyncio.Semaphore(256)

        async def one(x: int) -> Any:
            async with sem:
                return await asleep10ms(x)

        return len(await asyncio.gather(*(one(x) for x in range(n))))

    return asyncio.run(main())


def async_pypeln(n: int) -> int:
    import pypeln as pl

    return count(pl.task.map(asleep10ms, range(n), workers=256, maxsize=1000))


def async_streamable(n: int) -> int:
    from streamable import Stream

    async def main() -> int:
        return len([x async for x in Stream(range(n)).map(asleep10ms, concurrency=256)])

    return asyncio.run(main())


# -- workload 4: ordered output behind one slow item ----------------------------------------

SLOW_S = 3.0


def slow_first(x: int) -> int:
    if x == 0:
        time.sleep(SLOW_S)
    return x


def ordered_conveyor(n: int) -> int:
    from conveyor import Pipeline

    return count(Pipeline(range(n), ordered=True).map(slow_first, workers=4))


def ordered_window64(n: int) -> int:
    """The hand-written reference: 4 threads, at most 64 items in flight, emitted in order."""
    got = 0
    with ThreadPoolExecutor(4) as ex:
        window: deque[Any] = deque()
        for x in range(n):
            if len(window) >= 64:
                window.popleft().result()
                got += 1
            window.append(ex.submit(slow_first, x))
        while window:
            window.popleft().result()
            got += 1
    return got


def ordered_thread_pool(n: int) -> int:
    with ThreadPoolExecutor(4) as ex:
        return count(ex.map(slow_first, range(n)))


def ordered_pypeln(n: int) -> int:
    import pypeln as pl

    return count(pl.thread.ordered(pl.thread.map(slow_first, range(n), workers=4, maxsize=64)))


def ordered_mpire(n: int) -> int:
    from mpire import WorkerPool

    with WorkerPool(4, start_method="threading") as pool:
        return count(pool.imap(slow_first, range(n), iterable_len=n))


ORDERED: dict[str, Callable[[int], int]] = {
    "conveyor": ordered_conveyor,
    "hand-written 64-item window": ordered_window64,
    "ThreadPoolExecutor.map": ordered_thread_pool,
    "pypeln.thread + ordered": ordered_pypeln,
    "mpire (threading) imap": ordered_mpire,
}


def memory_child(name: str, n: int) -> None:
    """In a fresh process: peak traced memory above the baseline while running one peer."""
    fn = ORDERED[name]
    # import every peer first: module objects are not what this measures
    import mpire
    import pypeln

    import conveyor

    del conveyor, mpire, pypeln
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn(n)
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"peak_mb": (peak - base) / 1e6}))


# -- running --------------------------------------------------------------------------------


def measure(fns: dict[str, Callable[[int], int]], n: int, repeat: int) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for name, fn in fns.items():
        try:
            got = fn(min(n, 1000))  # warm up, and check it works at all
            if got != min(n, 1000):
                raise RuntimeError(f"returned {got} items")
            med, _ = median_time(lambda fn=fn: fn(n), repeat)
            out[name] = med
        except Exception as exc:
            out[name] = f"fails: {type(exc).__name__}: {exc}"[:90]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    parser.add_argument("--memory-child", nargs=2, metavar=("PEER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    repeat = 1 if args.quick else 3
    scale = 10 if args.quick else 1
    print(f"# pipelines benchmark (python {sys.version.split()[0]}, medians of {repeat})")

    n = 200_000 // scale
    res = measure(CHAIN, n, repeat)
    floor = res["floor (SimpleQueue, unbounded)"]
    rows = []
    for name, t in res.items():
        if isinstance(t, str):
            rows.append((name, t, ""))
        else:
            ratio = (n / t) / (n / floor) if isinstance(floor, float) else float("nan")
            rows.append((name, f"{n / t:,.0f}", f"{ratio:.2f}x floor"))
    table(
        f"1. three identity thread stages, 4 workers each, {n:,} items",
        rows,
        ("peer", "items/s", "vs floor"),
    )

    for title, fns, n, ideal_per_item in (
        (
            "2. one stage sleeping 2 ms, 64 workers",
            {
                "conveyor": sleepers_conveyor,
                "ThreadPoolExecutor.map": sleepers_thread_pool,
                "pypeln.thread": sleepers_pypeln,
                "k3jobq": sleepers_k3jobq,
            },
            12_800 // scale,
            0.002 / 64,
        ),
        (
            "3. one async stage, asyncio.sleep(0.01), 256 workers",
            {
                "conveyor": async_conveyor,
                "asyncio.gather + Semaphore": async_semaphore,
                "pypeln.task": async_pypeln,
                "streamable": async_streamable,
            },
            51_200 // scale,
            0.01 / 256,
        ),
    ):
        res = measure(fns, n, repeat)
        ideal = n * ideal_per_item
        rows = [
            (
                name,
                t if isinstance(t, str) else f"{t:.3f}",
                "" if isinstance(t, str) else f"{ideal / t:.1%} of ideal",
            )
            for name, t in res.items()
        ]
        table(f"{title}, {n:,} items (ideal {ideal:.2f} s)", rows, ("peer", "seconds", "share"))

    sizes = (5_000, 20_000) if args.quick else (50_000, 200_000)
    rows = []
    for name in ORDERED:
        cells = []
        for size in sizes:
            r = run_child("bench.pipelines", "--memory-child", name, str(size))
            cells.append(r["error"] if "error" in r else f"{r['peak_mb']:.2f} MB")
        rows.append((name, cells[0], cells[1]))
    table(
        "4a. ordered, item 0 takes 3 s, 4 workers: peak traced memory growth",
        rows,
        ("peer", f"N={sizes[0]:,}", f"N={sizes[1]:,}"),
    )
    n = sizes[1]
    res = measure({k: ORDERED[k] for k in ("conveyor", "hand-written 64-item window")}, n, repeat)
    ref = res["hand-written 64-item window"]
    rows = [
        (
            name,
            t if isinstance(t, str) else f"{t:.3f}",
            "" if isinstance(t, str) or isinstance(ref, str) else f"{t / ref:.2f}x the reference",
        )
        for name, t in res.items()
    ]
    table(
        f"4b. ordered, item 0 takes 3 s, 4 workers, {n:,} items: time",
        rows,
        ("peer", "seconds", "ratio"),
    )


if __name__ == "__main__":
    main()
