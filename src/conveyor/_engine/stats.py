"""Statistics: live counters kept by the engine and the frozen records handed to users.

Counters are bumped once per chunk of work, not once per item, under the owner's lock. Latency is
sampled into a fixed-size ring, so memory stays the same however long a run lasts; the
percentiles are read from the ring when a record is made.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage at one moment."""

    name: str
    kind: str
    received: int
    emitted: int
    failed: int
    retried: int
    skipped: int
    dead_lettered: int
    queue_depth: int
    queue_capacity: int
    workers: int
    busy_workers: int
    idle_workers: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None

    finished: int
    """inputs whose processing ended, whatever the outcome (a flat_map emits many per input)"""

    @property
    def in_flight(self) -> int:
        """Inputs taken and not yet finished."""
        return self.received - self.finished


@dataclass(frozen=True, slots=True)
class StreamStats:
    """A stream-fed run's input at one moment: one consumer of a consumer group."""

    stream: str
    group: str
    consumer: str
    #: entries delivered to this consumer for the first time
    read: int
    #: entries taken over from consumers that stopped renewing them (and this consumer's own
    #: entries from an earlier life under the same name)
    reclaimed: int
    #: entries acknowledged: everything made from them in this run is over
    acknowledged: int
    #: entries moved to the dead-letter stream (delivered too often, or not decodable)
    dead_lettered: int
    #: entries read and not yet acknowledged
    in_flight: int


@dataclass(frozen=True, slots=True)
class RunStats:
    """A whole run at one moment; ``stages`` follow the pipeline's order."""

    stages: tuple[StageStats, ...]
    elapsed_s: float
    items_in: int
    items_out: int
    state: str
    #: the input's own counts, for a run fed by ``Pipeline.from_stream``
    stream: StreamStats | None = None

    @property
    def throughput(self) -> float:
        """Source items taken per second of the run so far."""
        return self.items_in / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def stage(self, name: str) -> StageStats:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class LatencyRing:
    """The last ``size`` latency samples, in seconds."""

    __slots__ = ("_ring", "add")

    def __init__(self, size: int = 2048) -> None:
        # a bounded deque drops the oldest sample itself; appending and sorting it are single
        # steps under the interpreter's lock, so neither needs a lock of ours
        self._ring: deque[float] = deque(maxlen=size)
        #: record one sample
        self.add: Callable[[float], None] = self._ring.append

    def percentiles(self) -> tuple[float | None, float | None, float | None]:
        data = sorted(self._ring)
        if not data:
            return None, None, None

        def at(q: float) -> float:
            return data[min(len(data) - 1, int(q * len(data)))]

        return at(0.50), at(0.95), at(0.99)


class Counters:
    """The mutable side of :class:`StageStats`, updated under ``lock``."""

    __slots__ = (
        "dead_lettered",
        "emitted",
        "failed",
        "finished",
        "lock",
        "received",
        "retried",
        "skipped",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.finished = 0
        self.emitted = 0
        self.failed = 0
        self.retried = 0
        self.skipped = 0
        self.dead_lettered = 0
