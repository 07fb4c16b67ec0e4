"""The process worker kind: each worker is a child process fed by a driver thread.

The parent keeps everything that must be shared or decided in one place: taking units from the
source (so ``rate``, order and keys work as for any kind), what a failure leads to, the
statistics. A child only runs the user's code over the units it is sent and answers with their
outputs (:mod:`.child`; the messages are in :mod:`.wire`).

What crosses the pipe
---------------------
The source's work (the function, the ``Stage`` instance or class, a task registry) is pickled
once with cloudpickle (:mod:`..shipping`), so lambdas and closures travel under ``spawn`` and
``forkserver`` too, and a traceback from the child names the user's file and line. Units and
results use the standard pickle. A unit is as large as about 50 ms of work (measured in the
child and fed back), so tiny items are cheap and a slow item travels alone.

When things go wrong
--------------------
* An item raises in the child (anything, ``BaseException`` included): the exception (with its
  traceback text) comes back and the source decides; a retry runs on the same child.
* An item cannot be pickled, or its result cannot, or either pickles but cannot be unpickled
  on the other side: that item fails with :class:`ItemNotSendable`, naming its type; the other
  items of the unit go on.
* The child dies (a signal, ``os._exit``, a segfault) or an item runs past its time limit (then
  the parent kills it): a fresh child replaces it, and the item it was on fails with
  :class:`WorkerCrashed` or :class:`ItemTimeout`. The unit is sent again to the new child
  unless the source settles that item otherwise; results the dead child had not sent are
  recomputed, so every item's outputs are emitted exactly once.
* The parent dies: every child holds the read end of a *lifeline* pipe whose only writer is the
  parent, and exits as soon as it reads end-of-file there.
* The work is torn down (a failure, Ctrl-C): every child is killed at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import select
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any, ClassVar

from ..._errors import (
    ConfigurationError,
    ItemNotSendable,
    ItemTimeout,
    RemoteError,
    StageFailed,
    WorkerCrashed,
)
from .. import shipping
from ..buffer import BufferShutdown
from ..pool import Slot, SlotPool, register_kind
from ..source import WOKEN, StepSpec, Unit, timeout_of
from ..waiting import poll_briefly
from . import child as child_side
from .wire import (
    UNSENDABLE,
    Answer,
    Bye,
    Explain,
    Failure,
    Leave,
    Ready,
    Run,
    SetupFailed,
    Unreadable,
    dumps,
    pickles,
)

log = logging.getLogger("conveyor")

DEFAULT_START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
#: how long a unit of a process stage should take: long enough that the pipe's round trip is
#: small beside it, short enough that a slow item does not wait behind many
UNIT_TARGET_S = 0.05
#: a unit this small (pickled) may be sent while another is still running in the child: it
#: fits in the socket's buffer, so sending it cannot block while the child writes an answer
_PIPELINE_BYTES = 32 * 1024
#: a unit of large items stops growing at about this many pickled bytes
_UNIT_BYTES = 4 * 1024 * 1024
#: how long a child may take to start, set up, or tear down and leave
_START_TIMEOUT_S = 60.0
_LEAVE_TIMEOUT_S = 10.0
#: how often a waiting driver looks at the stop event (and at a timed item's clock)
_SLICE_S = 0.25


class _RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of an exception sent back."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the worker process:\n{self.text}"


class _Lost(Exception):
    """The child died, or an item ran past its time."""

    def __init__(self, late: bool) -> None:
        self.late = late


class _Flight:
    """Items sent to a child as one message, and, once it came back, the child's answer."""

    __slots__ = (
        "answer",
        "attempt",
        "data",
        "explained",
        "id",
        "items",
        "owner",
        "timeout_s",
        "unit",
        "unsendable",
    )

    def __init__(
        self, items: list[Any], unit: Unit | None, attempt: int, timeout_s: float | None
    ) -> None:
        self.items = items
        self.unit = unit
        self.attempt = attempt
        self.timeout_s = timeout_s
        self.id = -1
        self.owner: object = None
        self.data = b""
        self.unsendable: list[int] = []
        self.answer: Answer | None = None
        #: the child was asked to check its answer (it could not be read here)
        self.explained = False

    def unit_item(self, index: int) -> Any:
        """The item as the user gave it (``items`` may hold a stand-in)."""
        return self.unit.items[index] if self.unit is not None else self.items[index]


class _Child:
    def __init__(self, pool: ProcessPool) -> None:
        ctx = pool.ctx
        parent_end, child_end = ctx.Pipe(duplex=True)
        life_reader, life_writer = ctx.Pipe(duplex=False)
        self.progress = ctx.RawArray("q", child_side.PROGRESS_SLOTS)
        self.progress[child_side.UNIT] = -1
        self.proc = ctx.Process(
            target=child_side.child_main,
            args=(
                pool.payload,
                child_end,
                life_reader,
                life_writer if pool.start_method == "fork" else None,
                self.progress,
                pool.setting,
            ),
            name=f"conveyor:{pool.source.name}",
            daemon=True,
        )
        self.proc.start()
        child_end.close()
        life_reader.close()
        self.conn: Connection = parent_end
        self.lifeline: Connection = life_writer
        self.pid: int | None = self.proc.pid
        self.items_posted = 0
        self.next_id = 0
        #: flights sent and not yet answered, by id, oldest first
        self.flights: dict[int, _Flight] = {}
        #: whose answer comes next: the ids of the messages sent, in order (the child answers
        #: each Run and Explain once, in the order it got them)
        self.expect: deque[int] = deque()
        #: why the parent killed it (ProcessPool.cancel): the error its item fails with
        self.cancelled: BaseException | None = None
        #: the child's answers and its end, in one wait that looks before it sleeps
        self._answers = select.poll()
        for fd in (self.conn.fileno(), self.proc.sentinel):
            self._answers.register(fd, select.POLLIN)

    def send(self, msg: Any) -> None:
        self.send_bytes(dumps(msg))

    def send_bytes(self, data: bytes) -> None:
        """Send; a child that died meanwhile is noticed by the next receive, which says how
        (and its flights go to a fresh child)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.conn.send_bytes(data)

    def receive(self, stop: threading.Event, timeout_s: float | None) -> Any:
        """The child's next message (raw bytes are unpickled; one that cannot be is returned
        as ``None``); raises :class:`_Lost` if it died or its current item ran past
        ``timeout_s`` (of that flight's own, see ``late_by``)."""
        while True:
            if stop.is_set():
                raise BufferShutdown
            wait_s = _SLICE_S
            if timeout_s is not None:
                wait_s = min(wait_s, max(0.005, timeout_s / 4))
                if self.late():
                    raise _Lost(late=True)
            ready = {fd for fd, _events in poll_briefly(self._answers, wait_s)}
            if self.conn.fileno() in ready:
                try:
                    data = self.conn.recv_bytes()
                except (EOFError, OSError):
                    pass  # the child is gone: its sentinel says how
                else:
                    try:
                        return pickle.loads(data)
                    except Exception:
                        return None
            elif not ready:
                continue
            if stop.is_set():
                raise BufferShutdown
            self.proc.join(1.0)
            raise _Lost(late=False)

    def late(self) -> bool:
        """The item the child is on has run past its flight's time limit."""
        flight = self.flights.get(self.progress[child_side.UNIT])
        if flight is None or flight.timeout_s is None:
            return False
        started = self.progress[child_side.STARTED]
        return bool(time.monotonic_ns() - started > flight.timeout_s * 1e9)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.join(_LEAVE_TIMEOUT_S)
        self.close()

    def close(self) -> None:
        for end in (self.conn, self.lifeline):
            with contextlib.suppress(Exception):
                end.close()

    def leave(self) -> None:
        """Ask the child to tear down and exit; kill it if it does not in time."""
        try:
            self.conn.send_bytes(dumps(Leave()))
            deadline = time.monotonic() + _LEAVE_TIMEOUT_S
            while time.monotonic() < deadline:
                if not wait_any([self.conn, self.proc.sentinel], deadline - time.monotonic()):
                    break
                if self.conn.poll():
                    with contextlib.suppress(Exception):
                        if isinstance(pickle.loads(self.conn.recv_bytes()), Bye):
                            break
                else:
                    break
            self.proc.join(max(0.0, deadline - time.monotonic()))
        except (OSError, EOFError):
            pass
        if self.proc.is_alive():
            self.kill()
        else:
            self.close()


@register_kind
class ProcessPool(SlotPool):
    kind = "process"
    own_options: ClassVar[frozenset[str]] = frozenset({"start_method", "max_items_per_worker"})

    @classmethod
    def validate(cls, spec: StepSpec) -> None:
        super().validate(spec)
        method = spec.option("start_method", DEFAULT_START_METHOD)
        if method not in multiprocessing.get_all_start_methods():
            raise ConfigurationError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                f"not {method!r}"
            )
        recycle = spec.option("max_items_per_worker")
        if recycle is not None and (
            isinstance(recycle, bool) or not isinstance(recycle, int) or recycle < 1
        ):
            raise ConfigurationError(
                f"max_items_per_worker must be an int >= 1 or None, not {recycle!r}"
            )
        try:
            shipping.dumps((spec.make_work, spec.mode))
        except Exception as exc:
            raise ConfigurationError(
                f"{spec.name!r} cannot be sent to a worker process: {exc} "
                "(everything its function refers to must pickle)"
            ) from exc

    def start(self) -> None:
        spec = self.source.spec
        self.start_method: str = spec.option("start_method", DEFAULT_START_METHOD)
        self.ctx = multiprocessing.get_context(self.start_method)
        self.payload = shipping.dumps((spec.make_work, spec.mode))
        # what a process started now would inherit: a forkserver (or spawn) child gets it
        # sent, or it would see the environment of when the forkserver started
        self.setting = (
            None
            if self.start_method == "fork"
            else child_side.Setting(dict(os.environ), list(sys.path), os.getcwd())
        )
        self.recycle_after: int | None = spec.option("max_items_per_worker")
        self.source.target_unit_s = max(self.source.target_unit_s, UNIT_TARGET_S)
        if self.start_method == "forkserver":
            # the server imports conveyor once; every worker it forks then starts at once
            self.ctx.set_forkserver_preload(["conveyor._engine.processes"])
        # pickled bytes per item, smoothed over the units sent: caps units of large items
        self._item_bytes: float | None = None
        self._children: set[_Child] = set()
        self._children_lock = threading.Lock()
        self._aborted = False
        self._begin()

    def _launch(self, slot: Slot, first: Any) -> None:
        threading.Thread(
            target=self._drive,
            args=(slot,),
            name=f"{self.context.thread_name}:{self.source.name}:{slot.index}",
            daemon=True,
        ).start()

    def abort(self) -> None:
        self._aborted = True
        with self._children_lock:
            children = list(self._children)
        for child in children:
            with contextlib.suppress(Exception):
                child.proc.kill()

    def cancel(self, ref: object, error: BaseException) -> bool:
        # a cancellable source posts one unit at a time, so the child running a unit runs
        # nothing else: killing it ends that unit alone
        with self._children_lock:
            children = list(self._children)
        for child in children:
            flight = child.flights.get(child.progress[child_side.UNIT])
            unit = flight.unit if flight is not None else None
            if unit is not None and unit.ref == ref and child.cancelled is None:
                child.cancelled = error
                with contextlib.suppress(Exception):
                    child.proc.kill()
                return True
        return False

    def pids(self) -> list[int]:
        """The process ids of the current workers (for tests and tools)."""
        with self._children_lock:
            return [c.pid for c in self._children if c.pid is not None]

    # -- children -----------------------------------------------------------------------------
    def _new_child(self) -> _Child:
        """Start a child and wait until its ``setup`` ran; a failing setup is fatal."""
        source = self.source
        child = _Child(self)
        with self._children_lock:
            self._children.add(child)
        if self._aborted:
            child.kill()
            raise BufferShutdown
        deadline = time.monotonic() + _START_TIMEOUT_S
        msg: Any = None
        lost: _Lost | None = None
        while msg is None and lost is None:
            try:
                msg = child.receive(source.stop, None)
            except _Lost as exc:
                lost = exc
            if msg is None and time.monotonic() > deadline:
                lost = _Lost(late=True)
        if lost is not None or not isinstance(msg, Ready | SetupFailed):
            self._forget(child)
            error = WorkerCrashed(source.name, child.pid, child.proc.exitcode)
            if self.start_method != "fork":
                error.add_note(
                    "the worker died while starting; under spawn and forkserver it imports "
                    "the main module, so a script must keep its top level under "
                    "if __name__ == '__main__':"
                )
            source.fatal(StageFailed(source.name, None, 0, error))
            raise BufferShutdown from lost
        if isinstance(msg, SetupFailed):
            self._forget(child)
            source.fatal(StageFailed(source.name, None, 0, _revive(msg.error, msg.text)))
            raise BufferShutdown
        return child

    def _forget(self, child: _Child, *, gracefully: bool = False) -> None:
        with self._children_lock:
            self._children.discard(child)
        if gracefully:
            child.leave()
        else:
            child.kill()

    def _replace_child(self, child: _Child) -> _Child:
        self._forget(child)
        return self._new_child()

    # -- the driver thread ----------------------------------------------------------------------
    def _drive(self, slot: Slot) -> None:
        """Take units, keep up to two in flight to the child, complete them in order."""
        source = self.source
        eof = False
        child: _Child | None = None
        depth = 1 if source.spec.timed or source.spec.cancellable else 2
        pending: deque[_Flight] = deque()  # posted to the child, not yet completed
        later: deque[Unit] = deque()  # handed back by release(): same key, runs next
        held: _Flight | None = None  # too large to post while another flight runs
        ended = False
        retiring = False
        try:
            child = self._new_child()
            while True:
                # keep the child busy: post a unit, and a second (small) one behind it
                while held is None and len(pending) < depth and (later or not ended):
                    budget = self._budget(child)
                    if budget == 0:
                        break
                    if later:
                        unit: Unit | None = later.popleft()
                    else:
                        # a shrink takes effect within one unit: stop taking, finish what
                        # is in flight, then leave
                        if retiring or self._should_retire(slot):
                            retiring = True
                            break
                        unit = source.take(limit=budget, wait=not pending)
                    if unit is None:
                        ended = True
                    elif unit is WOKEN:
                        if pending:
                            break
                        continue
                    else:
                        flight = _Flight(
                            list(unit.items), unit, unit.attempt, timeout_of(source, unit)
                        )
                        self._prepare(child, flight)
                        if pending and len(flight.data) > _PIPELINE_BYTES:
                            held = flight
                        else:
                            self._post(child, flight)
                            pending.append(flight)
                if not pending:
                    if held is not None:
                        self._post(child, held)
                        pending.append(held)
                        held = None
                        continue
                    if retiring:
                        return
                    if ended:
                        eof = True
                        return
                    if self.recycle_after is not None and self._budget(child) == 0:
                        child = self._recycle(child)
                    continue
                flight = pending[0]
                slot.unit = flight.unit
                child = self._await(child, flight)
                pending.popleft()
                child, outs = self._finish(child, flight, pending)
                slot.unit = None
                assert flight.unit is not None
                source.complete(flight.unit, outs)
                nxt = source.release(flight.unit)
                if nxt is not None:
                    later.append(nxt)
        except BufferShutdown:
            pass
        except BaseException as exc:  # a bug of ours
            source.fatal(exc)
        finally:
            slot.unit = None
            if child is not None:
                self._forget(child, gracefully=not self._aborted and not source.stop.is_set())
            if not retiring:
                self._leave(slot, eof)
            else:
                self._leave(slot, False)

    def _budget(self, child: _Child) -> int | None:
        """How many items the next unit may hold: what the source's timing allows, no more
        than about ``_UNIT_BYTES`` pickled, and (0 when) the child is due to be recycled."""
        limit = self.source.unit_limit()
        if self._item_bytes is not None:
            limit = max(1, min(limit, int(_UNIT_BYTES / max(self._item_bytes, 1.0))))
        if self.recycle_after is not None:
            limit = min(limit, max(0, self.recycle_after - child.items_posted))
        return limit

    def _recycle(self, old: _Child) -> _Child:
        """A fresh child first, then the old one leaves (running its teardown)."""
        new = self._new_child()
        self._forget(old, gracefully=True)
        return new

    def _prepare(self, child: _Child, flight: _Flight) -> None:
        """Number the flight for ``child`` and pickle it, standing in for unpicklable items."""
        flight.id = child.next_id
        flight.owner = child
        child.next_id += 1
        try:
            flight.data = dumps(Run(flight.id, flight.items))
        except Exception:  # pickling fails in many ways: find the items at fault
            self._stand_in(flight, [i for i, x in enumerate(flight.items) if not pickles(x)])
        per_item = len(flight.data) / max(1, len(flight.items))
        seen = self._item_bytes
        self._item_bytes = per_item if seen is None else seen * 0.7 + per_item * 0.3

    def _stand_in(self, flight: _Flight, bad: list[int]) -> None:
        """Replace the items at ``bad`` by a stand-in the child skips (they fail here)."""
        flight.unsendable = sorted(set(flight.unsendable) | set(bad))
        for i in flight.unsendable:
            flight.items[i] = UNSENDABLE
        flight.data = dumps(Run(flight.id, flight.items))

    def _post(self, child: _Child, flight: _Flight) -> None:
        if flight.owner is not child:  # numbered for a child that was replaced since
            self._prepare(child, flight)
        child.send_bytes(flight.data)
        child.flights[flight.id] = flight
        child.expect.append(flight.id)
        child.items_posted += len(flight.items)
        flight.answer = None

    def _await(self, child: _Child, flight: _Flight) -> _Child:
        """Receive answers until ``flight`` has its own; replace the child (and send its
        unanswered flights again) as often as it dies on the way."""
        while flight.answer is None:
            limits = [f.timeout_s for f in child.flights.values() if f.timeout_s is not None]
            try:
                msg = child.receive(self.source.stop, min(limits) if limits else None)
            except _Lost as lost:
                child = self._recover(child, lost)
                continue
            whose = child.flights.get(child.expect.popleft()) if child.expect else None
            if whose is None:
                raise RuntimeError(f"worker {child.pid} answered when nothing was asked")
            if isinstance(msg, Answer) and msg.unit_id == whose.id:
                del child.flights[whose.id]
                whose.answer = msg
            elif msg is None and not whose.explained:
                # the answer pickled there but cannot be read here: ask for it again, with
                # every item's outputs checked there
                whose.explained = True
                child.send(Explain(whose.id))
                child.expect.append(whose.id)
            elif msg is None or (isinstance(msg, Unreadable) and whose.explained):
                # even checked, it cannot be read here: every item of the unit fails
                del child.flights[whose.id]
                whose.answer = Answer(whose.id, [], self._all_fail(whose, msg), 0.0)
            elif isinstance(msg, Unreadable):
                self._unreadable(child, whose)
            else:
                raise RuntimeError(f"worker {child.pid} answered out of turn: {msg!r:.200}")
        return child

    def _all_fail(self, flight: _Flight, msg: Any) -> list[Failure]:
        reason = TypeError(msg.reason if isinstance(msg, Unreadable) else "it does not unpickle")
        return [
            Failure(i, 0, ItemNotSendable("a result", flight.unit_item(i), reason), "")
            for i in range(len(flight.items))
            if flight.items[i] is not UNSENDABLE
        ]

    def _unreadable(self, child: _Child, flight: _Flight) -> None:
        """The child could not unpickle the flight: find the items that do not survive a
        round trip, stand them in, and send the flight again."""
        bad = [i for i, x in enumerate(flight.items) if x is not UNSENDABLE and not pickles(x)]
        if not bad:  # nothing to blame here: every item fails alike
            bad = list(range(len(flight.items)))
        del child.flights[flight.id]
        self._stand_in(flight, bad)
        self._post(child, flight)

    def _recover(self, child: _Child, lost: _Lost) -> _Child:
        """The child died (or was late): blame the item it was on, let the source decide, and
        send every unanswered flight to a fresh child."""
        source = self.source
        unit_id, index = child.progress[child_side.UNIT], child.progress[child_side.INDEX]
        flights = sorted(child.flights.values(), key=lambda f: f.id)
        blamed = child.flights.get(unit_id)
        if child.cancelled is not None:
            error: BaseException = child.cancelled
        elif lost.late:
            limit = (blamed.timeout_s if blamed is not None else None) or 0.0
            error = ItemTimeout(source.name, limit)
        else:
            error = WorkerCrashed(source.name, child.pid, child.proc.exitcode)
        child.flights.clear()
        child.expect.clear()
        new = self._replace_child(child)
        # the flight it was on; if it died before starting any, the first one's first item
        if blamed is None or not 0 <= index < len(blamed.items):
            blamed, index = flights[0], 0
        delay = source.on_failure(blamed.unit_item(index), error, blamed.attempt)
        if delay is None:  # settled: the others go again
            blamed.items[index] = UNSENDABLE
        else:
            blamed.attempt += 1
            self._pause(delay)
        for flight in flights:
            self._prepare(new, flight)  # again: a stand-in may have replaced an item
            self._post(new, flight)
        return new

    def _finish(
        self, child: _Child, flight: _Flight, pending: deque[_Flight]
    ) -> tuple[_Child, list[Any]]:
        """The outputs of an answered flight, its failed items settled in their places."""
        answer = flight.answer
        assert answer is not None
        outs = answer.outputs
        self.source.measured(len(flight.items), answer.seconds)
        settled = [(f.which, f.position, _revive(f.error, f.text)) for f in answer.failures]
        for i in flight.unsendable:
            start = next((pos for j, pos, _ in settled if j > i), len(outs))
            why = TypeError("it does not pickle")
            settled.append((i, start, ItemNotSendable("an item", flight.unit_item(i), why)))
        if not settled:
            return child, outs
        settled.sort(key=lambda f: f[0])
        # retries need the child to themselves: take the answers of the flights behind first
        for other in pending:
            child = self._await(child, other)
        shift = 0
        for index, position, error in settled:
            child, extra = self._settle(
                child, flight.unit_item(index), error, flight.attempt, flight.timeout_s
            )
            outs[position + shift : position + shift] = extra
            shift += len(extra)
        return child, outs

    def _settle(
        self,
        child: _Child,
        item: Any,
        error: BaseException,
        attempt: int,
        timeout_s: float | None,
    ) -> tuple[_Child, list[Any]]:
        """Let the source decide about one failed item, trying it again on a child while it
        says so."""
        source = self.source
        while True:
            delay = source.on_failure(item, error, attempt)
            if delay is None:
                return child, []
            self._pause(delay)
            attempt += 1
            retry = _Flight([item], None, attempt, timeout_s)
            self._prepare(child, retry)
            self._post(child, retry)
            child = self._await(child, retry)
            answer = retry.answer
            assert answer is not None
            if retry.unsendable:
                error = ItemNotSendable("an item", item, TypeError("it does not pickle"))
            elif answer.failures:
                f = answer.failures[0]
                error = _revive(f.error, f.text)
            else:
                return child, answer.outputs

    def _pause(self, delay: float) -> None:
        if delay > 0 and self.source.clock.wait(self.source.stop, delay):
            raise BufferShutdown


def _revive(error: Any, text: str) -> BaseException:
    """An exception from the child, with the child's traceback as its cause."""
    revived: BaseException = (
        error if isinstance(error, BaseException) else RemoteError(type(error).__name__, str(error))
    )
    if text and revived.__cause__ is None:
        revived.__cause__ = _RemoteTraceback(text)
    return revived
