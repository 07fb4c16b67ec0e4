"""Jobs as a source of work for the engine's worker kinds.

A worker claims jobs on its event loop; their functions run on the same thread, process and
async kinds that run pipeline stages, so a task gets what a stage gets: a time limit that
abandons and replaces a stuck thread or kills and replaces a process, a crash that fails only
the job it was running, cloudpickle and the start method for processes, recycling.

There is one :class:`JobSource` per kind a worker uses (made when its first job of that kind
comes). A job is a unit of one item, ``(run_key, task_key, args, kwargs, context)``; the kind
reports its outcome, and the source hands it to the worker on its loop. A job is never tried
again in place: a failure goes back to the worker, which retries it through its queue (with
backoff, counted as an attempt) or makes it dead. ``context`` is what :func:`current_job`
gives the task's code while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._engine import KINDS, SYSTEM_CLOCK, Buffer, BufferShutdown, Clock, PoolContext, StepSpec
from .._engine.source import MAP, WOKEN, Unit
from .._engine.stats import LatencyRing
from .._errors import ConfigurationError

#: an executor name (as in ``@q.task(executor=...)``) to the kind that runs it; ``inline``
#: functions are called on the worker's own loop, as async ones are
KIND_OF_EXECUTOR = {"thread": "thread", "process": "process", "async": "async", "inline": "async"}


class Outcomes(Protocol):
    """What a source tells its worker, on the worker's loop."""

    def job_returned(self, run_key: str, value: Any) -> None: ...

    def job_raised(self, run_key: str, error: BaseException) -> None: ...

    def pool_failed(self, kind: str, error: BaseException) -> None: ...


class AbortSignal:
    """How a running job hears that it was asked to stop (``JobContext.abort_requested``).

    The worker sets it; an ``async def`` task is also cancelled where it awaits, a process
    task's process is killed (a process never sees the flag: it travels there unset), and a
    thread task, which cannot be interrupted, has ``abort_grace_s`` to return before its
    thread is abandoned.
    """

    __slots__ = ("by", "requested", "scope")

    def __init__(self) -> None:
        #: set once, by the worker's loop; read from any thread (a plain attribute: a job's
        #: code polls it, nothing waits on it)
        self.requested = False
        self.by: str | None = None
        #: the running coroutine's cancel scope (an ``asyncio.Timeout``), for async tasks
        self.scope: Any = None

    def request(self, by: str, loop_time: float | None = None) -> None:
        self.by = by
        self.requested = True
        if self.scope is not None and loop_time is not None:
            self.scope.reschedule(loop_time)  # the coroutine is cancelled where it awaits

    def __reduce__(self) -> tuple[Any, ...]:
        return (AbortSignal, ())


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job a task's code runs for (:func:`conveyor.current_job`)."""

    id: str
    queue: str
    task: str
    attempt: int
    """1 for the first run, 2 for the first retry, ..."""
    enqueued_at: float
    lease_until: float | None
    """when the lease taken for this attempt would lapse without a heartbeat (the worker
    renews it while the job runs)"""
    url: str = field(default="", repr=False)  # where the queue lives (may hold a password)
    token: str = field(default="", repr=False)  # the lease this attempt holds
    #: the trace context of this attempt's ``process`` span, when the queue is traced, so
    #: that the task's own spans are its children: an OpenTelemetry context in this process,
    #: its W3C headers for a process task
    trace: Any = field(default=None, repr=False)
    abort: AbortSignal = field(default_factory=AbortSignal, repr=False, compare=False)

    @property
    def abort_requested(self) -> bool:
        """Someone asked to abort this job (``job.abort()``): a long task should look now and
        then and return early; the job ends ``aborted`` whatever it returns."""
        return self.abort.requested

    def progress(self, fraction: float, note: str = "") -> bool:
        """Say how far the job is (0 to 1) and what it is doing: stored with the job, shown by
        ``conveyor job`` and the dashboard. One write to the storage per call: call it at the
        pace a person reads. False if it could not be stored: the lease was lost, or the
        queue lives in memory and this task runs in another process."""
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 <= fraction <= 1.0
        ):
            raise ConfigurationError(f"progress is a number from 0 to 1, not {fraction!r}")
        stored: bool = _storage(self.url).progress(
            self.id, self.token, float(fraction), str(note)[:500]
        )
        return stored


_STORAGE: dict[str, Any] = {}
_STORAGE_LOCK = threading.Lock()


def _storage(url: str) -> Any:
    """A backend for ``url`` in this process, opened once (a worker process opens its own)."""
    with _STORAGE_LOCK:
        backend = _STORAGE.get(url)
        if backend is None:
            from ._queue import open_backend

            backend = _STORAGE[url] = open_backend(url)
        return backend


_CURRENT: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "conveyor_current_job", default=None
)


def current_job() -> JobContext | None:
    """The job the calling task runs for, or None outside a task. Works in every kind of
    task: thread, process, async and inline."""
    return _CURRENT.get()


def _attach_trace(context: JobContext) -> Any:
    """Make the attempt's span the current one (a token for :func:`_detach_trace`)."""
    trace = context.trace
    if trace is None:
        return None
    from opentelemetry import context as otel_context

    if not isinstance(trace, otel_context.Context):  # headers, from the worker's process
        from opentelemetry import propagate

        trace = propagate.extract(trace)
    return otel_context.attach(trace)


def _detach_trace(token: Any) -> None:
    if token is not None:
        from opentelemetry import context as otel_context

        otel_context.detach(token)


async def _in_context(context: JobContext, awaitable: Any) -> Any:
    async with asyncio.timeout(None) as scope:  # what an abort reschedules to now
        context.abort.scope = scope
        return await _in_context_of(context, awaitable)


async def _in_context_of(context: JobContext, awaitable: Any) -> Any:
    token = _CURRENT.set(context)
    try:
        try:
            traced = _attach_trace(context)
        except BaseException:
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()  # it will never be awaited: no "never awaited" warning later
            raise
        try:
            return await awaitable
        finally:
            _detach_trace(traced)
    finally:
        _CURRENT.reset(token)


class JobWork:
    """What one worker of a kind runs: the call a job stands for."""

    __slots__ = ("functions",)

    def __init__(self, functions: dict[str, Callable[..., Any]]) -> None:
        self.functions = functions

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        return None

    def call(self, item: tuple[str, str, list[Any], dict[str, Any], JobContext]) -> Any:
        _, task_key, args, kwargs, context = item
        token = _CURRENT.set(context)
        try:
            traced = _attach_trace(context)
            try:
                result = self.functions[task_key](*args, **kwargs)
            finally:
                _detach_trace(traced)
        finally:
            _CURRENT.reset(token)
        if hasattr(result, "__await__"):  # a coroutine runs later: it gets the job too
            return _in_context(context, result)
        return result


class JobSource:
    """The jobs of one worker that run on one kind."""

    mode = MAP
    target_unit_s = 0.0

    def __init__(
        self,
        kind: str,
        *,
        name: str,
        workers: int,
        functions: dict[str, Callable[..., Any]],
        timed: bool,
        options: dict[str, Any],
        outcomes: Outcomes,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.kind = kind
        self.name = name
        self.loop_native = kind == "async"
        # the pool starts with one worker and grows with the jobs handed to it, up to
        # ``workers``: a worker that runs one process task a minute starts one process
        self._most = workers
        self._size = 1
        self._busy = 0
        self.spec = StepSpec(
            name=name,
            kind=kind,
            mode=MAP,
            workers=1,
            make_work=functools.partial(JobWork, functions),
            timed_units=timed,
            cancellable=True,
            options=tuple(sorted((k, v) for k, v in options.items() if v is not None)),
        )
        self.stop = threading.Event()
        self.clock: Clock = SYSTEM_CLOCK
        self.latency = LatencyRing()
        self._outcomes = outcomes
        self._loop = loop
        self._loop_thread = threading.get_ident()
        # units waiting for a thread or a process; the worker never has more jobs out than
        # its concurrency, so this never fills
        self._inbox: Buffer[Unit] = Buffer(max(16, 4 * workers), name=name)
        pool_class = KINDS[kind]
        pool_class.validate(self.spec)
        self.pool = pool_class(self, PoolContext(get_loop=lambda: loop, thread_name=name))
        self.pool.start()

    # -- from the worker (on its loop) ----------------------------------------------------------
    def feed(self, run_key: str, task_key: str, args: list[Any], kwargs: dict[str, Any],
             timeout_s: float | None, context: JobContext) -> None:  # fmt: skip
        unit = Unit(0, [(run_key, task_key, args, kwargs, context)])
        unit.ref = run_key
        unit.timeout_s = timeout_s
        self._busy += 1
        if self._busy > self._size and self._size < self._most:
            self._size = min(self._most, self._busy)
            self.pool.resize(self._size)
        if self.loop_native:
            self.pool.submit(unit)  # type: ignore[attr-defined]
        elif not self._inbox.put(unit, 0):
            raise RuntimeError(f"{self.name}: more jobs handed over than it has room for")

    def close(self) -> None:
        """No more jobs: the workers leave once those given are done."""
        if self.loop_native:
            self.pool.end_input()  # type: ignore[attr-defined]
        else:
            self._inbox.close()

    def cancel(self, run_key: str, error: BaseException) -> bool:
        """End the job ``run_key`` where it runs (its thread abandoned, its process killed):
        it fails with ``error``. False if no worker is on it."""
        return self.pool.cancel(run_key, error)

    def abort(self) -> None:
        """Stop now: threads are abandoned, processes killed, coroutines cancelled."""
        self.stop.set()
        self._inbox.shutdown()
        self.pool.abort()

    # -- the source protocol (from the kind's workers) -------------------------------------------
    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        got = self._inbox.get_many(1, None if wait else 0)
        if got is None:
            return None
        if not got:
            return WOKEN
        return got[0]

    def unit_limit(self) -> int:
        return 1

    def kick(self) -> None:
        self._inbox.kick()

    def apply(self, item: Any, result: Any, out: list[Any]) -> None:
        out.append(result)

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        if isinstance(error, BufferShutdown):
            raise error
        self._tell(self._settled, self._outcomes.job_raised, item[0], error)
        return None  # settled: the worker retries it through the queue, or makes it dead

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        if outputs:  # no output: the job failed, and on_failure said so
            self._tell(self._settled, self._outcomes.job_returned, unit.ref, outputs[0])

    def _settled(self, tell: Callable[..., None], *args: Any) -> None:
        """A job's outcome, on the worker's loop."""
        self._busy -= 1
        tell(*args)

    def emit_early(self, outputs: list[Any]) -> None:
        raise AssertionError("jobs map: nothing is emitted early")

    def release(self, unit: Unit) -> Unit | None:
        return None

    def measured(self, n_items: int, seconds: float) -> None:
        if n_items:
            self.latency.add(seconds / n_items)

    def fatal(self, error: BaseException) -> None:
        self._tell(self._outcomes.pool_failed, self.kind, error)

    def close_output(self) -> None:
        return None

    def _tell(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            # a closed loop: the worker is gone, and its leases will lapse
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)
