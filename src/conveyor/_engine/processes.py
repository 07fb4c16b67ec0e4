"""The process worker kind: each worker is a child process fed by a driver thread.

The parent keeps everything that must be shared or decided in one place: taking units from the
step (so ``rate``, order and keys work as for any kind), the failure policy, the statistics. A
child only runs the user's function over the units it is sent and answers with their outputs.

What crosses the pipe
---------------------
The stage's work (the function, or the ``Stage`` instance or class) is pickled once with
cloudpickle (:mod:`.shipping`), so lambdas and closures travel under ``spawn`` and
``forkserver`` too, and a traceback from the child names the user's file and line. Units and
results use the standard pickle. A unit is as large as about 50 ms of work (measured in the child
and fed back), so tiny items are cheap and a slow item travels alone.

When things go wrong
--------------------
* An item raises in the child: the exception (with its traceback text) comes back and the
  parent applies the stage's policy; a retry runs on the same child.
* An item cannot be pickled, or its result cannot: that item fails with
  :class:`ItemNotSendable`, naming its type; the other items of the unit go on.
* The child dies (a signal, ``os._exit``, a segfault) or runs past ``timeout_s`` (then the parent
  kills it): a fresh child replaces it, and the item it was on fails with
  :class:`WorkerCrashed` or :class:`ItemTimeout`. The unit is sent again to the new child unless
  the policy settles that item otherwise; results the dead child had not sent are recomputed, so
  every item's outputs are emitted exactly once.
* The parent dies: every child holds the read end of a *lifeline* pipe whose only writer is the
  parent, and exits as soon as it reads end-of-file there.
* The run is torn down (a failure, Ctrl-C): every child is killed at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any, ClassVar

from .._errors import (
    ConfigurationError,
    ItemNotSendable,
    ItemTimeout,
    RemoteError,
    StageFailed,
    WorkerCrashed,
)
from . import shipping
from .buffer import BufferShutdown
from .pool import Slot, SlotPool, register_kind
from .step import EACH, FILTER, MAP, WOKEN, StepSpec, Unit

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
_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: how long a child may take to start, set up, or tear down and leave
_START_TIMEOUT_S = 60.0
_LEAVE_TIMEOUT_S = 10.0
#: how often a waiting driver looks at the run's stop event
_SLICE_S = 0.25


class _Unsendable:
    """Stands in a unit for an item that could not be pickled; the child skips it."""

    def __reduce__(self) -> str:
        # unpickles as the module's one instance, so the child can test with `is`
        return "_UNSENDABLE"


_UNSENDABLE = _Unsendable()


# -- the child side -----------------------------------------------------------------------------


class _RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of an exception sent back."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the worker process:\n{self.text}"


def _portable(exc: BaseException) -> tuple[Any, str]:
    """The exception itself if it pickles, else a RemoteError; plus its traceback text."""
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.dumps(exc, _PROTOCOL)
        return exc, text
    except Exception:
        return RemoteError(type(exc).__name__, str(exc)), text


def _run_items(
    work: Any, mode: str, items: list[Any], progress: Any
) -> tuple[list[Any], list[tuple[int, int, Any, str]], list[int]]:
    """Run ``items``; return the outputs, the failures ``(index, position in outputs, error,
    traceback)`` and where each item's outputs start."""
    call = work.call
    out: list[Any] = []
    append = out.append
    failures: list[tuple[int, int, Any, str]] = []
    starts: list[int] = []
    for i, item in enumerate(items):
        progress[1] = i
        starts.append(len(out))
        if item is _UNSENDABLE:
            continue
        try:
            if mode == MAP:
                append(call(item))
            elif mode == FILTER:
                if call(item):
                    append(item)
            elif mode == EACH:
                call(item)
            else:
                res = call(item)
                if res is not None:
                    out.extend(res)
        except Exception as exc:
            error, text = _portable(exc)
            failures.append((i, len(out), error, text))
    return out, failures, starts


def _answer(
    unit_id: int,
    out: list[Any],
    failures: list[tuple[int, int, Any, str]],
    starts: list[int],
    seconds: float,
) -> bytes:
    try:
        return pickle.dumps(("ok", unit_id, out, failures, seconds), _PROTOCOL)
    except Exception:
        pass
    # some result does not pickle: find whose, and turn those items into failures
    kept: list[Any] = []
    bad: list[tuple[int, int, Any, str]] = []
    failed = {f[0] for f in failures}
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(out)
        outputs = out[start:end]
        try:
            pickle.dumps(outputs, _PROTOCOL)
        except Exception as exc:
            culprit = next((o for o in outputs if not _pickles(o)), outputs)
            if i not in failed:
                error = ItemNotSendable("a result", culprit, exc)
                bad.append((i, len(kept), error, ""))
            continue
        # an item's failure position moves with the outputs removed before it
        for f in failures:
            if f[0] == i:
                bad.append((i, len(kept), f[2], f[3]))
        kept.extend(outputs)
    bad.sort(key=lambda f: f[0])
    return pickle.dumps(("ok", unit_id, kept, bad, seconds), _PROTOCOL)


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value, _PROTOCOL)
        return True
    except Exception:
        return False


def _watch_lifeline(lifeline: Connection) -> None:
    # the parent never writes here: end-of-file means it is gone
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(70)


def _child_main(
    payload: bytes,
    conn: Connection,
    lifeline: Connection,
    inherited_writer: Connection | None,
    progress: Any,
) -> None:
    # the parent decides when its workers stop: Ctrl-C in a terminal reaches the whole group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if inherited_writer is not None:  # under fork, our copy of the parent's end
        inherited_writer.close()
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    try:
        make_work, mode = shipping.loads(payload)
        work = make_work()
        work.setup()
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("setup_failed", *_portable(exc)), _PROTOCOL))
        return
    conn.send_bytes(pickle.dumps(("ready", os.getpid()), _PROTOCOL))
    try:
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except EOFError:
                break
            if msg is None:
                break
            unit_id, items = msg
            progress[0] = unit_id
            t0 = time.perf_counter()
            out, failures, starts = _run_items(work, mode, items, progress)
            seconds = time.perf_counter() - t0
            conn.send_bytes(_answer(unit_id, out, failures, starts, seconds))
    finally:
        try:
            work.teardown()
        except Exception:
            traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(("bye",), _PROTOCOL))
        if inherited_writer is not None:
            # a forked child of a threaded parent can hang in interpreter shutdown on a lock
            # some parent thread held at the fork; its work is done, so leave directly
            os._exit(0)


# -- the parent side ----------------------------------------------------------------------------


class _Lost(Exception):
    """The child died, or ran past its time."""

    def __init__(self, late: bool) -> None:
        self.late = late


class _Flight:
    """Items sent to a child as one message, and, once it came back, the child's answer."""

    __slots__ = ("answer", "attempt", "data", "id", "items", "owner", "unit", "unsendable")

    def __init__(self, items: list[Any], unit: Unit | None, attempt: int) -> None:
        self.items = items
        self.unit = unit
        self.attempt = attempt
        self.id = -1
        self.owner: object = None
        self.data = b""
        self.unsendable: list[int] = []
        self.answer: Any = None

    def unit_item(self, index: int) -> Any:
        """The item as the user gave it (``items`` may hold a stand-in)."""
        return self.unit.items[index] if self.unit is not None else self.items[index]


class _Child:
    def __init__(self, pool: ProcessPool) -> None:
        ctx = pool.ctx
        parent_end, child_end = ctx.Pipe(duplex=True)
        life_reader, life_writer = ctx.Pipe(duplex=False)
        self.progress = ctx.RawArray("q", 2)
        self.proc = ctx.Process(
            target=_child_main,
            args=(
                pool.payload,
                child_end,
                life_reader,
                life_writer if pool.start_method == "fork" else None,
                self.progress,
            ),
            name=f"conveyor:{pool.step.name}",
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
        #: flights sent and not yet answered, oldest first (the child answers in order)
        self.fifo: deque[_Flight] = deque()

    def send(self, msg: Any) -> None:
        self.conn.send_bytes(pickle.dumps(msg, _PROTOCOL))

    def receive(self, stop: threading.Event, deadline: float | None) -> Any:
        """The child's next message; raises :class:`_Lost` if it died or ran out of time."""
        while True:
            if stop.is_set():
                raise BufferShutdown
            wait_s = _SLICE_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise _Lost(late=True)
            ready = wait_any([self.conn, self.proc.sentinel], wait_s)
            if self.conn in ready:
                try:
                    return pickle.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    pass  # the child is gone: its sentinel says how
            elif not ready:
                continue
            if stop.is_set():
                raise BufferShutdown
            self.proc.join(1.0)
            raise _Lost(late=False)

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
            self.send(None)
            deadline = time.monotonic() + _LEAVE_TIMEOUT_S
            while time.monotonic() < deadline:
                if not wait_any([self.conn, self.proc.sentinel], deadline - time.monotonic()):
                    break
                if self.conn.poll():
                    if pickle.loads(self.conn.recv_bytes())[0] == "bye":
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
    # a round trip to a process costs tens of microseconds: tiny items need large units, and
    # a unit is never larger than the inbox's share of one worker
    default_maxsize = 4096
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
                f"stage {spec.name!r} cannot be sent to a worker process: {exc} "
                "(everything a process stage's function refers to must pickle)"
            ) from exc

    def start(self) -> None:
        spec = self.step.spec
        self.start_method: str = spec.option("start_method", DEFAULT_START_METHOD)
        self.ctx = multiprocessing.get_context(self.start_method)
        self.payload = shipping.dumps((spec.make_work, spec.mode))
        self.recycle_after: int | None = spec.option("max_items_per_worker")
        self.step.target_unit_s = UNIT_TARGET_S
        if self.start_method == "forkserver":
            # the server imports conveyor once; every worker it forks then starts at once
            self.ctx.set_forkserver_preload(["conveyor._engine.processes"])
        # pickled bytes per item, smoothed over the units sent: caps units of large items
        self._item_bytes: float | None = None
        self._children: set[_Child] = set()
        self._children_lock = threading.Lock()
        self._aborted = False
        self._begin()

    def _launch(self, slot: Slot, first: tuple[Unit, BaseException] | None) -> None:
        threading.Thread(
            target=self._drive,
            args=(slot,),
            name=f"{self.context.thread_name}:{self.step.name}:{slot.index}",
            daemon=True,
        ).start()

    def abort(self) -> None:
        self._aborted = True
        with self._children_lock:
            children = list(self._children)
        for child in children:
            with contextlib.suppress(Exception):
                child.proc.kill()

    def pids(self) -> list[int]:
        """The process ids of the current workers (for tests and tools)."""
        with self._children_lock:
            return [c.pid for c in self._children if c.pid is not None]

    # -- children -----------------------------------------------------------------------------
    def _new_child(self) -> _Child:
        """Start a child and wait until its ``setup`` ran; a failing setup fails the run."""
        step = self.step
        child = _Child(self)
        with self._children_lock:
            self._children.add(child)
        if self._aborted:
            child.kill()
            raise BufferShutdown
        try:
            msg = child.receive(step.stop, time.monotonic() + _START_TIMEOUT_S)
        except _Lost as lost:
            self._forget(child)
            error = WorkerCrashed(step.name, child.pid, child.proc.exitcode)
            if self.start_method != "fork":
                error.add_note(
                    "the worker died while starting; under spawn and forkserver it imports "
                    "the main module, so a script must keep its top level under "
                    "if __name__ == '__main__':"
                )
            step.fatal(StageFailed(step.name, None, 0, error))
            raise BufferShutdown from lost
        if msg[0] == "setup_failed":
            self._forget(child)
            step.fatal(StageFailed(step.name, None, 0, _revive(msg[1], msg[2])))
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
        step = self.step
        eof = False
        child: _Child | None = None
        depth = 1 if step.spec.timeout_s is not None else 2
        pending: deque[_Flight] = deque()  # posted to the child, not yet completed
        later: deque[Unit] = deque()  # handed back by release(): same key, runs next
        held: _Flight | None = None  # too large to post while another flight runs
        ended = False
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
                        if not pending and self._should_retire(slot):
                            return
                        unit = step.take(limit=budget, wait=not pending)
                    if unit is None:
                        ended = True
                    elif unit is WOKEN:
                        if pending:
                            break
                        continue
                    else:
                        flight = _Flight(list(unit.items), unit, unit.attempt)
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
                step.complete(flight.unit, outs)
                nxt = step.release(flight.unit)
                if nxt is not None:
                    later.append(nxt)
        except BufferShutdown:
            pass
        except BaseException as exc:  # a bug of ours
            step.fatal(exc)
        finally:
            slot.unit = None
            if child is not None:
                self._forget(child, gracefully=not self._aborted and not step.stop.is_set())
            self._leave(slot, eof)

    def _budget(self, child: _Child) -> int | None:
        """How many items the next unit may hold: what the step's timing allows, no more than
        about ``_UNIT_BYTES`` pickled, and (0 when) the child is due to be recycled."""
        limit = self.step.unit_limit()
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
            flight.data = pickle.dumps((flight.id, flight.items), _PROTOCOL)
            flight.unsendable = []
        except Exception:  # pickling fails in many ways: find the items at fault
            flight.unsendable = [i for i, x in enumerate(flight.items) if not _pickles(x)]
            for i in flight.unsendable:
                flight.items[i] = _UNSENDABLE
            flight.data = pickle.dumps((flight.id, flight.items), _PROTOCOL)
        per_item = len(flight.data) / max(1, len(flight.items))
        seen = self._item_bytes
        self._item_bytes = per_item if seen is None else seen * 0.7 + per_item * 0.3

    def _post(self, child: _Child, flight: _Flight) -> None:
        if flight.owner is not child:  # numbered for a child that was replaced since
            self._prepare(child, flight)
        child.conn.send_bytes(flight.data)
        child.fifo.append(flight)
        child.items_posted += len(flight.items)
        flight.answer = None

    def _await(self, child: _Child, flight: _Flight) -> _Child:
        """Receive answers, in order, until ``flight`` has its own; replace the child (and send
        its unanswered flights again) as often as it dies on the way."""
        timeout = self.step.spec.timeout_s
        while flight.answer is None:
            first = child.fifo[0]
            deadline = None
            if timeout is not None:
                deadline = time.monotonic() + timeout * max(1, len(first.items))
            try:
                msg = child.receive(self.step.stop, deadline)
            except _Lost as lost:
                child = self._recover(child, lost)
                continue
            child.fifo.popleft()
            if msg[0] != "ok" or msg[1] != first.id:
                raise RuntimeError(f"worker answered out of turn: {msg[:2]!r}")
            first.answer = msg
        return child

    def _recover(self, child: _Child, lost: _Lost) -> _Child:
        """The child died (or was late): blame the item it was on, let the policy decide, and
        send every unanswered flight to a fresh child."""
        step = self.step
        unit_id, index = child.progress[0], child.progress[1]
        if lost.late:
            error: BaseException = ItemTimeout(step.name, step.spec.timeout_s or 0.0)
        else:
            error = WorkerCrashed(step.name, child.pid, child.proc.exitcode)
        flights = list(child.fifo)
        child.fifo.clear()
        new = self._replace_child(child)
        # the flight it was on; if it died before starting any, the first one's first item
        blamed = next((f for f in flights if f.id == unit_id), None)
        if blamed is None or not 0 <= index < len(blamed.items):
            blamed, index = flights[0], 0
        delay = step.on_failure(blamed.items[index], error, blamed.attempt)
        if delay is None:  # skipped or dead-lettered: the others go again
            blamed.items[index] = _UNSENDABLE
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
        _, _, outs, failures, seconds = flight.answer
        self.step.measured(len(flight.items), seconds)
        settled = [(i, pos, _revive(error, text)) for i, pos, error, text in failures]
        for i in flight.unsendable:
            start = next((pos for j, pos, _ in settled if j > i), len(outs))
            settled.append((i, start, ItemNotSendable("an item", flight.unit_item(i), TypeError())))
        if not settled:
            return child, outs
        settled.sort(key=lambda f: f[0])
        # retries need the child to themselves: take the answers of the flights behind first
        for other in pending:
            child = self._await(child, other)
        shift = 0
        for index, position, error in settled:
            child, extra = self._settle(child, flight.unit_item(index), error, flight.attempt)
            outs[position + shift : position + shift] = extra
            shift += len(extra)
        return child, outs

    def _settle(
        self, child: _Child, item: Any, error: BaseException, attempt: int
    ) -> tuple[_Child, list[Any]]:
        """Apply the policy to one failed item, retrying it on a child while it says so."""
        step = self.step
        while True:
            delay = step.on_failure(item, error, attempt)
            if delay is None:
                return child, []
            self._pause(delay)
            attempt += 1
            retry = _Flight([item], None, attempt)
            self._prepare(child, retry)
            self._post(child, retry)
            child = self._await(child, retry)
            _, _, outs, failures, _seconds = retry.answer
            if retry.unsendable:
                error = ItemNotSendable("an item", item, TypeError())
            elif failures:
                error = _revive(failures[0][2], failures[0][3])
            else:
                return child, outs

    def _pause(self, delay: float) -> None:
        if delay > 0 and self.step.clock.wait(self.step.stop, delay):
            raise BufferShutdown


def _revive(error: Any, text: str) -> BaseException:
    """An exception from the child, with the child's traceback as its cause."""
    revived: BaseException = (
        error if isinstance(error, BaseException) else RemoteError(type(error).__name__, str(error))
    )
    if text and revived.__cause__ is None:
        revived.__cause__ = _RemoteTraceback(text)
    return revived
