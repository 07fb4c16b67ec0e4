"""Process stages: conveyor against the process pools people use, in one run, medians of 3.

    .bench-venv/bin/python -m bench.processes            # the full set
    .bench-venv/bin/python -m bench.processes --quick

Peers run with the platform's default start method (fork on Linux), as their users get them;
conveyor uses its own default (forkserver).

1. 20k items of a pure-Python function of about 200 us, 2 worker processes: items/s for serial,
   conveyor (no chunk size given), ``multiprocessing.Pool.imap`` at chunk sizes 1, 10, 100 and
   1000, ``ProcessPoolExecutor.map``, mpire, pypeln.process and joblib (loky).
2. 1M tiny items (identity) through 2 processes: items/s against ``Pool.imap`` (chunk sizes
   1000 and 1) and mpire with its default chunking.
3. 1 MB ``bytes`` items through a 2-process stage: MB/s against a raw ``multiprocessing.Pipe``
   send/recv loop between two processes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench._harness import count, median_time, table

LOOPS = 2000  # calibrated at start so that busy() takes about 200 us


def busy(x: int) -> int:
    s = 0
    for i in range(LOOPS):
        s += i ^ x
    return s


def busy_with(loops: int) -> Callable[[int], int]:
    """busy() as a closure over its loop count, for peers that ship functions by value."""

    def work(x: int) -> int:
        s = 0
        for i in range(loops):
            s += i ^ x
        return s

    return work


def ident(x: Any) -> Any:
    return x


def size_of(x: bytes) -> int:
    return len(x)


def calibrate(target_s: float = 200e-6) -> int:
    global LOOPS
    n = 20_000
    for _ in range(3):
        LOOPS = n
        t0 = time.perf_counter()
        for x in range(200):
            busy(x)
        per = (time.perf_counter() - t0) / 200
        n = max(100, int(n * target_s / per))
    LOOPS = n
    return n


def _init(loops: int) -> None:
    global LOOPS
    LOOPS = loops


# -- 1: 200 us items --------------------------------------------------------------------------


def busy_serial(n: int) -> int:
    return count(map(busy, range(n)))


def busy_conveyor(n: int) -> int:
    from conveyor import Pipeline

    work = busy_with(LOOPS)

    return count(Pipeline(range(n)).map(work, workers=2, kind="process"))


def pool_imap(chunksize: int) -> Callable[[int], int]:
    def run(n: int) -> int:
        with mp.get_context().Pool(2, initializer=_init, initargs=(LOOPS,)) as pool:
            return count(pool.imap(busy, range(n), chunksize=chunksize))

    return run


def busy_executor(n: int) -> int:
    ctx = mp.get_context()
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init, initargs=(LOOPS,)) as ex:
        return count(ex.map(busy, range(n), chunksize=max(1, n // 2 // 4)))


def busy_mpire(n: int) -> int:
    from mpire import WorkerPool

    work = busy_with(LOOPS)

    with WorkerPool(2, start_method="fork") as pool:
        return count(pool.imap(work, range(n), iterable_len=n))


def busy_pypeln(n: int) -> int:
    import pypeln as pl

    return count(pl.process.map(busy, range(n), workers=2, maxsize=1000))


def busy_joblib(n: int) -> int:
    from joblib import Parallel, delayed

    work = busy_with(LOOPS)

    return len(Parallel(n_jobs=2, backend="loky")(delayed(work)(x) for x in range(n)))


# -- 2: tiny items ----------------------------------------------------------------------------


def tiny_conveyor(n: int) -> int:
    from conveyor import Pipeline

    return count(Pipeline(range(n)).map(ident, workers=2, kind="process"))


def tiny_pool(chunksize: int, share: int = 1) -> Callable[[int], int]:
    """``share`` > 1 runs only n/share items (chunk size 1 would take many minutes) and the
    rate is computed on those."""

    def run(n: int) -> int:
        n //= share
        with mp.get_context().Pool(2) as pool:
            return count(pool.imap(ident, range(n), chunksize=chunksize))

    return run


def tiny_mpire(n: int) -> int:
    from mpire import WorkerPool

    with WorkerPool(2, start_method="fork") as pool:
        return count(pool.imap(ident, range(n), iterable_len=n))


# -- 3: large items ---------------------------------------------------------------------------

MB = 1 << 20


def big_conveyor(n: int) -> int:
    from conveyor import Pipeline

    # a new object per item: pickle sends a repeated object once per message
    blobs = (bytes([i % 256]) * MB for i in range(n))
    # maxsize counts items: with 1 MB items, a user bounds memory to 16 MB per buffer
    return count(Pipeline(blobs).map(size_of, workers=2, kind="process", maxsize=16))


def _echo_sizes(conn: Any) -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(len(data).to_bytes(8, "little"))


def big_raw_pipe(n: int) -> int:
    ctx = mp.get_context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo_sizes, args=(child,))
    proc.start()
    for i in range(n):
        parent.send_bytes(bytes([i % 256]) * MB)
        parent.recv_bytes()
    parent.send_bytes(b"")
    proc.join()
    return n


def measure(fns: dict[str, Callable[[int], int]], n: int, repeat: int) -> dict[str, Any]:
    """Seconds per run, scaled to ``n`` items for runners that did fewer."""
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            done = [n]

            def once(fn: Callable[[int], int] = fn, done: list[int] = done) -> None:
                done[0] = fn(n)

            med, _ = median_time(once, repeat)
            out[name] = med * n / max(1, done[0])
        except Exception as exc:
            out[name] = f"fails: {type(exc).__name__}: {exc}"[:90]
    return out


def rows_vs(res: dict[str, Any], n: int, ref: str, unit: float = 1.0) -> list[tuple[str, str, str]]:
    base = res.get(ref)
    rows = []
    for name, t in res.items():
        if isinstance(t, str):
            rows.append((name, t, ""))
            continue
        ratio = "" if not isinstance(base, float) else f"{base / t:.2f}x {ref}"
        rows.append((name, f"{n * unit / t:,.0f}", ratio))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    scale = 10 if args.quick else 1
    loops = calibrate()
    print(f"# processes benchmark (python {sys.version.split()[0]}, medians of {repeat})")
    print(f"busy(): {loops} loop iterations, about 200 us per call")

    n = 20_000 // scale
    fns: dict[str, Callable[[int], int]] = {"serial": busy_serial, "conveyor": busy_conveyor}
    for c in (1, 10, 100, 1000):
        fns[f"Pool.imap chunksize={c}"] = pool_imap(c)
    fns |= {
        "ProcessPoolExecutor.map": busy_executor,
        "mpire": busy_mpire,
        "pypeln.process": busy_pypeln,
        "joblib (loky)": busy_joblib,
    }
    res = measure(fns, n, repeat)
    best_pool = min(
        (t for k, t in res.items() if k.startswith("Pool.imap") and isinstance(t, float)),
        default=None,
    )
    if best_pool is not None:
        res["best Pool.imap"] = best_pool
    table(
        f"1. {n:,} items of ~200 us, 2 processes",
        rows_vs(res, n, "best Pool.imap"),
        ("peer", "items/s", "vs best Pool.imap"),
    )

    n = 1_000_000 // scale
    res = measure(
        {
            "conveyor": tiny_conveyor,
            "Pool.imap chunksize=1000": tiny_pool(1000),
            "Pool.imap chunksize=1 (on 1/50 of the items)": tiny_pool(1, share=50),
            "mpire (default chunks)": tiny_mpire,
        },
        n,
        repeat,
    )
    table(
        f"2. {n:,} tiny items (identity), 2 processes",
        rows_vs(res, n, "Pool.imap chunksize=1000"),
        ("peer", "items/s", "ratio"),
    )

    n = 2000 // scale
    res = measure({"conveyor": big_conveyor, "raw Pipe send/recv": big_raw_pipe}, n, repeat)
    table(
        f"3. {n:,} items of 1 MB bytes, 2 processes",
        rows_vs(res, n, "raw Pipe send/recv"),
        ("peer", "MB/s", "ratio"),
    )


if __name__ == "__main__":
    main()
