"""pymulproc's factories over :func:`conveyor.channels.open_channel`.

``PipeCommunication()`` joins a parent and one child, ``QueueCommunication()`` a parent and many;
``parent()`` and ``child()`` give the two ends, and the child's end is handed to
``multiprocessing.Process`` (any start method). ``send`` and ``receive`` keep pymulproc's
four-field list messages.

Differences, all in the safe direction: ``receive`` waits without polling when ``block=True``
and raises :class:`conveyor.BrokenResourceError` when the other side died instead of waiting
forever; a message that fails ``func`` stays for its recipient in order (on a queue, messages
addressed to a child only ever reach that child); a process's pid is the one it runs as, even for
an end made in its parent; joining children before reading what they sent never deadlocks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from conveyor import BrokenResourceError, ClosedResourceError
from conveyor.channels import Message, open_channel

from . import mpq_protocol
from .errors import QueuesCommunicationError

__all__ = ["PipeCommunication", "QueueCommunication"]


class _AsSender:
    """Data sent with an explicit ``sender_pid`` (pymulproc lets a sender name another pid)."""

    def __init__(self, pid: int, data: Any) -> None:
        self.pid = pid
        self.data = data


def _as_list(msg: Message) -> list[Any]:
    if isinstance(msg.data, _AsSender):
        return [msg.request, msg.data.pid, msg.recipient, msg.data.data]
    return [msg.request, msg.sender, msg.recipient, msg.data]


class _Api:
    def __init__(self, end: Any, peer: int, **kwargs: Any) -> None:
        self.conn = end
        self.peer = peer
        self.timeout = kwargs.get("timeout", 0.1)
        self.loops = kwargs.get("loops", 10)

    @property
    def pid(self) -> int:
        return os.getpid()

    def send(
        self,
        request: str,
        sender_pid: int | None = None,
        recipient_pid: int | None = None,
        data: Any = None,
    ) -> list[Any]:
        """Send ``[request, sender pid, recipient pid, data]``; returns it."""
        payload = data if sender_pid is None else _AsSender(sender_pid, data)
        loops = max(1, int(self.loops))
        for attempt in range(loops):
            try:
                self.conn.send(request, payload, recipient=recipient_pid, timeout_s=self.timeout)
                break
            except TimeoutError:  # the queue is full (max_size): try again, then give up
                if attempt == loops - 1:
                    raise QueuesCommunicationError(
                        f"process {self.pid} could not send: the queue stayed full for "
                        f"{loops} tries of {self.timeout} s"
                    ) from None
            except BrokenResourceError as exc:
                raise QueuesCommunicationError(
                    f"process {self.pid} could not send: {exc}", pid=exc.pid
                ) from exc
        return [request, sender_pid or self.pid, recipient_pid, data]

    def receive(self, func: Callable[[list[Any]], bool] | None = None, block: bool = False) -> Any:
        """The first message for which ``func`` holds (any message without it), or False if
        there is none now (``block=True``: wait for one). Typed ``Any``, as the code written
        for pymulproc indexes what it gets."""
        where = None if func is None else (lambda m: bool(func(_as_list(m))))
        try:
            msg = self.conn.receive(timeout_s=None if block else 0, where=where)
        except (TimeoutError, ClosedResourceError):
            return False
        return _as_list(msg)


class _QueueApi(_Api):
    def queue_empty(self) -> bool:
        """Nothing is waiting for this end."""
        return not self.conn.pending()

    def queue_join(self, timeout_s: float | None = None) -> None:
        """Wait until every message sent to this end has been taken."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.001
        while self.conn.pending():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("messages are still waiting")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class PipeCommunication:
    """A parent and one child over a pipe."""

    def __init__(self) -> None:
        self.parent_conn, self.child_conn = open_channel("pipe")

    def parent(self, **kwargs: Any) -> _Api:
        return _Api(self.parent_conn, mpq_protocol.PARENT_COMM_INTERFACE, **kwargs)

    def child(self, **kwargs: Any) -> _Api:
        return _Api(self.child_conn, mpq_protocol.CHILD_COMM_INTERFACE, **kwargs)


class QueueCommunication:
    """A parent and many children. ``max_size`` (0: no bound) bounds the messages sent and not
    yet taken, each way; a ``send`` that finds no room tries again ``loops`` times, each for
    ``timeout`` seconds, then raises ``QueuesCommunicationError``. A message without a
    recipient goes to a child that is waiting for one, as a shared queue would."""

    def __init__(self, **kwargs: Any) -> None:
        self.max_size = kwargs.get("max_size", 0)
        self.parent_conn, self.child_conn = open_channel(
            "queue", max_pending=self.max_size or None, dispatch="idle_first"
        )

    def parent(self, **kwargs: Any) -> _QueueApi:
        return _QueueApi(self.parent_conn, mpq_protocol.PARENT_COMM_INTERFACE, **kwargs)

    def child(self, **kwargs: Any) -> _QueueApi:
        return _QueueApi(self.child_conn, mpq_protocol.CHILD_COMM_INTERFACE, **kwargs)
