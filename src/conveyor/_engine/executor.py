"""The executor kinds: a step's function runs on a ``concurrent.futures.Executor``.

``kind="executor", executor=ex`` submits each item's call to ``ex``: a ``ProcessPoolExecutor``,
an ``InterpreterPoolExecutor``, or a Dask cluster through ``Client.get_executor()``.
``kind="dask", address="tcp://..."`` connects to a Dask scheduler and does the same through its
client, which the step opens when it starts and closes when it ends.

The step stays conveyor's. Its items travel as they do for an ``async`` step: ``workers``
coroutines on the run's event loop, each awaiting one future at a time, so no more than
``workers`` calls are ever submitted and unfinished. Order, keys, ``on_error`` policies and
statistics are the async kind's, written there once. ``timeout_s`` is too: a future past its
time limit is cancelled and its item fails as timed out. An executor that cannot cancel a call
that has started (a process pool) lets that call run to its end. The thread kind leaves a stuck
thread behind in the same way.

What the executor does when one of its workers dies is the executor's. A Dask scheduler runs the
task again on another worker (up to its ``allowed-failures``, then ``KilledWorker``). A
``ProcessPoolExecutor`` breaks, failing every call that is under way (``BrokenProcessPool``),
and each failure goes to the step's ``on_error`` like any other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from .._errors import BrokenResourceError, ConfigurationError
from .aio import AsyncPool, _being_cancelled
from .pool import register_kind
from .source import StepSpec, Work

log = logging.getLogger("conveyor")


class _Submitted:
    """A worker coroutine's work on an executor kind: each call is submitted to the executor
    and its future awaited on the loop."""

    __slots__ = ("executor", "fn", "loop")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        executor: concurrent.futures.Executor,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.executor = executor
        self.loop = loop

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        return None

    def call(self, item: Any) -> asyncio.Future[Any]:
        # cancelling the awaited future (a timeout, the run's end) cancels the executor's
        return asyncio.wrap_future(self.executor.submit(self.fn, item), loop=self.loop)


class _ElsewherePool(AsyncPool):
    """The async kind's workers, each handing its calls to an executor and awaiting them."""

    wants_async = False
    runs_here = False

    def _executor(self) -> concurrent.futures.Executor:
        raise NotImplementedError

    def _new_work(self) -> Work:
        work = self.source.spec.make_work()
        return _Submitted(work.call, self._executor(), self.loop)


@register_kind
class ExecutorPool(_ElsewherePool):
    """``kind="executor", executor=ex``: the calls go to ``ex``, which the user runs."""

    kind = "executor"
    own_options: ClassVar[frozenset[str]] = frozenset({"executor"})

    @classmethod
    def validate(cls, spec: StepSpec) -> None:
        super().validate(spec)
        executor = spec.option("executor")
        if not isinstance(executor, concurrent.futures.Executor):
            raise ConfigurationError(
                f"stage {spec.name!r}: kind='executor' needs executor=, a "
                f"concurrent.futures.Executor (not {executor!r})"
            )

    def _executor(self) -> concurrent.futures.Executor:
        executor: concurrent.futures.Executor = self.source.spec.option("executor")
        return executor


class _DaskCalls:
    """A dask step's calls, gathered on the run's loop: the calls asked for in one turn of the
    loop go to the scheduler in one message (``Client.map``), and the results of the calls that
    have ended since the last fetch come back in one (``Client.gather``). One call at a time
    costs a round trip each way per item, and the scheduler's work per message.

    The step's asynchronous client is opened by its workers' setup (once, for all of them), so
    a scheduler that cannot be reached fails the step as a failing setup does."""

    def __init__(
        self,
        address: str,
        fn: Callable[[Any], Any],
        loop: asyncio.AbstractEventLoop,
        connect_timeout_s: float,
    ) -> None:
        self.address = address
        self.fn = fn
        self.loop = loop
        self.connect_timeout_s = connect_timeout_s
        self.client: Any = None
        self._opening: asyncio.Task[None] | None = None
        self._asked: list[tuple[Any, asyncio.Future[Any]]] = []
        self._ended: list[tuple[Any, asyncio.Future[Any]]] = []
        self._fetching = False
        #: tasks of ours on the loop (the loop keeps only weak references to them)
        self._tasks: set[asyncio.Task[None]] = set()
        #: the items of calls sent in a batch, by task key, until they have ended
        self._batched: dict[Any, Any] = {}
        #: the calls sent and not settled
        self._waiting: set[asyncio.Future[Any]] = set()

    # -- the client ---------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the step's client, or wait for another worker's opening of it."""
        if self._opening is None:
            self._opening = self.loop.create_task(self._open())
        # shielded: a worker cancelled meanwhile does not cancel the others' opening
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        client = _distributed().Client(
            self.address,
            asynchronous=True,
            timeout=self.connect_timeout_s,
            set_as_default=False,
        )

        async def started() -> Any:
            return await client

        try:
            # bounded here too: Dask's own timeout does not cover a server that accepts the
            # connection and never answers its handshake
            await asyncio.wait_for(started(), self.connect_timeout_s)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(client.close(), 2)
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise BrokenResourceError(
                f"cannot reach the Dask scheduler at {self.address!r} within "
                f"{self.connect_timeout_s:g} s: {why}"
            ) from exc
        self.client = client

    async def close(self) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    def _lost(self) -> BrokenResourceError | None:
        """Why no call can be sent now (the client closed: the scheduler was lost), or None."""
        client = self.client
        if client is not None and client.status not in ("closing", "closed"):
            return None
        return BrokenResourceError(
            f"the Dask client of this stage closed: the scheduler at {self.address!r} was lost"
        )

    # -- calls --------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # a task cancelled before it began (the run's end) never starts its coroutine
        task.add_done_callback(lambda _task: coro.close())

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a task of ours; one that dies of a bug of ours is said, and the calls still
        waiting fail with its error instead of waiting for ever."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            log.error("a Dask stage's bookkeeping failed: %r", error, exc_info=error)
            self._fetching = False
            for fut in list(self._waiting):
                if not fut.done():
                    fut.set_exception(error)

    def call(self, item: Any) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        if not self._asked:
            self.loop.call_soon(self._send)
        self._asked.append((item, fut))
        return fut

    def _send(self) -> None:
        asked, self._asked = self._asked, []
        live = [(item, fut) for item, fut in asked if not fut.done()]
        if not live:
            return
        lost = self._lost()
        if lost is not None:
            for _item, fut in live:
                fut.set_exception(lost)
            return
        try:
            # pure=False: equal items are separate calls (Dask would otherwise run one for both)
            remote = self.client.map(self.fn, [item for item, _ in live], pure=False)
        except Exception:
            # something in the batch cannot be sent (an item that does not pickle): each item
            # on its own, so that only that one fails
            for item, fut in live:
                self._send_one(item, fut)
            return
        batched = len(live) > 1
        for (item, fut), task in zip(live, remote, strict=True):
            if batched:
                self._batched[task.key] = item
            self._watch(task, fut)

    def _send_one(self, item: Any, fut: asyncio.Future[Any]) -> None:
        try:
            task = self.client.submit(self.fn, item, pure=False)
        except Exception as exc:
            fut.set_exception(exc)
        else:
            self._watch(task, fut)

    def _watch(self, task: Any, fut: asyncio.Future[Any]) -> None:
        self._waiting.add(fut)
        fut.add_done_callback(self._waiting.discard)
        fut.add_done_callback(functools.partial(self._dropped, task))
        # called on a thread of Dask's; the result is fetched on the loop
        task.add_done_callback(functools.partial(self._ended_elsewhere, (task, fut)))

    def _dropped(self, task: Any, fut: asyncio.Future[Any]) -> None:
        """A call whose waiter gave up (its time limit, the end of the run) is cancelled on the
        cluster too."""
        if fut.cancelled() and self.client is not None:
            self._spawn(self._cancel(task))

    def _ended_elsewhere(self, pair: tuple[Any, asyncio.Future[Any]], _task: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._ended_one, pair)

    @staticmethod
    async def _cancel(task: Any) -> None:
        with contextlib.suppress(Exception):
            await task.cancel()

    def _ended_one(self, pair: tuple[Any, asyncio.Future[Any]]) -> None:
        self._ended.append(pair)
        if not self._fetching:
            self._fetching = True
            self._spawn(self._fetch())

    async def _fetch(self) -> None:
        try:
            while self._ended:
                ended, self._ended = self._ended, []
                done = [(t, f) for t, f in ended if t.status == "finished" and not f.done()]
                if done:
                    try:
                        results = await self.client.gather([t for t, _ in done])
                    except BaseException:
                        if _being_cancelled():
                            raise
                        results = None  # one was lost meanwhile: each on its own
                    if results is not None:
                        for (task, fut), result in zip(done, results, strict=True):
                            self._batched.pop(task.key, None)
                            if not fut.done():
                                fut.set_result(result)
                    else:
                        ended = done + ended
                for task, fut in ended:
                    if fut.done():
                        self._batched.pop(task.key, None)
                    else:
                        await self._settle_alone(task, fut)
        finally:
            self._fetching = False

    async def _settle_alone(self, task: Any, fut: asyncio.Future[Any]) -> None:
        item = self._batched.pop(task.key, _NOT_BATCHED)
        try:
            result = await self.client.gather(task)
        except BaseException as exc:  # the call's own failure, whatever it raised
            if _being_cancelled():
                raise
            if fut.done():
                return
            if item is not _NOT_BATCHED and _unreadable_graph(exc):
                # the scheduler could not read the batch (one item in it does not unpickle
                # there): each call of it goes again on its own, so that only that one fails
                self._send_one(item, fut)
                return
            fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(result)


class _DaskWork:
    """A worker coroutine's work on a dask step: its setup opens the step's client (once), and
    its calls go through the step's one batcher."""

    __slots__ = ("call", "setup")

    def __init__(self, calls: _DaskCalls) -> None:
        self.call = calls.call
        self.setup = calls.connect

    def teardown(self) -> None:
        return None


@register_kind
class DaskPool(_ElsewherePool):
    """``kind="dask", address=...``: the calls go to the Dask cluster at ``address``, through an
    asynchronous client of the step's own on the run's loop (``conveyor[dask]``), opened when
    the step starts and closed when it ends."""

    kind = "dask"
    own_options: ClassVar[frozenset[str]] = frozenset({"address"})
    #: how long connecting to the scheduler may take
    connect_timeout_s: ClassVar[float] = 30.0

    @classmethod
    def validate(cls, spec: StepSpec) -> None:
        super().validate(spec)
        address = spec.option("address")
        if not isinstance(address, str) or not address:
            raise ConfigurationError(
                f"stage {spec.name!r}: kind='dask' needs address=, the scheduler's address "
                f"(such as 'tcp://127.0.0.1:8786'), not {address!r}"
            )
        _distributed()

    def start(self) -> None:
        get_loop = self.context.get_loop
        assert get_loop is not None, "a dask pool needs an event loop"
        spec = self.source.spec
        self._calls = _DaskCalls(
            spec.option("address"), spec.make_work().call, get_loop(), self.connect_timeout_s
        )
        super().start()

    def _new_work(self) -> Work:
        return _DaskWork(self._calls)

    def _workers_left(self) -> None:
        # before the output closes: the run's loop may stop once the run has ended
        self._close_client(wait_s=10)

    def abort(self) -> None:
        super().abort()
        self._close_client(wait_s=2)

    def _close_client(self, wait_s: float) -> None:
        if not self.loop.is_running():
            return
        with contextlib.suppress(Exception):
            closing = asyncio.run_coroutine_threadsafe(self._calls.close(), self.loop)
            if not self._on_loop():
                closing.result(wait_s)


_NOT_BATCHED = object()


def _unreadable_graph(error: BaseException) -> bool:
    """The scheduler refused a batch whose graph it could not unpickle: every call of the batch
    fails with this, not only the one that caused it."""
    return isinstance(error, RuntimeError) and "deserialization of the task graph" in str(error)


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigurationError(
            "kind='dask' needs the dask extra: pip install 'conveyor[dask]'"
        ) from None
    return distributed
