"""pymulproc's page on conveyor.compat.pymulproc: its pipe and 1:N examples as written, and the
N:1 and full-duplex stress cases of its test suite."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest

from conveyor.compat.pymulproc import factory, mpq_protocol


def call_child(_child: Any) -> None:
    _child.send(mpq_protocol.REQ_TEST_CHILD)


def test_simple_pipe_communication() -> None:
    pipe_factory = factory.PipeCommunication()
    parent = pipe_factory.parent()
    child = pipe_factory.child()

    child_process = multiprocessing.Process(name="child_process_", target=call_child, args=(child,))
    child_process.start()
    child_process.join()
    message = parent.receive(block=True)
    request_offset = mpq_protocol.S_PID_OFFSET - 1
    assert message[request_offset] == mpq_protocol.REQ_TEST_CHILD
    assert message[mpq_protocol.S_PID_OFFSET] == child_process.pid
    assert len(message) == 4


class ChildProcess:
    def __init__(self, identifier: int, parent_pid: int, conn: Any) -> None:
        self.id = identifier
        self.conn = conn
        self.parent_pid = parent_pid
        self.pid = multiprocessing.current_process().pid

    def is_message_for_me(self, message: list[Any]) -> bool:
        return (
            message[mpq_protocol.S_PID_OFFSET + 1] == self.pid
            or not message[mpq_protocol.S_PID_OFFSET + 1]
        )

    def run(self, **kwargs: Any) -> None:
        data = kwargs.get("data")
        self.conn.send(mpq_protocol.REQ_FINISHED, data=data)


def call_queue_child(identifier: int, parent_pid: int, q_factory: Any, data: Any) -> None:
    child = ChildProcess(identifier, parent_pid, q_factory.child())
    child.run(data=data)


def test_children_to_parent_communication() -> None:
    queue_factory = factory.QueueCommunication()
    parent = queue_factory.parent()
    parent_pid = multiprocessing.current_process().pid

    child_processes = []
    val = 3
    for offset in range(5):
        child_process = multiprocessing.Process(
            name=f"child_process_{offset}",
            target=call_queue_child,
            args=(offset + 1, parent_pid, queue_factory, val),
        )
        child_processes.append(child_process)
    for child in child_processes:
        child.start()
    for child in child_processes:
        child.join()

    counter = 0
    data_offset = mpq_protocol.S_PID_OFFSET + 2
    while not parent.queue_empty():
        message = parent.receive()
        counter += message[data_offset]
    parent.queue_join()
    assert counter == val * len(child_processes)


def test_receive_with_a_criterion_that_always_fails_returns_false() -> None:
    pipe_factory = factory.PipeCommunication()
    parent, child = pipe_factory.parent(), pipe_factory.child()
    parent.send(mpq_protocol.REQ_DO, data=1)
    assert child.receive(lambda x: False) is False
    assert child.receive(block=True) == [mpq_protocol.REQ_DO, parent.pid, None, 1]


def full_duplex_child(q_factory: Any) -> None:
    conn = q_factory.child()
    me = multiprocessing.current_process().pid
    while True:
        message = conn.receive(
            func=lambda m: m[mpq_protocol.R_PID_OFFSET] in (me, None), block=True
        )
        if message is False:
            continue
        if message[0] == mpq_protocol.REQ_DIE:
            return
        conn.send(mpq_protocol.REQ_FINISHED, data=message[3] * 2)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_parent_full_duplex_communication_with_children_stress_test(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    queue_factory = factory.QueueCommunication()
    parent = queue_factory.parent()
    children = [
        ctx.Process(target=full_duplex_child, args=(queue_factory,), daemon=True) for _ in range(4)
    ]
    for c in children:
        c.start()
    n = 1000
    for i in range(n):
        parent.send(mpq_protocol.REQ_DO, recipient_pid=children[i % 4].pid, data=i)
    total = 0
    for _ in range(n):
        message = parent.receive(block=True)
        assert message[0] == mpq_protocol.REQ_FINISHED
        total += message[3]
    assert total == 2 * sum(range(n))
    for c in children:  # the poison pill
        parent.send(mpq_protocol.REQ_DIE, recipient_pid=c.pid)
    for c in children:
        c.join(30)
        assert c.exitcode == 0
    assert parent.queue_empty()


def many_to_one_child(q_factory: Any, count: int) -> None:
    conn = q_factory.child()
    for i in range(count):
        conn.send(mpq_protocol.REQ_FINISHED, data=i)


def test_many_children_to_one_parent_stress_test() -> None:
    queue_factory = factory.QueueCommunication()
    parent = queue_factory.parent()
    children = [
        multiprocessing.Process(target=many_to_one_child, args=(queue_factory, 500))
        for _ in range(6)
    ]
    for c in children:
        c.start()
    for c in children:  # joined before anything is read: no deadlock
        c.join(30)
        assert c.exitcode == 0
    got = []
    while not parent.queue_empty():
        got.append(parent.receive())
    assert len(got) == 3000
    per_child: dict[int, list[int]] = {}
    for message in got:
        per_child.setdefault(message[1], []).append(message[3])
    assert all(v == list(range(500)) for v in per_child.values())  # each child's order kept


def _send_as(conn: Any, pid: int) -> None:
    conn.child().send(mpq_protocol.REQ_FINISHED, sender_pid=pid, data="hi")


def test_an_explicit_sender_pid_is_kept_on_a_queue() -> None:
    """ "If provided, such integer is added to the message as sender PID", both ways."""
    qc = factory.QueueCommunication()
    parent = qc.parent()
    p = multiprocessing.get_context("fork").Process(target=_send_as, args=(qc, 12345))
    p.start()
    assert parent.receive(block=True) == [mpq_protocol.REQ_FINISHED, 12345, None, "hi"]
    p.join(10)


def test_a_parent_end_and_a_child_end_in_one_process() -> None:
    """A common test set-up, and threads acting as children: both ends in one process."""
    qc = factory.QueueCommunication()
    parent, child = qc.parent(), qc.child()
    child.send("HELLO", data=1)
    child.send("OTHER", data=2)
    got = parent.receive(func=lambda m: m[0] == "OTHER", block=True)
    assert got[0] == "OTHER" and got[3] == 2
    assert parent.receive(func=lambda m: m[0] == "HELLO", block=True)[3] == 1
    answers: list[Any] = []

    def a_thread_as_a_child() -> None:
        answers.append(child.receive(func=lambda m: m[0] == "DO", block=True))

    t = threading.Thread(target=a_thread_as_a_child)
    t.start()
    assert parent.send("DO", sender_pid=999, data=3) == ["DO", 999, None, 3]
    t.join(10)
    assert not t.is_alive() and answers[0][1] == 999 and answers[0][3] == 3
