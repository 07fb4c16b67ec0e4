"""Channels between a parent process and its children.

``open_channel("pipe")`` joins the parent and one child over a duplex pipe. ``open_channel
("queue")`` joins the parent and any number of children, each over pipes of its own (see
``_queue``).

Messages are ``Message(request, sender, recipient, data)``; the sender is the sending process's
pid. Each message is pickled once, checked against ``max_message_bytes``, and written whole.
What the channel says to itself (hello, goodbye, ready for work, how a child ended) travels as
control frames that start with a zero byte, which no pickle does: no request a user sends can
be taken for one.

How nothing hangs:

* **Children are known from their start.** When ``multiprocessing`` starts a process that holds
  a child end (in its arguments, or as an attribute of a ``Process`` subclass), the parent's
  end learns its pid at once: under spawn and forkserver while the end is pickled for it, under
  fork right after the fork. It watches the child with a pidfd (Linux; elsewhere, a liveness
  check every 0.2 s), so a child that dies before it ever used its end, or later, makes the
  parent's receive raise ``BrokenResourceError`` at once, after the messages it sent.
* **Children say how they ended.** At exit a child's end says goodbye (it ended normally), that
  it is leaving without having used the channel, or that its process ended by an exception; a
  child that says nothing was killed. Only a normal end is a close.
* **The parent always drains.** From ``open_channel`` on, the parent's end reads what children
  send into memory whenever no receive is reading, so a child never blocks on a full pipe:
  joining a child before reading what it sent cannot deadlock.
* **What a dead child did not take is not lost.** The parent keeps the child's reading side of
  every pipe it writes to; once the child is dead it reads back what the child never took and
  hands it on (see ``BrokenResourceError.undelivered`` and, on a queue, re-routing).
* **Every caller's timeout holds.** Several threads may receive on one end: one reads the pipe
  at a time, the others wait for what it reads, each until its own deadline.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.popen_fork
import multiprocessing.process
import multiprocessing.util
import os
import pickle
import secrets
import select
import signal
import struct
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .._engine.waiting import poll_briefly
from .._errors import BrokenResourceError, ClosedResourceError, ItemNotSendable, WouldBlock

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_LIVENESS_S = 0.2
#: how long a process being started may take to have a pid before its start counts as failed
#: (a failed start is seen at once: its Popen is dropped; this is the backstop)
_START_S = 60.0
#: how long the parent's reader thread leaves reading to receivers after the last one
_LINGER_S = 0.02
#: how long a slice of waiting for room is, between looks at whether the other side is alive
_ROOM_SLICE_S = 0.2

# control frames: a zero byte, a tag, the sender's pid, then (for FAIL) a few words
_CONTROL = b"\x00"
HELLO = b"H"  # first use of a child end in this process
BYE = b"B"  # this end closed (a child that ended normally closes its end)
LEAVE = b"L"  # a child that never used its end ends normally
FAIL = b"F"  # a child's process ends by an exception
READY = b"R"  # a child waits for a message (idle-first dispatch)
_PID = struct.Struct("q")
_MAX_WHY = 2000

DISPATCH_MODES = ("round_robin", "idle_first")


class Message(NamedTuple):
    """A message: what is asked, by whom, for whom (None: for whoever takes it), and data."""

    request: str
    sender: int
    recipient: int | None
    data: Any = None


def control(tag: bytes, pid: int, why: str = "") -> bytes:
    return _CONTROL + tag + _PID.pack(pid) + why.encode("utf-8", "replace")[:_MAX_WHY]


def parse_control(frame: bytes) -> tuple[bytes, int, str] | None:
    """``(tag, pid, why)`` for a control frame, None for a message."""
    if frame[:1] != _CONTROL or len(frame) < 2 + _PID.size:
        return None
    (pid,) = _PID.unpack_from(frame, 2)
    return frame[1:2], pid, frame[2 + _PID.size :].decode("utf-8", "replace")


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


def how_it_ended(pid: int) -> str:
    """How a dead child of this process ended ("was killed by SIGKILL"), without reaping it
    (its ``Process`` still collects the exit code); "" when it cannot be told (not our child,
    as under forkserver, or already collected)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return ""
    try:
        info = waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return ""
    if info is None:
        return ""
    if info.si_code == os.CLD_EXITED:
        return f"exited with code {info.si_status}"
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        name = f"signal {info.si_status}"
    return f"was killed by {name}"


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


def readable(conn: Any) -> bool:
    """``conn.poll(0)`` without the selector set-up of ``multiprocessing.connection.wait``."""
    return bool(select.select([conn], [], [], 0)[0])


def drain(conn: Any) -> list[bytes]:
    """Every whole frame waiting on ``conn`` now (the reading side of a dead child's pipe)."""
    frames = []
    with contextlib.suppress(EOFError, OSError):
        while readable(conn):
            frames.append(conn.recv_bytes())
    return frames


def undelivered_of(frames: list[bytes]) -> list[Message]:
    """The messages among frames read back from a dead child's pipe."""
    return [decode(f, 0) for f in frames if parse_control(f) is None]


# -- which processes hold a child end ---------------------------------------------------------
#: parent ends in this process, by channel token, for the start-time hooks below
_PARENT_ENDS: weakref.WeakValueDictionary[str, _End] = weakref.WeakValueDictionary()
_FORK_LAUNCH = multiprocessing.popen_fork.Popen._launch.__code__  # type: ignore[attr-defined]
_BOOTSTRAP = multiprocessing.process.BaseProcess._bootstrap.__code__  # type: ignore[attr-defined]
_SKIP = (type, type(os), type(len), str, bytes, bytearray, int, float)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _child_ends_in(proc: Any, limit: int = 5000) -> set[str]:
    """Tokens of the child ends a ``Process`` object reaches through its target, arguments
    and attributes (a few levels deep: an end inside an object inside the arguments counts)."""
    found: set[str] = set()
    own = ("_target", "_args", "_kwargs")
    roots = [getattr(proc, name, None) for name in own]
    roots.append({k: v for k, v in vars(proc).items() if k not in own})
    seen: set[int] = set()
    todo = collections.deque((r, 0) for r in roots)
    while todo and len(seen) < limit:
        obj, depth = todo.popleft()
        if obj is None or isinstance(obj, _SKIP) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _End):
            if obj.role == "child":
                found.add(obj.token)
            continue
        if depth >= 6:
            continue
        items: Any
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
            items = obj
        elif hasattr(obj, "__self__"):  # a bound method: its object
            items = [obj.__self__]
        elif isinstance(obj, types.FunctionType):  # a closure or a lambda: what it holds
            cells = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            items = [*cells, *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        else:
            try:
                items = [*vars(obj).values(), *getattr(obj, "args", ()), getattr(obj, "func", None)]
                keywords = getattr(obj, "keywords", None)
                if isinstance(keywords, dict):
                    items.extend(keywords.values())
            except Exception:  # no __dict__, an odd ``args``: nothing to look into
                continue
        todo.extend((item, depth + 1) for item in items)
    return found


def _after_fork_in_parent() -> None:
    """Right after ``multiprocessing`` forked a child: the parent's ends whose child end the
    new process holds learn about it (its pid is set the moment ``os.fork`` returns)."""
    if not _PARENT_ENDS:
        return
    try:
        frame = sys._getframe(1)
    except ValueError:
        return
    if frame.f_code is not _FORK_LAUNCH:
        return  # not multiprocessing's fork: the child is known at its first use
    popen, proc = frame.f_locals.get("self"), frame.f_locals.get("process_obj")
    if popen is None or proc is None:
        return
    for token in _child_ends_in(proc):
        end = _PARENT_ENDS.get(token)
        # a child that forks inherits its parent's parent ends: they are not its to use
        if end is not None and end.parent_pid == os.getpid() and not end._closed:
            end._expect(popen)


os.register_at_fork(after_in_parent=_after_fork_in_parent)


def _exiting() -> tuple[bool, str]:
    """Whether this process is ending normally, and if not, why: an exception on its way out
    of a ``multiprocessing`` target is not normal, and neither is an exit that did not come
    through ``Process._bootstrap`` (the interpreter ending after a failed start)."""
    exc = sys.exc_info()[1]
    if exc is not None:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return True, ""
        return False, f"{type(exc).__name__}: {exc}"
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _BOOTSTRAP:  # Python 3.11, 3.12: the target has just ended
            return True, ""
        frame = frame.f_back
    ended = _EXIT_CODE.get(os.getpid())
    if ended is not None:  # Python 3.13 and later: _bootstrap said, on its way out
        return ended == 0, "" if ended == 0 else f"it exited with code {ended}"
    # outside Process._bootstrap: a child of multiprocessing that failed while it started
    # (unpickling its arguments), or a process of another kind ending as it does
    if multiprocessing.current_process().name != "MainProcess":
        return False, "it failed while starting"
    return True, ""


#: the exit code ``Process._bootstrap`` ended with, by pid (Python 3.13 and later run the
#: finalizers after it has returned, with no trace of how the target ended)
_EXIT_CODE: dict[int, int] = {}
_EXIT_HOOKED: set[int] = set()


def _note_exit_code() -> None:
    """Called by ``threading._shutdown``, which ``_bootstrap`` runs in its ``finally``: read the
    exit code it is about to return."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _BOOTSTRAP:
            code = frame.f_locals.get("exitcode")
            if isinstance(code, int):
                _EXIT_CODE[os.getpid()] = code
            return
        frame = frame.f_back


#: whether multiprocessing runs a child's finalizers only after ``_bootstrap`` has returned
_LATE_FINALIZERS: bool = sys.version_info >= (3, 13)


def _hook_exit_code() -> None:
    if not _LATE_FINALIZERS or os.getpid() in _EXIT_HOOKED:
        return
    _EXIT_HOOKED.add(os.getpid())
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(_note_exit_code)


class _End:
    """What both kinds of end share: identity, size checks, room, closing, iteration."""

    def __init__(
        self,
        role: str,
        parent_pid: int,
        max_message_bytes: int,
        token: str,
        room: tuple[Any, Any] | None,
    ) -> None:
        self.role = role
        self.parent_pid = parent_pid
        self.max_message_bytes = max_message_bytes
        self.token = token
        # at most so many messages sent one way and not yet taken: (parent to children,
        # children to parent) semaphores, or None (unbounded)
        self._room = room
        self._setup_local()
        if role == "child":
            multiprocessing.util.register_after_fork(self, _End._forked)
        else:
            multiprocessing.util.register_after_fork(self, _End._forked_parent)

    def _setup_local(self) -> None:
        self._owner_pid: int | None = None  # the process this end was first used in
        self._closed = False
        self._peer_closed = False
        self._backlog: collections.deque[Message] = collections.deque()
        self._peers: dict[int, _Peer] = {}
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._reading = False  # a thread of this process reads the connection now
        self._armed_pid: int | None = None  # the process whose exit this end reports
        self._poll: Any = None  # a child's poll object on its parent's pipe and pidfd
        self._poll_key: tuple[int, int | None] | None = None

    #: attributes that belong to the process using the end, never pickled with it
    _LOCAL: tuple[str, ...] = (
        "_owner_pid",
        "_closed",
        "_peer_closed",
        "_backlog",
        "_peers",
        "_lock",
        "_cv",
        "_reading",
        "_armed_pid",
        "_poll",
        "_poll_key",
    )

    def __getstate__(self) -> dict[str, Any]:
        if self.role == "child" and os.getpid() == self.parent_pid:
            popen = multiprocessing.context.get_spawning_popen()
            parent = _PARENT_ENDS.get(self.token)
            if popen is not None and parent is not None:
                parent._expect(popen)  # pickled for a process being started: watch it
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_local()
        if self.role == "child":
            # a forkserver child clears the finalizers and runs the after-fork hooks once it
            # has unpickled its arguments: arm there too
            multiprocessing.util.register_after_fork(self, _End._forked)
            if os.getpid() != self.parent_pid:
                self._arm_exit()

    def _forked(self) -> None:
        """In a child forked by ``multiprocessing``: report its exit if it holds this end."""
        self._setup_local()
        if self.token in _child_ends_in(multiprocessing.current_process()):
            self._arm_exit()

    def _forked_parent(self) -> None:
        """In a child forked by ``multiprocessing``: the parent's end came along in memory.
        Close what it holds open, so that the parent's going away shows in the child."""
        self._setup_local()
        self._closed = True
        for conn in self._inherited():
            with contextlib.suppress(Exception):
                conn.close()

    def _inherited(self) -> list[Any]:
        """The parent's side of the channel, as a forked child inherits it."""
        return []

    def _arm_exit(self) -> None:
        """Say at exit how this process ended (once per process)."""
        if self._armed_pid == os.getpid():
            return
        self._armed_pid = os.getpid()
        multiprocessing.util.Finalize(self, self._at_exit, exitpriority=100)
        _hook_exit_code()

    def _at_exit(self) -> None:
        if self._closed or self._armed_pid != os.getpid():
            return
        normal, why = _exiting()
        used = self._owner_pid == os.getpid()
        with contextlib.suppress(Exception):
            if normal and used:
                self.close()
                return
            if normal:
                self._say_leaving()
            else:
                self._arrive()  # a child that failed before using its end says so too
                self._say_failed(why or "it ended abnormally")
        self._closed = True

    def _say_leaving(self) -> None:
        """A child that never used its end ends normally: the parent stops watching it."""
        raise NotImplementedError

    def _say_failed(self, why: str) -> None:
        """A child that used its end ends by an exception."""
        raise NotImplementedError

    def _expect(self, popen: Any) -> None:
        """Parent: a process holding the child end is starting (``popen.pid`` is set, or will
        be the moment it has started)."""
        if os.getpid() != self.parent_pid or self._closed:
            return
        self._arrive()
        inbox = self._inbox_here()
        if inbox is not None:
            inbox.expect(popen)

    def _arrive(self) -> None:
        """On the first use in each process, ``_first_use()`` (once, under the lock)."""
        if self._owner_pid == os.getpid():
            return
        with self._lock:
            if self._owner_pid == os.getpid():
                return
            self._first_use()
            # only now: another thread of this process must not use a half-made end
            self._owner_pid = os.getpid()

    def _first_use(self) -> None:
        raise NotImplementedError

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

    # -- room: a bound on messages sent and not yet taken -----------------------------------
    def _outgoing_room(self) -> Any:
        if self._room is None:
            return None
        return self._room[0] if self.role == "parent" else self._room[1]

    def _take_room(self, timeout_s: float | None) -> None:
        """Wait for room to send one more message (only with ``max_pending``)."""
        room = self._outgoing_room()
        if room is None or room.acquire(False):
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = _ROOM_SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    "no room to send within timeout_s: the channel holds max_pending messages "
                    "that have not been taken"
                )
            if room.acquire(True, min(left, _ROOM_SLICE_S)):
                return
            self._check_open()
            self._check_receiver()

    def _check_receiver(self) -> None:
        """While waiting for room: raise if no one is left to take what was sent."""

    def _give_room(self, n: int = 1, *, sent_here: bool = False) -> None:
        """A message sent from the other side was taken here; with ``sent_here``, messages
        this end sent will never be taken (their receiver died)."""
        if self._room is None or n <= 0:
            return
        room = self._room[1] if (self.role == "parent") != sent_here else self._room[0]
        for _ in range(n):
            with contextlib.suppress(ValueError):
                room.release()

    def _taken(self, msg: Message) -> Message:
        self._give_room()
        return msg

    def _watch(self, pid: int) -> None:
        if pid != os.getpid() and pid not in self._peers:
            self._peers[pid] = _Peer(pid)

    def _take_backlog(self, where: Callable[[Message], bool] | None) -> Message | None:
        for i, msg in enumerate(self._backlog):
            if where is None or where(msg):
                del self._backlog[i]
                return msg
        return None

    def send(
        self,
        request: str,
        data: Any = None,
        *,
        recipient: int | None = None,
        timeout_s: float | None = None,
    ) -> Message:
        """Send a message; returns it. From the parent, to ``recipient`` (a child's pid) or,
        without one, to the child (pipe) or to one child (queue: see ``dispatch``); from a
        child, to the parent. With ``max_pending``, waits up to ``timeout_s`` for room
        (``TimeoutError``)."""
        self._check_open()
        self._arrive()
        msg = Message(request, os.getpid(), recipient, data)
        payload = self._dumps(msg)
        self._check_can_send(recipient)
        self._take_room(timeout_s)
        self._deliver(payload, recipient)
        return msg

    def _check_can_send(self, recipient: int | None) -> None:
        """Raise if this message cannot be sent (its recipient is known to be gone)."""

    def _deliver(self, payload: bytes, recipient: int | None) -> None:
        raise NotImplementedError

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
        messages it sent), ``ClosedResourceError`` once it has closed and nothing is left.
        Several threads may receive at once; each one's ``timeout_s`` holds."""
        self._check_open()
        self._arrive()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
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

    def _asks_for_work(self) -> bool:
        """Whether ``_before_waiting`` does anything (it needs a look at the pipe first)."""
        return False

    def _before_waiting(self) -> None:
        """A child about to wait for its parent (idle-first dispatch asks for work here)."""

    def _got(self, msg: Message) -> None:
        """A child read a message from its parent."""

    def _receive_inbox(
        self, inbox: _Inbox, deadline: float | None, where: Callable[[Message], bool] | None
    ) -> Message:
        looked = False
        while True:
            self._check_open()  # closed by another thread meanwhile
            with inbox.lock:  # inbox.cond's lock (its Python-level __enter__ is on every receive)
                found = self._take_backlog(where) if self._backlog else None
                if found is not None:
                    return self._taken(found)
                while inbox.items:
                    msg = inbox.items.popleft()
                    if isinstance(msg.data, _Unreadable):
                        self._give_room()
                        _readable_or_raise(msg)  # that message's error; the next goes on
                    if where is None or where(msg):
                        return self._taken(msg)
                    self._backlog.append(msg)
                    inbox.cond.notify_all()  # another receiver may want it
                failure = self._nothing_left(inbox)
                if failure is not None:
                    raise failure
                left = None if deadline is None else deadline - time.monotonic()
                # even with no time left, what was already sent counts as there: read it once
                # (and let a child's pipes that are on their way in arrive)
                if left is not None and left <= 0 and looked and not self._in_flight():
                    raise TimeoutError("no message within timeout_s")
                reads = inbox.reads
            wait = None if left is None else max(0.0, left)
            # nothing is waiting here: the first message read may be this caller's own
            got = inbox.take_direct(wait)
            if isinstance(got, tuple):
                if where is None or where(got):
                    return self._taken(got)
                with inbox.cond:  # older than anything still to be read: in order
                    self._backlog.append(got)
                    inbox.cond.notify_all()
            elif not got:
                # another thread reads: wait for what it reads, until this caller's deadline
                with inbox.cond:
                    if inbox.reads == reads and not inbox.items:
                        inbox.cond.wait(wait)
            looked = True

    def _receive_direct(
        self,
        conn: Any,
        parent: _Peer | None,
        deadline: float | None,
        where: Callable[[Message], bool] | None,
    ) -> Message:
        """A child reads its parent's connection itself, watching the parent. One thread of
        the process reads at a time; the others wait for what it reads."""
        looked = False
        while True:
            self._check_open()
            with self._cv:
                found = self._take_backlog(where)
                if found is not None:
                    return self._taken(found)
                if self._peer_closed:
                    raise ClosedResourceError("the parent closed the channel")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0 and looked:
                    raise TimeoutError("no message within timeout_s")
                if self._reading:
                    self._cv.wait(None if left is None else max(0.0, left))
                    looked = True
                    continue
                self._reading = True
            try:
                msg = self._read_one(conn, parent, left)
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()
            looked = True
            if msg is None:
                continue
            if where is None or where(msg):
                return self._taken(msg)
            with self._cv:
                self._backlog.append(msg)
                self._cv.notify_all()

    def _read_one(self, conn: Any, parent: _Peer | None, left: float | None) -> Message | None:
        """Wait up to ``left`` for one frame from the parent: the message, or None."""
        if self._asks_for_work() and not readable(conn):
            self._before_waiting()
        if self._poll_parent(conn, parent, None if left is None else max(0.0, left)):
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                self._check_open()  # this end was closed under the wait
                raise BrokenResourceError(
                    "the parent closed the channel or died", pid=self.parent_pid
                ) from None
            ctl = parse_control(frame)
            if ctl is not None:
                if ctl[0] == BYE:
                    with self._cv:
                        self._peer_closed = True
                return None
            msg = decode(frame, self.parent_pid)
            self._got(msg)
            if isinstance(msg.data, _Unreadable):
                self._give_room()
            return _readable_or_raise(msg)
        if parent is not None and not parent.alive():
            raise BrokenResourceError("the parent process died", pid=self.parent_pid)
        return None

    def _poll_parent(self, conn: Any, parent: _Peer | None, left: float | None) -> bool:
        """Wait up to ``left`` for ``conn`` to be readable or the parent to die (whether
        ``conn`` is readable), with one poll object kept for the pair: no set-up on a
        receive."""
        key = (conn.fileno(), None if parent is None else parent.fd)
        if self._poll_key != key:
            poll = select.poll()
            for fd in key:
                if fd is not None:
                    poll.register(fd, select.POLLIN)
            self._poll, self._poll_key = poll, key
        if parent is not None and parent.fd is None:  # no pidfd: look at it now and then
            left = _LIVENESS_S if left is None else min(left, _LIVENESS_S)
        return any(fd == key[0] for fd, _events in poll_briefly(self._poll, left))

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
    the parent is busy elsewhere (or joining it). Whoever reads holds ``rlock``; control
    frames, ends of pipes and deaths are handled the same way by both. Connections can be
    added while it runs (``add``), and processes to watch (``expect``); ``eof`` is set once
    every connection it had has ended.

    The channel's end plugs in: ``on_control(conn, tag, pid, why)`` for what the inbox does not
    handle itself, ``on_death(pid)`` (the messages the dead child never took, read back),
    ``settling()`` (something a child sent is still on its way by another path: look again
    before declaring it dead)."""

    def __init__(
        self,
        conns: list[Any],
        *,
        more_coming: bool = False,
        on_control: Callable[[Any, bytes, int, str], None] | None = None,
        on_death: Callable[[int], list[Message]] | None = None,
        settling: Callable[[], bool] | None = None,
        on_bye: Callable[[int], None] | None = None,
    ) -> None:
        self.conns = list(conns)
        self.more_coming = more_coming  # connections will be added: never at an end
        self.on_control = on_control
        self.on_death = on_death
        self.settling = settling
        self.on_bye = on_bye
        self.conn_pid: dict[Any, int] = {}
        self.items: collections.deque[Message] = collections.deque()
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        # the reader thread waits on a condition of its own over the same lock: what wakes
        # receivers (every message read, every read finished) must not wake it too, or each
        # receive hands the GIL to a thread that only goes back to sleep
        self._thread_cv = threading.Condition(self.lock)
        self.rlock = threading.Lock()
        self.active = 0  # receivers reading directly now
        self.last_active = 0.0
        self.reads = 0  # direct reads finished: a waiting receiver looks again after each
        self.eof = False
        self.dead: list[BrokenResourceError] = []  # deaths not yet reported
        self.byes = 0
        self._had_any = bool(conns)
        self._watching: set[int] = set()
        #: the first process watched: on a pipe channel, the child (a process it started that
        #: holds the end too, a grandchild, is watched but does not stand for it)
        self.first: int | None = None
        self._watched: dict[int, _Peer] = {}
        self._polled: list[_Peer] = []
        # Popen objects whose pid is not known yet, and since when
        self._expected: list[tuple[Any, float]] = []
        self.said_bye: set[int] = set()
        self._failed: dict[int, str] = {}
        self.left: set[int] = set()  # ended normally without using the channel
        self._reported: set[int] = set()
        self._new: list[tuple[Any, int | None]] = []
        # two wake-up pipes: one for the receiver that reads, one for the reader thread (one
        # shared pipe lets one of them take the other's wake-up and wait on a stale set)
        self._wake_r, self._wake_w = os.pipe()
        self._thread_wake_r, self._thread_wake_w = os.pipe()
        for fd in (self._wake_r, self._thread_wake_r):
            os.set_blocking(fd, False)
        self._stopping = False
        #: bumped whenever the connections or the pidfds watched change: a receiver's poll
        #: object is made again only then, not on every receive
        self._changes = 0
        self._poller: tuple[int, Any, dict[int, Any], list[Any]] | None = None
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
                unread = any(readable(c) for c in self.conns)
                left = deadline - time.monotonic()
                if not unread or left <= 0 or self.eof:
                    return int(unread)
                reads = self.reads
            if not self.read_direct(min(left, 0.01)):
                with self.cond:
                    if self.reads == reads and not self.items:
                        self.cond.wait(0.01)

    def stop(self) -> None:
        """End the thread (before the connections it reads are closed) and close the wake-up
        pipe once no receiver is reading."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
            self._thread_cv.notify_all()
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
                    for fd in (self._wake_r, self._wake_w):
                        os.close(fd)
                    self._wake_r = self._wake_w = -1
        finally:
            self.rlock.release()

    def _wake(self) -> None:
        """Wake whoever waits on the connections (cond held)."""
        for fd in (self._wake_w, self._thread_wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(fd, b"x")

    def add(self, conn: Any, pid: int | None) -> None:
        """Read ``conn`` too, and watch ``pid``."""
        with self.cond:
            self._new.append((conn, pid))
            self.cond.notify_all()
            self._wake()

    def expect(self, popen: Any) -> None:
        """Watch the process ``popen`` starts, as soon as its pid is known."""
        with self.cond:
            self._expected.append((weakref.ref(popen), time.monotonic()))
            self.cond.notify_all()
            self._wake()

    def forget(self, pid: int) -> None:
        """``pid`` leaves without having used the channel: its end is not a death."""
        with self.cond:
            self.left.add(pid)
            self.cond.notify_all()

    # -- reading (the caller holds rlock) ---------------------------------------------------------
    def _merge_new(self) -> None:
        """Take in added connections and started processes (cond held)."""
        if self._expected:
            now = time.monotonic()
            for ref, since in list(self._expected):
                popen = ref()
                pid = getattr(popen, "pid", None)
                if pid is not None:
                    self._expected.remove((ref, since))
                    self._watch(pid)
                elif popen is None or now - since > _START_S:
                    # its start failed (the Popen was dropped): no process will come
                    self._expected.remove((ref, since))
        if not self._new:
            return
        new, self._new = self._new, []
        self._changes += 1
        for conn, pid in new:
            self.conns.append(conn)
            self._had_any = True
            if pid is not None:
                self.conn_pid[conn] = pid
                self._watch(pid)

    def _watch(self, pid: int) -> None:
        if pid in self._watching or pid == os.getpid():
            return
        if self.first is None:
            self.first = pid
        self._watching.add(pid)
        peer = _Peer(pid)
        if peer.fd is not None:
            self._watched[peer.fd] = peer
            self._changes += 1
        else:
            self._polled.append(peer)

    def reported(self) -> bool:
        """Some child's death has been seen."""
        with self.cond:
            return bool(self._reported)

    def expecting(self) -> bool:
        """A process holding the child end is starting and its pid is not known yet."""
        with self.cond:
            return bool(self._expected)

    def watching(self) -> set[int]:
        """The pids watched now (alive, or dead and not yet handled)."""
        with self.cond:
            return {p.pid for p in self._watched.values()} | {p.pid for p in self._polled}

    def _unread(self) -> bool:
        """Something is still to be read: on a connection (added ones too), or on its way."""
        with self.cond:
            self._merge_new()
            conns = list(self.conns)
        return any(readable(c) for c in conns) or bool(self.settling and self.settling())

    def _read(self, ready: list[Any], conns: list[Any]) -> None:
        """Read every whole message waiting on the ready connections; note deaths."""
        for r in ready:
            # ready may be stale (the other reader took what was there, or saw the end)
            if isinstance(r, int) or r not in conns or r not in self.conns:
                continue
            while readable(r):
                try:
                    frame = r.recv_bytes()
                except (EOFError, OSError):
                    with self.cond:
                        self.conns.remove(r)
                        self._changes += 1
                        self.cond.notify_all()
                    pid = self.conn_pid.pop(r, None)
                    if pid is not None:
                        self._died(pid)  # its pipe ended: it exited (said goodbye or not)
                    break
                self._take(r, frame)
        for r in ready:
            if isinstance(r, int) and r in self._watched:
                peer = self._watched.pop(r)
                self._changes += 1
                if self._unread():
                    self._polled.append(peer)  # read what it sent first; look again
                else:
                    self._died(peer.pid)
                    peer.close()
        if self._polled and not self._unread():
            for peer in [p for p in self._polled if not p.alive()]:
                self._polled.remove(peer)
                self._died(peer.pid)
                peer.close()

    def _take(self, conn: Any, frame: bytes) -> None:
        ctl = parse_control(frame)
        if ctl is None:
            msg = decode(frame, self.conn_pid.get(conn, 0))
            with self.cond:
                self.items.append(msg)
                self.cond.notify_all()
            return
        tag, pid, why = ctl
        if tag == HELLO:
            with self.cond:
                self.conn_pid.setdefault(conn, pid)
                self._watch(pid)
            return
        if tag == BYE:
            with self.cond:
                self.said_bye.add(pid)
                self.byes += 1
                self.cond.notify_all()
            if self.on_bye is not None:
                self.on_bye(pid)
        elif tag == LEAVE:
            self.forget(pid)
        elif tag == FAIL:
            self._failed[pid] = why
            self._died(pid)
        elif self.on_control is not None:
            self.on_control(conn, tag, pid, why)

    def _wait_set(self) -> tuple[list[Any], list[Any], float | None]:
        with self.cond:
            self._merge_new()
            conns = list(self.conns)
            expecting = bool(self._expected)
        liveness = 0.01 if expecting else _LIVENESS_S if self._polled else None
        return conns, [*conns, *self._watched], liveness

    def read_direct(self, left: float | None) -> bool:
        """Wait up to ``left`` for something to read (or a death) and read it, here. False
        (at once) when another thread is reading."""
        return self._direct(left, take=False) is not False

    def take_direct(self, left: float | None) -> Message | bool:
        """``read_direct`` for a receiver that takes the first message: that message itself
        when it was the first thing read (what came after it is read in behind it), True when
        it looked and read or handled what there was the usual way, False when another
        thread is reading."""
        return self._direct(left, take=True)

    def _direct(self, left: float | None, *, take: bool) -> Message | bool:
        if not self.rlock.acquire(blocking=False):
            return False
        # only the holder of rlock changes it: no lock needed (the thread only reads it)
        self.active += 1
        try:
            # what is read here is read under rlock, which this thread holds: no other lock
            if self.items or self.dead or self.eof or self._wake_r < 0:
                return True
            if take and not (self._new or self._expected or self._polled):
                return self._take_one(left)
            conns, waits, liveness = self._wait_set()
            timeout = left if liveness is None else min(left or liveness, liveness)
            ready = _ready([*waits, self._wake_r], timeout)
            if self._wake_r in ready:  # a connection was added: the caller looks again
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                ready.remove(self._wake_r)
            self._read(ready, conns)
            return True
        finally:
            self.rlock.release()
            self.active -= 1
            with self.lock:
                self.reads += 1
                self.last_active = time.monotonic()
                self.cond.notify_all()

    def _take_one(self, left: float | None) -> Message | bool:
        """The way of a round trip (rlock held; no process to take in, none watched by
        polling): one ``poll`` on every connection, every child's pidfd and the wake-up pipe,
        through a poll object made again only when they change. When it is one connection
        and its first frame is a message, that message is returned; anything else is read
        and handled as ``read_direct`` does (a death, a goodbye, an end of pipe, a
        connection added)."""
        poller = self._poller
        if poller is None or poller[0] != self._changes:
            with self.lock:
                conns = list(self.conns)
                changes, watched = self._changes, list(self._watched)
            poll = select.poll()
            by_fd: dict[int, Any] = {}
            for obj in [*conns, *watched, self._wake_r]:
                fd = obj if isinstance(obj, int) else obj.fileno()
                by_fd[fd] = obj
                poll.register(fd, select.POLLIN)
            poller = self._poller = (changes, poll, by_fd, conns)
        _changes, poll, by_fd, conns = poller
        events = poll_briefly(poll, left)
        ready = [by_fd[fd] for fd, _events in events]
        if len(ready) == 1 and not isinstance(ready[0], int):
            conn = ready[0]
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                self._read(ready, conns)  # the end of its pipe: handled there
                return True
            msg: Message | None = None
            if parse_control(frame) is not None:
                self._take(conn, frame)
            else:
                msg = decode(frame, self.conn_pid.get(conn, 0))
                if isinstance(msg.data, _Unreadable):  # its receive raises: the usual way
                    with self.cond:
                        self.items.append(msg)
                    msg = None
            if readable(conn):  # more came: in behind it, now (the parent always drains)
                self._read(ready, conns)
            return True if msg is None else msg
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
            ready.remove(self._wake_r)
        self._read(ready, conns)
        return True

    # -- the reader thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self._stopping and (
                        self.active or time.monotonic() - self.last_active < _LINGER_S
                    ):
                        self._thread_cv.wait(_LINGER_S)  # a receiver reads: leave it to them
                    if self._stopping:
                        return
                    if self._had_any and not self.conns and not self._new and not self.more_coming:
                        return
                conns, waits, liveness = self._wait_set()
                ready = _ready([*waits, self._thread_wake_r], liveness)
                if self._thread_wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._thread_wake_r, 512)
                    ready.remove(self._thread_wake_r)
                with self.rlock:
                    with self.cond:
                        if self.active or self._stopping:
                            continue
                    self._read(ready, conns)
                with self.cond:  # receivers waiting for this read look again
                    self.reads += 1
                    self.cond.notify_all()
        finally:
            for peer in [*self._watched.values(), *self._polled]:
                peer.close()
            with self.cond:
                self.eof = True
                for fd in (self._thread_wake_r, self._thread_wake_w):
                    os.close(fd)
                self._thread_wake_r = self._thread_wake_w = -1
                self.cond.notify_all()

    def _died(self, pid: int) -> None:
        with self.cond:
            if pid in self.said_bye or pid in self._reported or pid in self.left:
                return
            self._reported.add(pid)
        why = self._failed.get(pid)
        how = f"ended by an exception ({why})" if why else how_it_ended(pid) or "died"
        undelivered = self.on_death(pid) if self.on_death is not None else []
        never = f"; {len(undelivered)} message(s) sent to it were never taken"
        error = BrokenResourceError(
            f"the child process {pid} {how}{never if undelivered else ''}", pid=pid
        )
        error.undelivered = undelivered
        with self.cond:
            self.dead.append(error)
            self.cond.notify_all()


class PipeEnd(_End):
    """One end of a ``pipe`` channel (one parent, one child)."""

    def __init__(
        self,
        conn: Any,
        role: str,
        parent_pid: int,
        max_message_bytes: int,
        token: str,
        room: tuple[Any, Any] | None,
        child_conn: Any = None,
    ) -> None:
        self._conn = conn
        super().__init__(role, parent_pid, max_message_bytes, token, room)
        # parent: the child's side of the pipe, read back once the child is dead
        self._child_conn = child_conn

    def _setup_local(self) -> None:
        super()._setup_local()
        self._inbox: _Inbox | None = None
        self._send_lock = threading.Lock()
        self._child_conn = None
        self._death_told = False
        self._child_gone: int | None = None  # the child that died (parent): sends refused

    _LOCAL = (*_End._LOCAL, "_inbox", "_send_lock", "_child_conn", "_death_told", "_child_gone")

    def _first_use(self) -> None:
        """Announce this process, watch the peer, start reading if parent."""
        if self.role == "child":
            self._watch(self.parent_pid)
            self._arm_exit()
            with self._send_lock:
                self._conn.send_bytes(control(HELLO, os.getpid()))
        else:
            self._inbox = _Inbox([self._conn], on_death=self._reclaim, on_bye=self._bye)

    def _bye(self, pid: int) -> None:
        """The child closed its end: what was sent and not read is dropped, and a send
        blocked on the full pipe ends (it raises, as every later one does)."""
        assert self._inbox is not None
        if pid == self._inbox.first:
            self._reclaim(pid)

    def _reclaim(self, pid: int) -> list[Message]:
        """The child died: what the parent sent that it never read, read back from its side
        (unless another process holding the child end is still alive and may read it)."""
        assert self._inbox is not None
        if self._child_conn is None or self._inbox.watching() - {pid}:
            return []
        frames: list[bytes] = []
        # a send blocked on the full pipe holds the send lock: reading the pipe lets it end,
        # and what it wrote is read back with the rest
        while not self._send_lock.acquire(timeout=0.05):
            frames.extend(drain(self._child_conn))
        try:
            self._child_gone = pid
            frames.extend(drain(self._child_conn))
        finally:
            self._send_lock.release()
        undelivered = undelivered_of(frames)
        self._give_room(len(undelivered), sent_here=True)
        return undelivered

    def _check_can_send(self, recipient: int | None) -> None:
        inbox = self._inbox
        if inbox is None or not (inbox.dead or inbox.byes or inbox.left):
            return  # a child end, or nothing said or seen of the child's end yet
        if self._child_died(inbox):
            raise self._death(inbox)
        closed = self._child_closed(inbox)
        if closed is not None:
            raise closed

    @staticmethod
    def _child_died(inbox: _Inbox) -> bool:
        return any(e.pid in (inbox.first, None) for e in inbox.dead) or (
            bool(inbox.dead) and inbox.first is None
        )

    def _gone_error(self) -> Exception:
        """Why a send cannot go: the child closed its end, or died (its death, as reported,
        once the reader has finished handling it)."""
        inbox = self._inbox
        assert inbox is not None
        with inbox.cond:
            inbox.cond.wait_for(lambda: inbox.dead or inbox.byes, timeout=5)
        if inbox.dead:
            return self._death(inbox)
        return self._child_closed(inbox) or BrokenResourceError("the child process is gone")

    def _child_closed(self, inbox: _Inbox) -> ClosedResourceError | None:
        """The child closed its end, or ended without using it: nothing sent reaches it."""
        child = inbox.first
        if inbox.byes and (child is None or child in inbox.said_bye):
            return ClosedResourceError("the child end closed the channel")
        if child in inbox.left and child not in inbox.watching() and not inbox.expecting():
            return ClosedResourceError(f"the child process {child} ended without using the channel")
        return None

    def _deliver(self, payload: bytes, recipient: int | None) -> None:
        try:
            with self._send_lock:
                if self._child_gone is not None:
                    raise self._gone_error()
                self._conn.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise BrokenResourceError(f"the {self._other()} end is gone: {exc}") from None

    def _check_receiver(self) -> None:
        if self._inbox is not None:
            if self._child_died(self._inbox):
                raise self._death(self._inbox)
            closed = self._child_closed(self._inbox)
            if closed is not None:
                raise closed
        elif (
            self._peers.get(self.parent_pid) is not None
            and not self._peers[self.parent_pid].alive()
        ):
            raise BrokenResourceError("the parent process died", pid=self.parent_pid)

    def _death(self, inbox: _Inbox) -> BrokenResourceError:
        """The child's death: the first report carries what it never took; every later one
        is a fresh error saying the same."""
        first = inbox.dead[0]
        if inbox.first is not None and first.pid not in (inbox.first, None):
            # another process holding the end (a grandchild) died: not the child; said once
            inbox.dead.pop(0)
            return first
        if not self._death_told:
            self._death_told = True
            return first
        return BrokenResourceError(*first.args, pid=first.pid)

    def _inherited(self) -> list[Any]:
        return [self._conn]

    def _say_leaving(self) -> None:
        with self._send_lock:
            self._conn.send_bytes(control(LEAVE, os.getpid()))

    def _say_failed(self, why: str) -> None:
        with self._send_lock:
            self._conn.send_bytes(control(FAIL, os.getpid(), why))

    def _other(self) -> str:
        return "child" if self.role == "parent" else "parent"

    def _inbox_here(self) -> _Inbox | None:
        return self._inbox

    def _from_parent(self) -> tuple[Any, _Peer | None]:
        return self._conn, self._peers.get(self.parent_pid)

    def _nothing_left(self, inbox: _Inbox) -> Exception | None:
        if inbox.dead:
            return self._death(inbox)
        closed = self._child_closed(inbox)
        if closed is not None:
            return closed
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
                self._conn.send_bytes(control(BYE, os.getpid()))
        with self._cv:
            self._cv.notify_all()  # receivers waiting on this end look again, and leave
        if self._inbox is not None:
            self._inbox.stop()
        for conn in (self._conn, self._child_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        for peer in self._peers.values():
            peer.close()


class _Unreadable:
    """Stands, in the inbox, for a message whose bytes arrived whole but cannot be unpickled
    here (an exception whose ``__init__`` takes two arguments, a class this process cannot
    import): its receive raises; the channel goes on."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def decode(data: bytes, sender: int) -> Message:
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
    kind: str = "pipe",
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_pending: int | None = None,
    dispatch: str = "round_robin",
) -> tuple[Any, Any]:
    """``(parent_end, child_end)``: ``"pipe"`` for one child, ``"queue"`` for many.

    Hand the child end to ``multiprocessing.Process`` (any start method); keep the parent end.
    ``max_pending``: at most so many messages sent one way and not yet taken (each way counts
    on its own); ``send`` waits for room. ``dispatch`` (queue): where a message without a
    recipient goes, ``"round_robin"`` (to each child in turn) or ``"idle_first"`` (to a child
    waiting for one; the parent keeps it until one is).
    """
    from .._errors import ConfigurationError

    if max_pending is not None and (
        isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
    ):
        raise ConfigurationError(f"max_pending must be a positive int or None, not {max_pending!r}")
    if dispatch not in DISPATCH_MODES:
        raise ConfigurationError(f"dispatch {dispatch!r}: use one of {', '.join(DISPATCH_MODES)}")
    if kind not in ("pipe", "queue"):
        raise ConfigurationError(f"channel kind {kind!r}: use 'pipe' or 'queue'")
    parent_pid = os.getpid()
    token = secrets.token_hex(8)
    room = None
    if max_pending is not None:
        room = (
            multiprocessing.BoundedSemaphore(max_pending),
            multiprocessing.BoundedSemaphore(max_pending),
        )
    parent: _End
    child: _End
    if kind == "pipe":
        a, b = multiprocessing.Pipe(duplex=True)
        parent = PipeEnd(a, "parent", parent_pid, max_message_bytes, token, room, child_conn=b)
        child = PipeEnd(b, "child", parent_pid, max_message_bytes, token, room)
    else:
        from ._queue import open_queue_channel

        parent, child = open_queue_channel(parent_pid, max_message_bytes, token, room, dispatch)
    _PARENT_ENDS[token] = parent
    parent._arrive()  # drain from the moment a child can write
    return parent, child
