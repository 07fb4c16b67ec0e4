"""The child side of the process kind: what runs in a worker process.

A child builds its work from the payload (the user's function, or ``Stage``), sets it up, and
then answers ``Run`` messages until it is told to leave or its driver's pipe ends. It also
watches a *lifeline* pipe whose only writer is the parent: end-of-file there means the parent
is gone, and the child exits at once.

Everything the user's code raises is that item's failure, ``BaseException`` included (a
``SystemExit`` or ``KeyboardInterrupt`` from a function must not end the worker). An exception
travels back as itself when it survives a pickle round trip here, else as a
:class:`RemoteError` naming its type; its traceback always travels as text.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ..._errors import ItemNotSendable, RemoteError
from .. import shipping
from ..source import EACH, FILTER, MAP
from ..waiting import poll_briefly
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

#: progress slots shared with the driver: the unit running, the item's index in it, and when
#: that item started (``time.monotonic_ns``; the same clock in every process of the machine)
UNIT, INDEX, STARTED = 0, 1, 2
PROGRESS_SLOTS = 3
#: answers kept for an ``Explain``: the driver keeps at most two units in flight
_KEPT = 2


def portable(exc: BaseException) -> tuple[Any, str]:
    """The exception itself if it survives a pickle round trip, else a RemoteError naming its
    type; plus its traceback text."""
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))
        return exc, text
    except Exception:
        return RemoteError(type(exc).__name__, str(exc)), text


def _run_items(
    work: Any, mode: str, unit_id: int, items: list[Any], progress: Any
) -> tuple[list[Any], list[Failure], list[int]]:
    """Run ``items``; return the outputs, the failures and where each item's outputs start."""
    call = work.call
    out: list[Any] = []
    append = out.append
    failures: list[Failure] = []
    starts: list[int] = []
    clock = time.monotonic_ns
    progress[UNIT] = unit_id
    for i, item in enumerate(items):
        progress[INDEX] = i
        progress[STARTED] = clock()
        starts.append(len(out))
        if item is UNSENDABLE:
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
        except BaseException as exc:
            error, text = portable(exc)
            failures.append(Failure(i, len(out), error, text))
    return out, failures, starts


def _answer(
    unit_id: int,
    out: list[Any],
    failures: list[Failure],
    starts: list[int],
    seconds: float,
    *,
    checked: bool = False,
) -> bytes:
    """The answer, pickled. ``checked``: every item's outputs are first tried with a pickle
    round trip, and those that do not survive become that item's failure."""
    if not checked:
        try:
            return dumps(Answer(unit_id, out, failures, seconds))
        except Exception:
            pass  # some result does not pickle: find whose
    kept: list[Any] = []
    settled: list[Failure] = []
    failed = {f.which: f for f in failures}
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(out)
        outputs = out[start:end]
        if not pickles(outputs):
            culprit = next((o for o in outputs if not pickles(o)), outputs)
            if i not in failed:
                reason = _why_not(culprit)
                error = ItemNotSendable("a result", culprit, reason)
                settled.append(Failure(i, len(kept), error, ""))
                continue
        if i in failed:
            f = failed[i]
            settled.append(Failure(i, len(kept), f.error, f.text))
        kept.extend(outputs)
    return dumps(Answer(unit_id, kept, settled, seconds))


def _why_not(value: Any) -> BaseException:
    try:
        pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        return exc
    return TypeError("it does not pickle")


def _watch_lifeline(lifeline: Connection) -> None:
    # the parent never writes here: end-of-file means it is gone
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(70)


class Setting(NamedTuple):
    """The parent's environment when the pool started: what a process started then by the
    parent would have inherited."""

    environ: dict[str, str]
    path: list[str]
    cwd: str


def _take(setting: Setting | None) -> None:
    if setting is None:
        return
    if dict(os.environ) != setting.environ:
        os.environ.clear()
        os.environ.update(setting.environ)
    sys.path[:] = setting.path
    with contextlib.suppress(OSError):  # gone since: the child stays where it is
        os.chdir(setting.cwd)


def child_main(
    payload: bytes,
    conn: Connection,
    lifeline: Connection,
    inherited_writer: Connection | None,
    progress: Any,
    setting: Setting | None = None,
) -> None:
    # the parent decides when its workers stop: Ctrl-C in a terminal reaches the whole group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _take(setting)  # before the payload: its modules may be found through the parent's path
    if inherited_writer is not None:  # under fork, our copy of the parent's end
        inherited_writer.close()
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    try:
        make_work, mode = shipping.loads(payload)
        work = make_work()
        work.setup()
    except BaseException as exc:
        conn.send_bytes(dumps(SetupFailed(*portable(exc))))
        return
    conn.send_bytes(dumps(Ready(os.getpid())))
    recent: deque[tuple[int, list[Any], list[Failure], list[int], float]] = deque(maxlen=_KEPT)
    # the next unit often comes within moments of the last answer: look before sleeping
    arrivals = select.poll()
    arrivals.register(conn.fileno(), select.POLLIN)
    try:
        while True:
            try:
                poll_briefly(arrivals, None)
                data = conn.recv_bytes()
            except EOFError:
                break
            try:
                msg = pickle.loads(data)
            except Exception as exc:
                conn.send_bytes(dumps(Unreadable(f"{type(exc).__name__}: {exc}")))
                continue
            if isinstance(msg, Run):
                t0 = time.perf_counter()
                out, failures, starts = _run_items(work, mode, msg.unit_id, msg.items, progress)
                seconds = time.perf_counter() - t0
                recent.append((msg.unit_id, out, failures, starts, seconds))
                conn.send_bytes(_answer(msg.unit_id, out, failures, starts, seconds))
            elif isinstance(msg, Explain):
                kept = next((r for r in recent if r[0] == msg.unit_id), None)
                if kept is None:
                    conn.send_bytes(dumps(Unreadable(f"unit {msg.unit_id} is not kept")))
                else:
                    conn.send_bytes(_answer(*kept, checked=True))
            elif isinstance(msg, Leave):
                break
    finally:
        try:
            work.teardown()
        except Exception:
            traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send_bytes(dumps(Bye()))
        if inherited_writer is not None:
            # a forked child of a threaded parent can hang in interpreter shutdown on a lock
            # some parent thread held at the fork; its work is done, so leave directly
            os._exit(0)
