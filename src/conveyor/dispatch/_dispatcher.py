"""The dispatcher: topics, producers that answer requests, subscribers that receive answers.

Workers. Producers and subscriptions are sources of work for the engine's worker kinds, like a
pipeline's stages: each producer has a bounded buffer of calls and ``workers`` threads (or, for
``async def``, coroutines on one event loop the dispatcher runs in a thread of its own); each
subscription has its own bounded buffer and one worker. A request puts one call in the buffer of
every producer of its topic and returns at once; a producer's answer goes to every subscription
of the topic, each through its own buffer, so one slow or failing listener delays nobody else.
What a worker does when the user's code raises (anything, ``BaseException`` included) is the
kind's, written once: the call fails, is counted and logged, and the worker goes on.

Deadlines. A call that has not started when its request's deadline passes is skipped
(``expired``); an answer that comes after it is thrown away (``dropped``) and no listener sees it.

Registration. The producers and subscriptions of a topic are immutable tuples, swapped under a
lock; a request or an answer reads the tuple once, so registering and removing from any thread
never blocks the traffic, and a closed subscription's listener is never called after ``close()``
returns.

Bounds. A producer's queue holds up to ``maxsize`` calls (the engine's buffer: the bound is
exact, under one lock): a request waits for room until its own deadline, then counts the call as
expired. A subscription's buffer holds up to ``maxsize`` answers: an answer for a full buffer is
not stored and is counted as ``overflowed`` for that subscription (a listener that cannot keep up
loses answers instead of stalling the others).

Time. Deadlines are read from the dispatcher's clock (the engine's, injectable).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._engine import (
    KINDS,
    SYSTEM_CLOCK,
    Buffer,
    BufferShutdown,
    Clock,
    LoopThread,
    PoolContext,
    StepSpec,
    WorkerPool,
)
from .._engine.source import EACH, MAP, TARGET_UNIT_S, WOKEN, Unit, UnitSizer, apply_result
from .._engine.stats import LatencyRing
from .._errors import ClosedResourceError, ConfigurationError

log = logging.getLogger("conveyor.dispatch")

OUTCOMES = ("answered", "expired", "dropped", "failed")
_DELIVERIES = ("delivered", "listener_failed", "overflowed")


@dataclass(frozen=True)
class DispatcherStats:
    """A snapshot of a dispatcher's counters since it was made."""

    requests: int
    """requests made"""
    answered: int
    """producer answers that came in time (each went to every subscriber of its topic)"""
    expired: int
    """producer calls skipped: not started before their request's deadline"""
    dropped: int
    """producer answers that came after their request's deadline, thrown away"""
    failed: int
    """producer calls that raised (logged)"""
    delivered: int
    """listener calls made"""
    listener_failed: int
    """listener calls that raised (logged)"""
    overflowed: int
    """answers not given to a subscription whose buffer was full"""
    pending: int
    """calls and answers waiting in queues and buffers now"""
    producers: int
    subscriptions: int
    latency_p50_s: float | None
    """from ``request()`` to the start of a listener call, over the last 2048 deliveries"""
    latency_p99_s: float | None


class _Outcome:
    """What a producer's call that gave no answer came to: it is kept in a request's log in
    place of an answer."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_EXPIRED = _Outcome("expired")
_DROPPED = _Outcome("dropped")
_FAILED = _Outcome("failed")


class Request:
    """One request: which producers answered, which expired, and the answers that came in time.

    ``results(timeout_s=)`` waits until every producer has settled or the deadline has passed,
    and returns the answers so far, in arrival order; ``wait(timeout_s=)`` waits until every
    producer has settled (answered, expired, dropped or failed) and says whether they have.
    """

    # Each producer settles a request once, by appending to its log (an answer, or the
    # outcome that stands in for one). An append is atomic, so settling takes no lock: the
    # producer whose append makes the log complete wakes the waiters, if there are any. A
    # waiter publishes its event before it looks at the log, and a settler appends before it
    # looks for the event: one of the two sees the other, so no waiter sleeps through the end.
    __slots__ = (
        "_event",
        "_log",
        "args",
        "clock",
        "deadline",
        "expected",
        "kwargs",
        "started",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ttl_s: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.topic = topic
        self.args = args
        self.kwargs = kwargs
        self.clock = clock
        self.started = started = clock.now()
        self.deadline = started + ttl_s
        self.expected = 0
        self._log: list[Any] = []
        self._event: threading.Event | None = None

    def _settle(self, outcome: _Outcome) -> None:
        """One producer's call is settled: an answer, or what stands in for one."""
        log = self._log
        log.append(outcome)
        if len(log) >= self.expected and self._event is not None:
            self._event.set()

    @property
    def done(self) -> bool:
        """Every producer has settled."""
        return len(self._log) >= self.expected

    def _count(self, outcome: _Outcome) -> int:
        return sum(1 for x in self._log if x is outcome)

    @property
    def answered(self) -> int:
        """Producers whose answer came in time."""
        return sum(1 for x in self._log if not isinstance(x, _Outcome))

    @property
    def expired(self) -> int:
        """Producer calls skipped: not started before the deadline."""
        return self._count(_EXPIRED)

    @property
    def dropped(self) -> int:
        """Producer answers that came after the deadline, thrown away."""
        return self._count(_DROPPED)

    @property
    def failed(self) -> int:
        """Producer calls that raised."""
        return self._count(_FAILED)

    def _waiter(self) -> threading.Event:
        event = self._event
        if event is None:
            with _WAITER_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self.done:
            event.set()
        return event

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every producer has settled; False if ``timeout_s`` passed first."""
        if self.done:
            return True
        return self._waiter().wait(timeout_s)

    def results(self, timeout_s: float | None = None) -> list[Any]:
        """The answers that came before the deadline, once every producer has settled or the
        deadline has passed (or after ``timeout_s``, whichever is first)."""
        left = max(0.0, self.deadline - self.clock.now())
        if timeout_s is not None:
            left = min(left, timeout_s)
        if not self.done:
            self._waiter().wait(left)
        return [x for x in list(self._log) if not isinstance(x, _Outcome)]

    def __repr__(self) -> str:
        return (
            f"<Request {self.topic!r}: {self.answered} answered, {self.expired} expired, "
            f"{self.dropped} dropped, {self.failed} failed of {self.expected}>"
        )


#: makes one event per request that is waited for (rare, and over in a moment)
_WAITER_LOCK = threading.Lock()


class _Lane:
    """A bounded buffer and a pool of the engine's workers (threads, or coroutines for
    ``async def``), as a source of work: what producers and subscriptions have in common."""

    target_unit_s = TARGET_UNIT_S

    def __init__(
        self,
        dispatcher: Dispatcher,
        name: str,
        fn: Callable[..., Any],
        *,
        workers: int,
        maxsize: int,
        mode: str,
        make_work: Callable[[], Any],
    ) -> None:
        self.dispatcher = dispatcher
        self.name = name
        self.mode = mode
        self.is_async = inspect.iscoroutinefunction(fn)
        kind = "async" if self.is_async else "thread"
        self.spec = StepSpec(name=name, kind=kind, mode=mode, workers=workers, make_work=make_work)
        self.stop = threading.Event()
        self.clock = dispatcher.clock
        self.latency = LatencyRing()
        self.inbox: Buffer[Any] = Buffer(maxsize, name=name)
        self._put = self.inbox.put
        self._sizer = UnitSizer()
        self._lock = threading.Lock()
        context = PoolContext(get_loop=dispatcher._event_loop, thread_name=name)
        self.pool: WorkerPool = KINDS[kind](self, context)
        self.pool.start()

    # -- the source protocol --------------------------------------------------------------------
    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        n = self._sizer.limit() if limit is None else max(1, min(limit, self._sizer.limit()))
        items = self.inbox.get_many(n, None if wait else 0)
        if items is None:
            return None
        if not items:
            return WOKEN
        return Unit(0, items)

    def unit_limit(self) -> int:
        return self._sizer.limit()

    def kick(self) -> None:
        self.inbox.kick()

    def apply(self, item: Any, result: Any, out: list[Any]) -> None:
        apply_result(self.mode, item, result, out)

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        raise NotImplementedError

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        raise NotImplementedError

    def emit_early(self, outputs: list[Any]) -> None:
        raise AssertionError("nothing is emitted early here")

    def release(self, unit: Unit) -> Unit | None:
        return None

    def measured(self, n_items: int, seconds: float) -> None:
        self._sizer.measured(n_items, seconds)

    def fatal(self, error: BaseException) -> None:
        log.error("%s: %r", self.name, error, exc_info=error)

    def close_output(self) -> None:
        return None

    def pending(self) -> int:
        return len(self.inbox)

    def _end(self, *, now: bool) -> None:
        """Serve what is buffered and end (``now``: drop it and end at once)."""
        if now:
            self.stop.set()
            self.inbox.shutdown()
            self.pool.abort()
        else:
            self.inbox.close()


class _Call:
    """A producer's work: its function on one request, unless the request's deadline has
    passed (then the call is skipped). Returns the request and its answer, or the outcome
    that stands in for one (expired; dropped, for an answer that came too late)."""

    __slots__ = ("fn", "now")

    def __init__(self, fn: Callable[..., Any], clock: Clock) -> None:
        self.fn = fn
        self.now = clock.now

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        return None

    def call(self, req: Request) -> tuple[Request, Any]:
        if self.now() > req.deadline:
            return req, _EXPIRED
        if req.kwargs:
            result = self.fn(req.topic, *req.args, **req.kwargs)
        else:
            result = self.fn(req.topic, *req.args)
        return req, (result if self.now() <= req.deadline else _DROPPED)


class _AsyncCall(_Call):
    __slots__ = ()

    async def call(self, req: Request) -> tuple[Request, Any]:  # type: ignore[override]
        if self.now() > req.deadline:
            return req, _EXPIRED
        result = await self.fn(req.topic, *req.args, **req.kwargs)
        return req, (result if self.now() <= req.deadline else _DROPPED)


class Producer(_Lane):
    """A registered producer: ``fn(topic, *args, **kwargs)`` on ``workers`` threads (or
    coroutines, for ``async def``), fed by a queue of at most ``maxsize`` calls."""

    def __init__(
        self, dispatcher: Dispatcher, topic: str, fn: Callable[..., Any], workers: int, maxsize: int
    ) -> None:
        self.topic = topic
        self.fn = fn
        self.workers = workers
        self.maxsize = maxsize
        work = _AsyncCall if inspect.iscoroutinefunction(fn) else _Call
        self._counts = dict.fromkeys(OUTCOMES, 0)
        super().__init__(
            dispatcher,
            f"conveyor:producer:{topic}",
            fn,
            workers=workers,
            maxsize=maxsize,
            mode=MAP,
            make_work=functools.partial(work, fn, dispatcher.clock),
        )

    def _submit(self, req: Request) -> None:
        """Queue a call for which there was no room: wait for room until the deadline."""
        try:
            if self._put(req, max(0.0, req.deadline - self.clock.now())):
                return
        except (ClosedResourceError, BufferShutdown):
            pass  # deregistered meanwhile: this producer will not answer
        self._not_served(req)

    def _not_served(self, req: Request) -> None:
        self._count("expired")
        req._settle(_EXPIRED)

    def _count(self, outcome: str) -> None:
        self.dispatcher._tally(self._counts, outcome)

    def outcomes(self) -> dict[str, int]:
        """Answered, expired, dropped and failed calls of this producer so far."""
        with self.dispatcher._tally_lock:
            return dict(self._counts)

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        if isinstance(error, BufferShutdown):
            raise error
        log.error("producer %r of topic %r failed", self.fn, item.topic, exc_info=error)
        self._count("failed")
        item._settle(_FAILED)
        return None

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        # counted before the requests are settled: a caller that waited for one finds it in
        # the statistics
        answers = [x for x in outputs if x[1].__class__ is not _Outcome]
        expired = dropped = 0
        if len(answers) < len(outputs):
            expired = sum(1 for x in outputs if x[1] is _EXPIRED)
            dropped = len(outputs) - len(answers) - expired
        self.dispatcher._tally_unit(self._counts, len(answers), expired, dropped)
        for req, result in outputs:
            req._settle(result)
        if answers:
            self.dispatcher._fan_out(self.topic, answers)


class _Deliver:
    """A subscription's work: one call of its listener, unless it was closed meanwhile. Its
    one worker is the only writer of the subscription's delivery counts."""

    __slots__ = ("latency", "listener", "now", "sub")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.listener = sub.listener
        self.latency = sub.dispatcher._latency.add
        self.now = sub.clock.now

    def setup(self) -> None:
        self.sub._worker = threading.get_ident()

    def teardown(self) -> None:
        return None

    def call(self, item: tuple[Request, Any]) -> None:
        # the worker said it is busy when it took the unit (see Subscription.take); close()
        # says "closed" before it waits for the worker to be idle, so whichever comes first,
        # no call starts after close() returns
        sub = self.sub
        if sub._closed:
            return
        req, result = item
        self.latency(self.now() - req.started)
        self.listener(req.topic, result)
        sub.delivered += 1


class _AsyncDeliver(_Deliver):
    __slots__ = ()

    async def call(self, item: tuple[Request, Any]) -> None:  # type: ignore[override]
        sub = self.sub
        sub._idle.clear()  # before looking at _closed: close() waits for _idle
        try:
            if sub._closed:
                return
            req, result = item
            self.latency(self.now() - req.started)
            await self.listener(req.topic, result)
            sub.delivered += 1
        finally:
            sub._idle.set()


class Subscription(_Lane):
    """A listener ``listener(topic, result)`` behind its own bounded buffer, called one call at
    a time, in the order answers came (on every topic it listens to).

    ``close()`` removes it: once it returns, the listener is not called again (a call under way
    when ``close()`` is called finishes first, unless ``close()`` is called by that call).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        topics: tuple[str, ...],
        listener: Callable[[str, Any], Any],
        maxsize: int,
    ) -> None:
        self.topics = topics
        self.topic = topics[0]
        self.listener = listener
        self.maxsize = maxsize
        #: listener calls made, and those that raised (written by its one worker only)
        self.delivered = 0
        self.listener_failed = 0
        self._counts = dict.fromkeys(_DELIVERIES, 0)  # overflowed, under the tally lock
        self._folded = False
        self._closed = False
        #: True while the worker holds a unit of answers (it may be calling the listener)
        self._calling_now = False
        self._worker: int | None = None
        self._idle = threading.Event()
        self._idle.set()
        work = _AsyncDeliver if inspect.iscoroutinefunction(listener) else _Deliver
        super().__init__(
            dispatcher,
            f"conveyor:listener:{','.join(topics)}",
            listener,
            workers=1,
            maxsize=maxsize,
            mode=EACH,
            make_work=functools.partial(work, self),
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _offer(self, items: list[tuple[Request, Any]]) -> None:
        if self._closed:
            return
        try:
            kept = self.inbox.offer_many(list(items))
        except (ClosedResourceError, BufferShutdown):
            return  # closed meanwhile
        for _ in range(len(items) - kept):
            self.dispatcher._tally(self._counts, "overflowed")

    @property
    def overflowed(self) -> int:
        """Answers not kept because the buffer was full."""
        return self._counts["overflowed"]

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None:
        if isinstance(error, BufferShutdown):
            raise error
        self.listener_failed += 1
        log.error("listener %r of topic %r failed", self.listener, item[0].topic, exc_info=error)
        return None

    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None:
        unit = super().take(limit, wait)
        # said before any listener call of the unit looks at "closed"
        self._calling_now = unit is not None and unit is not WOKEN
        return unit

    def complete(self, unit: Unit, outputs: list[Any]) -> None:
        self._calling_now = False

    def add_topic(self, topic: str) -> None:
        """Listen to ``topic`` too: its answers join the same buffer, in arrival order with
        the others, one call at a time."""
        self.dispatcher._add_topic(self, topic)

    def remove_topic(self, topic: str) -> bool:
        """Stop listening to ``topic`` (answers already buffered are still delivered); False if
        it was not one of this subscription's topics. A subscription left with no topic stays
        open, receiving nothing, until it is closed."""
        return self.dispatcher._remove_topic(self, topic)

    def close(self) -> None:
        """Unsubscribe; answers still in the buffer are not delivered."""
        if self._closed:
            return
        self._closed = True
        self.dispatcher._remove_subscription(self)
        self._end(now=False)
        self._settled()

    def _settled(self, timeout_s: float | None = None) -> bool:
        """Wait for a call under way (unless it is the caller) for up to ``timeout_s``, then
        fold this subscription's deliveries into the dispatcher's totals: no listener call
        comes after. False if the call was still under way."""
        if self.is_async:
            if not self.dispatcher._on_loop() and not self._idle.wait(timeout_s):
                return False
        elif self._worker != threading.get_ident():
            # a call under way ends before close() returns
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            pause = 0.0001
            while self._calling_now and not self.pool.gone.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        self.dispatcher._fold(self)
        return True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Dispatcher:
    """Topics, producers and subscriptions; requests with deadlines.

    ``ttl_s`` is the default deadline of a request (5 s); ``maxsize`` the default bound of a
    producer's queue of calls and of a subscription's buffer (1024); ``clock`` the time that
    deadlines are read from (the engine's clock; tests pass a manual one). Use it as a
    context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(
        self, *, ttl_s: float = 5.0, maxsize: int = 1024, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if not ttl_s > 0 or isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise ConfigurationError("ttl_s must be positive and maxsize an int of at least 1")
        if maxsize < 1:
            raise ConfigurationError("ttl_s must be positive and maxsize an int of at least 1")
        self.ttl_s = ttl_s
        self.maxsize = maxsize
        self.clock = clock
        self._lock = threading.Lock()
        self._producers: dict[str, tuple[Producer, ...]] = {}
        self._subscriptions: dict[str, tuple[Subscription, ...]] = {}
        # every count, for stats(): producers and subscriptions add to these as they go, so
        # one that is removed need not be kept for its numbers
        self._tally_lock = threading.Lock()
        self._totals = dict.fromkeys((*OUTCOMES, *_DELIVERIES), 0)
        #: removed producers and subscriptions whose workers may not have ended yet
        self._ending: list[_Lane] = []
        self._closed = False
        self._loop_thread: LoopThread | None = None
        self._requests = itertools.count()
        self._latency = LatencyRing()

    # -- lifetime -------------------------------------------------------------------------------
    def start(self) -> Dispatcher:
        """Ready to use on creation; ``start()`` only checks that it has not been stopped."""
        if self._closed:
            raise ClosedResourceError("this dispatcher was stopped; make a new one")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests; producers serve the calls already accepted, subscriptions are
        closed, and every worker ends. Workers still busy after ``timeout_s`` (a listener or
        producer that never returns) are left behind: threads abandoned, coroutines
        cancelled; ``stop`` itself always returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producers = [p for ps in self._producers.values() for p in ps]
            subscriptions = {id(s): s for ss in self._subscriptions.values() for s in ss}
        for p in producers:
            self.deregister_producer(p.topic, p)
        for s in subscriptions.values():
            s._closed = True  # no listener call from here on
            self._remove_subscription(s)
            s._end(now=False)
        deadline = time.monotonic() + timeout_s
        for s in subscriptions.values():
            if not s._settled(max(0.0, deadline - time.monotonic())):
                log.warning("a listener of %s did not return within %.1f s", s.topics, timeout_s)
        with self._lock:
            ending, self._ending = self._ending, []
        for lane in ending:
            left = max(0.0, deadline - time.monotonic())
            if not lane.pool.gone.wait(left):
                log.warning("%s did not end within %.1f s: left behind", lane.name, timeout_s)
                lane._end(now=True)
        if self._loop_thread is not None:
            self._loop_thread.stop()

    def __enter__(self) -> Dispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = LoopThread("conveyor:dispatch-loop")
            return self._loop_thread.loop

    def _on_loop(self) -> bool:
        thread = None if self._loop_thread is None else self._loop_thread._thread
        return threading.current_thread() is thread

    def _retire(self, lane: _Lane) -> None:
        """Forget a removed producer or subscription, but for ``stop``, which waits for its
        workers to end: it is kept only until they have."""
        with self._lock:
            self._ending = [x for x in self._ending if not x.pool.gone.is_set()]
            self._ending.append(lane)

    def _tally(self, counts: dict[str, int], what: str) -> None:
        with self._tally_lock:
            counts[what] += 1
            self._totals[what] += 1

    def _fold(self, sub: Subscription) -> None:
        with self._tally_lock:
            if sub._folded:
                return
            sub._folded = True
            self._totals["delivered"] += sub.delivered
            self._totals["listener_failed"] += sub.listener_failed

    def _tally_unit(
        self, counts: dict[str, int], answered: int, expired: int, dropped: int
    ) -> None:
        """Count the outcomes of one unit of a producer's calls."""
        with self._tally_lock:
            totals = self._totals
            if answered:
                counts["answered"] += answered
                totals["answered"] += answered
            if expired:
                counts["expired"] += expired
                totals["expired"] += expired
            if dropped:
                counts["dropped"] += dropped
                totals["dropped"] += dropped

    # -- registration ---------------------------------------------------------------------------
    def register_producer(
        self,
        topic: str,
        fn: Callable[..., Any],
        *,
        workers: int = 1,
        maxsize: int | None = None,
    ) -> Producer:
        """``fn(topic, *args, **kwargs)`` answers every request on ``topic``, ``workers`` calls at
        a time (threads; coroutines for ``async def``). Returns the registration."""
        if not callable(fn):
            raise ConfigurationError(f"a producer must be callable, not {fn!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigurationError(f"workers must be an int of at least 1, not {workers!r}")
        self._check_open()
        producer = Producer(self, topic, fn, workers, self._maxsize(maxsize))
        with self._lock:
            self._producers[topic] = (*self._producers.get(topic, ()), producer)
        return producer

    def deregister_producer(self, topic: str, producer: Producer | Callable[..., Any]) -> bool:
        """Remove a producer (the registration, or every registration of that function) from
        ``topic``. Calls it already accepted are still served; a request racing the removal
        counts that producer's call as expired. False if it was not there."""
        with self._lock:
            current = self._producers.get(topic, ())
            gone = [p for p in current if p is producer or p.fn == producer]
            if not gone:
                return False
            self._producers[topic] = tuple(p for p in current if p not in gone)
            if not self._producers[topic]:
                del self._producers[topic]
        for p in gone:
            p._end(now=False)
            self._retire(p)
        return True

    def subscribe(
        self,
        topic: str | Iterable[str],
        listener: Callable[[str, Any], Any],
        *,
        maxsize: int | None = None,
    ) -> Subscription:
        """``listener(topic, result)`` receives every answer on ``topic`` (one topic, or several:
        a list of them) that came in time, in the order they came, one call at a time.
        Returns the subscription (``close()`` it)."""
        if not callable(listener):
            raise ConfigurationError(f"a listener must be callable, not {listener!r}")
        topics = (topic,) if isinstance(topic, str) else tuple(dict.fromkeys(topic))
        if not topics or not all(isinstance(t, str) for t in topics):
            raise ConfigurationError(f"a topic is a string (or several), not {topic!r}")
        self._check_open()
        sub = Subscription(self, topics, listener, self._maxsize(maxsize))
        with self._lock:
            for t in topics:
                self._subscriptions[t] = (*self._subscriptions.get(t, ()), sub)
        return sub

    def unsubscribe(self, topic: str, listener: Subscription | Callable[..., Any]) -> bool:
        """Close the subscription (or every subscription of that listener) on ``topic``."""
        with self._lock:
            subs = [
                s
                for s in self._subscriptions.get(topic, ())
                if s is listener or s.listener == listener
            ]
        for s in subs:
            s.close()
        return bool(subs)

    def _add_topic(self, sub: Subscription, topic: str) -> None:
        if not isinstance(topic, str):
            raise ConfigurationError(f"a topic is a string, not {topic!r}")
        with self._lock:
            if sub._closed:
                raise ClosedResourceError("this subscription was closed")
            if topic in sub.topics:
                return
            sub.topics = (*sub.topics, topic)
            self._subscriptions[topic] = (*self._subscriptions.get(topic, ()), sub)

    def _remove_topic(self, sub: Subscription, topic: str) -> bool:
        with self._lock:
            if topic not in sub.topics:
                return False
            sub.topics = tuple(t for t in sub.topics if t != topic)
            current = tuple(s for s in self._subscriptions.get(topic, ()) if s is not sub)
            if current:
                self._subscriptions[topic] = current
            else:
                self._subscriptions.pop(topic, None)
            return True

    def _remove_subscription(self, sub: Subscription) -> None:
        with self._lock:
            for t in sub.topics:
                current = tuple(s for s in self._subscriptions.get(t, ()) if s is not sub)
                if current:
                    self._subscriptions[t] = current
                else:
                    self._subscriptions.pop(t, None)
        self._retire(sub)

    def _maxsize(self, maxsize: int | None) -> int:
        if maxsize is None:
            return self.maxsize
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be an int of at least 1, not {maxsize!r}")
        return maxsize

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("this dispatcher was stopped")

    # -- traffic --------------------------------------------------------------------------------
    def request(self, topic: str, *args: Any, ttl_s: float | None = None, **kwargs: Any) -> Request:
        """Ask every producer of ``topic``; their answers go to the topic's subscribers until the
        deadline (``ttl_s``, the dispatcher's default if not given). Returns at once."""
        if self._closed:
            raise ClosedResourceError("this dispatcher was stopped")
        if ttl_s is None:
            ttl_s = self.ttl_s
        elif not ttl_s > 0:
            raise ConfigurationError(f"ttl_s must be positive, not {ttl_s}")
        next(self._requests)
        req = Request(topic, args, kwargs, ttl_s, self.clock)
        producers = self._producers.get(topic, ())
        req.expected = len(producers)
        for p in producers:
            try:
                if p._put(req, 0):
                    continue  # there was room: the usual case
            except (ClosedResourceError, BufferShutdown):
                p._not_served(req)  # deregistered meanwhile: this producer will not answer
                continue
            p._submit(req)
        return req

    def _fan_out(self, topic: str, items: list[tuple[Request, Any]]) -> None:
        """Give the answers of one unit of a producer to every subscription of ``topic``: one
        hand-over per subscription, whatever the number of answers."""
        for sub in self._subscriptions.get(topic, ()):
            sub._offer(items)

    # -- statistics -----------------------------------------------------------------------------
    def topics(self) -> dict[str, tuple[int, int]]:
        """Each topic with (producers, subscriptions) registered now."""
        with self._lock:
            names = set(self._producers) | set(self._subscriptions)
            return {
                t: (len(self._producers.get(t, ())), len(self._subscriptions.get(t, ())))
                for t in sorted(names)
            }

    def stats(self) -> DispatcherStats:
        with self._lock:
            producers = [p for ps in self._producers.values() for p in ps]
            subs = list({id(s): s for ss in self._subscriptions.values() for s in ss}.values())
        with self._tally_lock:
            totals = dict(self._totals)
            for s in subs:
                if not s._folded:
                    totals["delivered"] += s.delivered
                    totals["listener_failed"] += s.listener_failed
        p50, _p95, p99 = self._latency.percentiles()
        return DispatcherStats(
            requests=_value(self._requests),
            answered=totals["answered"],
            expired=totals["expired"],
            dropped=totals["dropped"],
            failed=totals["failed"],
            delivered=totals["delivered"],
            listener_failed=totals["listener_failed"],
            overflowed=totals["overflowed"],
            pending=sum(p.pending() for p in producers) + sum(s.pending() for s in subs),
            producers=len(producers),
            subscriptions=len(subs),
            latency_p50_s=p50,
            latency_p99_s=p99,
        )


def _value(counter: itertools.count[int]) -> int:
    """How many times ``next`` was called on a counter started at 0 (without advancing it)."""
    return int(repr(counter)[len("count(") : -1])
