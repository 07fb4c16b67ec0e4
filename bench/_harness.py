"""Shared bits of the benchmarks: timing with medians, subprocess memory probes, tables."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any


def count(it: Iterable[Any]) -> int:
    """Consume ``it``; how many items it gave."""
    n = 0
    for _ in it:
        n += 1
    return n


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_child(module: str, *args: str, timeout_s: float = 600) -> dict[str, Any]:
    """Run ``python -m module args`` and read the JSON object it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err[:120]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def table(title: str, rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> None:
    print(f"\n## {title}\n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
