"""The thread worker kind: each worker is a daemon thread calling the user's function.

A thread cannot be interrupted. When an item runs past the stage's ``timeout_s`` the watchdog
*abandons* its thread: the item is settled by the stage's policy on a fresh replacement thread,
and whatever the old thread returns later is thrown away. The old thread is a daemon, so it never
keeps the interpreter alive.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .._errors import ItemTimeout, StageFailed
from .buffer import BufferShutdown
from .pool import Slot, SlotPool, register_kind
from .step import EACH, FILTER, FLAT, FLUSH_OUTPUTS, MAP, WOKEN, Unit, Work

log = logging.getLogger("conveyor")


@register_kind
class ThreadPool(SlotPool):
    kind = "thread"

    def start(self) -> None:
        self._begin()
        if self.step.spec.timeout_s is not None:
            threading.Thread(
                target=self._watch, name=f"{self.context.thread_name}:watchdog", daemon=True
            ).start()

    def _launch(self, slot: Slot, first: tuple[Unit, BaseException] | None) -> None:
        threading.Thread(
            target=self._run,
            args=(slot, first),
            name=f"{self.context.thread_name}:{self.step.name}:{slot.index}",
            daemon=True,
        ).start()

    def abort(self) -> None:
        # threads unwind through their buffers; nothing else to reach
        pass

    # -- the worker -------------------------------------------------------------------------
    def _run(self, slot: Slot, first: tuple[Unit, BaseException] | None) -> None:
        step = self.step
        eof = False
        work: Work | None = None
        try:
            work = step.spec.make_work()
            try:
                work.setup()
            except Exception as exc:
                step.fatal(StageFailed(step.name, None, 0, exc))
                work = None
                return
            unit: Unit | None = None
            if first is not None:
                unit, error = first
                out: list[Any] = []
                slot.unit = unit
                self._recover(work, slot, unit.items[0], error, out, unit.attempt)
                if not self._done_with(slot):
                    return
                step.complete(unit, out)
                unit = step.release(unit)
            while True:
                while unit is not None:
                    outs = self._run_unit(work, slot, unit)
                    if not self._done_with(slot):
                        return
                    step.complete(unit, outs)
                    unit = step.release(unit)
                if self._should_retire(slot):
                    return
                unit = step.take()
                if unit is None:
                    eof = True
                    return
                if unit is WOKEN:
                    unit = None
        except BufferShutdown:
            pass
        except BaseException as exc:  # a bug of ours, or KeyboardInterrupt in a worker
            step.fatal(exc)
        finally:
            if work is not None and not slot.abandoned:
                try:
                    work.teardown()
                except Exception:
                    log.exception("teardown of a worker of stage %r failed", step.name)
            if not slot.abandoned:
                self._leave(slot, eof)

    def _run_unit(self, work: Work, slot: Slot, unit: Unit) -> list[Any]:
        step = self.step
        call = work.call
        items = unit.items
        out: list[Any] = []
        append = out.append
        mode = step.mode
        slot.unit = unit
        timed = step.spec.timeout_s is not None
        if timed:
            slot.started = step.clock.now()
        t0 = time.perf_counter()
        if mode == MAP:
            for item in items:
                try:
                    append(call(item))
                except Exception as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        elif mode == FILTER:
            for item in items:
                try:
                    if call(item):
                        append(item)
                except Exception as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        elif mode == EACH:
            for item in items:
                try:
                    call(item)
                except Exception as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        else:
            assert mode == FLAT
            early = not step.spec.ordered
            for item in items:
                try:
                    res = call(item)
                    if res is not None:
                        for r in res:
                            append(r)
                            if early and len(out) >= FLUSH_OUTPUTS:
                                step.emit_early(out)
                                out = []
                                append = out.append
                except Exception as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        step.measured(len(items), time.perf_counter() - t0)
        return out

    def _done_with(self, slot: Slot) -> bool:
        """Clear the slot's unit; False if the watchdog gave the unit to another thread."""
        if self.step.spec.timeout_s is None:
            slot.unit = None
            return True
        return self._finished_unit(slot)

    def _recover(
        self,
        work: Work,
        slot: Slot,
        item: Any,
        error: BaseException,
        out: list[Any],
        attempt: int,
    ) -> None:
        """Settle a failed item by the stage's policy, retrying it here if the policy says so."""
        step = self.step
        while True:
            delay = step.on_failure(item, error, attempt)
            if delay is None:
                return
            if step.spec.timeout_s is not None:
                # the backoff is not part of the next try's time limit
                slot.started = step.clock.now() + delay
            if delay > 0 and step.clock.wait(step.stop, delay):
                raise BufferShutdown
            attempt += 1
            if step.spec.timeout_s is not None:
                # the unit holds this one item: a watchdog replacement resumes the count
                if slot.unit is not None:
                    slot.unit.attempt = attempt
                slot.started = step.clock.now()
            try:
                res = work.call(item)
                if step.mode == FLAT and res is not None:
                    res = list(res)
                if slot.abandoned:
                    return
                step.apply(item, res, out)
                return
            except Exception as exc:
                error = exc

    # -- timeouts ---------------------------------------------------------------------------
    def _watch(self) -> None:
        step = self.step
        timeout = step.spec.timeout_s
        assert timeout is not None
        tick = max(0.005, min(timeout / 4, 0.1))
        while not step.stop.wait(tick) and not self.gone.is_set():
            now = step.clock.now()
            with self._lock:
                late = [
                    (slot, slot.unit)
                    for slot in self._slots
                    if slot.unit is not None and not slot.abandoned and now - slot.started > timeout
                ]
            for slot, unit in late:
                if unit is not None:
                    self._replace(slot, (unit, ItemTimeout(step.name, timeout)))
