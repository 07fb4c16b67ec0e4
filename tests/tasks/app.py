"""A task module for the worker-process tests (imported by ``conveyor worker``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conveyor import TaskQueue

queue = TaskQueue(os.environ.get("CONVEYOR_TEST_QUEUE", "memory://"))
LOG = Path(os.environ.get("CONVEYOR_TEST_LOG", os.devnull))
GATE = Path(os.environ.get("CONVEYOR_TEST_GATE", "/nonexistent"))


def note(line: str) -> None:
    # one write() per line with O_APPEND: lines from several processes never interleave
    with open(LOG, "a") as log:
        log.write(line + "\n")


@queue.task(name="record", retries=1)
def record(job: str, hold: bool = False) -> str:
    note(f"start {job} {os.getpid()}")
    while hold and not GATE.exists():
        time.sleep(0.01)  # the test opens the gate by creating the file
    note(f"end {job} {os.getpid()}")
    return job


@queue.task(name="precord", retries=0, executor="process")
def precord(job: str, hold: bool = False) -> str:
    """``record``, in a worker process (and registered with the decorator, at module level)."""
    return str(record.fn(job, hold))


@queue.task(name="poison", retries=2)
def poison(job: str) -> None:
    """Kills the worker running it, every time."""
    note(f"start {job} {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)
