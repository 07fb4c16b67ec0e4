"""Is that worker still alive? What a worker's record says, judged by another worker.

A worker found dead has its leases ended at once, so its jobs run again within seconds rather
than after ``lease_s``. Being wrong costs a second run of a job (never a second outcome: the
token still decides), so the judgement errs on the side of "alive":

* **Same machine** (same host name, same boot, same process namespace): the pid is looked up.
  A pid that no longer runs — gone, or a zombie not yet reaped, or a new process that took the
  number (its start time differs) — is dead. A process that runs is alive, however late its
  beats (it may be paused, or busy); its leases still protect its jobs.
* **Another machine** (or one whose identity cannot be read): dead after
  ``WORKER_MISSED_BEATS`` beats without a record, judged only by a worker that has itself been
  looking at regular intervals — one that was paused, or whose clock jumped, first looks again.
"""

from __future__ import annotations

import os
import socket
from functools import cache

from .backends.base import WORKER_MISSED_BEATS, WorkerInfo


@cache
def host_key() -> str:
    """This machine and process namespace: two workers with the same key see the same pids.
    Empty where that cannot be known (no ``/proc``): pids are then never compared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if no such process runs
    (a zombie does not run). -1 when it cannot be told (no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    # "pid (comm) state ppid ...": comm may hold anything, so split after its last ')'
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        return -1
    if fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[19])


def why_gone(record: WorkerInfo, me: str, now: float, judge_beats: bool) -> str | None:
    """Why the worker of ``record`` is dead and its leases should end now; None if it may be
    alive, stopped cleanly (it handed its jobs back), or was already found dead. ``now`` is
    on the storage's clock; ``judge_beats``: this worker has been looking regularly."""
    if record.id == me or record.stopped_at is not None:
        return None
    if record.reclaimed_at is not None and record.reclaimed_at >= record.last_beat:
        return None
    mine = host_key()
    if mine and record.host_key == mine:
        started = process_started(record.pid)
        if started is None:
            return f"its process (pid {record.pid}) no longer runs"
        if started >= 0 and record.pid_started and started != record.pid_started:
            return f"its process (pid {record.pid}) no longer runs (the pid is another's now)"
        return None
    silent = now - record.last_beat
    if judge_beats and silent > record.beat_s * WORKER_MISSED_BEATS:
        return f"it has not beaten for {silent:.1f} s (it beats every {record.beat_s:g} s)"
    return None
