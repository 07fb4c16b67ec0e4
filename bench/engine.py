"""The execution layer: what keys, time limits and the kinds' users cost, and a before/after.

    .bench-venv/bin/python -m bench.engine [--quick] [--before SRC]

``--before SRC`` runs every workload a second time with another checkout of conveyor first on
the import path (``git worktree add /tmp/before <commit>``, then ``--before /tmp/before/src``),
each in a fresh process, so the two are measured in the same run.

Workloads (medians of 3, each in a fresh process):

1. one thread stage of ``lambda x: x``, 4 workers, 200k items: plain, keyed (``key=x % 64``
   and ``key=x % 7``) and with ``timeout_s=5``; items/s and the ratio to plain;
2. the same on a process stage, 2 workers;
3. 10k CPU-light process tasks (``x + 1``) on one worker (memory queue, concurrency 2): jobs/s;
4. 10k thread tasks and 10k async tasks on one worker: jobs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench._harness import table

STAGE_N = 200_000
TASK_N = 10_000


def ident(x: int) -> int:
    return x


def plus_one(x: int) -> int:
    return x + 1


async def aplus_one(x: int) -> int:
    return x + 1


def key64(x: int) -> int:
    return x % 64


def key7(x: int) -> int:
    return x % 7


def stage(kind: str, variant: str, n: int) -> float:
    from conveyor import Pipeline

    options: dict[str, Any] = {"kind": kind, "workers": 4 if kind == "thread" else 2}
    if variant == "key64":
        options["key"] = key64
    elif variant == "key7":
        options["key"] = key7
    elif variant == "timeout":
        options["timeout_s"] = 5
    t0 = time.perf_counter()
    count = sum(1 for _ in Pipeline(range(n)).map(ident, **options))
    seconds = time.perf_counter() - t0
    assert count == n
    return n / seconds


def tasks(executor: str, n: int) -> float:
    from conveyor import TaskQueue

    q = TaskQueue(f"memory://bench-{executor}")
    fn: Any = aplus_one if executor == "async" else plus_one
    task = (
        q.task(fn, name="plus_one")
        if executor == "async"
        else q.task(fn, name="plus_one", executor=executor)
    )
    jobs = task.enqueue_many([((i,), {}) for i in range(n)])
    concurrency = 2 if executor == "process" else 8
    t0 = time.perf_counter()
    q.worker(burst=True, concurrency=concurrency, handle_signals=False).run()
    seconds = time.perf_counter() - t0
    assert jobs[-1].result() == n
    return n / seconds


WORKLOADS = {
    **{f"thread {v}": ("stage", "thread", v) for v in ("plain", "key64", "key7", "timeout")},
    **{f"process {v}": ("stage", "process", v) for v in ("plain", "key64", "key7", "timeout")},
    **{f"{e} tasks": ("tasks", e, "") for e in ("process", "thread", "async")},
}


def child(name: str, scale: float) -> None:
    what, kind, variant = WORKLOADS[name]
    if what == "stage":
        rate = stage(kind, variant, int(STAGE_N * scale))
    else:
        rate = tasks(kind, int(TASK_N * scale))
    print(json.dumps({"rate": rate}))


def measure(name: str, src: str | None, scale: float, repeat: int) -> float | str:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in (src, root) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    rates = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-m", "bench.engine", "--child", name, str(scale)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            return (done.stderr.strip().splitlines() or ["no output"])[-1][:80]
        rates.append(json.loads(lines[-1])["rate"])
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", metavar="SRC", help="another conveyor's src folder")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]))
        return
    scale, repeat = (0.25, 1) if args.quick else (1.0, 3)
    rows = []
    results: dict[str, dict[str, float | str]] = {}
    for name in WORKLOADS:
        now = measure(name, None, scale, repeat)
        before = measure(name, args.before, scale, repeat) if args.before else None
        results[name] = {"now": now} | ({"before": before} if before is not None else {})
        print(f"{name}: {results[name]}", file=sys.stderr)
    for name, res in results.items():
        kind = name.split()[0]
        plain = results.get(f"{kind} plain", {}).get("now")
        now = res["now"]
        vs_plain = ""
        if isinstance(now, float) and isinstance(plain, float) and "tasks" not in name:
            vs_plain = f"{now / plain:.2f}x plain"
        cell = f"{now:,.0f}/s" if isinstance(now, float) else str(now)
        before = res.get("before")
        if isinstance(before, float) and isinstance(now, float):
            cell += f" (before {before:,.0f}/s: {now / before:.2f}x)"
        elif before is not None:
            cell += f" (before: {before})"
        rows.append((name, cell, vs_plain))
    table("execution layer (medians)", rows, ("workload", "rate", "vs plain"))


if __name__ == "__main__":
    main()
