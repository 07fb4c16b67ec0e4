"""Channels between a parent process and its children.

``open_channel("pipe")`` joins the parent and one child over a duplex pipe. ``open_channel
("queue")`` joins the parent and any number of children: one pipe up (every child to the
parent), one pipe down (the parent to the children), each shared under a process lock.

Messages are ``Message(request, sender, recipient, data)``; the sender is the sending process's
pid. Each message is pickled once, checked against ``max_message_bytes``, and written whole.

How nothing hangs:

* **Peers are watched.** The first time an end is used in a process it announces its pid; the
  other side opens a pidfd (Linux; elsewhere, a liveness check every 0.2 s) and waits on it
  together with the pipe, so a receive on a peer that died raises ``BrokenResourceError`` at
  once. A child knows its parent's pid from the start.
* **The parent always drains.** The parent's end reads on a thread of its own into memory, so a
  child never blocks on a full pipe: joining a child before reading what it sent cannot
  deadlock. (The child's end reads directly: a child's parent does not join it.)
* **Locks have deadlines.** A child killed while it held a queue channel's lock leaves it held;
  the others give up after ``lock_timeout_s`` with ``BrokenResourceError`` instead of waiting
  forever.
* **Addressed messages keep their order.** On a queue channel the parent numbers its messages
  per recipient; a child that reads a message for another child writes it back, and a child
  holds a message that came early until the ones before it arrive.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .._errors import BrokenResourceError, ClosedResourceError, ItemNotSendable, WouldBlock

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HELLO = "__conveyor:hello__"
_BYE = "__conveyor:bye__"
_LIVENESS_S = 0.2
#: how long the parent's reader thread leaves reading to receivers after the last one
_LINGER_S = 0.02


class Message(NamedTuple):
    """A message: what is asked, by whom, for whom (None: for whoever takes it), and data."""

    request: str
    sender: int
    recipient: int | None
    data: Any = None


class _Peer:
    """A process on the other side, watched for its death."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self.fd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]

    def alive(self) -> bool:
        if self.fd is not None:
            return not select.select([self.fd], [], [], 0)[0]
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _ready(objects: list[Any], timeout: float | None) -> list[Any]:
    """``multiprocessing.connection.wait`` for file descriptors and connections, with one
    ``poll()`` call and none of its per-call selector set-up (it is on every receive)."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for obj in objects:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [by_fd[fd] for fd, _events in poller.poll(ms)]


def _readable(conn: Any) -> bool:
    """``conn.poll(0)`` without the selector set-up of ``multiprocessing.connection.wait``."""
    return bool(select.select([conn], [], [], 0)[0])


def _wait(conns: list[Any], peers: list[_Peer], timeout: float | None) -> list[Any]:
    """Wait for a connection to be readable or a peer to die."""
    fds = [p.fd for p in peers if p.fd is not None]
    polled = len(fds) < len(peers)
    if polled:
        timeout = _LIVENESS_S if timeout is None else min(timeout, _LIVENESS_S)
    return _ready([*conns, *fds], timeout)


class _End:
    """What both kinds of end share: identity, size checks, closing, iteration."""

    def __init__(self, role: str, parent_pid: int, max_message_bytes: int) -> None:
        self.role = role
        self.parent_pid = parent_pid
        self.max_message_bytes = max_message_bytes
        self._setup_local()

    def _setup_local(self) -> None:
        self._owner_pid: int | None = None  # the process this end was first used in
        self._closed = False
        self._peer_closed = False
        self._backlog: collections.deque[Message] = collections.deque()
        self._peers: dict[int, _Peer] = {}
        self._lock = threading.RLock()

    #: attributes that belong to the process using the end, never pickled with it
    _LOCAL: tuple[str, ...] = (
        "_owner_pid",
        "_closed",
        "_peer_closed",
        "_backlog",
        "_peers",
        "_lock",
    )

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def _arrive(self) -> None:
        """On the first use in each process, ``_first_use()`` (once, under the lock)."""
        if self._owner_pid == os.getpid():
            return
        with self._lock:
            if self._owner_pid == os.getpid():
                return
            self._owner_pid = os.getpid()
            self._first_use()

    def _first_use(self) -> None:
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_local()

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"this {self.role} end of the channel is closed")

    def _dumps(self, msg: Message) -> bytes:
        try:
            data = pickle.dumps(tuple(msg), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ItemNotSendable("message data", msg.data, exc) from None
        if len(data) > self.max_message_bytes:
            raise ItemNotSendable(
                "message",
                msg.data,
                ValueError(
                    f"{len(data):,} bytes pickled, over the channel's limit of "
                    f"{self.max_message_bytes:,} (max_message_bytes)"
                ),
            )
        return data

    def _watch(self, pid: int) -> None:
        if pid != os.getpid() and pid not in self._peers:
            self._peers[pid] = _Peer(pid)

    def _take_backlog(self, where: Callable[[Message], bool] | None) -> Message | None:
        for i, msg in enumerate(self._backlog):
            if where is None or where(msg):
                del self._backlog[i]
                return msg
        return None

    def receive_nowait(self, where: Callable[[Message], bool] | None = None) -> Message:
        """A message that is there now, or ``WouldBlock``."""
        try:
            return self.receive(timeout_s=0, where=where)
        except TimeoutError:
            raise WouldBlock("no message now") from None

    def receive(
        self, timeout_s: float | None = None, where: Callable[[Message], bool] | None = None
    ) -> Message:
        """The first message for which ``where`` holds (any message without ``where``); the
        others stay, in order. ``TimeoutError`` after ``timeout_s``; ``BrokenResourceError`` if
        the other side died (on a queue channel's parent end: once per dead child, after the
        messages it sent), ``ClosedResourceError`` once it has closed and nothing is left."""
        self._check_open()
        self._arrive()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            found = self._take_backlog(where)
            if found is not None:
                return found
            inbox = self._inbox_here()
            if inbox is not None:
                return self._receive_inbox(inbox, deadline, where)
            conn, parent = self._from_parent()
            return self._receive_direct(conn, parent, deadline, where)

    # what each kind of end says about where its messages come from
    def _inbox_here(self) -> _Inbox | None:
        """The parent's inbox, on the parent's end in the process using it."""
        raise NotImplementedError

    def _from_parent(self) -> tuple[Any, _Peer | None]:
        """A child's connection from its parent, and the parent to watch."""
        raise NotImplementedError

    def _nothing_left(self, inbox: _Inbox) -> Exception | None:
        """With the inbox empty (its lock held): the error to raise, or None to wait."""
        raise NotImplementedError

    def _in_flight(self) -> bool:
        """Something already sent to this end is on its way in (not yet readable)."""
        return False

    def _receive_inbox(
        self, inbox: _Inbox, deadline: float | None, where: Callable[[Message], bool] | None
    ) -> Message:
        looked = False
        while True:
            failure = None
            with inbox.cond:
                msg = inbox.items.popleft() if inbox.items else None
                if msg is None:
                    failure = self._nothing_left(inbox)
            if msg is None:
                if failure is not None:
                    raise failure
                left = None if deadline is None else deadline - time.monotonic()
                # even with no time left, what was already sent counts as there: read it once
                # (and let a child's pipes that are on their way in arrive)
                if left is not None and left <= 0 and looked and not self._in_flight():
                    raise TimeoutError("no message within timeout_s")
                inbox.read_direct(None if left is None else max(0.0, left))
                looked = True
                continue
            _readable_or_raise(msg)  # that message's error; the next receive goes on
            if where is None or where(msg):
                return msg
            self._backlog.append(msg)

    def _receive_direct(
        self,
        conn: Any,
        parent: _Peer | None,
        deadline: float | None,
        where: Callable[[Message], bool] | None,
    ) -> Message:
        """A child reads its parent's connection itself, watching the parent."""
        peers = [] if parent is None else [parent]
        while True:
            if self._peer_closed:
                raise ClosedResourceError("the parent closed the channel")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if conn in _wait([conn], peers, left):
                try:
                    msg = _readable_or_raise(_decode(conn.recv_bytes(), self.parent_pid))
                except (EOFError, OSError):
                    raise BrokenResourceError(
                        "the parent closed the channel or died", pid=self.parent_pid
                    ) from None
                if msg.request == _BYE:
                    self._peer_closed = True
                elif where is None or where(msg):
                    return msg
                else:
                    self._backlog.append(msg)
                continue
            if parent is not None and not parent.alive():
                raise BrokenResourceError("the parent process died", pid=self.parent_pid)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no message within timeout_s")

    def __iter__(self) -> Iterator[Message]:
        """Every message until the other side closes its end."""
        while True:
            try:
                yield self.receive()
            except ClosedResourceError:
                if self._closed:
                    raise
                return

    def __enter__(self) -> _End:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class _Inbox:
    """Everything the parent's end receives goes through here.

    A receiver that finds nothing waiting reads the connections itself (``read_direct``): no
    thread hop on the way to it. When no receiver has come for a moment (``_LINGER_S``), a
    thread of its own reads instead, into memory, so a child never blocks on a full pipe while
    the parent is busy elsewhere (or joining it). Whoever reads holds ``rlock``; hellos,
    goodbyes, ends of pipes and deaths are handled the same way by both. Connections can be
    added while it runs (``add``); ``eof`` is set once every connection it had has ended."""

    def __init__(self, conns: list[Any], *, more_coming: bool = False) -> None:
        self.conns = list(conns)
        self.more_coming = more_coming  # connections will be added: never at an end
        self._conn_pid: dict[Any, int] = {}
        self.items: collections.deque[Message] = collections.deque()
        self.cond = threading.Condition()
        self.rlock = threading.Lock()
        self.active = 0  # receivers reading directly now
        self.last_active = 0.0
        self.eof = False
        self.dead: list[int] = []  # pids that died without saying goodbye, not yet reported
        self.byes = 0
        self._had_any = bool(conns)
        self._watched: dict[int, _Peer] = {}
        self._polled: list[_Peer] = []
        self._said_bye: set[int] = set()
        self._reported: set[int] = set()
        self._new: list[tuple[Any, int | None]] = []
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="conveyor:channel", daemon=True)
        self.thread.start()

    def pending(self, settle_s: float = 2.0) -> int:
        """Messages here. Bytes still unread on a connection (a message, a goodbye or the end)
        are first read (or left to the reader) for up to ``settle_s``, so the count is exact."""
        deadline = time.monotonic() + settle_s
        while True:
            with self.cond:
                if self.items:
                    return len(self.items)
                self._merge_new()
                unread = any(_readable(c) for c in self.conns)
                left = deadline - time.monotonic()
                if not unread or left <= 0 or self.eof:
                    return int(unread)
            self.read_direct(min(left, 0.01))

    def stop(self) -> None:
        """End the thread (before the connections it reads are closed) and close the wake-up
        pipe once no receiver is reading."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
            self._wake()
        if threading.current_thread() is self.thread:
            return
        self.thread.join(5)
        # a receiver on another thread may still be inside a wait: it holds rlock until the
        # wake-up above ends it
        if self.thread.is_alive() or not self.rlock.acquire(timeout=5):
            return
        try:
            with self.cond:
                if self._wake_w >= 0:
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._wake_r = self._wake_w = -1
        finally:
            self.rlock.release()

    def _wake(self) -> None:
        """Wake whoever waits on the connections (cond held)."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def add(self, conn: Any, pid: int | None) -> None:
        """Read ``conn`` too, and watch ``pid``."""
        with self.cond:
            self._new.append((conn, pid))
            self.cond.notify_all()
            self._wake()

    # -- reading (the caller holds rlock) ---------------------------------------------------------
    def _merge_new(self) -> None:
        """Take in added connections (cond held)."""
        if not self._new:
            return
        new, self._new = self._new, []
        for conn, pid in new:
            self.conns.append(conn)
            self._had_any = True
            if pid is not None:
                self._conn_pid[conn] = pid
                self._watch(pid)

    def _watch(self, pid: int) -> None:
        peer = _Peer(pid)
        if peer.fd is not None:
            self._watched[peer.fd] = peer
        else:
            self._polled.append(peer)

    def _read(self, ready: list[Any], conns: list[Any]) -> None:
        """Read every whole message waiting on the ready connections; note deaths."""
        unread = False
        for r in ready:
            # ready may be stale (the other reader took what was there, or saw the end)
            if isinstance(r, int) or r not in conns or r not in self.conns:
                continue
            while _readable(r):
                try:
                    msg = _decode(r.recv_bytes(), self._conn_pid.get(r, 0))
                except (EOFError, OSError):
                    with self.cond:
                        self.conns.remove(r)
                        self.cond.notify_all()
                    pid = self._conn_pid.pop(r, None)
                    if pid is not None:
                        self._died(pid)  # its pipe ended: it exited (said goodbye or not)
                    break
                self._take(r, msg)
        for r in ready:
            if isinstance(r, int) and r in self._watched:
                unread = unread or any(_readable(c) for c in self.conns)
                peer = self._watched.pop(r)
                if unread:
                    self._polled.append(peer)  # read what it sent first; look again
                else:
                    self._died(peer.pid)
                    peer.close()
        if self._polled and not any(_readable(c) for c in self.conns):
            for peer in [p for p in self._polled if not p.alive()]:
                self._polled.remove(peer)
                self._died(peer.pid)
                peer.close()

    def _take(self, conn: Any, msg: Message) -> None:
        if msg.request == _HELLO:
            self._conn_pid[conn] = msg.sender
            self._watch(msg.sender)
            return
        with self.cond:
            if msg.request == _BYE:
                self._said_bye.add(msg.sender)
                self.byes += 1
            else:
                self.items.append(msg)
            self.cond.notify_all()

    def _wait_set(self) -> tuple[list[Any], list[Any], float | None]:
        with self.cond:
            self._merge_new()
            conns = list(self.conns)
        return conns, [*conns, *self._watched], _LIVENESS_S if self._polled else None

    def read_direct(self, left: float | None) -> None:
        """Wait up to ``left`` for something to read (or a death) and read it, here."""
        with self.cond:
            self.active += 1
        try:
            with self.rlock:
                with self.cond:
                    if self.items or self.dead or self.eof or self._wake_r < 0:
                        return
                conns, waits, liveness = self._wait_set()
                timeout = left if liveness is None else min(left or liveness, liveness)
                ready = _ready([*waits, self._wake_r], timeout)
                if self._wake_r in ready:  # a connection was added: the caller looks again
                    os.read(self._wake_r, 512)
                    ready.remove(self._wake_r)
                self._read(ready, conns)
        finally:
            with self.cond:
                self.active -= 1
                self.last_active = time.monotonic()
                self.cond.notify_all()

    # -- the reader thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self._stopping and (
                        self.active or time.monotonic() - self.last_active < _LINGER_S
                    ):
                        self.cond.wait(_LINGER_S)  # a receiver reads: leave it to them
                    if self._stopping:
                        return
                    if self._had_any and not self.conns and not self._new and not self.more_coming:
                        return
                conns, waits, liveness = self._wait_set()
                ready = _ready([*waits, self._wake_r], liveness)
                woken = self._wake_r in ready
                if woken:
                    os.read(self._wake_r, 512)
                    ready.remove(self._wake_r)
                with self.cond:
                    if self.active and woken:
                        self._wake()  # for the receiver waiting right now
                with self.rlock:
                    with self.cond:
                        if self.active or self._stopping:
                            continue
                    self._read(ready, conns)
        finally:
            for peer in [*self._watched.values(), *self._polled]:
                peer.close()
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _died(self, pid: int) -> None:
        with self.cond:
            if pid in self._said_bye or pid in self._reported:
                return
            self._reported.add(pid)
            self.dead.append(pid)
            self.cond.notify_all()


class PipeEnd(_End):
    """One end of a ``pipe`` channel (one parent, one child)."""

    def __init__(self, conn: Any, role: str, parent_pid: int, max_message_bytes: int) -> None:
        self._conn = conn
        super().__init__(role, parent_pid, max_message_bytes)

    def _setup_local(self) -> None:
        super()._setup_local()
        self._inbox: _Inbox | None = None
        self._send_lock = threading.Lock()

    _LOCAL = (*_End._LOCAL, "_inbox", "_send_lock")

    def _first_use(self) -> None:
        """Announce this process, watch the peer, start reading if parent."""
        if self.role == "child":
            self._watch(self.parent_pid)
            # a child that ends normally says goodbye, even without close(): only a
            # killed child is reported as broken
            multiprocessing.util.Finalize(self, self.close, exitpriority=100)
            with self._send_lock:
                self._conn.send_bytes(self._dumps(Message(_HELLO, os.getpid(), None)))
        else:
            self._inbox = _Inbox([self._conn])

    def send(self, request: str, data: Any = None, *, recipient: int | None = None) -> Message:
        """Send a message to the other end; returns it."""
        self._check_open()
        self._arrive()
        msg = Message(request, os.getpid(), recipient, data)
        payload = self._dumps(msg)
        try:
            with self._send_lock:
                self._conn.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise BrokenResourceError(f"the {self._other()} end is gone: {exc}") from None
        return msg

    def _other(self) -> str:
        return "child" if self.role == "parent" else "parent"

    def _inbox_here(self) -> _Inbox | None:
        return self._inbox

    def _from_parent(self) -> tuple[Any, _Peer | None]:
        return self._conn, self._peers.get(self.parent_pid)

    def _nothing_left(self, inbox: _Inbox) -> Exception | None:
        if inbox.dead:
            return BrokenResourceError(f"the child process {inbox.dead[0]} died", pid=inbox.dead[0])
        if inbox.byes:
            return ClosedResourceError("the child end closed the channel")
        if inbox.eof:
            return BrokenResourceError("the child process died")
        return None

    def close(self) -> None:
        """Close this end; the other end's iteration stops after the messages already sent."""
        if self._closed:
            return
        self._closed = True
        if self._owner_pid == os.getpid():
            with contextlib.suppress(Exception), self._send_lock:
                self._conn.send_bytes(pickle.dumps((_BYE, os.getpid(), None, None)))
        if self._inbox is not None:
            self._inbox.stop()
        with contextlib.suppress(Exception):
            self._conn.close()
        for peer in self._peers.values():
            peer.close()


class _Unreadable:
    """Stands, in the inbox, for a message whose bytes arrived whole but cannot be unpickled
    here (an exception whose ``__init__`` takes two arguments, a class this process cannot
    import): its receive raises; the channel goes on."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _decode(data: bytes, sender: int) -> Message:
    try:
        return Message(*pickle.loads(data))
    except Exception as exc:
        return Message("", sender, None, _Unreadable(f"{type(exc).__name__}: {exc}"))


def _readable_or_raise(msg: Message) -> Message:
    if isinstance(msg.data, _Unreadable):
        raise ItemNotSendable(
            f"a message from process {msg.sender}", msg.data, ValueError(msg.data.why)
        )
    return msg


def open_channel(
    kind: str = "pipe", *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[Any, Any]:
    """``(parent_end, child_end)``: ``"pipe"`` for one child, ``"queue"`` for many.

    Hand the child end to ``multiprocessing.Process`` (any start method); keep the parent end.
    """
    parent_pid = os.getpid()
    if kind == "pipe":
        a, b = multiprocessing.Pipe(duplex=True)
        return (
            PipeEnd(a, "parent", parent_pid, max_message_bytes),
            PipeEnd(b, "child", parent_pid, max_message_bytes),
        )
    if kind == "queue":
        from ._queue import open_queue_channel

        return open_queue_channel(parent_pid, max_message_bytes)
    from .._errors import ConfigurationError

    raise ConfigurationError(f"channel kind {kind!r}: use 'pipe' or 'queue'")
