"""The thread worker kind: each worker is a daemon thread calling the user's function.

A thread cannot be interrupted. When an item runs past its time limit the watchdog *abandons*
its thread: a fresh thread takes the worker's place, settles the late item by the source's
decision and runs the rest of the unit; whatever the old thread does later is thrown away. The
old thread is a daemon, so it never keeps the interpreter alive.

Time limits are per item, so a timed source keeps the same adaptive units as any other: each
item notes when it started (and how many outputs its unit had by then), which is all the
watchdog and a replacement need.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .._errors import ItemTimeout, StageFailed
from .buffer import BufferShutdown
from .pool import Slot, SlotPool, register_kind
from .source import EACH, FILTER, FLAT, FLUSH_OUTPUTS, MAP, WOKEN, Unit, Work, timeout_of

log = logging.getLogger("conveyor")


class _Abandoned(Exception):
    """The watchdog gave this thread's unit to another thread: stop, drop everything."""


class _Resume:
    """What a replacement thread picks up: the unit, the item at ``pos`` that ran late, and
    the outputs of the items before it."""

    __slots__ = ("error", "outputs", "pos", "unit")

    def __init__(self, unit: Unit, pos: int, error: BaseException, outputs: list[Any]) -> None:
        self.unit = unit
        self.pos = pos
        self.error = error
        self.outputs = outputs


@register_kind
class ThreadPool(SlotPool):
    kind = "thread"

    def start(self) -> None:
        spec = self.source.spec
        # a cancellable source runs as a timed one (each item says where it is, under the
        # slot's lock), so that cancel() can give a thread up as the watchdog does
        self._timed = spec.timed or spec.cancellable
        self._begin()
        if spec.timed:
            threading.Thread(
                target=self._watch, name=f"{self.context.thread_name}:watchdog", daemon=True
            ).start()

    def _launch(self, slot: Slot, first: Any) -> None:
        threading.Thread(
            target=self._run,
            args=(slot, first),
            name=f"{self.context.thread_name}:{self.source.name}:{slot.index}",
            daemon=True,
        ).start()

    def abort(self) -> None:
        # threads unwind through the source (its buffers shut down); nothing else to reach
        pass

    # -- the worker -------------------------------------------------------------------------
    def _run(self, slot: Slot, first: _Resume | None) -> None:
        source = self.source
        eof = False
        work: Work | None = None
        try:
            work = source.spec.make_work()
            try:
                work.setup()
            except Exception as exc:
                source.fatal(StageFailed(source.name, None, 0, exc))
                work = None
                return
            unit: Unit | None = None
            if first is not None:
                unit = first.unit
                out = first.outputs
                item = unit.items[first.pos]
                self._recover(work, slot, item, first.error, out, unit.attempt)
                outs = self._run_items(work, slot, unit, first.pos + 1, out)
                if not self._done_with(slot):
                    return
                source.complete(unit, outs)
                unit = source.release(unit)
            while True:
                while unit is not None:
                    outs = self._run_items(work, slot, unit, 0, [])
                    if not self._done_with(slot):
                        return
                    source.complete(unit, outs)
                    unit = source.release(unit)
                if self._should_retire(slot):
                    return
                unit = source.take()
                if unit is None:
                    eof = True
                    return
                if unit is WOKEN:
                    unit = None
        except (BufferShutdown, _Abandoned):
            pass
        except BaseException as exc:  # a bug of ours
            source.fatal(exc)
        finally:
            if work is not None and not slot.abandoned:
                try:
                    work.teardown()
                except Exception:
                    log.exception("teardown of a worker of %r failed", source.name)
            if not slot.abandoned:
                self._leave(slot, eof)

    def _run_items(
        self, work: Work, slot: Slot, unit: Unit, start: int, out: list[Any]
    ) -> list[Any]:
        """Run ``unit.items[start:]``, adding their outputs to ``out``."""
        source = self.source
        call = work.call
        items = unit.items if start == 0 else unit.items[start:]
        append = out.append
        mode = source.mode
        timed = self._timed
        t0 = time.perf_counter()
        if timed:
            # each item publishes where it is (one new tuple; no lock, no clock): the
            # watchdog times an item by how long the same tuple stays; a thread it gave up
            # on stops before its next item
            apply = source.apply
            with slot.lock:
                if slot.abandoned:
                    raise _Abandoned
                slot.out = out
                slot.progress = (start, len(out), 0.0)
                slot.unit = unit
            pos = start
            for item in items:
                if slot.abandoned:
                    raise _Abandoned
                slot.progress = (pos, len(out), 0.0)
                pos += 1
                try:
                    res = call(item)
                    if mode == FLAT and res is not None:
                        res = list(res)
                except BaseException as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
                    continue
                if slot.abandoned:
                    raise _Abandoned
                if mode == MAP:
                    append(res)
                else:
                    apply(item, res, out)
            source.measured(len(items), time.perf_counter() - t0)
            return out
        slot.unit = unit
        if mode == MAP:
            for item in items:
                try:
                    append(call(item))
                except BaseException as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        elif mode == FILTER:
            for item in items:
                try:
                    if call(item):
                        append(item)
                except BaseException as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        elif mode == EACH:
            for item in items:
                try:
                    call(item)
                except BaseException as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        else:
            assert mode == FLAT
            early = not source.spec.ordered
            for item in items:
                try:
                    res = call(item)
                    if res is not None:
                        for r in res:
                            append(r)
                            if early and len(out) >= FLUSH_OUTPUTS:
                                source.emit_early(out)
                                out = []
                                append = out.append
                except BaseException as exc:
                    self._recover(work, slot, item, exc, out, unit.attempt)
        source.measured(len(items), time.perf_counter() - t0)
        return out

    def _done_with(self, slot: Slot) -> bool:
        """Clear the slot's unit; False if the watchdog gave the unit to another thread."""
        if not self._timed:
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
        """Settle a failed item by the source's decision, trying it again here while the
        source says so. Anything the user's code raises counts, ``BaseException`` included:
        a ``SystemExit`` or ``KeyboardInterrupt`` raised by a function fails its item."""
        source = self.source
        timed = self._timed
        while True:
            if slot.abandoned:
                raise _Abandoned
            delay = source.on_failure(item, error, attempt)
            if delay is None:
                return
            if timed:
                # the backoff is not part of the next try's time limit
                pos, mark, _ = slot.progress
                slot.progress = (pos, mark, source.clock.now() + delay)
            if delay > 0 and source.clock.wait(source.stop, delay):
                raise BufferShutdown
            attempt += 1
            if timed:
                # a replacement resumes the count of tries from here
                if slot.unit is not None:
                    slot.unit.attempt = attempt
                pos, mark, _ = slot.progress
                slot.progress = (pos, mark, 0.0)
            try:
                res = work.call(item)
                if source.mode == FLAT and res is not None:
                    res = list(res)
            except BaseException as exc:
                error = exc
                continue
            if slot.abandoned:
                raise _Abandoned
            source.apply(item, res, out)
            return

    def cancel(self, ref: object, error: BaseException) -> bool:
        if not self._timed:
            return False
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            resume = self._give_up(slot, ref, error)
            if resume is not None:
                self._replace(slot, resume)
                return True
        return False

    def _give_up(self, slot: Slot, ref: object, error: BaseException) -> _Resume | None:
        """Mark ``slot``'s thread abandoned if it is on the unit ``ref``, under its lock (as
        the watchdog does): what its replacement picks up, or None if it is not on it."""
        with slot.lock:
            unit = slot.unit
            if unit is None or slot.abandoned or unit.ref != ref:
                return None
            slot.abandoned = True
            pos, mark, _ = slot.progress
            return _Resume(unit, pos, error, list(slot.out[:mark]))

    # -- time limits ------------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            self._watch_slots()
        except BaseException as exc:  # a bug of ours: time limits would stop without a word
            self.source.fatal(exc)

    def _watch_slots(self) -> None:
        source = self.source
        default = source.spec.timeout_s
        tick = 0.02 if default is None else max(0.005, min(default / 4, 0.1))
        # each slot's progress as last seen, and since when
        seen: dict[Slot, tuple[tuple[int, int, float], float]] = {}
        while not source.stop.wait(tick) and not self.gone.is_set():
            now = source.clock.now()
            with self._lock:
                slots = list(self._slots)
            for slot in [s for s in seen if s not in slots]:
                del seen[slot]
            for slot in slots:
                progress = slot.progress
                last = seen.get(slot)
                if last is None or last[0] is not progress:
                    seen[slot] = (progress, max(now, progress[2]))
                    continue
                with slot.lock:
                    unit = slot.unit
                    if unit is None or slot.abandoned or slot.progress is not progress:
                        continue
                    limit = timeout_of(source, unit)
                    if limit is None or now - last[1] <= limit:
                        continue
                    # late: the thread is given up on here; it stops before its next item
                    slot.abandoned = True
                    pos, mark, _ = progress
                    kept = list(slot.out[:mark])
                    resume = _Resume(unit, pos, ItemTimeout(source.name, limit), kept)
                del seen[slot]
                self._replace(slot, resume)
