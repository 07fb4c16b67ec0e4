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
from typing import Any

from .._errors import StageFailed
from .buffer import Buffer, BufferShutdown
from .carry import Ledger, plain
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
from .source import (
    EACH,
    FILTER,
    FLAT,
    FLUSH_OUTPUTS,
    MAP,
    MAX_UNIT,
    MODES,
    WOKEN,
    StepSpec,
    Unit,
    UnitSizer,
    Work,
    apply_result,
)
from .stats import Counters, LatencyRing, StageStats

__all__ = [
    "EACH",
    "FILTER",
    "FLAT",
    "FLUSH_OUTPUTS",
    "MAP",
    "MODES",
    "WOKEN",
    "Step",
    "StepSpec",
    "Unit",
    "Work",
]

#: returned by _take_serial when every item it took waits behind another unit of its key
_PARKED = Unit(-1, [])


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
        # per-key order: each key held by a unit, with what is parked behind it (ordered:
        # one-item units, which keep their place in the output; unordered: the items; None:
        # nothing yet), and units that hold their keys and wait for any worker
        self._keys: dict[Hashable, deque[Any] | None] = {}
        self._parked = 0
        self._ready: deque[Unit] = deque()
        self._cond_waiters = 0
        # adaptive unit size; a worker kind whose hand-off costs more (a process) raises the
        # target (``target_unit_s``)
        self.sizer = UnitSizer()
        self._closed_output = False
        #: set when the items are carried (see ``carry``): the step counts them in and out
        self.ledger: Ledger | None = None

    # -- sizing -----------------------------------------------------------------------------
    @property
    def target_unit_s(self) -> float:
        return self.sizer.target_unit_s

    @target_unit_s.setter
    def target_unit_s(self, seconds: float) -> None:
        self.sizer.target_unit_s = seconds

    def unit_limit(self) -> int:
        n = self.sizer.limit()
        if self.limiter is not None:
            n = min(n, self.limiter.max_batch())
        # what workers hold counts against memory like what buffers hold: a stage's workers
        # together hold at most about one inbox's worth
        return max(1, min(n, self.inbox.capacity // self.spec.workers))

    def measured(self, n_items: int, seconds: float) -> None:
        """Feed the unit-size estimate and the latency samples with one finished unit."""
        per = self.sizer.measured(n_items, seconds)
        if per is not None:
            self.latency.add(per)

    # -- taking -----------------------------------------------------------------------------
    def kick(self) -> None:
        self.inbox.kick()

    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        """Wait for the next unit; ``None`` once the input has ended, :data:`WOKEN` when the
        inbox was kicked (the pool wants its workers to look at their orders) or, with
        ``wait=False``, when nothing could be taken at once.

        Raises :class:`BufferShutdown` when the run is being torn down.
        """
        while True:
            n = self.unit_limit() if limit is None else max(1, min(limit, MAX_UNIT))
            if self.limiter is not None:
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
        """Take a unit for an ordered or keyed step. The take lock keeps the numbering in
        inbox order; a taker that must not wait never waits for it either, because its
        holder may be waiting for room in the window that only that taker's own units can
        make (a process driver with units in flight takes with ``wait=False``)."""
        spec = self.spec
        if not self._take_lock.acquire(blocking=wait):
            return WOKEN
        try:
            with self._cond:
                if self._ready:
                    return self._ready.popleft()
                if spec.ordered:
                    while self._in_window >= spec.window:
                        if not wait:
                            return WOKEN
                        self._check_stop()
                        self._wait_on_cond()
                    n = min(n, spec.window - self._in_window)
                if spec.key is not None:
                    while self._parked >= spec.window:
                        if not wait:
                            return WOKEN
                        self._check_stop()
                        self._wait_on_cond()
                    n = min(n, spec.window - self._parked)
            items = self.inbox.get_many(n, None if wait else 0)
            if items is None:
                return self._after_the_input(wait)
            if not items:
                return WOKEN
            with self.counters.lock:
                self.counters.received += len(items)
            if spec.key is None:
                with self._cond:
                    unit = Unit(self._seq, items)
                    self._seq += 1
                    if spec.ordered:
                        self._in_window += len(items)
                return unit
            keys = self._keys_of(items)
            with self._cond:
                try:
                    units = self._gate(items, keys)
                except TypeError:  # an unhashable key: find whose, and fail the stage
                    self._culprit(items)
                    raise
                if spec.ordered:
                    self._in_window += len(items)
                if not units:
                    return _PARKED
                first = units[0]
                self._ready.extend(units[1:])
            return first
        finally:
            self._take_lock.release()

    def _after_the_input(self, wait: bool) -> Unit | None:
        """The inbox is closed and drained. Items may still be parked behind units in flight:
        they come out (through ``_ready``) when those units release their keys, so the input
        has ended only once no unit holds a key."""
        with self._cond:
            while True:
                if self._ready:
                    return self._ready.popleft()
                if not self._keys:
                    return None
                if not wait:
                    return WOKEN
                self._check_stop()
                self._wait_on_cond()

    def _keys_of(self, items: list[Any]) -> list[Hashable]:
        key = self.spec.key
        assert key is not None
        try:
            return list(map(key, items))  # an unhashable key fails in _gate, which comes back
        except Exception:
            pass
        self._culprit(items)
        raise AssertionError("a key failed once and not again")

    def _culprit(self, items: list[Any]) -> None:
        """Fail the stage with the first item whose key cannot be made or hashed."""
        key = self.spec.key
        assert key is not None
        for item in items:
            try:
                hash(key(item))
            except Exception as exc:
                self.fatal(StageFailed(self.name, plain(item), 1, exc))
                raise BufferShutdown from exc

    def _gate(self, items: list[Any], keys: list[Hashable]) -> list[Unit]:
        """Split items just taken into units that may run now (holding their keys) and
        single-item units parked behind the unit that holds their key (cond held).

        Items of one unit run in order on one worker, so a unit may hold several items of
        one key. In an ordered step each unit is a run of consecutive items (units are
        emitted in ``seq`` order), so a parked item ends the run before it."""
        if not self.spec.ordered:
            return self._gate_unordered(items, keys)
        runnable: list[Unit] = []
        run_items: list[Any] = []
        run_item_keys: list[Hashable] = []
        run_keys: dict[Hashable, None] = {}

        def close_run() -> None:
            nonlocal run_items, run_item_keys, run_keys
            if run_items:
                unit = Unit(self._seq, run_items)
                self._seq += 1
                unit.keys = tuple(run_keys)
                unit.item_keys = run_item_keys
                for k in unit.keys:
                    self._keys[k] = None
                runnable.append(unit)
                run_items, run_item_keys, run_keys = [], [], {}

        for item, k in zip(items, keys, strict=True):
            if k in run_keys or k not in self._keys:
                run_items.append(item)
                run_item_keys.append(k)
                run_keys[k] = None
                continue
            close_run()
            single = Unit(self._seq, [item])
            self._seq += 1
            single.keys = (k,)
            self._park(k, single)
            self._parked += 1
        close_run()
        return runnable

    def _gate_unordered(self, items: list[Any], keys: list[Hashable]) -> list[Unit]:
        """``_gate`` where order matters only within a key: every item whose key is free (or
        taken by an earlier item of this batch) joins one unit (cond held)."""
        held = self._keys
        mine: dict[Hashable, None] = {}
        run_items: list[Any] = []
        run = run_items.append
        parked = 0
        for item, k in zip(items, keys, strict=True):
            if k in mine or k not in held:
                mine[k] = None
                run(item)
            else:
                waiting = held[k]  # unordered: a parked item needs no unit of its own
                if waiting is None:
                    held[k] = waiting = deque()
                waiting.append(item)
                parked += 1
        self._parked += parked
        if not run_items:
            return []
        unit = Unit(0, run_items)
        unit.keys = tuple(mine)
        for k in mine:
            held[k] = None
        return [unit]

    def _park(self, key: Hashable, what: Any) -> None:
        waiting = self._keys[key]
        if waiting is None:
            self._keys[key] = waiting = deque()
        waiting.append(what)

    def _wait_on_cond(self) -> None:
        """Wait (cond held) for a change of the window, the parked items or the keys."""
        self._cond_waiters += 1
        try:
            self._cond.wait(0.25)
        finally:
            self._cond_waiters -= 1

    def _notify(self) -> None:
        """Wake what waits on cond (cond held); a notify costs only when someone listens."""
        if self._cond_waiters:
            self._cond.notify_all()

    def _check_stop(self) -> None:
        if self.stop.is_set() or self.inbox.is_shutdown:
            raise BufferShutdown

    def release(self, unit: Unit) -> Unit | None:
        """Give back the keys of a finished unit; the items parked behind them run next.

        Ordered: the next parked unit of each key now holds that key; one comes back to the
        caller, which runs it next, and the others wait for any worker. Unordered: the parked
        items of the released keys are gathered into units of up to ``unit_limit()`` items,
        as many units as there are workers (each holding its own keys, with every key's items
        in order), so a few busy keys do not tie all the work to one worker; one comes back
        to the caller, the others wait for any worker."""
        if not unit.keys:
            return None
        with self._cond:
            gather = self._next_parked_units if self.spec.ordered else self._gather_parked
            nxt = gather(unit)
            if not nxt:
                return None
            self._notify()
            self._ready.extend(nxt[1:])
        if len(nxt) > 1:
            self.inbox.kick()  # workers waiting in the inbox take the rest from _ready
        return nxt[0]

    def _next_parked_units(self, unit: Unit) -> list[Unit]:
        nxt: list[Unit] = []
        for k in unit.keys:
            waiting = self._keys[k]
            if waiting:
                self._parked -= 1
                nxt.append(waiting.popleft())
            else:
                del self._keys[k]
        return nxt

    def _gather_parked(self, unit: Unit) -> list[Unit]:
        # parked items are already out of the inbox (they count against the window): their
        # units are sized by time alone, not by a worker's share of the inbox
        cap = self.sizer.limit()
        groups: list[list[tuple[Hashable, list[Any]]]] = [[] for _ in range(self.spec.workers)]
        sizes = [0] * len(groups)
        turn = 0
        for k in unit.keys:
            waiting = self._keys[k]
            if not waiting:
                del self._keys[k]
                continue
            g = turn % len(groups)
            turn += 1
            # at least one item each: a key with parked items must be held by a new unit, or
            # nothing would ever release them
            items: list[Any] = [waiting.popleft()]
            sizes[g] += 1
            while waiting and sizes[g] < cap:
                items.append(waiting.popleft())
                sizes[g] += 1
            self._parked -= len(items)
            groups[g].append((k, items))
            # a key whose parked items did not all fit stays held by the new unit
        units = []
        for group in groups:
            if group:
                merged = Unit(0, [x for _, items in group for x in items])
                merged.keys = tuple(k for k, _ in group)
                units.append(merged)
        return units

    # -- results ----------------------------------------------------------------------------
    def apply(self, item: Any, result: Any, out: list[Any]) -> None:
        """Add what ``result`` (of the user's function on ``item``) means to ``out``."""
        apply_result(self.mode, item, result, out)

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        """Hand on the outputs of a finished unit (in order, for an ordered step)."""
        n_items = len(unit.items)
        with self.counters.lock:
            self.counters.finished += n_items
            self.counters.emitted += len(outputs)
        ledger = self.ledger
        if ledger is not None:
            # the outputs count in before anything downstream can count them out
            ledger.enter(outputs)
        if not self.spec.ordered:
            if outputs:
                self.outbox.put_many(outputs)
            if ledger is not None:
                ledger.leave(unit.items)
            return
        with self._cond:
            self._done[unit.seq] = (outputs, n_items)
            if ledger is not None:
                ledger.leave(unit.items)
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
                    self._notify()
        except BaseException:
            with self._cond:
                self._flushing = False
            raise

    def emit_early(self, outputs: list[Any]) -> None:
        """Hand on part of a unit's outputs before the unit ends (unordered steps only)."""
        with self.counters.lock:
            self.counters.emitted += len(outputs)
        if self.ledger is not None:
            self.ledger.enter(outputs)
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
        carried, item = item, plain(item)
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
        if self.ledger is not None and carried is not item:
            self.ledger.failed(carried.tokens, error)
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
