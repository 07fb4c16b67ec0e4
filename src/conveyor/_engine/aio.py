"""The async worker kind: ``workers`` long-lived coroutines on an event loop.

A source's blocking calls never run on the loop. For a source that blocks (a pipeline's step),
one *intake* thread takes units from it and hands their items to the loop, keeping at most
``workers`` items queued ahead of the coroutines, and one *outlet* thread hands finished units
back to it, which may block on a full buffer. The loop only runs the user's coroutines and a
little bookkeeping, so a full downstream buffer slows intake instead of freezing the loop.

A source that lives on the loop itself (``loop_native``: a task worker's claimed jobs) needs no
threads: it hands units over with :meth:`AsyncPool.submit` on the loop and is told of their
outcomes there, so a job pays no thread hop at all.

Each worker coroutine owns one instance of the work: ``setup`` before its first item,
``teardown`` after its last (also when the pool shrinks or stops). Anything the user's code
raises fails its item, ``BaseException`` included; a ``CancelledError`` counts as the user's
own unless this worker is the one being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from .._errors import ItemTimeout, StageFailed
from .buffer import BufferShutdown
from .pool import WorkerPool, register_kind
from .source import FLAT, MAP, WOKEN, Unit, Work, timeout_of

log = logging.getLogger("conveyor")

_EOF = object()
_STOP = object()
#: stands for an item's index when a coroutine runs several items of a unit (one key's), in
#: order: the entry then holds ``(index, item)`` pairs
_IN_ORDER = -1


def _being_cancelled() -> bool:
    """The current task is being cancelled (its worker is stopping), as opposed to a
    ``CancelledError`` that the user's code raised itself."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _Pending:
    """A unit whose items are running; it completes when the last one is done."""

    __slots__ = ("remaining", "results", "timeout_s", "unit")

    def __init__(self, unit: Unit, timeout_s: float | None) -> None:
        self.unit = unit
        self.timeout_s = timeout_s
        self.results: list[list[Any]] = [[] for _ in unit.items]
        self.remaining = len(unit.items)


@register_kind
class AsyncPool(WorkerPool):
    kind = "async"
    wants_async = True

    def start(self) -> None:
        get_loop = self.context.get_loop
        assert get_loop is not None, "an async pool needs an event loop"
        self.loop = get_loop()
        self._cv = threading.Condition()
        self._target = self.source.spec.workers
        # items handed to the loop, and items picked up there by a worker coroutine: each has
        # one writer (the side that hands over, the loop), so neither needs a lock; what waits
        # is their difference
        self._handed = 0
        self._picked = 0
        self._inflight_units = 0
        #: how many items the loop may hold (set by the intake), and whether it waits for room
        self._cap = self._target
        self._intake_waiting = False
        self._busy = 0
        self._live = 0
        self._closing = False
        self._aborted = False
        self._eof = False
        self._topping_up = False
        self._local: deque[tuple[_Pending, int, Any]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers_gone = threading.Event()
        self._outlet: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._native = bool(getattr(self.source, "loop_native", False))
        if self._native:
            self._grow()  # a native source starts the pool on its loop
            return
        self.loop.call_soon_threadsafe(self._grow)
        name = f"{self.context.thread_name}:{self.source.name}"
        threading.Thread(target=self._intake, name=f"{name}:intake", daemon=True).start()
        threading.Thread(target=self._drain, name=f"{name}:outlet", daemon=True).start()

    @property
    def workers(self) -> int:
        return self._live

    @property
    def busy(self) -> int:
        return self._busy

    def resize(self, n: int) -> None:
        with self._cv:
            self._target = n
            self._cv.notify_all()
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._grow)

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify_all()
        self._outlet.put(_STOP)
        if self._native and self._on_loop():
            self._cancel_all()
            return
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self.loop.call_soon_threadsafe(self._cancel_all)

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # -- a source on the loop -------------------------------------------------------------------
    def submit(self, unit: Unit) -> None:
        """Run ``unit`` (on the loop, for a ``loop_native`` source)."""
        self._inflight_units += 1
        self._handed += len(unit.items)
        self._accept(_Pending(unit, timeout_of(self.source, unit)))

    def end_input(self) -> None:
        """No more units (on the loop): the workers leave once the units given are done."""
        self._eof = True
        if self._inflight_units == 0:
            self._close_workers()

    def _settle_native(self, unit: Unit, outputs: list[Any]) -> None:
        source = self.source
        self._inflight_units -= 1
        source.complete(unit, outputs)
        nxt = source.release(unit)
        if nxt is not None:
            self.submit(nxt)
        elif self._eof and self._inflight_units == 0:
            self._close_workers()

    # -- on the loop: the worker coroutines -----------------------------------------------------
    def _grow(self) -> None:
        while self._live < self._target and not self._closing:
            self._live += 1
            task = self.loop.create_task(self._worker())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # shrinking: idle workers look at the target when woken
        self._wake_all()

    def _wake_all(self) -> None:
        idle = self._idle
        while idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if not self._tasks:
            self._all_left()

    def _accept(self, pending: _Pending) -> None:
        local = self._local
        unit = pending.unit
        items = unit.items
        if unit.keys and len(items) > 1:
            # the items of one key run in order, on one coroutine; keys run at once
            by_key: dict[Any, list[tuple[int, Any]]] = {}
            key = self.source.spec.key
            item_keys = unit.item_keys or (
                [unit.keys[0]] * len(items) if key is None else [key(x) for x in items]
            )
            for i, (item, k) in enumerate(zip(items, item_keys, strict=True)):
                by_key.setdefault(k, []).append((i, item))
            for group in by_key.values():
                local.append((pending, _IN_ORDER, group))
        else:
            for i, item in enumerate(items):
                local.append((pending, i, item))
        self._wake(1)
        self._top_up_later()

    def _wake(self, n: int) -> None:
        idle = self._idle
        while n > 0 and idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def _top_up_later(self) -> None:
        """Wake more workers on the loop's next turn, for the items still waiting then.

        Waking a worker per item costs a future and a scheduling each; a worker whose items
        never suspend gets through them all on its own. So one worker is woken, and the rest
        only if items are still waiting when the loop comes round again: when the running
        workers have suspended (their items wait on I/O), and the others are needed."""
        if not self._topping_up:
            self._topping_up = True
            self.loop.call_soon(self._top_up)

    def _top_up(self) -> None:
        self._topping_up = False
        self._wake(len(self._local))

    def _close_workers(self) -> None:
        self._closing = True
        self._wake_all()
        if self._live == 0:
            self._all_left()

    def _new_work(self) -> Work:
        """One worker's instance of the work."""
        return self.source.spec.make_work()

    async def _worker(self) -> None:
        source = self.source
        work = self._new_work()
        try:
            await _maybe_await(work.setup())
        except BaseException as exc:
            self._leave()  # counted out either way: the pool's end waits for every worker
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise
            source.fatal(StageFailed(source.name, None, 0, exc))
            return
        local = self._local
        call = work.call
        mode = source.mode
        plain_map = mode == MAP
        apply = source.apply
        measured = source.measured
        clock = time.perf_counter
        try:
            while True:
                if not local:
                    if self._closing or self._live > self._target:
                        break
                    fut: asyncio.Future[None] = self.loop.create_future()
                    self._idle.append(fut)
                    await fut
                    continue
                if self._live > self._target:
                    break
                pending, index, item = local.popleft()
                if local:
                    self._top_up_later()
                self._picked += len(item) if index is _IN_ORDER else 1
                # the intake says it waits (under the lock) before it looks at the counts, and
                # this looks at its word after counting: one of the two sees the other
                if self._intake_waiting and self._handed - self._picked <= self._cap // 2:
                    with self._cv:
                        self._cv.notify()
                self._busy += 1
                out: list[Any] = []
                t0 = clock()
                try:
                    if index is _IN_ORDER:
                        for i, one in item:
                            one_out: list[Any] = []
                            await self._run_item(
                                work, one, one_out, pending.unit.attempt, pending.timeout_s
                            )
                            pending.results[i] = one_out
                        done = len(item)
                    elif pending.timeout_s is None:
                        # the common case inline (no coroutine of ours around the call);
                        # a failure goes the long way, through the source's decision
                        try:
                            res = call(item)
                            if hasattr(res, "__await__"):
                                res = await res
                            if mode == FLAT and hasattr(res, "__aiter__"):
                                res = [x async for x in res]
                        except BaseException as exc:
                            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                                raise
                            await self._after_failure(
                                work, item, out, pending.unit.attempt, None, exc
                            )
                        else:
                            if plain_map:
                                out.append(res)
                            else:
                                apply(item, res, out)
                        pending.results[index] = out
                        done = 1
                    else:
                        await self._run_item(
                            work, item, out, pending.unit.attempt, pending.timeout_s
                        )
                        pending.results[index] = out
                        done = 1
                finally:
                    self._busy -= 1
                measured(done, clock() - t0)
                pending.remaining -= done
                if pending.remaining == 0:
                    results = pending.results
                    flat = results[0] if len(results) == 1 else [x for r in results for x in r]
                    if self._native:
                        self._settle_native(pending.unit, flat)
                    else:
                        self._outlet.put((pending.unit, flat))
        except (BufferShutdown, asyncio.CancelledError):
            pass
        except BaseException as exc:
            source.fatal(exc)
        finally:
            try:
                await _maybe_await(work.teardown())
            except Exception:
                log.exception("teardown of a worker of %r failed", source.name)
            self._leave()

    def _leave(self) -> None:
        self._live -= 1
        if self._live == 0 and (self._closing or self._aborted):
            self._all_left()

    def _workers_left(self) -> None:
        """Every worker has left and the output is not closed yet: while the loop still runs,
        what the pool holds on it can be let go (nothing by default)."""

    def _all_left(self) -> None:
        self._workers_gone.set()
        if self._native:
            self.gone.set()

    async def _run_item(
        self, work: Work, item: Any, out: list[Any], attempt: int, timeout: float | None
    ) -> None:
        source = self.source
        while True:
            try:
                if timeout is None:
                    res = work.call(item)
                    if hasattr(res, "__await__"):
                        res = await res
                else:
                    limit = asyncio.timeout(timeout)
                    try:
                        async with limit:
                            res = await _maybe_await(work.call(item))
                    except TimeoutError:
                        if limit.expired():
                            raise ItemTimeout(source.name, timeout) from None
                        raise
                if source.mode == FLAT and hasattr(res, "__aiter__"):
                    res = [x async for x in res]
            except asyncio.CancelledError as exc:
                if _being_cancelled():
                    raise  # this worker is being cancelled: not the item's failure
                error: BaseException = exc
            except BaseException as exc:
                error = exc
            else:
                source.apply(item, res, out)
                return
            delay = source.on_failure(item, error, attempt)
            if delay is None:
                return
            if delay > 0:
                await asyncio.sleep(delay)
            attempt += 1

    async def _after_failure(
        self,
        work: Work,
        item: Any,
        out: list[Any],
        attempt: int,
        timeout: float | None,
        error: BaseException,
    ) -> None:
        """An item's try failed: the source decides; tries again (from the next attempt)
        for as long as it says so."""
        delay = self.source.on_failure(item, error, attempt)
        if delay is None:
            return
        if delay > 0:
            await asyncio.sleep(delay)
        await self._run_item(work, item, out, attempt + 1, timeout)

    # -- threads, for a source that blocks ------------------------------------------------------
    def _intake(self) -> None:
        source = self.source
        try:
            while True:
                with self._cv:
                    # the loop holds what its workers run and what waits for them: at least
                    # a unit's worth (what takes about TARGET_UNIT_S), or one item per worker.
                    # Wait for half of it to be free, not the first free place: units of
                    # many items cross to the loop, instead of one item per wake-up
                    cap = max(self._target, source.unit_limit())
                    self._cap = cap
                    if self._handed - self._picked > cap // 2 and not self._aborted:
                        self._intake_waiting = True
                        while self._handed - self._picked > cap // 2 and not self._aborted:
                            self._cv.wait()
                        self._intake_waiting = False
                    if self._aborted:
                        return
                    room = cap - (self._handed - self._picked)
                unit = source.take(limit=room)
                if unit is None:
                    break
                if unit is WOKEN:
                    continue
                self._hand_over(unit)
        except BufferShutdown:
            return
        except BaseException as exc:
            source.fatal(exc)
            return
        self._outlet.put(_EOF)

    def _hand_over(self, unit: Unit) -> None:
        with self._cv:
            self._handed += len(unit.items)
            self._inflight_units += 1
        pending = _Pending(unit, timeout_of(self.source, unit))
        self.loop.call_soon_threadsafe(self._accept, pending)

    def _drain(self) -> None:
        source = self.source
        eof = False
        try:
            while True:
                if eof and self._inflight_units == 0:
                    break
                msg = self._outlet.get()
                if msg is _STOP:
                    return
                if msg is _EOF:
                    eof = True
                    continue
                unit, outs = msg
                source.complete(unit, outs)
                nxt = source.release(unit)
                with self._cv:
                    self._inflight_units -= 1
                if nxt is not None:
                    self._hand_over(nxt)
        except BufferShutdown:
            return
        except BaseException as exc:
            source.fatal(exc)
            return
        finally:
            self._finish(eof)

    def _finish(self, eof: bool) -> None:
        if self.loop.is_running():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._close_workers)
            if not self._workers_gone.wait(10):
                log.warning("workers of async %r did not leave in time", self.source.name)
        self._workers_left()
        if eof and not self._aborted:
            self.source.close_output()
        self.gone.set()
