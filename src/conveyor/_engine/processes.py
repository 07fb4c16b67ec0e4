"""The process worker kind: each worker is a child process fed by a driver thread.

The parent keeps everything that must be shared or decided in one place: taking units from the
step (so ``rate``, order and keys work as for any kind), the failure policy, the statistics. A
child only runs the user's function over the units it is sent and answers with their outputs.

What crosses the pipe
---------------------
The stage's work (the function, or the ``Stage`` instance or class) is pickled once with
cloudpickle, so lambdas and closures travel under ``spawn`` and ``forkserver`` too. Units and
results use the standard pickle. A unit is as large as about 20 ms of work (measured in the child
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
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any, ClassVar

import cloudpickle

from .._errors import (
    ConfigurationError,
    ItemNotSendable,
    ItemTimeout,
    RemoteError,
    StageFailed,
    WorkerCrashed,
)
from .buffer import BufferShutdown
from .pool import Slot, SlotPool, register_kind
from .step import EACH, FILTER, MAP, WOKEN, StepSpec, Unit

log = logging.getLogger("conveyor")

DEFAULT_START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
#: how long a unit of a process stage should take: long enough that the pipe's round trip is
#: small beside it, short enough that a slow item does not wait behind many
UNIT_TARGET_S = 0.02
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
        make_work, mode = cloudpickle.loads(payload)
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
    """The child died, or ran past its time; ``index`` is the item it was on."""

    def __init__(self, index: int, error: BaseException) -> None:
        self.index = index
        self.error = error


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
        self.items_done = 0
        self.next_id = 0

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
                    raise _Lost(self.progress[1], TimeoutError())
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
            raise _Lost(self.progress[1], ChildProcessError(self.proc.exitcode))

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
            cloudpickle.dumps((spec.make_work, spec.mode), _PROTOCOL)
        except Exception as exc:
            raise ConfigurationError(
                f"stage {spec.name!r} cannot be sent to a worker process: {exc} "
                "(everything a process stage's function refers to must pickle)"
            ) from exc

    def start(self) -> None:
        spec = self.step.spec
        self.start_method: str = spec.option("start_method", DEFAULT_START_METHOD)
        self.ctx = multiprocessing.get_context(self.start_method)
        self.payload = cloudpickle.dumps((spec.make_work, spec.mode), _PROTOCOL)
        self.recycle_after: int | None = spec.option("max_items_per_worker")
        self.step.target_unit_s = UNIT_TARGET_S
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
        step = self.step
        eof = False
        child: _Child | None = None
        try:
            child = self._new_child()
            while True:
                if self._should_retire(slot):
                    return
                # a unit never runs past the point where the child is due to be recycled
                budget = None
                if self.recycle_after is not None:
                    budget = min(step.unit_limit(), max(1, self.recycle_after - child.items_done))
                unit = step.take(limit=budget)
                if unit is None:
                    eof = True
                    return
                if unit is WOKEN:
                    continue
                while unit is not None:
                    slot.unit = unit
                    child, outs = self._run_unit(child, unit)
                    slot.unit = None
                    step.complete(unit, outs)
                    unit = step.release(unit)
                    if self.recycle_after is not None and child.items_done >= self.recycle_after:
                        child = self._recycle(child)
        except BufferShutdown:
            pass
        except BaseException as exc:  # a bug of ours
            step.fatal(exc)
        finally:
            slot.unit = None
            if child is not None:
                self._forget(child, gracefully=not self._aborted and not step.stop.is_set())
            self._leave(slot, eof)

    def _recycle(self, old: _Child) -> _Child:
        """A fresh child first, then the old one leaves (running its teardown)."""
        new = self._new_child()
        self._forget(old, gracefully=True)
        return new

    def _send_unit(self, child: _Child, items: list[Any]) -> tuple[int, list[int]]:
        """Send ``items``; return the unit's id and the indexes that could not be pickled."""
        unit_id = child.next_id
        child.next_id += 1
        try:
            child.send((unit_id, items))
            return unit_id, []
        except (pickle.PicklingError, TypeError, AttributeError, ValueError):
            bad = [i for i, item in enumerate(items) if not _pickles(item)]
            sendable = [_UNSENDABLE if i in bad else item for i, item in enumerate(items)]
            child.send((unit_id, sendable))
            return unit_id, bad

    def _exchange(
        self, child: _Child, items: list[Any]
    ) -> tuple[list[Any], list[tuple[int, int, BaseException]]]:
        """Run ``items`` on ``child``: their outputs, and the items that failed, as
        ``(index, position in outputs, error)``. Raises :class:`_Lost`."""
        timeout = self.step.spec.timeout_s
        unit_id, unsendable = self._send_unit(child, items)
        deadline = None if timeout is None else time.monotonic() + timeout * len(items)
        msg = child.receive(self.step.stop, deadline)
        if msg[0] != "ok" or msg[1] != unit_id:
            raise RuntimeError(f"worker answered out of turn: {msg[:2]!r}")
        _, _, outs, failures, seconds = msg
        child.items_done += len(items)
        self.step.measured(len(items), seconds)
        settled = [(i, pos, _revive(error, text)) for i, pos, error, text in failures]
        for i in unsendable:
            start = next((pos for j, pos, _ in settled if j > i), len(outs))
            settled.append((i, start, ItemNotSendable("an item", items[i], TypeError())))
        settled.sort(key=lambda f: f[0])
        return outs, settled

    def _run_unit(self, child: _Child, unit: Unit) -> tuple[_Child, list[Any]]:
        """Run a unit to the end, whatever happens to the children on the way."""
        step = self.step
        items = list(unit.items)
        while True:
            try:
                outs, failures = self._exchange(child, items)
                break
            except _Lost as lost:
                child, error = self._lost(child, lost)
                index = lost.index if 0 <= lost.index < len(items) else 0
                delay = step.on_failure(items[index], error, unit.attempt)
                if delay is None:  # skipped or dead-lettered: the others go again
                    items[index] = _UNSENDABLE
                else:
                    unit.attempt += 1
                    self._pause(delay)
        # settle the items that raised, in order, so their outputs keep their places
        shift = 0
        for index, position, error in failures:
            child, extra = self._settle(child, items[index], error, unit.attempt)
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
            try:
                outs, failures = self._exchange(child, [item])
            except _Lost as lost:
                child, error = self._lost(child, lost)
                continue
            if not failures:
                return child, outs
            error = failures[0][2]

    def _lost(self, child: _Child, lost: _Lost) -> tuple[_Child, BaseException]:
        """Replace a dead or late child; return the new one and the error for its item."""
        step = self.step
        if isinstance(lost.error, TimeoutError):
            error: BaseException = ItemTimeout(step.name, step.spec.timeout_s or 0.0)
        else:
            error = WorkerCrashed(step.name, child.pid, child.proc.exitcode)
        return self._replace_child(child), error

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
