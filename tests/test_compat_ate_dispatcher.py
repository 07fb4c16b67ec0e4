"""ate-dispatcher's page on conveyor.compat.ate_dispatcher: its README scenario, as written
(with the page's two typos mended: ``time.sleep(timeout)`` meant ``self.timeout``, and commas
were missing in the expected dicts). The page's producers sleep for their work (200 and 500 ms)
and its ``time.sleep`` waits let the answers arrive; here each producer's work waits for a turn
the test gives, and the deadlines follow a manual clock, so which answer comes first and which
comes too late is the test's doing, not the machine's speed."""

from __future__ import annotations

import threading
from typing import Any

from conveyor import ManualClock
from conveyor.compat.ate_dispatcher import ATEDispatcher, Producer, ResultListener

from .conftest import eventually


class SpecificTopicProducer(Producer):
    def __init__(self, _id: int, timeout: int, *topics: str) -> None:
        super().__init__()
        self.id = _id
        self.timeout = timeout / 1000  # the page's work time: here, a turn the test gives
        self.topics = set(topics)
        self.turns = threading.Semaphore(0)

    def produce_dispatcher_output(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        assert self.turns.acquire(timeout=30)  # the producer's own work
        return {"id": self.id, "some_key": topic, "args": args, "kwargs": kwargs}


class ResultListenerExample(ResultListener):
    def __init__(self) -> None:
        super().__init__()
        self.responses: dict[str, list[Any]] = {}

    def clear(self) -> None:
        self.responses = {}

    def process_dispatcher_result(self, topic: str, response: Any) -> None:
        topic_responses = self.responses.get(topic, [])
        topic_responses.append(response)
        self.responses[topic] = topic_responses


def reply(i: int, topic: str) -> dict[str, Any]:
    return {"id": i, "some_key": topic, "args": (3, 4, 5), "kwargs": {"keyword": "b"}}


def test_the_readme_scenario() -> None:
    dispatcher = ATEDispatcher()
    clock = ManualClock()
    dispatcher.dispatcher.clock = clock  # before any registration: every deadline follows it
    dispatcher.start()

    producer1 = SpecificTopicProducer(0, 200, "topic1", "my_topic")
    producer1.start()
    producer2 = SpecificTopicProducer(1, 500, "topic1", "topic2", "my_topic")
    producer2.start()
    for topic in producer1.topics:
        dispatcher.register_result_producer(producer1, topic)
    for topic in producer2.topics:
        dispatcher.register_result_producer(producer2, topic)

    listener1 = ResultListenerExample()
    listener1.start()
    listener2 = ResultListenerExample()
    listener2.start()
    for topic in ["topic1", "topic2", "my_topic"]:
        dispatcher.register_result_listener(listener1, topic)
    for topic in ["topic1", "my_topic"]:
        dispatcher.register_result_listener(listener2, topic)

    # 4000 ms: both producers answer in time, the faster (200 ms) first
    request = dispatcher.send_request("topic1", 3, 4, 5, ttl=4000, keyword="b")
    clock.advance(0.2)
    producer1.turns.release()
    first = {"topic1": [reply(0, "topic1")]}
    eventually(lambda: listener1.responses == first and listener2.responses == first)
    clock.advance(0.3)
    producer2.turns.release()
    assert request.wait(5)
    expected = {"topic1": [reply(0, "topic1"), reply(1, "topic1")]}
    eventually(lambda: listener1.responses == expected and listener2.responses == expected)
    listener1.clear()
    listener2.clear()

    # 300 ms: only producer1 (200 ms) is in time; producer2's answer (500 ms) is discarded
    request = dispatcher.send_request("my_topic", 3, 4, 5, ttl=300, keyword="b")
    clock.advance(0.2)
    producer1.turns.release()
    eventually(lambda: request.answered == 1)
    clock.advance(0.3)  # 500 ms: past the deadline
    producer2.turns.release()
    assert request.wait(5)
    assert request.answered == 1 and request.dropped == 1
    expected = {"my_topic": [reply(0, "my_topic")]}
    eventually(lambda: listener1.responses == expected and listener2.responses == expected)
    listener1.clear()

    # 1000 ms on topic2: only producer2 answers, only listener1 listens
    request = dispatcher.send_request("topic2", 3, 4, 5, ttl=1000, keyword="b")
    clock.advance(0.5)
    producer2.turns.release()
    assert request.wait(5)
    expected = {"topic2": [reply(1, "topic2")]}
    eventually(lambda: listener1.responses == expected)

    dispatcher.deregister_result_listener(listener2, "my_topic")
    dispatcher.deregister_result_producer(producer1, "topic1")
    for topic in producer1.topics:
        dispatcher.deregister_result_producer(producer1, topic)
    for topic in producer2.topics:
        dispatcher.deregister_result_producer(producer2, topic)
    producer1.stop()
    producer2.stop()
    for topic in ["topic1", "topic2", "my_topic"]:
        dispatcher.deregister_result_listener(listener1, topic)
    for topic in ["topic1", "my_topic"]:
        dispatcher.deregister_result_listener(listener2, topic)
    dispatcher.stop()
    assert dispatcher.dispatcher.stats().dropped == 1


def test_a_producer_answers_one_request_at_a_time_and_failures_do_not_kill_it() -> None:
    class Counting(Producer):
        def __init__(self) -> None:
            super().__init__()
            self.inside = 0
            self.most = 0
            self.calls = 0

        def produce_dispatcher_output(self, topic: str, *args: Any, **kwargs: Any) -> Any:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.calls += 1
            try:
                if args and args[0] == "boom":
                    raise RuntimeError("boom")
                return args
            finally:
                self.inside -= 1

    dispatcher = ATEDispatcher()
    producer = Counting()
    for topic in ("a", "b", "c"):
        dispatcher.register_result_producer(producer, topic)
    dispatcher.register_result_producer(producer, "a")  # twice: still once, as in a set
    failing = dispatcher.send_request("a", "boom")
    requests = [dispatcher.send_request(t, i) for i in range(30) for t in ("a", "b", "c")]
    assert failing.wait(5) and failing.failed == 1
    assert all(r.wait(5) and r.answered == 1 for r in requests)
    assert producer.most == 1 and producer.calls == 91
    dispatcher.stop()


def test_the_interfaces_are_threads() -> None:
    """ "Since the interfaces inherit from threading.Thread": users call name, daemon, ident,
    is_alive and join, and subclass them with their own arguments."""

    class Named(Producer):
        def __init__(self) -> None:
            super().__init__(name="my-producer")

        def produce_dispatcher_output(self, topic: str, *args: Any, **kwargs: Any) -> Any:
            return topic

    d = ATEDispatcher()
    p, listener = Named(), ResultListenerExample()
    for thing in (d, p, listener):
        assert isinstance(thing, threading.Thread)
        thing.start()
        thing.start()  # as the page's example does for the dispatcher: no error
        assert thing.is_alive() and thing.ident is not None and thing.daemon
    assert p.name == "my-producer"
    d.register_result_producer(p, "t")
    d.register_result_listener(listener, "t")
    d.send_request("t")
    eventually(lambda: listener.responses == {"t": ["t"]})
    d.stop()
    for thing in (d, p, listener):
        thing.join(5)
        assert not thing.is_alive()


def test_one_listener_on_several_topics_receives_in_arrival_order_one_call_at_a_time() -> None:
    """ "The messages will be delivered to the result listeners as they arrive": across all of
    a listener's topics, in one line, one call at a time, on one thread."""

    class Echo(Producer):
        def produce_dispatcher_output(self, topic: str, *args: Any, **kwargs: Any) -> Any:
            return args[0]

    gate = threading.Event()

    class Ordered(ResultListener):
        def __init__(self) -> None:
            super().__init__()
            self.got: list[tuple[str, int]] = []
            self.threads: set[int] = set()

        def process_dispatcher_result(self, topic: str, response: Any) -> None:
            if not self.got:
                gate.wait(10)  # the first answer is slow to take in: the others queue
            self.threads.add(threading.get_ident())
            self.got.append((topic, response))

    d = ATEDispatcher()
    listener = Ordered()
    for topic in ("a", "b", "c"):
        d.register_result_producer(Echo(), topic)
        d.register_result_listener(listener, topic)
    order = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)]
    for topic, i in order:
        d.send_request(topic, i).wait(5)  # answered before the next is asked
    gate.set()
    eventually(lambda: len(listener.got) == len(order))
    assert listener.got == order and len(listener.threads) == 1
    d.deregister_result_listener(listener, "a")
    d.send_request("a", -1).wait(5)
    d.send_request("b", -2).wait(5)
    eventually(lambda: listener.got[-1] == ("b", -2))
    assert ("a", -1) not in listener.got
    d.stop()
