"""The ``queue`` channel: one parent, any number of children.

Every child has two pipes of its own, one up and one down. On its first use a child makes them
and hands the parent's ends to the parent over a Unix socket (``SCM_RIGHTS``), with its pid.
Nothing is shared between children but that socket (a few bytes per child, once): no process
lock that a killed child could leave held, no message that one child must skip or put back for
another. The parent's end reads every child's pipe on a thread of its own (see ``_channel``)
and watches every child; it writes a child's messages to that child's pipe only, so each child
sees its own in the order they were sent. A message without a recipient goes to one child, in
turn, among those that said hello. Messages for a child that has not said hello yet wait in the
parent until it does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import select
import socket
import struct
import threading
import time
from typing import Any

from .._errors import BrokenResourceError, ClosedResourceError
from ._channel import _BYE, Message, _End, _Inbox, _Peer


class QueueEnd(_End):
    """One end of a ``queue`` channel: the parent's, or the one every child shares."""

    def __init__(
        self,
        role: str,
        parent_pid: int,
        max_message_bytes: int,
        handshake: tuple[Any, Any],
    ) -> None:
        self._hs_parent, self._hs_child = handshake
        super().__init__(role, parent_pid, max_message_bytes)

    def _setup_local(self) -> None:
        super()._setup_local()
        self._inbox: _Inbox | None = None
        self._parent: _Peer | None = None
        self._down: Any = None  # child: its own pipes from and to the parent
        self._up: Any = None
        self._send_lock = threading.Lock()
        # parent: each child's pipe, messages waiting for children not seen yet, turn order
        self._children: dict[int, Any] = {}
        self._waiting: dict[int | None, list[bytes]] = {}
        self._turn = 0
        self._route_lock = threading.Lock()
        self._handshakes: threading.Thread | None = None
        self._hs_lock = threading.Lock()
        self._adopting = False

    _LOCAL = (
        *_End._LOCAL,
        "_inbox",
        "_parent",
        "_down",
        "_up",
        "_send_lock",
        "_children",
        "_waiting",
        "_turn",
        "_route_lock",
        "_handshakes",
        "_hs_lock",
        "_adopting",
    )

    def _first_use(self) -> None:
        if self.role == "parent":
            self._inbox = _Inbox([], more_coming=True)
            self._handshakes = threading.Thread(
                target=self._accept, name="conveyor:channel-handshake", daemon=True
            )
            self._handshakes.start()
        else:
            self._parent = _Peer(self.parent_pid)
            # a child that ends normally says goodbye, even without close(): only a
            # killed child is reported as broken
            multiprocessing.util.Finalize(self, self.close, exitpriority=100)
            down_r, down_w = multiprocessing.Pipe(duplex=False)
            up_r, up_w = multiprocessing.Pipe(duplex=False)
            self._down, self._up = down_r, up_w
            sock = socket.socket(fileno=os.dup(self._hs_child.fileno()))
            try:
                # one small write with both descriptors: atomic, so children need no lock
                socket.send_fds(
                    sock, [struct.pack("q", os.getpid())], [down_w.fileno(), up_r.fileno()]
                )
            finally:
                sock.close()
                down_w.close()
                up_r.close()

    # -- the parent's side of the handshake ------------------------------------------------------
    def _accept(self) -> None:
        sock = socket.socket(fileno=os.dup(self._hs_parent.fileno()))
        with sock:
            while True:
                select.select([sock], [], [])
                try:
                    with self._hs_lock:  # pending() sees the pipe handed over or still coming
                        self._adopting = True
                        try:
                            data, fds, _flags, _addr = socket.recv_fds(sock, 8, 2)
                            self._adopt(data, fds)
                        finally:
                            self._adopting = False
                except OSError:
                    return
                if not data:
                    return

    def _adopt(self, data: bytes, fds: list[int]) -> None:
        """Take a child's pipes: read one, write its waiting messages to the other."""
        if len(data) < 8 or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return
        (pid,) = struct.unpack("q", data[:8])
        writer = multiprocessing.connection.Connection(fds[0], readable=False)
        reader = multiprocessing.connection.Connection(fds[1], writable=False)
        assert self._inbox is not None
        self._inbox.add(reader, pid)
        with self._route_lock:  # messages that waited go first: no send can overtake them
            self._children[pid] = writer
            for payload in self._waiting.pop(pid, []) + self._waiting.pop(None, []):
                with contextlib.suppress(BrokenResourceError):
                    self._write_child(pid, payload)

    def _write_child(self, pid: int, payload: bytes) -> None:
        """Write to a child's pipe; the caller holds ``_route_lock``, so that writes to one
        child keep the order of the sends."""
        conn = self._children.get(pid)
        if conn is None:
            return
        try:
            conn.send_bytes(payload)
        except OSError:
            self._children.pop(pid, None)
            raise BrokenResourceError(f"child process {pid} is gone", pid=pid) from None

    def _write_up(self, payload: bytes) -> None:
        with self._send_lock:
            self._up.send_bytes(payload)

    # -- sending --------------------------------------------------------------------------------
    def send(self, request: str, data: Any = None, *, recipient: int | None = None) -> Message:
        """Parent: to ``recipient`` (a child's pid), or to one child in turn (None).
        Child: to the parent."""
        self._check_open()
        self._arrive()
        msg = Message(request, os.getpid(), recipient, data)
        payload = self._dumps(msg)
        try:
            if self.role == "child":
                self._write_up(payload)
                return msg
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BrokenResourceError(f"the channel is broken: {exc}") from None
        with self._route_lock:
            pid = recipient
            if pid is None and self._children:
                pids = sorted(self._children)
                pid = pids[self._turn % len(pids)]
                self._turn += 1
            if pid is None or pid not in self._children:
                self._waiting.setdefault(pid, []).append(payload)
                return msg
            self._write_child(pid, payload)
        return msg

    # -- receiving ------------------------------------------------------------------------------
    def _inbox_here(self) -> _Inbox | None:
        return self._inbox

    def _from_parent(self) -> tuple[Any, _Peer | None]:
        return self._down, self._parent

    def _nothing_left(self, inbox: _Inbox) -> Exception | None:
        if inbox.dead:
            pid = inbox.dead.pop(0)  # each death is reported once; the others go on
            return BrokenResourceError(f"child process {pid} died", pid=pid)
        if inbox.byes and not inbox.conns and not inbox._new and not self._handing_over():
            return ClosedResourceError("every child closed the channel")
        return None  # a child's pipes on their way in wake the wait (``_Inbox.add``)

    def _in_flight(self) -> bool:
        return self._handing_over()

    def _handing_over(self) -> bool:
        """A child's pipes are being handed over (sent, or being adopted)."""
        return self._adopting or bool(select.select([self._hs_parent], [], [], 0)[0])

    def pending(self) -> int:
        """Parent: whether messages are waiting to be taken (a count of at least that many).
        Counts what children sent and the parent has not read yet, including a child's first
        message whose pipe is still being handed over."""
        self._arrive()
        if self._inbox is None:
            return len(self._backlog)
        deadline = time.monotonic() + 2.0
        while self._handing_over() and time.monotonic() < deadline:
            with self._hs_lock:  # wait for the adoption under way, if any
                pass
            if self._handing_over():
                self._inbox.read_direct(0.005)
        return self._inbox.pending() + len(self._backlog) + int(self._handing_over())

    def close(self) -> None:
        """Close this end. The parent's goodbye reaches every child that said hello."""
        if self._closed:
            return
        self._closed = True
        if self._owner_pid == os.getpid():
            bye = pickle.dumps((_BYE, os.getpid(), None, None))
            with contextlib.suppress(Exception):
                if self.role == "child":
                    self._write_up(bye)
                else:
                    with self._route_lock:
                        children = list(self._children.values())
                        self._children.clear()
                    for conn in children:
                        with contextlib.suppress(OSError):
                            conn.send_bytes(bye)
                            conn.close()
        if self._handshakes is not None:
            # no child arrives after the parent left: end the hand-over thread (shutting the
            # socket down wakes its select), then close the socket pair in this process
            with (
                contextlib.suppress(OSError),
                socket.socket(fileno=os.dup(self._hs_parent.fileno())) as sock,
            ):
                sock.shutdown(socket.SHUT_RD)
            self._handshakes.join(5)
            for end in (self._hs_parent, self._hs_child):
                end.close()
        if self._inbox is not None:
            self._inbox.stop()
            for conn in self._inbox.conns:
                with contextlib.suppress(OSError):
                    conn.close()
        if self._parent is not None:
            self._parent.close()
        for conn in (self._down, self._up):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()


def open_queue_channel(parent_pid: int, max_message_bytes: int) -> tuple[QueueEnd, QueueEnd]:
    handshake = multiprocessing.Pipe(duplex=True)  # a Unix socket pair: it can carry fds
    return (
        QueueEnd("parent", parent_pid, max_message_bytes, handshake),
        QueueEnd("child", parent_pid, max_message_bytes, handshake),
    )
