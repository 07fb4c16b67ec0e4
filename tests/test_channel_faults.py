"""Channels when a child goes away before, during or after its work, when control words appear
in user messages, when several threads receive at once, and with bounded and idle-first
queues."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import BrokenResourceError, ClosedResourceError, ConfigurationError
from conveyor.channels import open_channel
from conveyor.compat.pymulproc import factory
from conveyor.compat.pymulproc.errors import QueuesCommunicationError

from .conftest import inside

METHODS = ["fork", "spawn", "forkserver"]


pytestmark = pytest.mark.usefixtures("no_child_left")


def raise_first(end: Any) -> None:
    raise ValueError("the child's first line")


def sleep_until_killed(end: Any) -> None:
    threading.Event().wait(60)


def return_at_once(end: Any) -> None:
    return


def answer_then_die(end: Any, answers: int, gate: Any = None) -> None:
    for _ in range(answers):
        msg = end.receive()
        end.send("ANSWER", msg.data)
    if gate is not None:
        gate.wait(60)  # what the parent sends now stays in this child's pipe
    os.kill(os.getpid(), signal.SIGKILL)


def answer_all(end: Any) -> None:
    for msg in end:
        if msg.request == "STOP":
            break
        end.send("ANSWER", (os.getpid(), msg.data))
    end.close()


def write_big_and_exit(end: Any) -> None:
    end.send("BIG", b"x" * (8 * 1024 * 1024))


def send_control_words(end: Any) -> None:
    for word in ("__conveyor:bye__", "__conveyor:hello__", "\x00B", "REAL"):
        end.send(word, 1)
    end.receive()


def hold_one_until_released(end: Any, release: Any) -> None:
    msg = end.receive()
    end.send("HOLDING", (os.getpid(), msg.data))
    release.wait(60)  # busy with it, outside the channel
    end.send("ANSWER", (os.getpid(), msg.data))
    answer_all(end)


CRASHES = [
    (method, how)
    for method in METHODS
    for how in ("import", "first line", "sigkill")
    if not (method == "fork" and how == "import")  # a forked child imports nothing
]


@pytest.mark.parametrize("kind", ["pipe", "queue"])
@pytest.mark.parametrize(("method", "how"), CRASHES)
def test_a_child_that_dies_before_it_used_its_end_is_reported_at_once(
    kind: str, method: str, how: str
) -> None:
    parent, child = open_channel(kind)
    ctx: Any = multiprocessing.get_context(method)
    # the module that fails in children is imported here only: children of the other cases
    # import this test module
    targets: dict[str, Callable[[], Any]] = {
        "import": lambda: importlib.import_module("tests.channel_import_crash").target,
        "first line": lambda: raise_first,
        "sigkill": lambda: sleep_until_killed,
    }
    target = targets[how]()
    p = ctx.Process(target=target, args=(child,))
    p.start()
    if how == "sigkill":
        os.kill(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(BrokenResourceError) as raised:
        parent.receive(timeout_s=60)  # reaching this timeout would be the failure
    assert time.monotonic() - t0 < 30
    assert raised.value.pid == p.pid
    if how == "first line":
        # Python 3.13 runs a child's exit hooks after the exception was printed and dropped:
        # its exit code is what is left
        said = str(raised.value)
        assert "ValueError: the child's first line" in said or "exited with code 1" in said
    p.join(10)
    parent.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_a_child_killed_and_joined_before_the_parent_receives_is_reported(kind: str) -> None:
    parent, child = open_channel(kind)
    p: Any = multiprocessing.get_context("fork").Process(target=sleep_until_killed, args=(child,))
    p.start()
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)  # reaped: only the pid learnt at the fork says who it was
    with pytest.raises(BrokenResourceError) as raised:
        parent.receive(timeout_s=60)
    assert raised.value.pid == p.pid
    parent.close()


@pytest.mark.parametrize("method", METHODS)
def test_a_pipe_child_that_ends_without_using_its_end_closes_the_channel(method: str) -> None:
    parent, child = open_channel("pipe")
    p = multiprocessing.get_context(method).Process(target=return_at_once, args=(child,))  # type: ignore[attr-defined]
    p.start()
    with pytest.raises(ClosedResourceError, match="without using the channel"):
        parent.receive(timeout_s=60)
    p.join(10)
    parent.close()


def test_queue_children_that_end_without_using_it_are_not_deaths() -> None:
    parent, child = open_channel("queue")
    ctx: Any = multiprocessing.get_context("fork")
    idle = [ctx.Process(target=return_at_once, args=(child,)) for _ in range(3)]
    busy = ctx.Process(target=answer_all, args=(child,))
    for p in [*idle, busy]:
        p.start()
    for p in idle:
        p.join(10)
    for i in range(20):
        parent.send("DO", i)
    assert sorted(parent.receive(timeout_s=30).data[1] for _ in range(20)) == list(range(20))
    parent.send("STOP", recipient=busy.pid)
    with pytest.raises(ClosedResourceError):
        parent.receive(timeout_s=60)  # every child closed or left: no death among them
    busy.join(10)
    parent.close()


def test_what_a_dead_pipe_child_never_took_comes_back_with_its_death() -> None:
    parent, child = open_channel("pipe")
    p = multiprocessing.get_context("fork").Process(target=answer_then_die, args=(child, 22))
    p.start()
    for i in range(30):
        parent.send("DO", i)
    answered = []
    with pytest.raises(BrokenResourceError) as raised:
        while True:
            answered.append(parent.receive(timeout_s=60).data)
    assert answered == list(range(22))
    assert [m.data for m in raised.value.undelivered] == list(range(22, 30))
    assert "8 message(s) sent to it were never taken" in str(raised.value)
    with pytest.raises(BrokenResourceError):  # every later use says so too
        parent.send("DO", 30)
    p.join(10)
    parent.close()


def test_a_dead_queue_childs_messages_go_on_or_come_back() -> None:
    parent, child = open_channel("queue")
    ctx: Any = multiprocessing.get_context("fork")
    gate = ctx.Event()
    dying = ctx.Process(target=answer_then_die, args=(child, 3, gate))
    dying.start()
    for i in range(3):
        parent.send("DO", i)
    assert sorted(parent.receive(timeout_s=60).data for _ in range(3)) == [0, 1, 2]
    for i in range(3, 13):  # without a recipient: to the only child, which never reads them
        parent.send("DO", i)
    for i in range(100, 105):  # addressed to it
        parent.send("DO", i, recipient=dying.pid)
    gate.set()
    with pytest.raises(BrokenResourceError) as raised:
        parent.receive(timeout_s=60)
    assert raised.value.pid == dying.pid
    assert [m.data for m in raised.value.undelivered] == list(range(100, 105))
    with pytest.raises(BrokenResourceError):
        parent.send("DO", 105, recipient=dying.pid)
    survivor = ctx.Process(target=answer_all, args=(child,))
    survivor.start()
    # the messages without a recipient went on, to the next child
    assert sorted(parent.receive(timeout_s=60).data[1] for _ in range(10)) == list(range(3, 13))
    parent.send("STOP", recipient=survivor.pid)
    survivor.join(10)
    dying.join(10)
    parent.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_writing_8mb_before_the_parent_used_its_end_can_be_joined(
    kind: str, method: str
) -> None:
    parent, child = open_channel(kind)
    p = multiprocessing.get_context(method).Process(target=write_big_and_exit, args=(child,))  # type: ignore[attr-defined]
    p.start()
    p.join(60)  # before the parent ever touched its end
    assert p.exitcode == 0
    assert len(parent.receive(timeout_s=10).data) == 8 * 1024 * 1024
    parent.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_control_words_in_user_messages_are_just_requests(kind: str) -> None:
    parent, child = open_channel(kind)
    p = multiprocessing.get_context("fork").Process(target=send_control_words, args=(child,))
    p.start()
    got = [parent.receive(timeout_s=30).request for _ in range(4)]
    assert got == ["__conveyor:bye__", "__conveyor:hello__", "\x00B", "REAL"]
    parent.send("__conveyor:bye__")  # the child takes it as a message, and returns
    p.join(10)
    assert p.exitcode == 0
    parent.close()


@pytest.mark.parametrize("side", ["parent", "child"])
def test_every_receivers_timeout_holds_while_another_thread_waits(side: str) -> None:
    parent, child = open_channel("pipe")  # both ends used in this process
    end = parent if side == "parent" else child
    other = child if side == "parent" else parent
    late: list[Any] = []

    def long_wait() -> None:
        late.append(end.receive(timeout_s=60, where=lambda m: m.request == "LATE"))

    thread = threading.Thread(target=long_wait)
    thread.start()
    inside(thread, "_receive_inbox" if side == "parent" else "_receive_direct")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        end.receive(timeout_s=0.2)
    assert time.monotonic() - t0 < 10  # not held for the other thread's 60 s
    other.send("FOR-ANYONE", 1)
    assert end.receive(timeout_s=10).data == 1  # the waiting thread left it for others
    assert not late
    other.send("LATE", 2)
    thread.join(10)
    assert [m.data for m in late] == [2]
    parent.close()
    child.close()


def test_idle_first_gives_work_to_the_child_that_waits_for_it() -> None:
    ctx: Any = multiprocessing.get_context("fork")
    for dispatch, expect_stuck in (("idle_first", False), ("round_robin", True)):
        parent, child = open_channel("queue", dispatch=dispatch)
        release = ctx.Event()
        slow = ctx.Process(target=hold_one_until_released, args=(child, release))
        slow.start()
        parent.send("DO", 0)
        holding = parent.receive(timeout_s=30)
        assert holding.request == "HOLDING"  # the slow child is busy with message 0
        fast = ctx.Process(target=answer_all, args=(child,))
        fast.start()
        for i in range(1, 11):
            parent.send("DO", i)
        # the fast child can answer what it was given while the slow one is held
        answers: list[Any] = []
        with pytest.raises(TimeoutError) if expect_stuck else contextlib.nullcontext():
            while len(answers) < 10:
                answers.append(parent.receive(timeout_s=3 if expect_stuck else 60).data)
        if not expect_stuck:
            assert {pid for pid, _ in answers} == {fast.pid}
            assert sorted(i for _, i in answers) == list(range(1, 11))
        release.set()
        rest = 11 - len(answers)
        answers += [parent.receive(timeout_s=60).data for _ in range(rest)]
        assert sorted(i for _, i in answers) == list(range(11))
        for p in (slow, fast):
            parent.send("STOP", recipient=p.pid)
            p.join(10)
        parent.close()


def test_max_pending_bounds_what_is_sent_and_not_taken() -> None:
    parent, child = open_channel("pipe", max_pending=3)  # both ends used in this process
    for i in range(3):
        child.send("UP", i, timeout_s=1)
    with pytest.raises(TimeoutError, match="max_pending"):
        child.send("UP", 3, timeout_s=0.1)
    parent.send("DOWN", 0, timeout_s=1)  # each way counts on its own
    assert parent.receive(timeout_s=5).data == 0
    child.send("UP", 3, timeout_s=1)  # room again
    assert [parent.receive(timeout_s=5).data for _ in range(3)] == [1, 2, 3]
    parent.close()
    child.close()
    with pytest.raises(ConfigurationError):
        open_channel("queue", max_pending=0)
    with pytest.raises(ConfigurationError):
        open_channel("queue", dispatch="random")


def send_two_then_hang(end: Any) -> None:
    for i in range(2):
        end.send("UP", i)
    threading.Event().wait(60)  # busy outside the channel until it is killed


def test_a_sender_waiting_for_room_learns_that_the_receiver_died() -> None:
    parent, child = open_channel("queue", max_pending=2)
    p: Any = multiprocessing.get_context("fork").Process(target=send_two_then_hang, args=(child,))
    p.start()
    assert parent.receive(timeout_s=30).data == 0
    parent.send("DOWN", 0, recipient=p.pid)
    parent.send("DOWN", 1, recipient=p.pid)
    with pytest.raises(TimeoutError):  # two sent and not taken: no room
        parent.send("DOWN", 2, recipient=p.pid, timeout_s=0.1)
    os.kill(p.pid, signal.SIGKILL)
    assert parent.receive(timeout_s=30).data == 1  # what it sent comes first
    with pytest.raises(BrokenResourceError) as raised:
        parent.receive(timeout_s=30)
    assert [m.data for m in raised.value.undelivered] == [0, 1]
    with pytest.raises(BrokenResourceError):
        parent.send("DOWN", 3, recipient=p.pid)
    # the two never taken gave their room back; then no one is left to make room
    parent.send("DOWN", 4, timeout_s=5)
    parent.send("DOWN", 5, timeout_s=5)
    with pytest.raises(BrokenResourceError, match="every child"):
        parent.send("DOWN", 6)
    p.join(10)
    parent.close()


def test_pymulproc_max_size_makes_send_raise_after_its_tries() -> None:
    comm = factory.QueueCommunication(max_size=2)
    child = comm.child(timeout=0.05, loops=3)  # used in this process, as a thread child would
    parent = comm.parent()
    child.send("FINISHED", data=1)
    child.send("FINISHED", data=2)
    t0 = time.monotonic()
    with pytest.raises(QueuesCommunicationError, match=r"3 tries of 0\.05 s"):
        child.send("FINISHED", data=3)
    assert time.monotonic() - t0 >= 0.15  # it did try three times
    assert parent.receive(block=True)[3] == 1
    child.send("FINISHED", data=3)
    assert [parent.receive(block=True)[3] for _ in range(2)] == [2, 3]


def say_hi(end: Any, *extra: Any) -> None:
    end.send("HI")


def test_sends_to_a_pipe_child_that_closed_raise_instead_of_filling_the_pipe() -> None:
    parent, child = open_channel("pipe")
    p = multiprocessing.get_context("fork").Process(target=say_hi, args=(child,))
    p.start()
    assert parent.receive(timeout_s=30).request == "HI"
    p.join(10)
    with pytest.raises(ClosedResourceError):
        for _ in range(100):  # 10 MB: far more than the pipe holds
            parent.send("DO", b"x" * 100_000)
    parent.close()


def send_until_broken(end: Any, result: Any) -> None:
    try:
        while True:
            end.send("UP", b"x" * 100_000)
    except BrokenResourceError:
        result.set()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_a_child_sending_learns_that_its_parent_closed(kind: str) -> None:
    ctx: Any = multiprocessing.get_context("fork")
    parent, child = open_channel(kind)
    broken = ctx.Event()
    p = ctx.Process(target=send_until_broken, args=(child, broken))
    p.start()
    parent.receive(timeout_s=30)
    parent.close()  # the child keeps writing: it must not block on a pipe no one reads
    assert broken.wait(30)
    p.join(10)


def take_one_and_leave(end: Any) -> None:
    end.receive(timeout_s=30)


def test_a_queue_child_that_closed_gets_no_more_messages() -> None:
    ctx: Any = multiprocessing.get_context("fork")
    parent, child = open_channel("queue")
    leaver = ctx.Process(target=take_one_and_leave, args=(child,))
    stayer = ctx.Process(target=answer_all, args=(child,))
    leaver.start()
    stayer.start()
    parent.send("DO", -1, recipient=leaver.pid)
    leaver.join(10)
    parent.send("DO", -2, recipient=stayer.pid)
    assert parent.receive(timeout_s=30).data[1] == -2  # both were there; one has left
    for i in range(20):
        parent.send("DO", i)
    assert sorted(parent.receive(timeout_s=30).data[1] for _ in range(20)) == list(range(20))
    with pytest.raises(BrokenResourceError):
        parent.send("DO", 0, recipient=leaver.pid)
    parent.send("STOP", recipient=stayer.pid)
    stayer.join(10)
    parent.close()


def grandparent_of_one(end: Any) -> None:
    g = multiprocessing.get_context("fork").Process(target=say_hi, args=(end,))
    g.start()
    g.join(30)
    for i in range(5):
        end.send("FROM-CHILD", i)
    end.receive(timeout_s=30)


def test_a_grandchild_holding_a_pipe_end_does_not_stand_for_the_child() -> None:
    parent, child = open_channel("pipe")
    p = multiprocessing.get_context("fork").Process(target=grandparent_of_one, args=(child,))
    p.start()
    got = [parent.receive(timeout_s=30) for _ in range(6)]  # the grandchild's HI, then five
    assert [m.data for m in got if m.request == "FROM-CHILD"] == list(range(5))
    parent.send("BYE")  # the child is still there to take it
    p.join(10)
    assert p.exitcode == 0
    parent.close()


def test_a_start_that_failed_is_not_waited_for() -> None:
    parent, child = open_channel("queue")
    ctx: Any = multiprocessing.get_context("spawn")
    with pytest.raises(TypeError):  # a lock cannot be pickled for a spawned child
        ctx.Process(target=say_hi, args=(child, threading.Lock())).start()
    p = ctx.Process(target=say_hi, args=(child,))
    p.start()
    p.join(30)
    assert parent.receive(timeout_s=30).request == "HI"
    with pytest.raises(ClosedResourceError):
        parent.receive(timeout_s=30)  # ends: no process from the failed start is awaited
    parent.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_closing_an_end_ends_a_receive_waiting_on_another_thread(kind: str) -> None:
    parent, child = open_channel(kind)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            parent.receive(timeout_s=60)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    inside(thread, "_receive_inbox")  # it waits on the end when the end closes
    parent.close()
    thread.join(10)
    assert not thread.is_alive() and isinstance(raised[0], ClosedResourceError)
    child.close()
