"""The ``queue`` channel: one parent, any number of children.

Every child has two pipes of its own, one up and one down. On its first use a child makes them
and hands the parent its ends over a Unix socket (``SCM_RIGHTS``), with its pid: the writing
side of the down pipe, the reading side of the up pipe, and a second reading side of the down
pipe, which the parent reads only once the child is dead (what it never took). Nothing is shared
between children but that socket (a few bytes per child, once): no process lock that a killed
child could leave held, no message that one child must skip or put back for another.

The parent's end reads every child's pipe on a thread of its own (see ``_channel``) and watches
every child; it writes a child's messages to that child's pipe only, so each child sees its own
in the order they were sent. A message without a recipient goes, with ``round_robin``, to each
child in turn among those that said hello; with ``idle_first``, to a child that asked for work
(a child asks when it is about to wait with nothing to read), and the parent keeps it until one
does. Messages for a child that has not said hello yet wait in the parent until it does. When a
child dies, the messages without a recipient that it never took go on to another child; those
addressed to it come back on the ``BrokenResourceError`` that reports its death.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from .._errors import BrokenResourceError, ClosedResourceError
from ._channel import (
    BYE,
    FAIL,
    READY,
    Message,
    _End,
    _Inbox,
    _Peer,
    control,
    drain,
    parse_control,
    undelivered_of,
)

log = logging.getLogger("conveyor.channels")

#: a hand-over record on the socket: a tag and a pid; "H" comes with three descriptors
_RECORD = struct.Struct("cq")
_HELLO_RECORD = b"H"
_LEAVE_RECORD = b"L"


class QueueEnd(_End):
    """One end of a ``queue`` channel: the parent's, or the one every child shares."""

    def __init__(
        self,
        role: str,
        parent_pid: int,
        max_message_bytes: int,
        token: str,
        room: tuple[Any, Any] | None,
        handshake: tuple[Any, Any],
        dispatch: str,
    ) -> None:
        self._hs_parent, self._hs_child = handshake
        self.dispatch = dispatch
        super().__init__(role, parent_pid, max_message_bytes, token, room)

    def _setup_local(self) -> None:
        super()._setup_local()
        self._inbox: _Inbox | None = None
        self._parent: _Peer | None = None
        self._down: Any = None  # child: its own pipes from and to the parent
        self._up: Any = None
        self._send_lock = threading.Lock()
        self._asked = False  # child (idle-first): asked for work and not given any yet
        # parent: each child, messages waiting for children not seen yet and for any child,
        # turn order, children waiting for work
        self._children: dict[int, _Child] = {}
        self._gone: set[int] = set()
        self._had_children = False
        self._waiting: dict[int, list[bytes]] = {}
        self._queued: collections.deque[bytes] = collections.deque()
        self._idle: collections.deque[int] = collections.deque()
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
        "_asked",
        "_children",
        "_gone",
        "_had_children",
        "_waiting",
        "_queued",
        "_idle",
        "_turn",
        "_route_lock",
        "_handshakes",
        "_hs_lock",
        "_adopting",
    )

    def _first_use(self) -> None:
        if self.role == "parent":
            self._inbox = _Inbox(
                [],
                more_coming=True,
                on_control=self._on_control,
                on_death=self._reclaim,
                on_bye=self._closed_by_child,
                settling=self._handing_over,
            )
            self._handshakes = threading.Thread(
                target=self._accept, name="conveyor:channel-handshake", daemon=True
            )
            self._handshakes.start()
        else:
            self._parent = _Peer(self.parent_pid)
            self._arm_exit()
            down_r, down_w = multiprocessing.Pipe(duplex=False)
            up_r, up_w = multiprocessing.Pipe(duplex=False)
            self._down, self._up = down_r, up_w
            # one small write with the descriptors: atomic, so children need no lock
            self._hand_over(_HELLO_RECORD, [down_w.fileno(), up_r.fileno(), down_r.fileno()])
            down_w.close()
            up_r.close()

    def _hand_over(self, tag: bytes, fds: list[int]) -> None:
        sock = socket.socket(fileno=os.dup(self._hs_child.fileno()))
        try:
            socket.send_fds(sock, [_RECORD.pack(tag, os.getpid())], fds)
        finally:
            sock.close()

    def _inherited(self) -> list[Any]:
        return [self._hs_parent]

    def _say_leaving(self) -> None:
        self._hand_over(_LEAVE_RECORD, [])

    def _say_failed(self, why: str) -> None:
        self._write_up(control(FAIL, os.getpid(), why))

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
                            data, fds, _flags, _addr = socket.recv_fds(sock, _RECORD.size, 3)
                            self._adopt(data, fds)
                        finally:
                            self._adopting = False
                except OSError:
                    return
                if not data:
                    return

    def _adopt(self, data: bytes, fds: list[int]) -> None:
        """Take a child's pipes: read one, write its waiting messages to the other."""
        if len(data) != _RECORD.size:
            for fd in fds:
                os.close(fd)
            return
        tag, pid = _RECORD.unpack(data)
        assert self._inbox is not None
        if tag == _LEAVE_RECORD or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self._inbox.forget(pid)
            return
        child = _Child(
            multiprocessing.connection.Connection(fds[0], readable=False),
            multiprocessing.connection.Connection(fds[2], writable=False),
        )
        self._inbox.add(multiprocessing.connection.Connection(fds[1], writable=False), pid)
        with child.lock:  # messages that waited go first: no send can overtake them
            with self._route_lock:
                self._children[pid] = child
                self._had_children = True
                waiting = self._waiting.pop(pid, [])
                queued: list[bytes] = []
                if self.dispatch == "round_robin":
                    queued, self._queued = list(self._queued), collections.deque()
            for payload in waiting:
                child.write_held(payload)
        for payload in queued:
            self._send_unaddressed(payload)

    def _write_up(self, payload: bytes) -> None:
        with self._send_lock:
            self._up.send_bytes(payload)

    # -- routing (the parent) ---------------------------------------------------------------
    def _pick(self) -> _Child | None:
        """A child for a message without a recipient, or None: the parent keeps it
        (``_route_lock`` held)."""
        if self.dispatch == "idle_first":
            while self._idle:
                child = self._children.get(self._idle.popleft())
                if child is not None:
                    return child
            return None
        pids = sorted(self._children)
        if not pids:
            return None
        pid = pids[self._turn % len(pids)]
        self._turn += 1
        return self._children[pid]

    def _send_unaddressed(self, payload: bytes) -> None:
        while True:
            with self._route_lock:
                child = self._pick()
                if child is None:
                    self._queued.append(payload)
                    return
            if child.write(payload):
                return  # else that child died just now: to another

    def _on_control(self, conn: Any, tag: bytes, pid: int, why: str) -> None:
        if tag != READY:
            return
        with self._route_lock:
            child = self._children.get(pid)
            if child is None:
                return
            if not self._queued:
                if pid not in self._idle:
                    self._idle.append(pid)
                return
            payload = self._queued.popleft()
        if not child.write(payload):
            self._send_unaddressed(payload)

    def _reclaim(self, pid: int) -> list[Message]:
        """A child died: read back what it never took. Messages without a recipient go on to
        another child; those addressed to it are returned (they are reported with its death)."""
        with self._route_lock:
            self._gone.add(pid)
            child = self._children.pop(pid, None)
            with contextlib.suppress(ValueError):
                self._idle.remove(pid)
            frames = self._waiting.pop(pid, [])
        if child is not None:
            frames = child.close() + frames
        undelivered: list[Message] = []
        for frame in frames:
            if parse_control(frame) is not None:
                continue
            msg = undelivered_of([frame])[0]
            if msg.recipient is None:
                self._send_unaddressed(frame)
            else:
                undelivered.append(msg)
        self._give_room(len(undelivered), sent_here=True)
        return undelivered

    def _closed_by_child(self, pid: int) -> None:
        """A child closed its end: no more messages for it. Those without a recipient that it
        never took go on to another child; addressed ones cannot be delivered any more."""
        lost = self._reclaim(pid)
        if lost:
            log.warning(
                "channel: child process %s closed its end with %d message(s) addressed to it "
                "unread; they are dropped",
                pid,
                len(lost),
            )

    # -- sending --------------------------------------------------------------------------------
    def _check_can_send(self, recipient: int | None) -> None:
        if self.role == "parent" and recipient is not None and recipient in self._gone:
            raise BrokenResourceError(f"child process {recipient} is gone", pid=recipient)

    def _deliver(self, payload: bytes, recipient: int | None) -> None:
        if self.role == "child":
            try:
                self._write_up(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise BrokenResourceError(
                    f"the channel is broken: {exc}", pid=self.parent_pid
                ) from None
            return
        if recipient is None:
            self._send_unaddressed(payload)
            return
        with self._route_lock:
            child = self._children.get(recipient)
            if child is None:
                self._waiting.setdefault(recipient, []).append(payload)
                return
        if not child.write(payload):
            # it died between the two: its death reports the message as never taken
            with self._route_lock:
                self._waiting.setdefault(recipient, []).append(payload)

    def _check_receiver(self) -> None:
        if self.role == "child":
            if self._parent is not None and not self._parent.alive():
                raise BrokenResourceError("the parent process died", pid=self.parent_pid)
            return
        inbox = self._inbox
        assert inbox is not None
        ended = self._had_children or inbox.left or inbox.reported()
        if ended and not self._children and not inbox.watching() and not inbox.expecting():
            raise BrokenResourceError("every child of the channel is gone")

    # -- receiving ------------------------------------------------------------------------------
    def _inbox_here(self) -> _Inbox | None:
        return self._inbox

    def _from_parent(self) -> tuple[Any, _Peer | None]:
        return self._down, self._parent

    def _asks_for_work(self) -> bool:
        return self.dispatch == "idle_first"

    def _before_waiting(self) -> None:
        if self.dispatch != "idle_first" or self._asked:
            return
        if any(m.recipient is None for m in self._backlog):
            return  # it holds work it has not taken yet: no more
        self._asked = True
        self._write_up(control(READY, os.getpid()))

    def _got(self, msg: Message) -> None:
        if msg.recipient is None:
            self._asked = False

    def _nothing_left(self, inbox: _Inbox) -> Exception | None:
        if inbox.dead:
            return inbox.dead.pop(0)  # each death is reported once; the others go on
        if (
            (inbox.byes or inbox.left)
            and not inbox.conns
            and not inbox._new
            and not self._handing_over()
            and not inbox.watching()
            and not inbox.expecting()
        ):
            return ClosedResourceError("every child closed the channel")
        return None  # a child's pipes on their way in wake the wait (``_Inbox.add``)

    def _in_flight(self) -> bool:
        return self._handing_over()

    def _handing_over(self) -> bool:
        """A child's pipes (or its leaving) are being handed over (sent, or being adopted)."""
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
            bye = control(BYE, os.getpid())
            with contextlib.suppress(Exception):
                if self.role == "child":
                    self._write_up(bye)
                else:
                    with self._route_lock:
                        children = list(self._children.values())
                        self._children.clear()
                    for child in children:
                        child.write(bye)
                        child.shut()
        with self._cv:
            self._cv.notify_all()  # receivers waiting on this end look again, and leave
        if self._inbox is not None:
            self._inbox.stop()  # before the descriptors it reads close
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
            for conn in self._inbox.conns:
                with contextlib.suppress(OSError):
                    conn.close()
        if self._parent is not None:
            self._parent.close()
        for conn in (self._down, self._up):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()


class _Child:
    """The parent's side of one child: the pipe it writes to, and that pipe's reading side
    (read only once the child is dead). Writes to one child hold its lock, so a send blocked on
    its full pipe holds up no other child."""

    def __init__(self, writer: Any, back: Any) -> None:
        self.writer = writer
        self.back = back
        self.lock = threading.Lock()
        self.gone = False

    def write(self, payload: bytes) -> bool:
        """False if the child is gone (the message was not written)."""
        with self.lock:
            return self.write_held(payload)

    def write_held(self, payload: bytes) -> bool:
        """``write`` with the lock already held."""
        if self.gone:
            return False
        try:
            self.writer.send_bytes(payload)
        except OSError:
            return False
        return True

    def close(self) -> list[bytes]:
        """Stop writing; what was written and never read. A write blocked on the full pipe
        ends as this reads."""
        frames: list[bytes] = []
        while not self.lock.acquire(timeout=0.05):
            frames.extend(drain(self.back))
        try:
            self.gone = True
            frames.extend(drain(self.back))
            for conn in (self.writer, self.back):
                with contextlib.suppress(OSError):
                    conn.close()
        finally:
            self.lock.release()
        return frames

    def shut(self) -> None:
        """The parent closes its end: stop writing, leave the pipe to the child."""
        self.gone = True
        for conn in (self.writer, self.back):
            with contextlib.suppress(OSError):
                conn.close()


def open_queue_channel(
    parent_pid: int,
    max_message_bytes: int,
    token: str,
    room: tuple[Any, Any] | None,
    dispatch: str,
) -> tuple[QueueEnd, QueueEnd]:
    handshake = multiprocessing.Pipe(duplex=True)  # a Unix socket pair: it can carry fds
    return (
        QueueEnd("parent", parent_pid, max_message_bytes, token, room, handshake, dispatch),
        QueueEnd("child", parent_pid, max_message_bytes, token, room, handshake, dispatch),
    )
