"""The ``Pipeline`` builder."""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Hashable,
    Iterable,
)
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, Generic, TypedDict, TypeVar, Unpack, overload

from .._engine import EACH, FILTER, FLAT, MAP, SYSTEM_CLOCK, Clock, RunStats, StepSpec
from .._errors import ConfigurationError
from ._batch import no_work
from ._run import Progress, Run, _Layout
from ._stage import DEFAULT_MAXSIZE, Stage, _positive_int, _positive_number, build_spec

#: what flows out of a pipeline (covariant: a Pipeline[bool] is a Pipeline[int])
T_co = TypeVar("T_co", covariant=True)
U = TypeVar("U")

_NO_SOURCE = object()


class StageOptions(TypedDict, total=False):
    """The options every stage takes (all keyword-only, all optional)."""

    #: shown in statistics and errors; defaults to the function's name
    name: str | None
    #: how many workers run at once (default 1)
    workers: int
    #: "thread" (default), "async", "process", "executor" or "dask"
    kind: str
    #: keep input order (default: the pipeline's ``ordered``)
    ordered: bool | None
    #: items with the same key run one at a time, in order; keys run in parallel
    key: Callable[[Any], Hashable] | None
    #: capacity of the stage's inbox, and of its reorder window (default 4096)
    maxsize: int | None
    #: "raise" (default), Skip(), Retry(...) or DeadLetter(sink)
    on_error: Any
    #: time limit per item, in seconds
    timeout_s: float | None
    #: at most this many items per second, shared by the stage's workers
    rate: float | None
    #: process stages: "forkserver" (the default on Linux), "spawn" or "fork"
    start_method: str | None
    #: process stages: replace a worker process after it has run this many items
    max_items_per_worker: int | None
    #: executor stages: the ``concurrent.futures.Executor`` each call is submitted to
    executor: Executor | None
    #: dask stages: the scheduler's address, such as "tcp://127.0.0.1:8786"
    address: str | None


_OPTION_NAMES = frozenset(StageOptions.__annotations__)


class Pipeline(Generic[T_co]):
    """Items flowing through stages, each stage a pool of workers, every boundary a bounded buffer.

    ``Pipeline(source)`` reads an iterable, iterator, generator or async iterable;
    ``Pipeline()`` is fed with ``run.put(item)`` on a started run. Each method returns a new
    pipeline, so a pipeline can be extended and reused; a one-shot iterator source is consumed
    by the first run.
    """

    @overload
    def __init__(
        self: Pipeline[Any], *, ordered: bool = False, clock: Clock = SYSTEM_CLOCK
    ) -> None: ...
    @overload
    def __init__(
        self,
        source: Iterable[T_co] | AsyncIterable[T_co],
        *,
        ordered: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None: ...
    def __init__(
        self,
        source: Any = _NO_SOURCE,
        *,
        ordered: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if (
            source is not _NO_SOURCE
            and source is not None
            and not (hasattr(source, "__iter__") or hasattr(source, "__aiter__"))
        ):
            raise ConfigurationError(
                f"a pipeline's source is an iterable or an async iterable, not "
                f"{type(source).__name__}"
            )
        if not isinstance(ordered, bool):
            raise ConfigurationError(f"ordered must be True or False, not {ordered!r}")
        self._source: Any = source
        self._has_source = source is not _NO_SOURCE and source is not None
        self._ordered = ordered
        self._clock = clock
        self._layouts: list[_Layout] = []

    def _extend(self, layout: _Layout) -> Pipeline[Any]:
        names = {lay.spec.name for lay in self._layouts}
        spec = layout.spec
        if spec.name in names:
            n = 2
            while f"{spec.name}-{n}" in names:
                n += 1
            layout = _Layout(replace(spec, name=f"{spec.name}-{n}"), layout.capacity, layout.batch)
        new: Pipeline[Any] = Pipeline.__new__(Pipeline)
        new.__dict__.update(self.__dict__)
        new._layouts = [*self._layouts, layout]
        return new

    def _stage(self, mode: str, fn: Any, options: StageOptions) -> Pipeline[Any]:
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            bad = sorted(unknown)[0]
            close = difflib.get_close_matches(bad, _OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"unknown stage option {bad!r}{hint} (options: {', '.join(sorted(_OPTION_NAMES))})"
            )
        name = options.get("name")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"a stage name is a non-empty string, not {name!r}")
            if any(lay.spec.name == name for lay in self._layouts):
                raise ConfigurationError(f"two stages are named {name!r}")
        ordered = options.get("ordered")
        spec, cap = build_spec(
            mode,
            fn,
            name=name,
            workers=options.get("workers", 1),
            kind=options.get("kind", "thread"),
            ordered=self._ordered if ordered is None else ordered,
            key=options.get("key"),
            maxsize=options.get("maxsize"),
            on_error=options.get("on_error", "raise"),
            timeout_s=options.get("timeout_s"),
            rate=options.get("rate"),
            kind_options={
                "start_method": options.get("start_method"),
                "max_items_per_worker": options.get("max_items_per_worker"),
                "executor": options.get("executor"),
                "address": options.get("address"),
            },
        )
        return self._extend(_Layout(spec, cap, None))

    # -- stages -------------------------------------------------------------------------------
    # The overloads give each stage's output type: a Stage subclass's ``Out``, what an ``async
    # def`` returns once awaited, or what a plain function returns. A function that returns an
    # awaitable also fits the plain form, so the async form comes first.
    @overload
    def map(
        self, fn: type[Stage[T_co, U]] | Stage[T_co, U], **options: Unpack[StageOptions]
    ) -> Pipeline[U]: ...
    @overload
    def map(
        self, fn: Callable[[T_co], Awaitable[U]], **options: Unpack[StageOptions]
    ) -> Pipeline[U]: ...
    @overload
    def map(self, fn: Callable[[T_co], U], **options: Unpack[StageOptions]) -> Pipeline[U]: ...
    def map(self, fn: Any, **options: Unpack[StageOptions]) -> Pipeline[Any]:
        """Each item becomes ``fn(item)``. Options: see :class:`StageOptions`."""
        return self._stage(MAP, fn, options)

    def filter(
        self,
        fn: Callable[[T_co], object] | type[Stage[T_co, Any]] | Stage[T_co, Any],
        **options: Unpack[StageOptions],
    ) -> Pipeline[T_co]:
        """Items for which ``fn(item)`` is true go on; the others are dropped."""
        return self._stage(FILTER, fn, options)

    @overload
    def flat_map(
        self,
        fn: type[Stage[T_co, Iterable[U]]] | Stage[T_co, Iterable[U]],
        **options: Unpack[StageOptions],
    ) -> Pipeline[U]: ...
    @overload
    def flat_map(
        self, fn: Callable[[T_co], AsyncIterable[U]], **options: Unpack[StageOptions]
    ) -> Pipeline[U]: ...
    @overload
    def flat_map(
        self, fn: Callable[[T_co], Awaitable[Iterable[U]]], **options: Unpack[StageOptions]
    ) -> Pipeline[U]: ...
    @overload
    def flat_map(
        self, fn: Callable[[T_co], Iterable[U]], **options: Unpack[StageOptions]
    ) -> Pipeline[U]: ...
    def flat_map(self, fn: Any, **options: Unpack[StageOptions]) -> Pipeline[Any]:
        """``fn(item)`` returns an iterable (a list, a generator, ...); each element goes on."""
        return self._stage(FLAT, fn, options)

    def each(
        self,
        fn: Callable[[T_co], object] | type[Stage[T_co, Any]] | Stage[T_co, Any],
        **options: Unpack[StageOptions],
    ) -> Pipeline[None]:
        """A sink: ``fn(item)`` runs for its effect and nothing goes on."""
        return self._stage(EACH, fn, options)

    def batch(
        self,
        size: int,
        *,
        within_s: float | None = None,
        name: str | None = None,
        maxsize: int | None = None,
    ) -> Pipeline[list[T_co]]:
        """Group items into lists of up to ``size``; a list waits at most ``within_s`` seconds
        after its first item before it goes on as it is. The last list may be shorter."""
        size = _positive_int("batch size", size)
        within = _positive_number("within_s", within_s)
        cap = DEFAULT_MAXSIZE if maxsize is None else _positive_int("maxsize", maxsize)
        label = name or "batch"
        if name is not None and any(lay.spec.name == name for lay in self._layouts):
            raise ConfigurationError(f"two stages are named {name!r}")
        spec = StepSpec(
            name=label, kind="batch", mode="batch", workers=1, make_work=no_work, window=cap
        )
        return self._extend(_Layout(spec, cap, (size, within)))

    # -- streams ------------------------------------------------------------------------------
    @classmethod
    def from_stream(
        cls,
        url: str,
        name: str,
        *,
        group: str,
        consumer: str | None = None,
        lease_s: float = 30.0,
        max_deliveries: int = 5,
        serializer: str = "json",
        count: int = 256,
        burst: bool = False,
        start: str = "0",
        ordered: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Pipeline[Any]:
        """A pipeline fed by the Redis Stream ``name``, sharing its entries with every other
        consumer of ``group`` (made at the stream's first entry when missing; ``start="$"``
        makes it at its end). An entry is acknowledged once everything this run made from it
        is over; one held by a consumer that stopped renewing it for ``lease_s`` is taken
        over by another; one delivered more than ``max_deliveries`` times goes to
        ``<name>:dead``. The run reads until it is stopped (``run.stop()``), or, with
        ``burst=True``, until the group has nothing left. ``consumer`` names this reader
        (default: host, pid and a random part); ``count`` entries are read at a time.
        """
        from ._stream import StreamInput

        where = StreamInput(
            url,
            name,
            group=group,
            consumer=consumer,
            lease_s=lease_s,
            max_deliveries=max_deliveries,
            serializer=serializer,
            count=count,
            burst=burst,
            start=start,
        )
        new: Pipeline[Any] = Pipeline(ordered=ordered, clock=clock)
        new._source = where
        new._has_source = True
        return new

    def to_stream(
        self,
        url: str,
        name: str,
        *,
        max_lag: int | None = None,
        maxlen: int | None = None,
        serializer: str = "json",
        batch: int = 256,
        within_s: float = 0.01,
        stage_name: str = "to_stream",
    ) -> Pipeline[None]:
        """End the pipeline by appending each output to the Redis Stream ``name``, up to
        ``batch`` entries per round trip (a batch waits at most ``within_s``). ``max_lag``
        makes the writer wait while a consumer group of the stream has more entries than
        that not acknowledged; ``maxlen`` trims the stream to about that many entries
        (trimmed entries are gone, read or not)."""
        from ._stream import StreamWriter

        writer = StreamWriter(url, name, max_lag=max_lag, maxlen=maxlen, serializer=serializer)
        grouped = self.batch(batch, within_s=within_s, name=f"{stage_name}:batch")
        return grouped.each(writer, name=stage_name)

    # -- running ------------------------------------------------------------------------------
    def start(self) -> Run[T_co]:
        """Start every worker and return the run's handle (a context manager)."""
        return Run(self, clock=self._clock)

    def __iter__(self) -> Generator[T_co]:
        run: Run[T_co] = Run(self, clock=self._clock)
        return run._outputs(None, owner=True)

    def __aiter__(self) -> AsyncIterator[T_co]:
        run: Run[T_co] = Run(self, loop=asyncio.get_running_loop(), clock=self._clock)
        return run._aoutputs(None)

    def run(
        self,
        timeout_s: float | None = None,
        progress: Progress = False,
        metrics_port: int | None = None,
        name: str = "pipeline",
    ) -> RunStats:
        """Run to the end, dropping the last stage's outputs, and return the final statistics.

        ``timeout_s`` bounds the whole run (:class:`RunTimeout`); ``progress=True`` draws a
        progress bar, and a callable is called with :class:`RunStats` about ten times a second,
        on the calling thread.
        ``metrics_port`` serves each stage's statistics on ``/metrics`` (127.0.0.1) while the
        run lasts, labelled ``pipeline=name`` (``conveyor[metrics]``).
        """
        timeout_s = _positive_number("timeout_s", timeout_s)
        handle: Run[T_co] = Run(self, clock=self._clock)
        server = None
        if metrics_port is not None:
            from ..metrics import Metrics

            metrics = Metrics()
            metrics.watch_run(name, handle.stats)
            server = metrics.serve(metrics_port)
        try:
            for _ in handle._outputs(timeout_s, progress):
                pass
        finally:
            if server is not None:
                server.close()
        return handle.stats()

    async def arun(self, timeout_s: float | None = None) -> RunStats:
        """``run()`` for async code: async stages run on the running event loop."""
        timeout_s = _positive_number("timeout_s", timeout_s)
        handle: Run[T_co] = Run(self, loop=asyncio.get_running_loop(), clock=self._clock)
        async for _ in handle._aoutputs(timeout_s):
            pass
        return handle.stats()

    def __repr__(self) -> str:
        stages = " | ".join(f"{lay.spec.mode}:{lay.spec.name}" for lay in self._layouts)
        return f"<Pipeline {stages or '(no stages)'}>"
