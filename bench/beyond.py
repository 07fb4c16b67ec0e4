"""Beyond one machine: a conveyor stage on a Dask cluster against Dask's own ``Client.map``.

    bench/setup && .bench-venv/bin/python -m bench.beyond [--quick]

One ``distributed.LocalCluster`` (2 worker processes of 1 thread each, on loopback) serves
every peer in the run, in turn, three times (median):

1. items of about 2 ms of CPU: ``Client.map`` + ``gather`` over all of them at once (the
   scheduler holds every task), against a conveyor stage ``kind="dask"`` with 16 calls in
   flight, and ``kind="executor"`` given the client's executor;
2. items of about 20 µs of CPU, where the round trip to the scheduler is the cost: the same
   peers, and a conveyor pipeline that batches 200 items per call (``.batch(200)``) before the
   Dask stage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench._harness import table
from bench.processes import busy_with as spin


def on_lists(fn: Callable[[int], int]) -> Callable[[list[int]], list[int]]:
    def work(xs: list[int]) -> list[int]:
        return [fn(x) for x in xs]

    return work


def loops_for(seconds: float) -> int:
    fn = spin(10_000)
    t0 = time.perf_counter()
    for i in range(20):
        fn(i)
    per_loop = (time.perf_counter() - t0) / 20 / 10_000
    return max(1, int(seconds / per_loop))


def client_map(client: Any, fn: Callable[[int], int], n: int) -> int:
    futures = client.map(fn, range(n), pure=False)
    return len(client.gather(futures))


def conveyor_dask(address: str, fn: Callable[[int], int], n: int) -> int:
    from conveyor import Pipeline

    return sum(1 for _ in Pipeline(range(n)).map(fn, kind="dask", address=address, workers=16))


def conveyor_executor(client: Any, fn: Callable[[int], int], n: int) -> int:
    from conveyor import Pipeline

    ex = client.get_executor(pure=False)
    return sum(1 for _ in Pipeline(range(n)).map(fn, kind="executor", executor=ex, workers=16))


def conveyor_batched(address: str, fn: Callable[[int], int], n: int) -> int:
    from conveyor import Pipeline

    p = (
        Pipeline(range(n))
        .batch(200)
        .map(on_lists(fn), kind="dask", address=address, workers=8)
        .flat_map(lambda xs: xs)
    )
    return sum(1 for _ in p)


def measure(run: Callable[[], int], n: int, repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        assert run() == n
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster.scheduler_address) as client,
    ):
        address = cluster.scheduler_address
        for label, seconds, n in (
            ("about 2 ms of CPU", 2e-3, 500 if args.quick else 2000),
            ("about 20 us of CPU", 20e-6, 1000 if args.quick else 5000),
        ):
            fn = spin(loops_for(seconds))
            client.run(lambda: None)  # the workers are up
            peers: dict[str, Callable[[], int]] = {
                "Client.map + gather": lambda fn=fn, n=n: client_map(client, fn, n),
                'conveyor kind="dask", 16 in flight': lambda fn=fn, n=n: conveyor_dask(
                    address, fn, n
                ),
                'conveyor kind="executor" (client executor)': lambda fn=fn, n=n: conveyor_executor(
                    client, fn, n
                ),
            }
            if seconds < 1e-3:
                peers['conveyor .batch(200) then kind="dask"'] = lambda fn=fn, n=n: (
                    conveyor_batched(address, fn, n)
                )
            rates = {name: measure(run, n, repeat) for name, run in peers.items()}
            floor = rates["Client.map + gather"]
            ideal = 2 / seconds
            table(
                f"{n:,} items of {label}, 2 Dask workers (ideal {ideal:,.0f} items/s)",
                [
                    (name, f"{rate:,.0f}", f"{rate / floor:.2f}x Client.map")
                    for name, rate in rates.items()
                ],
                ("peer", "items/s", "ratio"),
            )


if __name__ == "__main__":
    main()
