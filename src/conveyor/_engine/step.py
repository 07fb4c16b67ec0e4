"""One step of work between two buffers, independent of how its workers run.

A :class:`Step` owns everything a step does whatever its worker kind: taking *units* (a list of
items, sized to how long items take) from its inbox, the reorder window for ordered output, the
key gate for per-key order, the failure policy, the rate limit and the statistics. A worker kind
(``thread``, ``async``, ...) only decides where the user's function runs; it calls

* :meth:`Step.take` to get a unit (``None`` at the end of the input),
* :meth:`Step.apply` / the failure helpers while it runs the items,
* :meth:`Step.complete` to hand the outputs on, and
* :meth:`Step.release` to hand back a key, possibly receiving the next unit of that key.

How a unit travels
------------------
Unordered: outputs go straight to the outbox. Ordered: every unit gets a sequence number as it is
taken (under ``_take_lock``, so numbers follow inbox order); finished units wait in ``_done`` until
all earlier ones are out, and the worker that completes the oldest one moves every consecutive
finished unit to the outbox. The window counts items taken and not yet emitted; when it is full
(the oldest item is slow), ``take`` waits, so nothing buffers the whole stream.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from .._errors import StageFailed
from .buffer import Buffer, BufferShutdown
from .clock import SYSTEM_CLOCK, Clock
from .limiter import RateLimiter
from .policy import (
    DEAD,
    RAISE,
    RETRY,
    SKIP,
    DeadLetter,
    Skip,
    decide,
    final_policy,
    log_skip,
    make_failure,
)
from .stats import Counters, LatencyRing, StageStats

MAP = "map"
FILTER = "filter"
FLAT = "flat_map"
EACH = "each"
MODES = (MAP, FILTER, FLAT, EACH)

#: how long one unit of work should take; units of fast items grow until they take about this
TARGET_UNIT_S = 0.002
MAX_UNIT = 2048
#: unordered flat_map outputs are handed on in pieces of this size
FLUSH_OUTPUTS = 1024


class Work(Protocol):
    """What one worker runs: ``setup`` before its first item, ``call`` per item, ``teardown``."""

    def setup(self) -> Any: ...

    def call(self, item: Any) -> Any: ...

    def teardown(self) -> Any: ...


@dataclass(frozen=True)
class StepSpec:
    name: str
    kind: str
    mode: str
    workers: int
    make_work: Callable[[], Work]
    ordered: bool = False
    key: Callable[[Any], Hashable] | None = None
    policy: Any = "raise"
    timeout_s: float | None = None
    rate: float | None = None
    window: int = 1024
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


class Unit:
    """Items taken together; ``seq`` orders units of an ordered step."""

    __slots__ = ("attempt", "items", "key", "seq", "started")

    def __init__(self, seq: int, items: list[Any]) -> None:
        self.seq = seq
        self.items = items
        self.key: Hashable = _NO_KEY
        self.attempt = 1
        self.started = 0.0


class _NoKey:
    def __repr__(self) -> str:
        return "<no key>"


_NO_KEY: Hashable = _NoKey()
# returned by _take_serial when the unit it took waits behind another unit of its key
_PARKED = Unit(-1, [])
#: returned by Step.take when the inbox was kicked
WOKEN = Unit(-2, [])


class Step:
    def __init__(
        self,
        spec: StepSpec,
        inbox: Buffer[Any],
        outbox: Buffer[Any],
        *,
        stop: threading.Event,
        on_fatal: Callable[[BaseException], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.mode = spec.mode
        self.inbox = inbox
        self.outbox = outbox
        self.stop = stop
        self.clock = clock
        self._on_fatal = on_fatal
        self.policy = spec.policy
        self.counters = Counters()
        self.latency = LatencyRing()
        self.limiter = RateLimiter(spec.rate, clock) if spec.rate else None
        self.serial_take = spec.ordered or spec.key is not None
        self._take_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seq = 0
        # ordered output
        self._next_emit = 0
        self._in_window = 0
        self._done: dict[int, tuple[list[Any], int]] = {}
        self._flushing = False
        # per-key order
        self._keys: dict[Hashable, deque[Unit]] = {}
        self._parked = 0
        # adaptive unit size: seconds per item, smoothed; a worker kind whose handoff costs
        # more (a process) raises the target
        self._item_s: float | None = None
        self.target_unit_s = TARGET_UNIT_S
        self._closed_output = False

    # -- sizing -----------------------------------------------------------------------------
    def unit_limit(self) -> int:
        spec = self.spec
        if spec.key is not None or spec.timeout_s is not None:
            return 1
        item_s = self._item_s
        target = self.target_unit_s
        n = 1 if item_s is None else max(1, min(MAX_UNIT, int(target / max(item_s, 1e-9))))
        if self.limiter is not None:
            n = min(n, self.limiter.max_batch())
        # what workers hold counts against memory like what buffers hold: a stage's workers
        # together hold at most about one inbox's worth
        return max(1, min(n, self.inbox.capacity // spec.workers))

    def measured(self, n_items: int, seconds: float) -> None:
        """Feed the unit-size estimate and the latency samples with one finished unit."""
        if n_items <= 0:
            return
        per = seconds / n_items
        prev = self._item_s
        self._item_s = per if prev is None else prev * 0.7 + per * 0.3
        self.latency.add(per)

    # -- taking -----------------------------------------------------------------------------
    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        """Wait for the next unit; ``None`` once the input has ended, :data:`WOKEN` when the
        inbox was kicked (the pool wants its workers to look at their orders).

        Raises :class:`BufferShutdown` when the run is being torn down.
        """
        while True:
            n = self.unit_limit() if limit is None else max(1, min(limit, MAX_UNIT))
            if self.spec.key is not None:
                n = 1
            elif self.limiter is not None:
                n = min(n, self.limiter.max_batch())
            if self.serial_take:
                unit = self._take_serial(n, wait)
            else:
                items = self.inbox.get_many(n, None if wait else 0)
                if items is None:
                    return None
                if not items:
                    return WOKEN
                unit = Unit(0, items)
                with self.counters.lock:
                    self.counters.received += len(items)
            if unit is None:
                return None
            if unit is _PARKED:
                continue
            if unit is WOKEN:
                return unit
            if self.limiter is not None and not self.limiter.acquire(len(unit.items), self.stop):
                raise BufferShutdown
            return unit

    def _take_serial(self, n: int, wait: bool) -> Unit | None:
        spec = self.spec
        with self._take_lock:
            with self._cond:
                if spec.ordered:
                    while self._in_window >= spec.window:
                        if not wait:
                            return WOKEN
                        self._check_stop()
                        self._cond.wait(0.25)
                    n = min(n, spec.window - self._in_window)
                if spec.key is not None:
                    while self._parked >= spec.window:
                        if not wait:
                            return WOKEN
                        self._check_stop()
                        self._cond.wait(0.25)
            items = self.inbox.get_many(n, None if wait else 0)
            if items is None:
                return None
            if not items:
                return WOKEN
            with self._cond:
                unit = Unit(self._seq, items)
                self._seq += 1
                if spec.ordered:
                    self._in_window += len(items)
            with self.counters.lock:
                self.counters.received += len(items)
            if spec.key is not None:
                try:
                    unit.key = spec.key(items[0])
                    hash(unit.key)
                except Exception as exc:
                    self.fatal(StageFailed(self.name, items[0], 1, exc))
                    raise BufferShutdown from exc
                if not self._claim_key(unit):
                    return _PARKED
        return unit

    def _check_stop(self) -> None:
        if self.stop.is_set() or self.inbox.is_shutdown:
            raise BufferShutdown

    def _claim_key(self, unit: Unit) -> bool:
        """Take the unit's key, or park the unit behind the holder of that key (False)."""
        with self._cond:
            waiting = self._keys.get(unit.key)
            if waiting is None:
                self._keys[unit.key] = deque()
                return True
            waiting.append(unit)
            self._parked += 1
            return False

    def release(self, unit: Unit) -> Unit | None:
        """Give back the key of a finished unit: the next unit of that key, if any, comes back
        to the caller, which keeps the key and runs it next."""
        if unit.key is _NO_KEY:
            return None
        with self._cond:
            waiting = self._keys[unit.key]
            if waiting:
                self._parked -= 1
                self._cond.notify_all()
                return waiting.popleft()
            del self._keys[unit.key]
            return None

    # -- results ----------------------------------------------------------------------------
    def apply(self, item: Any, result: Any, out: list[Any]) -> None:
        """Add what ``result`` (of the user's function on ``item``) means to ``out``."""
        mode = self.mode
        if mode == MAP:
            out.append(result)
        elif mode == FILTER:
            if result:
                out.append(item)
        elif mode == FLAT and result is not None:
            out.extend(result)

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        """Hand on the outputs of a finished unit (in order, for an ordered step)."""
        n_items = len(unit.items)
        with self.counters.lock:
            self.counters.finished += n_items
            self.counters.emitted += len(outputs)
        if not self.spec.ordered:
            if outputs:
                self.outbox.put_many(outputs)
            return
        with self._cond:
            self._done[unit.seq] = (outputs, n_items)
            if self._flushing or unit.seq != self._next_emit:
                return
            self._flushing = True
        try:
            while True:
                batch: list[Any] = []
                released = 0
                with self._cond:
                    while self._next_emit in self._done:
                        outs, n = self._done.pop(self._next_emit)
                        batch.extend(outs)
                        released += n
                        self._next_emit += 1
                    if not released:
                        self._flushing = False
                        return
                if batch:
                    self.outbox.put_many(batch)
                with self._cond:
                    self._in_window -= released
                    self._cond.notify_all()
        except BaseException:
            with self._cond:
                self._flushing = False
            raise

    def emit_early(self, outputs: list[Any]) -> None:
        """Hand on part of a unit's outputs before the unit ends (unordered steps only)."""
        with self.counters.lock:
            self.counters.emitted += len(outputs)
        self.outbox.put_many(outputs)

    def close_output(self) -> None:
        """The last worker is done: downstream sees the end of the stream."""
        with self._lock:
            if self._closed_output:
                return
            self._closed_output = True
        self.outbox.close()

    # -- failures ---------------------------------------------------------------------------
    def fatal(self, error: BaseException) -> None:
        self._on_fatal(error)

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        """Record a failed try and decide: the delay before retrying, or ``None`` when the item
        is settled (skipped or dead-lettered). Under ``"raise"`` the run is failed and
        :class:`BufferShutdown` unwinds the worker."""
        decision = decide(self.policy, error, attempt)
        action = decision.action
        if action == RETRY:
            with self.counters.lock:
                self.counters.retried += 1
            return decision.delay_s
        with self.counters.lock:
            self.counters.failed += 1
        final = final_policy(self.policy)
        if action == SKIP:
            with self.counters.lock:
                self.counters.skipped += 1
            if isinstance(final, Skip) and final.log:
                log_skip(self.name, item, error)
            return None
        if action == DEAD:
            assert isinstance(final, DeadLetter)
            try:
                final.deliver(make_failure(self.name, item, attempt, error))
            except Exception as sink_error:
                sink_error.__context__ = error
                self.fatal(StageFailed(self.name, item, attempt, sink_error))
                raise BufferShutdown from sink_error
            with self.counters.lock:
                self.counters.dead_lettered += 1
            return None
        assert action == RAISE
        self.fatal(StageFailed(self.name, item, attempt, error))
        raise BufferShutdown from error

    # -- statistics -------------------------------------------------------------------------
    def snapshot(self, workers: int, busy: int) -> StageStats:
        c = self.counters
        with c.lock:
            received, finished, emitted = c.received, c.finished, c.emitted
            failed, retried, skipped, dead = c.failed, c.retried, c.skipped, c.dead_lettered
        p50, p95, p99 = self.latency.percentiles()
        return StageStats(
            name=self.name,
            kind=self.spec.kind,
            received=received,
            emitted=emitted,
            failed=failed,
            retried=retried,
            skipped=skipped,
            dead_lettered=dead,
            queue_depth=len(self.inbox),
            queue_capacity=self.inbox.capacity,
            workers=workers,
            busy_workers=busy,
            idle_workers=max(0, workers - busy),
            latency_p50_s=p50,
            latency_p95_s=p95,
            latency_p99_s=p99,
            finished=finished,
        )
