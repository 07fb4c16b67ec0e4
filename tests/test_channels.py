"""Channels between processes: every start method, addressed messages, and every way a peer can
go away."""

from __future__ import annotations

import copyreg
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import BrokenResourceError, ClosedResourceError, ItemNotSendable, WouldBlock
from conveyor.channels import Message, open_channel

from .conftest import eventually

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fork", "spawn", "forkserver"]


pytestmark = pytest.mark.usefixtures("no_child_left")


def echo(end: Any) -> None:
    for msg in end:
        end.send("ECHO", msg.data)
    end.close()


def announce_then_wait(end: Any) -> None:
    end.send("READY")
    end.receive()  # the parent never answers: this child waits until it is killed


def chatty(end: Any, n: int, size: int) -> None:
    for i in range(n):
        end.send("DATA", (i, b"x" * size))
    end.close()


def worker(end: Any) -> None:
    me = os.getpid()
    for msg in end:
        if msg.request == "DIE":
            break
        end.send("FINISHED", (me, msg.data))
    end.close()


@pytest.mark.parametrize("method", METHODS)
def test_pipe_round_trips_under_every_start_method(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    parent, child = open_channel("pipe")
    p = ctx.Process(target=echo, args=(child,))
    p.start()
    for i in range(100):
        parent.send("DO", i)
    got = [parent.receive(timeout_s=30) for _ in range(100)]
    assert [m.data for m in got] == list(range(100))
    assert all(m.request == "ECHO" and m.sender == p.pid for m in got)
    parent.close()  # the child's iteration ends; it closes and exits
    p.join(30)
    assert p.exitcode == 0


def test_where_takes_the_first_match_and_keeps_the_rest_in_order() -> None:
    parent, child = open_channel("pipe")
    p = multiprocessing.get_context("fork").Process(target=chatty, args=(child, 6, 1))
    p.start()
    odd = parent.receive(timeout_s=10, where=lambda m: m.data[0] % 2 == 1)
    assert odd.data[0] == 1
    rest = [m.data[0] for m in parent]  # iteration ends when the child closes
    assert rest == [0, 2, 3, 4, 5]
    p.join(10)
    with pytest.raises(ClosedResourceError):
        parent.receive(timeout_s=1)
    parent.close()
    with pytest.raises(ClosedResourceError, match="closed"):
        parent.send("x")


def test_receive_times_out_and_nowait_would_block() -> None:
    parent, child = open_channel("pipe")
    with pytest.raises(TimeoutError):
        parent.receive(timeout_s=0.01)
    with pytest.raises(WouldBlock):
        parent.receive_nowait()
    parent.close()
    child.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_a_child_killed_while_the_parent_waits_is_reported_within_a_second(kind: str) -> None:
    parent, child = open_channel(kind)
    forkserver: Any = multiprocessing.get_context("forkserver")
    p = forkserver.Process(target=announce_then_wait, args=(child,))
    p.start()
    assert parent.receive(timeout_s=30).request == "READY"
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    with pytest.raises(BrokenResourceError, match=str(p.pid)) as raised:
        parent.receive(timeout_s=10)
    assert time.monotonic() - t0 < 1.0
    assert raised.value.pid == p.pid  # which peer went
    p.join(10)
    parent.close()


def test_a_killed_parent_makes_the_childs_receive_raise(tmp_path: Path) -> None:
    marker = tmp_path / "child.txt"
    script = textwrap.dedent(
        f"""
        import multiprocessing, sys, threading
        from conveyor import BrokenResourceError
        from conveyor.channels import open_channel

        def child(end):
            end.send("READY")
            try:
                end.receive()
            except BrokenResourceError as exc:
                open({str(marker)!r}, "w").write(f"broken: {{exc.pid}} {{exc}}")

        if __name__ == "__main__":
            parent, end = open_channel(sys.argv[1])
            p = multiprocessing.get_context("spawn").Process(target=child, args=(end,))
            p.start()
            parent.receive()
            print("ready", flush=True)
            threading.Event().wait()  # until the test kills this process
        """
    )
    path = tmp_path / "parent.py"  # a file, so that spawn can import the child's function
    path.write_text(script)
    for kind in ("pipe", "queue"):
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(path), kind], cwd=ROOT, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        # the child may be between opening the file and writing it: wait for the words
        eventually(lambda: marker.exists() and marker.read_text().startswith("broken: "), 5)
        assert marker.read_text().split()[1] == str(proc.pid)  # which peer went: the parent


def test_joining_a_child_before_draining_what_it_sent_does_not_deadlock() -> None:
    parent, child = open_channel("pipe")
    # 200 messages of 64 KB: far more than a pipe holds
    p = multiprocessing.get_context("fork").Process(target=chatty, args=(child, 200, 65536))
    p.start()
    parent.send("GO")  # the parent's end starts reading in the background on first use
    p.join(30)
    assert p.exitcode == 0
    got = [m.data[0] for m in parent]
    assert got == list(range(200))
    parent.close()


def test_a_message_over_the_limit_is_refused_at_send() -> None:
    parent, child = open_channel("pipe", max_message_bytes=1000)
    with pytest.raises(ItemNotSendable, match=r"over the channel's limit of 1,000"):
        parent.send("BIG", b"x" * 5000)
    parent.send("SMALL", b"x")  # the channel is still fine
    assert child.receive(timeout_s=5).data == b"x"
    with pytest.raises(ItemNotSendable, match=r"lambda|function"):
        parent.send("FN", lambda: 1)
    parent.close()
    child.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_queue_channel_full_duplex_with_addressed_messages(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    parent, child = open_channel("queue")
    procs = [ctx.Process(target=worker, args=(child,), daemon=True) for _ in range(4)]
    for p in procs:
        p.start()
    n = 400
    for i in range(n):
        parent.send("DO", i, recipient=procs[i % 4].pid)
    answers = [parent.receive(timeout_s=30) for _ in range(n)]
    by_child: dict[int, list[int]] = {}
    for m in answers:
        pid, i = m.data
        assert m.sender == pid
        by_child.setdefault(pid, []).append(i)
    # each child got exactly its own messages, in the order they were sent
    assert by_child == {p.pid: list(range(k, n, 4)) for k, p in enumerate(procs)}
    for p in procs:
        parent.send("DIE", recipient=p.pid)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    parent.close()


def test_queue_channel_unaddressed_messages_go_to_one_child_each() -> None:
    parent, child = open_channel("queue")
    procs = [
        multiprocessing.get_context("fork").Process(target=worker, args=(child,), daemon=True)
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for i in range(90):
        parent.send("DO", i)
    answers = [parent.receive(timeout_s=30) for _ in range(90)]
    assert sorted(m.data[1] for m in answers) == list(range(90))
    for p in procs:
        parent.send("DIE", recipient=p.pid)
    for p in procs:
        p.join(30)
    assert parent.pending() == 0
    parent.close()


def test_messages_are_named_tuples() -> None:
    msg = Message("DO", 1, None, {"v": 2})
    assert msg.request == "DO" and msg.recipient is None and tuple(msg)[3] == {"v": 2}


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled: its ``__init__`` takes two arguments."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def send_a_bad_one_then_a_good_one(end: Any) -> None:
    end.send("BAD", TwoArgError(1, 2))
    end.send("GOOD", 3)
    end.receive(timeout_s=30)  # stay alive until the parent has looked
    end.close()


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_a_message_that_cannot_be_unpickled_is_its_own_error_and_the_channel_goes_on(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # importing distributed (another test's) makes every exception class known then picklable
    # with its attributes (tblib's pickling support): this one must stay unpicklable here
    monkeypatch.delitem(copyreg.dispatch_table, TwoArgError, raising=False)
    parent, child = open_channel(kind)
    p = multiprocessing.get_context("fork").Process(
        target=send_a_bad_one_then_a_good_one, args=(child,)
    )
    p.start()
    with pytest.raises(ItemNotSendable, match="TypeError"):
        parent.receive(timeout_s=30)
    good = parent.receive(timeout_s=30)  # the reader did not die: the child is not "dead"
    assert (good.request, good.data) == ("GOOD", 3)
    parent.send("BYE")
    p.join(10)
    assert p.exitcode == 0
    parent.close()
