"""The async worker kind: each item is a task on an event loop, up to ``workers`` at once.

The step's blocking calls never run on the loop. One *intake* thread takes units from the step
(sized to the free concurrency) and starts a task per item on the loop; one *outlet* thread hands
finished units to the step, which may block on a full buffer. The loop only ever runs the user's
coroutines, so a full downstream buffer slows intake instead of freezing the loop.

``Stage`` instances (one per concurrent slot) are created and set up on the loop when first
needed and torn down when the stage shrinks or ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
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
        self._free = self._target
        self._inflight = 0
        self._busy = 0
        self._outlet: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle: list[Work] = []
        self._made = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._aborted = False
        name = f"{self.context.thread_name}:{self.step.name}"
        threading.Thread(target=self._intake, name=f"{name}:intake", daemon=True).start()
        threading.Thread(target=self._drain, name=f"{name}:outlet", daemon=True).start()

    @property
    def workers(self) -> int:
        return self._target

    @property
    def busy(self) -> int:
        return self._busy

    def resize(self, n: int) -> None:
        with self._cv:
            self._free += n - self._target
            self._target = n
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify_all()
        self._outlet.put(_STOP)
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self.loop.call_soon_threadsafe(self._cancel_all)

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- threads ----------------------------------------------------------------------------
    def _intake(self) -> None:
        step = self.step
        try:
            while True:
                with self._cv:
                    while self._free <= 0 and not self._aborted:
                        self._cv.wait()
                    if self._aborted:
                        return
                    free = self._free
                unit = step.take(limit=free)
                if unit is None:
                    break
                if unit is WOKEN:
                    continue
                with self._cv:
                    self._free -= len(unit.items)
                    self._inflight += 1
                self.loop.call_soon_threadsafe(self._launch, unit)
        except BufferShutdown:
            return
        except BaseException as exc:
            step.fatal(exc)
            return
        self._outlet.put(_EOF)

    def _drain(self) -> None:
        step = self.step
        eof = False
        try:
            while True:
                if eof and self._inflight == 0:
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
                if nxt is not None:
                    self.loop.call_soon_threadsafe(self._launch, nxt)
                    continue
                with self._cv:
                    self._free += len(unit.items)
                    self._inflight -= 1
                    self._cv.notify_all()
        except BufferShutdown:
            return
        except BaseException as exc:
            step.fatal(exc)
            return
        finally:
            self._finish(eof)

    def _finish(self, eof: bool) -> None:
        try:
            fut = asyncio.run_coroutine_threadsafe(self._teardown_all(), self.loop)
            fut.result(timeout=30)
        except Exception:
            log.debug("async teardown of stage %r did not complete", self.step.name, exc_info=True)
        if eof and not self._aborted:
            self.step.close_output()
        self.gone.set()

    # -- on the loop ------------------------------------------------------------------------
    def _launch(self, unit: Unit) -> None:
        pending = _Pending(unit)
        for i, item in enumerate(unit.items):
            task = self.loop.create_task(self._item(pending, i, item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _borrow(self) -> Work:
        if self._idle:
            return self._idle.pop()
        work = self.step.spec.make_work()
        self._made += 1
        try:
            await _maybe_await(work.setup())
        except Exception as exc:
            self._made -= 1
            self.step.fatal(StageFailed(self.step.name, None, 0, exc))
            raise BufferShutdown from exc
        return work

    async def _give_back(self, work: Work) -> None:
        if self._made > self._target:
            self._made -= 1
            await self._teardown(work)
        else:
            self._idle.append(work)

    async def _teardown(self, work: Work) -> None:
        try:
            await _maybe_await(work.teardown())
        except Exception:
            log.exception("teardown of a worker of stage %r failed", self.step.name)

    async def _teardown_all(self) -> None:
        idle, self._idle = self._idle, []
        for work in idle:
            await self._teardown(work)

    async def _item(self, pending: _Pending, index: int, item: Any) -> None:
        step = self.step
        try:
            work = await self._borrow()
        except BufferShutdown:
            return
        self._busy += 1
        out: list[Any] = []
        try:
            t0 = time.perf_counter()
            await self._run_item(work, item, out, pending.unit.attempt)
            step.latency.add(time.perf_counter() - t0)
        except BufferShutdown:
            return
        except asyncio.CancelledError:
            return
        except BaseException as exc:
            step.fatal(exc)
            return
        finally:
            self._busy -= 1
            await self._give_back(work)
        pending.results[index] = out
        pending.remaining -= 1
        if pending.remaining == 0:
            results = pending.results
            flat = results[0] if len(results) == 1 else [x for r in results for x in r]
            self._outlet.put((pending.unit, flat))

    async def _run_item(self, work: Work, item: Any, out: list[Any], attempt: int) -> None:
        step = self.step
        timeout = step.spec.timeout_s
        while True:
            try:
                if timeout is None:
                    res = await _maybe_await(work.call(item))
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
