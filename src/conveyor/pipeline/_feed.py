"""A pipeline's input, read on the engine's thread kind like any other user code.

Iterating the source runs the user's code (a generator, an iterator's ``__next__``), so it runs
where all user code runs: on a worker of the thread kind. The input is one unit of work for
one worker: "read the source into the first buffer", which waits whenever that buffer is full
(backpressure reaches the source). A source that raises fails the run as the stage
``"source"``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from .._engine import SYSTEM_CLOCK, Buffer, BufferShutdown, Clock, StepSpec
from .._engine.source import EACH, Unit
from .._engine.stats import LatencyRing
from .._errors import ClosedResourceError, StageFailed

#: list, tuple and range sources are handed to the first buffer in slices of this size
SOURCE_SLICE = 512


class _Read:
    """The work of the feed's one worker: read the whole source into the first buffer."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        return None

    def call(self, _: Any) -> None:
        feed = self.feed
        first = feed.first
        source = feed.source
        if isinstance(source, list | tuple | range):
            for i in range(0, len(source), SOURCE_SLICE):
                if feed.stopped():
                    break
                first.put_many(list(source[i : i + SOURCE_SLICE]))
        elif hasattr(source, "__aiter__"):
            self._read_async(source)
        else:
            for item in source:
                if feed.stopped():
                    break
                first.put(item)
        first.close()

    def _read_async(self, source: Any) -> None:
        loop = self.feed.get_loop()
        iterator = source.__aiter__()

        async def next_item() -> tuple[bool, Any]:
            try:
                return True, await iterator.__anext__()
            except StopAsyncIteration:
                return False, None

        while not self.feed.stopped():
            more, item = asyncio.run_coroutine_threadsafe(next_item(), loop).result()
            if not more:
                break
            self.feed.first.put(item)


class OneUnitSource:
    """A source whose whole work is one unit for one worker of the thread kind: reading an
    input into the first buffer. Subclasses set ``spec`` and ``_on_fatal``."""

    name = "source"
    mode = EACH
    target_unit_s = 0.0
    _given = False
    _on_fatal: Callable[[BaseException], None]

    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        if self._given:
            return None
        self._given = True
        return Unit(0, [None])

    def unit_limit(self) -> int:
        return 1

    def kick(self) -> None:
        return None

    def apply(self, item: Any, result: Any, out: list[Any]) -> None:
        return None

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        if isinstance(error, BufferShutdown | ClosedResourceError):
            raise BufferShutdown  # the run is being torn down: nothing more to read
        self._on_fatal(StageFailed("source", None, 1, error))
        raise BufferShutdown from error

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        return None

    def emit_early(self, outputs: list[Any]) -> None:
        return None

    def release(self, unit: Unit) -> Unit | None:
        return None

    def measured(self, n_items: int, seconds: float) -> None:
        return None

    def fatal(self, error: BaseException) -> None:
        self._on_fatal(error)

    def close_output(self) -> None:
        return None


class Feed(OneUnitSource):
    """The source of work "read the input": one unit, for one worker of the thread kind."""

    def __init__(
        self,
        source: Any,
        first: Buffer[Any],
        *,
        stop: threading.Event,
        stopped: Callable[[], bool],
        on_fatal: Callable[[BaseException], None],
        get_loop: Callable[[], asyncio.AbstractEventLoop],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.source = source
        self.first = first
        self.stop = stop
        self.stopped = stopped
        self.get_loop = get_loop
        self.clock = clock
        self.latency = LatencyRing()
        self._on_fatal = on_fatal
        self.spec = StepSpec(
            name="source", kind="thread", mode=EACH, workers=1, make_work=lambda: _Read(self)
        )
