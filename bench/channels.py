"""Channels: parent <-> child messages, conveyor against pymulproc, multiprocessing and pyzmq.

    bench/setup && .bench-venv/bin/python -m bench.channels [--quick]

* round trips: the parent sends a small message, the child answers, N times;
* one-way streaming: the child sends N small messages, the parent takes them all.

The child runs under fork. CPU is the user + system time of parent and child together per
message, to show who waits by polling. Peers: conveyor ``open_channel("pipe")`` and
``("queue")``; pymulproc's ``PipeCommunication`` and ``QueueCommunication`` (non-blocking
``receive`` in a loop, as its API offers); ``multiprocessing.Pipe`` (the raw floor);
``multiprocessing.Queue``; pyzmq ``PAIR`` over ``ipc://``; and the raw pipe plus the least that
conveyor's promises cost per message (a dead peer seen in the same wait, several receivers,
the sender named): how near the raw pipe a channel that keeps them can come.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench._harness import table

CTX = multiprocessing.get_context("fork")


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- each peer: child(conn, n, mode) and parent(conn, n, mode) ---------------------------------


def conveyor_pair(kind: str) -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    from conveyor.channels import open_channel

    parent, child = open_channel(kind)

    def child_fn(end: Any, n: int, mode: str) -> None:
        if mode == "rt":
            for _ in range(n):
                msg = end.receive()
                end.send("R", msg.data)
        else:
            for i in range(n):
                end.send("D", i)
        end.receive()  # wait for the parent's "done"

    def parent_fn(end: Any, n: int, mode: str, child_pid: int) -> None:
        if mode == "rt":
            for i in range(n):
                end.send("Q", i, recipient=child_pid if kind == "queue" else None)
                end.receive()
        else:
            for _ in range(n):
                end.receive()
        end.send("done", recipient=child_pid if kind == "queue" else None)

    return parent, child, child_fn, parent_fn


def pymulproc_pair(kind: str) -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    from pymulproc import factory

    f = factory.PipeCommunication() if kind == "pipe" else factory.QueueCommunication()

    def take(conn: Any) -> Any:
        # pymulproc's receive does not block on a pipe: poll, as its users do. Its queue is one
        # JoinableQueue that both sides read: each takes only what is addressed to it (its
        # receive puts the others back), or the parent takes its own requests and the child
        # waits for them for ever. A blocking get there: polling it starves the feeder thread
        # that puts messages back (a few per second)
        mine = {} if kind == "pipe" else {"func": lambda m: m[2] == conn.pid, "block": True}
        while True:
            msg = conn.receive(**mine)
            if msg is not False:
                return msg

    def child_fn(end: Any, n: int, mode: str) -> None:
        conn = f.child() if kind == "queue" else end
        if mode == "rt":
            for _ in range(n):
                msg = take(conn)
                conn.send("R", recipient_pid=msg[1], data=msg[3])
        else:
            for i in range(n):
                conn.send("D", recipient_pid=os.getppid(), data=i)
        time.sleep(0.5)  # let the parent read before this end goes away

    def parent_fn(end: Any, n: int, mode: str, child_pid: int) -> None:
        if mode == "rt":
            for i in range(n):
                end.send("Q", recipient_pid=child_pid, data=i)
                take(end)
        else:
            for _ in range(n):
                take(end)

    if kind == "pipe":
        return f.parent(), f.child(), child_fn, parent_fn
    return f.parent(), None, child_fn, parent_fn


def mp_pipe_pair() -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    a, b = multiprocessing.Pipe()

    def child_fn(conn: Any, n: int, mode: str) -> None:
        if mode == "rt":
            for _ in range(n):
                conn.send(conn.recv())
        else:
            for i in range(n):
                conn.send(i)
        conn.recv()

    def parent_fn(conn: Any, n: int, mode: str, child_pid: int) -> None:
        if mode == "rt":
            for i in range(n):
                conn.send(i)
                conn.recv()
        else:
            for _ in range(n):
                conn.recv()
        conn.send("done")

    return a, b, child_fn, parent_fn


def promises_pair() -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    """The raw pipe plus the least that conveyor's promises cost on every message: each
    receive waits in one ``poll`` on the pipe, the peer's pidfd and a wake-up pipe (a dead
    peer is seen in the same wait), under a lock (several receivers may share an end); each
    message is a 4-field record naming its sender, pickled; the deadline reads the clock.
    Not a channel: nothing else (no drain, no bound, no control frames)."""
    import pickle
    import select
    import threading

    a, b = multiprocessing.Pipe()

    def waiter(conn: Any, peer: int) -> Callable[[], Any]:
        pidfd = os.pidfd_open(peer)
        wake_r, _wake_w = os.pipe()
        poll = select.poll()
        for fd in (conn.fileno(), pidfd, wake_r):
            poll.register(fd, select.POLLIN)
        lock = threading.Lock()

        def receive() -> Any:
            time.monotonic()
            poll.poll(None)
            with lock:
                return pickle.loads(conn.recv_bytes())

        return receive

    def send(conn: Any, data: Any) -> None:
        msg = ("r", os.getpid(), None, data)
        conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def child_fn(conn: Any, n: int, mode: str) -> None:
        receive = waiter(conn, os.getppid())
        if mode == "rt":
            for _ in range(n):
                send(conn, receive()[3])
        else:
            for i in range(n):
                send(conn, i)
        receive()

    def parent_fn(conn: Any, n: int, mode: str, child_pid: int) -> None:
        receive = waiter(conn, child_pid)
        if mode == "rt":
            for i in range(n):
                send(conn, i)
                receive()
        else:
            for _ in range(n):
                receive()
        send(conn, "done")

    return a, b, child_fn, parent_fn


def mp_queue_pair() -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    down, up = CTX.Queue(), CTX.Queue()

    def child_fn(qs: Any, n: int, mode: str) -> None:
        d, u = qs
        if mode == "rt":
            for _ in range(n):
                u.put(d.get())
        else:
            for i in range(n):
                u.put(i)
        d.get()

    def parent_fn(qs: Any, n: int, mode: str, child_pid: int) -> None:
        d, u = qs
        if mode == "rt":
            for i in range(n):
                d.put(i)
                u.get()
        else:
            for _ in range(n):
                u.get()
        d.put("done")

    return (down, up), (down, up), child_fn, parent_fn


def zmq_pair() -> tuple[Any, Any, Callable[..., None], Callable[..., None]]:
    import zmq

    address = f"ipc://{tempfile.mkdtemp()}/pair"

    def child_fn(_: Any, n: int, mode: str) -> None:
        sock = zmq.Context().socket(zmq.PAIR)
        sock.connect(address)
        if mode == "rt":
            for _ in range(n):
                sock.send_pyobj(sock.recv_pyobj())
        else:
            for i in range(n):
                sock.send_pyobj(i)
        sock.recv_pyobj()

    state: dict[str, Any] = {}

    def parent_fn(_: Any, n: int, mode: str, child_pid: int) -> None:
        sock = state["sock"]
        if mode == "rt":
            for i in range(n):
                sock.send_pyobj(i)
                sock.recv_pyobj()
        else:
            for _ in range(n):
                sock.recv_pyobj()
        sock.send_pyobj("done")
        sock.close(linger=1000)
        state["ctx"].term()  # no context (and its threads) left over for the next fork

    def make() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.bind(address)
        state["sock"], state["ctx"] = sock, ctx

    make()
    return None, None, child_fn, parent_fn


PEERS: dict[str, Callable[[], tuple[Any, Any, Callable[..., None], Callable[..., None]]]] = {
    "conveyor pipe": lambda: conveyor_pair("pipe"),
    "conveyor queue": lambda: conveyor_pair("queue"),
    "pymulproc pipe": lambda: pymulproc_pair("pipe"),
    "pymulproc queue": lambda: pymulproc_pair("queue"),
    "multiprocessing.Pipe (floor)": mp_pipe_pair,
    "Pipe + the promises' least cost": promises_pair,
    "multiprocessing.Queue": mp_queue_pair,
    "pyzmq PAIR ipc://": zmq_pair,
}


#: how long a child may take to end once the parent is done with it
_JOIN_S = 10.0
#: how long one measure may take before it counts as hung (a peer that loses a message)
_RUN_S = 120


def _overran(signum: int, frame: Any) -> None:
    raise TimeoutError(f"no end within {_RUN_S} s")


def measure(make: Any, n: int, mode: str) -> tuple[float, float]:
    parent_end, child_end, child_fn, parent_fn = make()
    p = CTX.Process(target=child_fn, args=(child_end, n, mode))
    previous = signal.signal(signal.SIGALRM, _overran)  # ends a receive that waits for ever
    signal.alarm(_RUN_S)
    try:
        c0 = cpu()
        p.start()
        t0 = time.perf_counter()
        parent_fn(parent_end, n, mode, p.pid)
        elapsed = time.perf_counter() - t0
        p.join(_JOIN_S)
        used = cpu() - c0
        if p.exitcode != 0:
            raise RuntimeError(f"the child did not end well ({p.exitcode=})")
        return n / elapsed, used / n
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        # a child still running would be joined for ever by multiprocessing at exit
        if p.is_alive():
            p.kill()
            p.join(_JOIN_S)
        for end in (parent_end, child_end):
            close = getattr(end, "close", None)
            if close is not None:
                close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", metavar="TEXT", help="only the peers whose name holds TEXT (and the floor)"
    )
    args = parser.parse_args()
    n = 5_000 if args.quick else 20_000
    results: dict[str, dict[str, tuple[float, float]] | str] = {}
    for name, make in PEERS.items():
        if args.only and args.only not in name and make not in (mp_pipe_pair, promises_pair):
            continue
        try:
            results[name] = {
                mode: max((measure(make, n, mode) for _ in range(3)), key=lambda r: r[0])
                for mode in ("rt", "stream")
            }
        except Exception as exc:
            results[name] = f"fails: {type(exc).__name__}: {exc}"[:80]
    floor = results.get("multiprocessing.Pipe (floor)")
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append((name, r, ""))
            continue
        cells = []
        for mode in ("rt", "stream"):
            rate, cpu_per = r[mode]
            ratio = f" {rate / floor[mode][0]:.2f}x" if isinstance(floor, dict) else ""
            cells.append(f"{rate:,.0f}/s{ratio}, {cpu_per * 1e6:.0f} us CPU")
        rows.append((name, cells[0], cells[1]))
    table(
        f"{n:,} small messages, best of 3 (ratios to multiprocessing.Pipe)",
        rows,
        ("peer", "round trips", "one-way stream"),
    )


if __name__ == "__main__":
    main()
