"""The dispatcher: topics, producers that answer requests, subscribers that receive answers.

Threads. Each producer has ``workers`` threads (or, for ``async def``, tasks on one event loop
the dispatcher runs in a thread of its own) fed by a queue of calls; each subscription has one
thread (or task) fed by its own bounded buffer. A request puts one call on the queue of every
producer of its topic and returns at once; a producer's answer goes to every subscription of the
topic, each through its own buffer, so one slow or failing listener delays nobody else.

Deadlines. A call that has not started when its request's deadline passes is skipped
(``expired``); an answer that comes after it is thrown away (``dropped``) and no listener sees it.

Registration. The producers and subscriptions of a topic are immutable tuples, swapped under a
lock; a request or an answer reads the tuple once, so registering and removing from any thread
never blocks the traffic, and a closed subscription's listener is never called after ``close()``
returns.

Bounds. A producer's queue holds up to ``maxsize`` calls: a request waits for room until its own
deadline, then counts the call as expired. A subscription's buffer holds up to ``maxsize``
answers: an answer for a full buffer is not stored and is counted as ``overflowed`` for that
subscription (a listener that cannot keep up loses answers instead of stalling the others).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._engine import LoopThread
from .._engine.stats import LatencyRing
from .._errors import ClosedResourceError, ConfigurationError

log = logging.getLogger("conveyor.dispatch")

_STOP = object()
_now = time.monotonic
OUTCOMES = ("answered", "expired", "dropped", "failed")


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


class Request:
    """One request: which producers answered, which expired, and the answers that came in time.

    ``results(timeout_s=)`` waits until every producer has settled or the deadline has passed,
    and returns the answers so far, in arrival order; ``wait(timeout_s=)`` waits until every
    producer has settled (answered, expired, dropped or failed) and says whether they have.
    """

    __slots__ = (
        "_event",
        "_lock",
        "_results",
        "_settled",
        "answered",
        "args",
        "deadline",
        "dropped",
        "expected",
        "expired",
        "failed",
        "kwargs",
        "started",
        "topic",
    )

    def __init__(
        self, topic: str, args: tuple[Any, ...], kwargs: dict[str, Any], ttl_s: float
    ) -> None:
        self.topic = topic
        self.args = args
        self.kwargs = kwargs
        self.started = _now()
        self.deadline = self.started + ttl_s
        self.expected = 0
        self.answered = 0
        self.expired = 0
        self.dropped = 0
        self.failed = 0
        self._settled = 0
        self._results: list[Any] = []
        self._lock = threading.Lock()
        self._event: threading.Event | None = None

    def _settle(self, outcome: str, result: Any = None) -> str:
        """Count one producer's outcome; an answer after the deadline becomes ``dropped``.
        Returns the outcome counted (``answered``: in time, to be delivered)."""
        with self._lock:
            if outcome == "answered":
                if _now() > self.deadline:
                    outcome = "dropped"
                    self.dropped += 1
                else:
                    self._results.append(result)
                    self.answered += 1
            elif outcome == "expired":
                self.expired += 1
            else:
                self.failed += 1
            self._settled += 1
            event = self._event if self._settled >= self.expected else None
        if event is not None:
            event.set()
        return outcome

    @property
    def done(self) -> bool:
        """Every producer has settled."""
        return self._settled >= self.expected

    def _waiter(self) -> threading.Event:
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
                if self._settled >= self.expected:
                    self._event.set()
            return self._event

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every producer has settled; False if ``timeout_s`` passed first."""
        if self.done:
            return True
        return self._waiter().wait(timeout_s)

    def results(self, timeout_s: float | None = None) -> list[Any]:
        """The answers that came before the deadline, once every producer has settled or the
        deadline has passed (or after ``timeout_s``, whichever is first)."""
        left = max(0.0, self.deadline - _now())
        if timeout_s is not None:
            left = min(left, timeout_s)
        if not self.done:
            self._waiter().wait(left)
        with self._lock:
            return list(self._results)

    def __repr__(self) -> str:
        return (
            f"<Request {self.topic!r}: {self.answered} answered, {self.expired} expired, "
            f"{self.dropped} dropped, {self.failed} failed of {self.expected}>"
        )


class _Counts:
    """Counters written by one thread only (its owner), read by ``stats()``."""

    __slots__ = ("delivered", "listener_failed", "overflowed")

    def __init__(self) -> None:
        self.delivered = 0
        self.listener_failed = 0
        self.overflowed = 0


class Producer:
    """A registered producer: ``fn(topic, *args, **kwargs)`` on ``workers`` threads or tasks."""

    def __init__(
        self, dispatcher: Dispatcher, topic: str, fn: Callable[..., Any], workers: int, maxsize: int
    ) -> None:
        self.dispatcher = dispatcher
        self.topic = topic
        self.fn = fn
        self.workers = workers
        self.maxsize = maxsize
        self.is_async = inspect.iscoroutinefunction(fn)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # outcome counts, one row per worker thread (each written by its thread only; the
        # async tasks share row 0, all on the loop thread); the last row is written under
        # ``_room`` by requests that found the queue full until their deadline
        self._counts = [dict.fromkeys(OUTCOMES, 0) for _ in range(workers + 1)]
        self._room = threading.Condition()
        self._waiting = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._ainbox: asyncio.Queue[Any] | None = None
        if self.is_async:
            loop = dispatcher._event_loop()
            self._loop = loop

            def start_tasks() -> None:
                self._ainbox = asyncio.Queue()
                for _ in range(workers):
                    loop.create_task(self._awork(self._counts[0]))

            asyncio.run_coroutine_threadsafe(_call(start_tasks), loop).result()
        else:
            for i in range(workers):
                t = threading.Thread(
                    target=self._work,
                    args=(self._counts[i],),
                    name=f"conveyor:producer:{topic}:{i}",
                    daemon=True,
                )
                t.start()
                self._threads.append(t)

    def _submit(self, req: Request) -> None:
        if self._inbox.qsize() >= self.maxsize and not self._wait_for_room(req):
            with self._room:
                self._counts[-1][req._settle("expired")] += 1
            return
        if self.is_async:
            self._loop.call_soon_threadsafe(self._put_async, req)
        else:
            self._inbox.put(req)

    def _put_async(self, req: Request) -> None:
        assert self._ainbox is not None
        self._inbox.put(None)  # counts toward qsize(): one per call waiting on the loop
        self._ainbox.put_nowait(req)

    def _wait_for_room(self, req: Request) -> bool:
        with self._room:
            self._waiting += 1
            try:
                while self._inbox.qsize() >= self.maxsize and not self._stopped:
                    left = req.deadline - _now()
                    if left <= 0:
                        return False
                    self._room.wait(left)
                return not self._stopped
            finally:
                self._waiting -= 1

    def _took(self) -> None:
        with self._room:
            self._room.notify()

    def outcomes(self) -> dict[str, int]:
        """Answered, expired, dropped and failed calls of this producer so far."""
        return {k: sum(row[k] for row in self._counts) for k in OUTCOMES}

    def _work(self, counts: dict[str, int]) -> None:
        get = self._inbox.get
        fn = self.fn
        fan_out = self.dispatcher._fan_out
        while True:
            req = get()
            if req is _STOP:
                return
            if self._waiting:
                self._took()
            if _now() > req.deadline:
                counts[req._settle("expired")] += 1
                continue
            try:
                result = fn(req.topic, *req.args, **req.kwargs)
            except Exception:
                log.exception("producer %r of topic %r failed", fn, req.topic)
                counts[req._settle("failed")] += 1
                continue
            outcome = req._settle("answered", result)
            counts[outcome] += 1
            if outcome == "answered":
                fan_out(req, result)

    async def _awork(self, counts: dict[str, int]) -> None:
        assert self._ainbox is not None
        while True:
            req = await self._ainbox.get()
            if req is _STOP:
                return
            self._inbox.get_nowait()
            if self._waiting:
                self._took()
            if _now() > req.deadline:
                counts[req._settle("expired")] += 1
                continue
            try:
                result = await self.fn(req.topic, *req.args, **req.kwargs)
            except Exception:
                log.exception("producer %r of topic %r failed", self.fn, req.topic)
                counts[req._settle("failed")] += 1
                continue
            outcome = req._settle("answered", result)
            counts[outcome] += 1
            if outcome == "answered":
                self.dispatcher._fan_out(req, result)

    def _stop(self) -> None:
        """Serve what was accepted, then end."""
        with self._room:
            self._stopped = True
            self._room.notify_all()
        if self.is_async:
            for _ in range(self.workers):
                self._loop.call_soon_threadsafe(_put_nowait, self, _STOP)
        else:
            for _ in self._threads:
                self._inbox.put(_STOP)

    def pending(self) -> int:
        return self._inbox.qsize()


def _put_nowait(producer: Producer, item: Any) -> None:
    assert producer._ainbox is not None
    producer._ainbox.put_nowait(item)


async def _call(fn: Callable[[], None]) -> None:
    fn()


class Subscription:
    """A listener ``listener(topic, result)`` behind its own bounded buffer.

    ``close()`` removes it: once it returns, the listener is not called again (a call under way
    when ``close()`` is called finishes first, unless ``close()`` is called by that call).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        topic: str,
        listener: Callable[[str, Any], Any],
        maxsize: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.topic = topic
        self.listener = listener
        self.maxsize = maxsize
        self.is_async = inspect.iscoroutinefunction(listener)
        self.counts = _Counts()
        self._overflow_lock = threading.Lock()
        self._buffer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._calling = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        if self.is_async:
            self._loop = dispatcher._event_loop()
            self._abuffer: asyncio.Queue[Any] | None = None

            def start_task() -> None:
                self._abuffer = asyncio.Queue()
                self._loop.create_task(self._awork())

            asyncio.run_coroutine_threadsafe(_call(start_task), self._loop).result()
        else:
            self._thread = threading.Thread(
                target=self._work, name=f"conveyor:listener:{topic}", daemon=True
            )
            self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def _offer(self, item: tuple[str, Any, float]) -> None:
        if self._closed:
            return
        if self._buffer.qsize() >= self.maxsize:
            with self._overflow_lock:
                self.counts.overflowed += 1
            return
        self._buffer.put(item)
        if self.is_async:
            self._loop.call_soon_threadsafe(self._wake_async)

    def _wake_async(self) -> None:
        assert self._abuffer is not None
        self._abuffer.put_nowait(None)

    def _deliver(self, topic: str, result: Any, started: float) -> None:
        self.dispatcher._latency.add(_now() - started)
        try:
            self.listener(topic, result)
            self.counts.delivered += 1
        except Exception:
            self.counts.listener_failed += 1
            log.exception("listener %r of topic %r failed", self.listener, topic)

    def _work(self) -> None:
        get = self._buffer.get
        get_nowait = self._buffer.get_nowait
        calling = self._calling
        deliver = self._deliver
        while True:
            item = get()
            with calling:
                # everything already buffered, under one hold of the lock
                while True:
                    if item is _STOP:
                        return
                    if self._closed:
                        break
                    deliver(*item)
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break

    async def _awork(self) -> None:
        assert self._abuffer is not None
        while True:
            await self._abuffer.get()
            item = self._buffer.get_nowait()
            if item is _STOP:
                return
            topic, result, started = item
            self._idle.clear()  # before looking at _closed: close() waits for _idle
            try:
                if self._closed:
                    continue
                self.dispatcher._latency.add(_now() - started)
                try:
                    await self.listener(topic, result)
                    self.counts.delivered += 1
                except Exception:
                    self.counts.listener_failed += 1
                    log.exception("listener %r of topic %r failed", self.listener, topic)
            finally:
                self._idle.set()

    def pending(self) -> int:
        return self._buffer.qsize()

    def close(self) -> None:
        """Unsubscribe; answers still in the buffer are not delivered."""
        if self._closed:
            return
        self._closed = True
        self.dispatcher._remove_subscription(self)
        self._buffer.put(_STOP)
        if self.is_async:
            self._loop.call_soon_threadsafe(self._wake_async)
            if threading.current_thread() is not self.dispatcher._loop_thread_obj():
                self._idle.wait()
        elif threading.current_thread() is not self._thread:
            with self._calling:  # a call under way ends before close() returns
                pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Dispatcher:
    """Topics, producers and subscriptions; requests with deadlines.

    ``ttl_s`` is the default deadline of a request (5 s); ``maxsize`` the default bound of a
    producer's queue of calls and of a subscription's buffer (1024). Use it as a context manager,
    or call ``start()`` and ``stop()``.
    """

    def __init__(self, *, ttl_s: float = 5.0, maxsize: int = 1024) -> None:
        if ttl_s <= 0 or maxsize < 1:
            raise ConfigurationError("ttl_s must be positive and maxsize at least 1")
        self.ttl_s = ttl_s
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._producers: dict[str, tuple[Producer, ...]] = {}
        self._subscriptions: dict[str, tuple[Subscription, ...]] = {}
        self._retired: list[Producer | Subscription] = []
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

    def stop(self) -> None:
        """Stop taking requests; producers serve the calls already accepted, then every thread
        and task ends. Subscriptions are closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producers = [p for ps in self._producers.values() for p in ps]
            subscriptions = [s for ss in self._subscriptions.values() for s in ss]
        for p in producers:
            self.deregister_producer(p.topic, p)
        for s in subscriptions:
            s.close()
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

    def _loop_thread_obj(self) -> threading.Thread | None:
        return None if self._loop_thread is None else self._loop_thread._thread

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
        a time (threads; tasks for ``async def``). Returns the registration."""
        if not callable(fn):
            raise ConfigurationError(f"a producer must be callable, not {fn!r}")
        if workers < 1:
            raise ConfigurationError(f"workers must be at least 1, not {workers}")
        self._check_open()
        producer = Producer(self, topic, fn, workers, maxsize or self.maxsize)
        with self._lock:
            self._producers[topic] = (*self._producers.get(topic, ()), producer)
        return producer

    def deregister_producer(self, topic: str, producer: Producer | Callable[..., Any]) -> bool:
        """Remove a producer (the registration, or every registration of that function) from
        ``topic``. Calls it already accepted are still served. False if it was not there."""
        with self._lock:
            current = self._producers.get(topic, ())
            gone = [p for p in current if p is producer or p.fn == producer]
            if not gone:
                return False
            self._producers[topic] = tuple(p for p in current if p not in gone)
            self._retired.extend(gone)
        for p in gone:
            p._stop()
        return True

    def subscribe(
        self,
        topic: str,
        listener: Callable[[str, Any], Any],
        *,
        maxsize: int | None = None,
    ) -> Subscription:
        """``listener(topic, result)`` receives every answer on ``topic`` that came in time, in
        the order they came, one call at a time. Returns the subscription (``close()`` it)."""
        if not callable(listener):
            raise ConfigurationError(f"a listener must be callable, not {listener!r}")
        self._check_open()
        sub = Subscription(self, topic, listener, maxsize or self.maxsize)
        with self._lock:
            self._subscriptions[topic] = (*self._subscriptions.get(topic, ()), sub)
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

    def _remove_subscription(self, sub: Subscription) -> None:
        with self._lock:
            current = self._subscriptions.get(sub.topic, ())
            self._subscriptions[sub.topic] = tuple(s for s in current if s is not sub)
            self._retired.append(sub)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("this dispatcher was stopped")

    # -- traffic --------------------------------------------------------------------------------
    def request(self, topic: str, *args: Any, ttl_s: float | None = None, **kwargs: Any) -> Request:
        """Ask every producer of ``topic``; their answers go to the topic's subscribers until the
        deadline (``ttl_s``, the dispatcher's default if not given). Returns at once."""
        if self._closed:
            raise ClosedResourceError("this dispatcher was stopped")
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ConfigurationError(f"ttl_s must be positive, not {ttl}")
        next(self._requests)
        req = Request(topic, args, kwargs, ttl)
        producers = self._producers.get(topic, ())
        req.expected = len(producers)
        for p in producers:
            p._submit(req)
        return req

    def _fan_out(self, req: Request, result: Any) -> None:
        item = (req.topic, result, req.started)
        for sub in self._subscriptions.get(req.topic, ()):
            sub._offer(item)

    # -- statistics -----------------------------------------------------------------------------
    def topics(self) -> dict[str, tuple[int, int]]:
        """Each topic with (producers, subscriptions) registered now."""
        with self._lock:
            names = set(self._producers) | set(self._subscriptions)
            return {
                t: (len(self._producers.get(t, ())), len(self._subscriptions.get(t, ())))
                for t in sorted(names)
                if self._producers.get(t) or self._subscriptions.get(t)
            }

    def stats(self) -> DispatcherStats:
        with self._lock:
            producers = [p for ps in self._producers.values() for p in ps]
            subs = [s for ss in self._subscriptions.values() for s in ss]
            retired = list(self._retired)
        everyone_subs = subs + [s for s in retired if isinstance(s, Subscription)]
        everyone_producers = producers + [p for p in retired if isinstance(p, Producer)]
        totals = dict.fromkeys(OUTCOMES, 0)
        for p in everyone_producers:
            for k, v in p.outcomes().items():
                totals[k] += v
        p50, _p95, p99 = self._latency.percentiles()
        return DispatcherStats(
            requests=_value(self._requests),
            answered=totals["answered"],
            expired=totals["expired"],
            dropped=totals["dropped"],
            failed=totals["failed"],
            delivered=sum(s.counts.delivered for s in everyone_subs),
            listener_failed=sum(s.counts.listener_failed for s in everyone_subs),
            overflowed=sum(s.counts.overflowed for s in everyone_subs),
            pending=sum(p.pending() for p in producers) + sum(s.pending() for s in subs),
            producers=len(producers),
            subscriptions=len(subs),
            latency_p50_s=p50,
            latency_p99_s=p99,
        )


def _value(counter: itertools.count[int]) -> int:
    """How many times ``next`` was called on a counter started at 0 (without advancing it)."""
    return int(repr(counter)[len("count(") : -1])
