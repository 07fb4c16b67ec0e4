"""The async worker kind: ``workers`` long-lived coroutines on an event loop.

The step's blocking calls never run on the loop. One *intake* thread takes units from the step
and hands their items to the loop, keeping at most ``workers`` items queued ahead of the
coroutines; one *outlet* thread hands finished units to the step, which may block on a full
buffer. The loop only runs the user's coroutines and a little bookkeeping, so a full downstream
buffer slows intake instead of freezing the loop.

Each worker coroutine owns one instance of the stage's work: ``setup`` before its first item,
``teardown`` after its last (also when the stage shrinks or the run stops).
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
from .step import FLAT, WOKEN, Unit, Work

log = logging.getLogger("conveyor")

_EOF = object()
_STOP = object()


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _Pending:
    """A unit whose items are running; it completes when the last one is done."""

    __slots__ = ("remaining", "results", "unit")

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.results: list[list[Any]] = [[] for _ in unit.items]
        self.remaining = len(unit.items)


@register_kind
class AsyncPool(WorkerPool):
    kind = "async"
    wants_async = True

    def start(self) -> None:
        get_loop = self.context.get_loop
        assert get_loop is not None, "an async stage needs an event loop"
        self.loop = get_loop()
        self._cv = threading.Condition()
        self._target = self.step.spec.workers
        # items handed to the loop and not yet picked up by a worker coroutine
        self._queued = 0
        self._inflight_units = 0
        self._busy = 0
        self._live = 0
        self._closing = False
        self._aborted = False
        self._local: deque[tuple[_Pending, int, Any]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers_gone = threading.Event()
        self._outlet: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.loop.call_soon_threadsafe(self._grow)
        name = f"{self.context.thread_name}:{self.step.name}"
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
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self.loop.call_soon_threadsafe(self._cancel_all)

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

    def _accept(self, pending: _Pending) -> None:
        local = self._local
        for i, item in enumerate(pending.unit.items):
            local.append((pending, i, item))
        idle = self._idle
        for _ in range(min(len(idle), len(pending.unit.items))):
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)

    def _close_workers(self) -> None:
        self._closing = True
        self._wake_all()
        if self._live == 0:
            self._workers_gone.set()

    async def _worker(self) -> None:
        step = self.step
        work: Work = step.spec.make_work()
        try:
            await _maybe_await(work.setup())
        except Exception as exc:
            step.fatal(StageFailed(step.name, None, 0, exc))
            self._leave()
            return
        local = self._local
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
                with self._cv:
                    self._queued -= 1
                    self._cv.notify()
                self._busy += 1
                out: list[Any] = []
                t0 = time.perf_counter()
                try:
                    await self._run_item(work, item, out, pending.unit.attempt)
                finally:
                    self._busy -= 1
                step.latency.add(time.perf_counter() - t0)
                pending.results[index] = out
                pending.remaining -= 1
                if pending.remaining == 0:
                    results = pending.results
                    flat = results[0] if len(results) == 1 else [x for r in results for x in r]
                    self._outlet.put((pending.unit, flat))
        except (BufferShutdown, asyncio.CancelledError):
            pass
        except BaseException as exc:
            step.fatal(exc)
        finally:
            try:
                await _maybe_await(work.teardown())
            except Exception:
                log.exception("teardown of a worker of stage %r failed", step.name)
            self._leave()

    def _leave(self) -> None:
        self._live -= 1
        if self._live == 0 and (self._closing or self._aborted):
            self._workers_gone.set()

    async def _run_item(self, work: Work, item: Any, out: list[Any], attempt: int) -> None:
        step = self.step
        timeout = step.spec.timeout_s
        while True:
            try:
                if timeout is None:
                    res = work.call(item)
                    if inspect.iscoroutine(res) or inspect.isawaitable(res):
                        res = await res
                else:
                    limit = asyncio.timeout(timeout)
                    try:
                        async with limit:
                            res = await _maybe_await(work.call(item))
                    except TimeoutError:
                        if limit.expired():
                            raise ItemTimeout(step.name, timeout) from None
                        raise
                if step.mode == FLAT and hasattr(res, "__aiter__"):
                    res = [x async for x in res]
                step.apply(item, res, out)
                return
            except Exception as exc:
                delay = step.on_failure(item, exc, attempt)
                if delay is None:
                    return
                if delay > 0:
                    await asyncio.sleep(delay)
                attempt += 1

    # -- threads ----------------------------------------------------------------------------
    def _intake(self) -> None:
        step = self.step
        try:
            while True:
                with self._cv:
                    while self._queued >= self._target and not self._aborted:
                        self._cv.wait()
                    if self._aborted:
                        return
                    room = self._target - self._queued
                unit = step.take(limit=room)
                if unit is None:
                    break
                if unit is WOKEN:
                    continue
                self._hand_over(unit)
        except BufferShutdown:
            return
        except BaseException as exc:
            step.fatal(exc)
            return
        self._outlet.put(_EOF)

    def _hand_over(self, unit: Unit) -> None:
        with self._cv:
            self._queued += len(unit.items)
            self._inflight_units += 1
        self.loop.call_soon_threadsafe(self._accept, _Pending(unit))

    def _drain(self) -> None:
        step = self.step
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
                step.complete(unit, outs)
                nxt = step.release(unit)
                with self._cv:
                    self._inflight_units -= 1
                if nxt is not None:
                    self._hand_over(nxt)
        except BufferShutdown:
            return
        except BaseException as exc:
            step.fatal(exc)
            return
        finally:
            self._finish(eof)

    def _finish(self, eof: bool) -> None:
        if self.loop.is_running():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._close_workers)
            if not self._workers_gone.wait(10):
                log.warning("workers of async stage %r did not leave in time", self.step.name)
        if eof and not self._aborted:
            self.step.close_output()
        self.gone.set()
