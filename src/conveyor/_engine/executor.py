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
from collections.abc import Callable
from typing import Any, ClassVar

from .._errors import ConfigurationError
from .aio import AsyncPool
from .pool import register_kind
from .source import StepSpec, Work


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


@register_kind
class DaskPool(_ElsewherePool):
    """``kind="dask", address=...``: the calls go to the Dask cluster at ``address``, through a
    client of the step's own (``conveyor[dask]``), opened when the step starts and closed when
    it ends."""

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
        self._client: Any = _distributed().Client(
            self.source.spec.option("address"),
            timeout=self.connect_timeout_s,
            set_as_default=False,
        )
        # pure=False: equal items are separate calls (Dask would otherwise run one for both)
        self._dask_executor: concurrent.futures.Executor = self._client.get_executor(pure=False)
        super().start()

    def _executor(self) -> concurrent.futures.Executor:
        return self._dask_executor

    def _finish(self, eof: bool) -> None:
        try:
            super()._finish(eof)
        finally:
            self._close_client()

    def abort(self) -> None:
        super().abort()
        self._close_client()

    def _close_client(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigurationError(
            "kind='dask' needs the dask extra: pip install 'conveyor[dask]'"
        ) from None
    return distributed
