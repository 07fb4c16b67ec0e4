"""A running pipeline: its buffers, its workers, the feeder of its source and its handle."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from .._engine import (
    KINDS,
    SYSTEM_CLOCK,
    Buffer,
    BufferShutdown,
    Clock,
    LoopThread,
    PoolContext,
    RunStats,
    StageStats,
    Step,
    StepSpec,
    WorkerPool,
    control,
)
from .._engine.carry import Ledger, carry_spec
from .._errors import (
    ClosedResourceError,
    ConfigurationError,
    PipelineClosed,
    PipelineError,
    RunTimeout,
)
from ._batch import BatchPool
from ._feed import Feed
from ._stream import StreamFeed, StreamInput

if TYPE_CHECKING:
    from ._pipeline import Pipeline

#: how often a waiting caller wakes to draw the progress bar
_PROGRESS_TICK_S = 0.1
#: the longest a caller's thread waits in one go. A signal (Ctrl-C) that the kernel hands to
#: another thread cannot break an untimed lock wait in the main thread; waking this often lets
#: Python run the KeyboardInterrupt handler promptly.
_SLICE_S = 0.2

#: how long an ending stream-fed run waits for its reader's last acknowledgements
_STREAM_LAST_WORDS_S = 10.0

Progress = bool | Callable[[RunStats], Any]

#: what comes out of the run (its pipeline's last stage)
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class _Layout:
    spec: StepSpec
    capacity: int
    batch: tuple[int, float | None] | None


class StageHandle:
    """One stage of a running pipeline: its statistics and its size."""

    def __init__(self, run: Run[Any], index: int) -> None:
        self._run = run
        self._index = index
        self.name = run._steps[index].name

    def resize(self, n: int) -> None:
        """Set the number of workers. Growing starts workers at once; shrinking lets the extra
        workers finish their current item and run ``teardown`` before they leave."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"a stage needs at least one worker, not {n!r}")
        self._run._pools[self._index].resize(n)

    def stats(self) -> StageStats:
        return self._run._stage_stats(self._index)

    def pids(self) -> list[int]:
        """The process ids of the stage's worker processes (empty unless kind="process")."""
        return self._run._pools[self._index].pids()


class Run(Generic[T_co]):
    """The handle of a started pipeline (``with pipeline.start() as run:``).

    Leaving the ``with`` block waits for the end: a source-fed run reads its whole source, a
    ``put()``-fed run takes no more input and drains. Leaving it by an exception stops every
    worker at once.

    Outputs of the last stage come out by iterating the handle; ``wait()`` consumes (and drops)
    the outputs nobody iterated.
    """

    def __init__(
        self,
        pipeline: Pipeline[Any],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        layouts: list[_Layout] = pipeline._layouts
        if not layouts:
            raise ConfigurationError("a pipeline needs at least one stage before it can run")
        self._source = pipeline._source
        self._has_source = pipeline._has_source
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_feeding = False
        self._error: BaseException | None = None
        self._state = "running"
        self._given_loop = loop
        self._loop_thread: LoopThread | None = None
        self._items_out = 0
        self._started = time.monotonic()
        self._elapsed: float | None = None
        # outputs taken from the last buffer and not yet handed to a consumer
        self._pending: deque[Any] = deque()

        self._buffers: list[Buffer[Any]] = [
            Buffer(lay.capacity, name=lay.spec.name) for lay in layouts
        ]
        self._buffers.append(Buffer(layouts[-1].capacity, name="output"))
        context = PoolContext(get_loop=self._get_loop, thread_name="conveyor")
        # a stream's entries are acknowledged when all their items are over: the items carry
        # their entries' ids through every stage, and the feed's ledger counts them
        self._stream: StreamFeed | None = None
        self._ledger: Ledger | None = None
        if isinstance(self._source, StreamInput):
            self._stream = StreamFeed(
                self._source,
                self._buffers[0],
                stop=self._stop,
                stopped=lambda: self._stop_feeding,
                on_fatal=self._fail,
                clock=clock,
            )
            self._ledger = self._stream.ledger
        self._steps: list[Step] = []
        self._pools: list[WorkerPool] = []
        for i, lay in enumerate(layouts):
            step = Step(
                lay.spec if self._ledger is None else carry_spec(lay.spec),
                self._buffers[i],
                self._buffers[i + 1],
                stop=self._stop,
                on_fatal=self._fail,
                clock=clock,
            )
            step.ledger = self._ledger
            pool: WorkerPool
            if lay.batch is not None:
                pool = BatchPool(step, context, *lay.batch)
            else:
                pool = KINDS[lay.spec.kind](step, context)
            self._steps.append(step)
            self._pools.append(pool)
        self._names = {s.name: i for i, s in enumerate(self._steps)}
        control.ensure_started()
        for pool in self._pools:
            pool.start()
        self._feeder: WorkerPool | None = None
        if self._stream is not None:
            # the stream is read on a worker of the thread kind too, like any source
            self._feeder = KINDS["thread"](self._stream, context)
            self._feeder.start()
        elif self._has_source:
            # the source is the user's code too: it is read on a worker of the thread kind
            feed = Feed(
                self._source,
                self._buffers[0],
                stop=self._stop,
                stopped=lambda: self._stop_feeding,
                on_fatal=self._fail,
                get_loop=self._get_loop,
                clock=clock,
            )
            self._feeder = KINDS["thread"](feed, context)
            self._feeder.start()

    # -- the loop for async stages ------------------------------------------------------------
    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._given_loop is not None:
            return self._given_loop
        with self._lock:
            if self._loop_thread is None:
                # the engine's host for the async kind's loop: async stages run on it as the
                # async kind's workers, as they would on a loop the caller gave
                self._loop_thread = LoopThread()
            return self._loop_thread.loop

    # -- ending -------------------------------------------------------------------------------
    def _end(self, state: str, error: BaseException | None = None) -> bool:
        """Leave ``running`` for ``state``; only the first call does anything. A run that did
        not finish is torn down: its buffers shut down, its pools aborted."""
        with self._lock:
            if self._state != "running":
                return False
            self._state = state
            self._error = error
        self._elapsed = time.monotonic() - self._started
        self._stop.set()
        if state != "finished":
            for buffer in self._buffers:
                buffer.shutdown()
            for pool in self._pools:
                pool.abort()
        if self._loop_thread is not None:
            # our own event loop goes once the async workers on it have left (they tear down
            # their Stage instances on it); the caller's thread never waits for that. This
            # thread only waits and stops the loop: no user code runs on it
            threading.Thread(target=self._close_loop, name="conveyor:reaper", daemon=True).start()
        return True

    def _fail(self, error: BaseException) -> None:
        self._end("failed", error)

    def _close_loop(self) -> None:
        for pool in self._pools:
            pool.gone.wait(10)
        if self._loop_thread is not None:
            self._loop_thread.stop()

    def cancel(self) -> None:
        """Stop every worker now; items in flight are dropped."""
        self._end("stopped")

    def _finish_ok(self) -> None:
        # every stage has closed its output: wait briefly for workers to leave, then settle
        for pool in self._pools:
            pool.gone.wait(5)
        self._stream_written()
        self._end("finished")

    def _stream_written(self) -> None:
        """A stream-fed run that ended: wait (briefly) for its reader to write the last
        acknowledgements, and the reasons of a failure, before the caller hears of the end."""
        if self._stream is not None and self._feeder is not None:
            self._feeder.gone.wait(_STREAM_LAST_WORDS_S)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- feeding by hand ----------------------------------------------------------------------
    def put(self, item: Any, timeout_s: float | None = None) -> None:
        """Feed one item to a pipeline built without a source; waits while the first buffer is
        full. Raises :class:`PipelineClosed` once the run was stopped or has failed."""
        if self._has_source:
            raise PipelineError("this pipeline reads its source; put() is for Pipeline() runs")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        first = self._buffers[0]
        try:
            while True:
                wait_s = _SLICE_S
                if deadline is not None:
                    wait_s = min(wait_s, deadline - time.monotonic())
                    if wait_s <= 0:
                        raise TimeoutError(f"the first stage stayed full for {timeout_s} s")
                if first.put(item, wait_s):
                    break
        except (BufferShutdown, ClosedResourceError):
            self._raise_if_failed()
            raise PipelineClosed("the run no longer takes items") from None

    def stop(self, drain: bool = True, *, wait: bool = True) -> None:
        """Stop taking input. ``drain=True`` lets every accepted item finish (and, with
        ``wait``, returns when they have); ``drain=False`` stops every worker at once.

        ``stop(..., wait=False)`` takes no lock and returns at once, so it is safe in a signal
        handler: the work is done on conveyor's control thread.
        """
        self._stop_feeding = True
        if not wait:
            control.defer(self.cancel if not drain else self._buffers[0].close)
            return
        if not drain:
            self.cancel()
            return
        self._buffers[0].close()
        self.wait()

    def wait(self, timeout_s: float | None = None) -> RunStats:
        """Wait for the end of the run, dropping outputs nobody iterated; raise its failure."""
        for _ in self._outputs(timeout_s):
            pass
        return self.stats()

    # -- outputs ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[T_co]:
        """The last stage's outputs. Leaving the loop early keeps the run going (and the outputs
        not yet seen stay for the next loop); ``pipeline.__iter__`` instead owns its run and
        stops it when the loop is left."""
        return self._outputs(None, owner=False)

    def _outputs(
        self, timeout_s: float | None, progress: Progress = False, *, owner: bool = True
    ) -> Generator[T_co]:
        final = self._buffers[-1]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _ProgressBar(self, progress) if progress else None
        tick = _PROGRESS_TICK_S if bar is not None else _SLICE_S
        try:
            pending = self._pending
            ledger = self._ledger
            while pending:
                if ledger is None:
                    yield pending.popleft()
                else:
                    item = pending.popleft()
                    yield item.value
                    ledger.leave((item,))
            while True:
                wait_s = tick
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._fail(RunTimeout(timeout_s or 0.0))
                        break
                    wait_s = left if wait_s is None else min(wait_s, left)
                try:
                    chunk = final.get_many(8192, wait_s)
                except BufferShutdown:
                    break
                if bar is not None:
                    bar.update()
                if not chunk and chunk is not None:
                    continue
                if chunk is None:
                    self._finish_ok()
                    break
                self._items_out += len(chunk)
                pending = self._pending
                pending.extend(chunk)
                if ledger is None:
                    while pending:
                        yield pending.popleft()
                    continue
                while pending:  # carried: an entry is over once its last output was taken
                    item = pending.popleft()
                    yield item.value
                    ledger.leave((item,))
        except GeneratorExit:
            if owner:
                self.cancel()
            raise
        except BaseException:
            # KeyboardInterrupt, a timeout, ...: nobody is left to finish the run
            self.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
        self._stream_written()
        self._raise_if_failed()

    async def _aoutputs(self, timeout_s: float | None) -> AsyncIterator[T_co]:
        loop = asyncio.get_running_loop()
        final = self._buffers[-1]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # the run's own thread for an async caller: it moves finished outputs off the last
        # buffer and waits for the pools to leave. No user code runs on it: every stage runs
        # on the engine's kinds
        pool = ThreadPoolExecutor(1, thread_name_prefix="conveyor:output")
        try:
            while True:
                wait_s = None
                if deadline is not None:
                    wait_s = deadline - time.monotonic()
                    if wait_s <= 0:
                        self._fail(RunTimeout(timeout_s or 0.0))
                        break
                try:
                    chunk = await loop.run_in_executor(pool, final.get_many, 8192, wait_s)
                except BufferShutdown:
                    break
                if chunk is None:
                    await loop.run_in_executor(pool, self._finish_ok)
                    break
                self._items_out += len(chunk)
                ledger = self._ledger
                for item in chunk:
                    if ledger is None:
                        yield item
                    else:
                        yield item.value
                        ledger.leave((item,))
            await loop.run_in_executor(pool, self._stream_written)
        except BaseException:
            self.cancel()
            raise
        finally:
            pool.shutdown(wait=False)
        self._raise_if_failed()

    # -- statistics -----------------------------------------------------------------------------
    def _stage_stats(self, index: int) -> StageStats:
        pool = self._pools[index]
        return self._steps[index].snapshot(pool.workers, pool.busy)

    def stats(self) -> RunStats:
        elapsed = self._elapsed if self._elapsed is not None else time.monotonic() - self._started
        return RunStats(
            stages=tuple(self._stage_stats(i) for i in range(len(self._steps))),
            elapsed_s=elapsed,
            items_in=self._buffers[0].accepted,
            items_out=self._items_out,
            state=self._state,
            stream=None if self._stream is None else self._stream.stats(),
        )

    def stage(self, name: str) -> StageHandle:
        try:
            return StageHandle(self, self._names[name])
        except KeyError:
            raise KeyError(f"no stage named {name!r}; stages: {', '.join(self._names)}") from None

    @property
    def state(self) -> str:
        """``running``, ``finished``, ``failed`` or ``stopped``."""
        return self._state

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.cancel()
            return
        # a source-fed run reads its whole source; a put()-fed one ends its input here
        if self._has_source:
            self.wait()
        else:
            self.stop(drain=True)


class _ProgressBar:
    """Draws the run on a tqdm bar, or hands its statistics to a callable.

    The bar counts the inputs the first stage has finished, against the source's length when
    it has one; what the last stage has finished and any failures show beside it. A callable
    is called on the thread that reads the outputs, which is the caller's own (as the body of
    its ``for`` loop is): conveyor starts no thread for it.
    """

    def __init__(self, run: Run[Any], progress: Progress) -> None:
        self.run = run
        self.callback = progress if callable(progress) else None
        self.bar: Any = None
        self.last = 0
        if self.callback is None:
            from tqdm.auto import tqdm

            source = run._source
            total = len(source) if hasattr(source, "__len__") else None
            self.bar = tqdm(total=total, unit="item", desc="conveyor", dynamic_ncols=True)

    def update(self) -> None:
        stats = self.run.stats()
        if self.callback is not None:
            self.callback(stats)
            return
        done = stats.stages[0].finished
        if done > self.last:
            self.bar.update(done - self.last)
            self.last = done
        postfix = {"done": stats.stages[-1].finished}
        failed = sum(s.failed for s in stats.stages)
        if failed:
            postfix["failed"] = failed
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.update()
        if self.bar is not None:
            self.bar.close()
