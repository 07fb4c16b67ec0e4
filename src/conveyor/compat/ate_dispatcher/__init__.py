"""ate-dispatcher on conveyor: ``from conveyor.compat.ate_dispatcher import ATEDispatcher,
Producer, ResultListener``.

``ATEDispatcher`` keeps ate-dispatcher's names and behaviour on a :class:`conveyor.Dispatcher`:
``register_result_producer``, ``register_result_listener``, their ``deregister_*``,
``send_request(topic, *args, ttl=ms, **kwargs)`` (5000 ms by default) and thread-style
``start``/``stop``. As in ate-dispatcher, each ``Producer`` answers one request at a time and each
``ResultListener`` receives one result at a time, whatever the number of topics they are
registered on; a result that comes after its request's ``ttl`` is discarded.

Where ate-dispatcher could hang or lose work, the dispatcher underneath keeps its own contract: a
producer that raises loses only that answer (logged and counted, where ate-dispatcher's producer
thread died and every later request on it hung), and queues are bounded.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from conveyor import Dispatcher

__all__ = ["ATEDispatcher", "Producer", "ResultListener"]


class _Lifetime(threading.Thread):
    """ate-dispatcher's classes are threads, and their users treat them so: ``name``,
    ``daemon``, ``ident``, ``is_alive()``, ``join(timeout)``, subclassing with ``super()``.
    Here the thread only lives from ``start()`` to ``stop()``; the calls themselves (the user's
    code) run on the dispatcher's workers, where crashes, counts and bounds are kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("daemon", True)
        super().__init__(*args, **kwargs)
        self._serial = threading.Lock()  # one call at a time, as ate-dispatcher's one thread
        self._stopped_event = threading.Event()

    def start(self) -> None:
        """Start the thread; starting it again does nothing (ate-dispatcher's examples do)."""
        if not self.is_alive() and not self._stopped_event.is_set():
            with contextlib.suppress(RuntimeError):  # started before
                super().start()

    def run(self) -> None:
        self._stopped_event.wait()

    def stop(self) -> None:
        self._stopped_event.set()


class Producer(_Lifetime):
    """Subclass it and implement ``produce_dispatcher_output(topic, *args, **kwargs)``."""

    def produce_dispatcher_output(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("A producer must implement `produce_dispatcher_output`")

    def _produce(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        with self._serial:
            return self.produce_dispatcher_output(topic, *args, **kwargs)


class ResultListener(_Lifetime):
    """Subclass it and implement ``process_dispatcher_result(topic, response)``."""

    def process_dispatcher_result(self, topic: str, response: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__qualname__} has not implemented the process_dispatcher_result method"
        )

    def _receive(self, topic: str, response: Any) -> None:
        with self._serial:
            self.process_dispatcher_result(topic, response)


class ATEDispatcher(_Lifetime):
    """The dispatcher: relays each request to the producers of its topic and their results to
    the listeners of that topic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dispatcher = Dispatcher(ttl_s=5.0)
        self._producers: dict[tuple[int, str], tuple[Producer, Any]] = {}
        #: one subscription per listener, whatever the number of its topics: its results
        #: arrive in one line, in the order they came, one call at a time
        self._listeners: dict[int, tuple[ResultListener, Any]] = {}
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Stop the dispatcher and every producer and listener still registered."""
        with self._lock:
            producers = {id(p): p for p, _ in self._producers.values()}
            listeners = {id(r): r for r, _ in self._listeners.values()}
            self._producers.clear()
            self._listeners.clear()
        self.dispatcher.stop()
        for thing in [*producers.values(), *listeners.values()]:
            thing.stop()
        super().stop()

    def register_result_producer(self, producer: Producer, topic: str) -> None:
        with self._lock:
            if (id(producer), topic) in self._producers:
                return
            handle = self.dispatcher.register_producer(topic, producer._produce)
            self._producers[(id(producer), topic)] = (producer, handle)

    def deregister_result_producer(self, producer: Producer, topic: str) -> None:
        with self._lock:
            found = self._producers.pop((id(producer), topic), None)
        if found is not None:
            self.dispatcher.deregister_producer(topic, found[1])

    def register_result_listener(self, listener: ResultListener, topic: str) -> None:
        with self._lock:
            found = self._listeners.get(id(listener))
            if found is not None:
                found[1].add_topic(topic)
                return
            sub = self.dispatcher.subscribe(topic, listener._receive)
            self._listeners[id(listener)] = (listener, sub)

    def deregister_result_listener(self, listener: ResultListener, topic: str) -> None:
        with self._lock:
            found = self._listeners.get(id(listener))
            if found is None:
                return
            found[1].remove_topic(topic)
            if found[1].topics:
                return
            del self._listeners[id(listener)]
        found[1].close()

    def send_request(self, topic: str, *args: Any, ttl: float = 5000, **kwargs: Any) -> Any:
        """Ask every producer of ``topic``; results within ``ttl`` milliseconds go to the
        listeners of ``topic``. Returns the :class:`conveyor.dispatch.Request`."""
        return self.dispatcher.request(topic, *args, ttl_s=ttl / 1000, **kwargs)
