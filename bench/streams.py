"""A Redis Stream boundary: conveyor's ``from_stream`` → ``map`` → ``to_stream`` against a raw
redis-py loop doing the same work (the floor).

    bench/setup && .bench-venv/bin/python -m bench.streams [--quick]

One redis-server of the benchmark's own (loopback, no persistence). Per run: N entries are
written to ``in`` beforehand; then two consumer processes of one group move every entry,
doubled, to ``out`` and acknowledge it. The raw loop is ``XREADGROUP COUNT 256 BLOCK 100``,
one pipelined ``XADD`` per entry into ``out``, one ``XACK`` of the batch, until the group has
nothing left. The rate is N over the time from the first consumer's start of work to the last
one's end (process start-up excluded). Three runs each, alternating; medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._harness import table

BATCH = 256


def raw_consumer(url: str, name: str) -> tuple[float, float]:
    import redis

    r = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    while True:
        reply = r.xreadgroup("g", name, {"in": ">"}, count=BATCH, block=100)
        if not reply or not reply[0][1]:
            info = next(g for g in r.xinfo_groups("in") if g["name"] == b"g")
            if not info["lag"]:
                break
            continue
        entries = reply[0][1]
        pipe = r.pipeline(transaction=False)
        for _, fields in entries:
            pipe.xadd("out", {b"v": json.dumps(json.loads(fields[b"v"]) * 2).encode()})
        pipe.xack("in", "g", *[entry_id for entry_id, _ in entries])
        pipe.execute()
    return t0, time.perf_counter()


def conveyor_consumer(url: str, name: str) -> tuple[float, float]:
    from conveyor import Pipeline

    t0 = time.perf_counter()
    (
        Pipeline.from_stream(url, "in", group="g", consumer=name, burst=True)
        .map(lambda v: v * 2)
        .to_stream(url, "out")
        .run()
    )
    return t0, time.perf_counter()


def one_run(url: str, peer: str, n: int) -> float:
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd("in", {b"v": str(i).encode()})
    pipe.execute()
    r.xgroup_create("in", "g", id="0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.streams", "--consume", peer, url, f"c{k}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    spans = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert r.xlen("out") >= n, (peer, r.xlen("out"))
    r.close()
    return n / (max(e for _, e in spans) - min(s for s, _ in spans))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--consume", nargs=3, metavar=("PEER", "URL", "NAME"))
    args = parser.parse_args()
    if args.consume:
        peer, url, name = args.consume
        fn = raw_consumer if peer == "raw" else conveyor_consumer
        print(json.dumps(fn(url, name)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from redis_server import RedisServer

    n = 20_000 if args.quick else 100_000
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-streams-")))
    server.start()
    rates: dict[str, list[float]] = {"raw": [], "conveyor": []}
    try:
        for _ in range(3):
            for peer, got in rates.items():
                got.append(one_run(server.url, peer, n))
    finally:
        server.stop()
    floor = statistics.median(rates["raw"])
    rows: list[tuple[str, str, str]] = []
    for peer, got in rates.items():
        med = statistics.median(got)
        rows.append((peer, f"{med:,.0f}", f"{med / floor:.2f}x"))
    table(
        f"Redis Stream boundary: {n:,} entries, 2 consumer processes (entries/s, median of 3)",
        rows,
        ("peer", "entries/s", "vs raw loop"),
    )


if __name__ == "__main__":
    main()
