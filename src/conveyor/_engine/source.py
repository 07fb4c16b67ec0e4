"""What a worker kind runs: work it is given by a *source*.

A worker kind (thread, process, async) only decides where the user's code runs. What to run,
what a result means and what a failure leads to belong to whoever hands it the work. Three
things do: a pipeline's :class:`~conveyor._engine.step.Step` (the items between two buffers), a
task worker's claimed jobs, and a dispatcher's producers and subscriptions. Each is a
:class:`Source`; every kind takes units from any of them, so crash handling, timeouts,
replacement of stuck or dead workers, recycling and rate limits are written once, in the kinds.

The conversation, for one unit:

1. ``take()`` gives a :class:`Unit` (a list of items; ``None`` at the end of the input,
   :data:`WOKEN` when the pool should look at its orders).
2. The kind runs ``work.call(item)`` for each item on one worker (``work`` is what
   ``spec.make_work()`` built for that worker: ``setup`` before its first item, ``teardown``
   after its last). A call that raises, runs past its time or kills its worker is reported
   with ``on_failure(item, error, attempt)``: the source decides, and answers with a delay
   before the kind tries the item again, or ``None`` when the item is settled (the source has
   dealt with it: skipped it, dead-lettered it, sent it back to its queue).
3. ``complete(unit, outputs)`` hands on what the unit's items gave (see ``spec.mode``), then
   ``release(unit)`` lets the source hand back the next unit that must run on the same worker
   (the next items of its keys), if any.

``measured`` feeds the source the time a unit took; ``fatal`` reports a fault of the engine
itself; ``close_output`` says that the last worker has left after the end of the input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from .clock import Clock
from .stats import LatencyRing

#: what a call's result means: ``map`` emits it, ``filter`` emits the item when it is true,
#: ``flat_map`` emits each element of it, ``each`` emits nothing
MAP = "map"
FILTER = "filter"
FLAT = "flat_map"
EACH = "each"
MODES = (MAP, FILTER, FLAT, EACH)
#: unordered flat_map outputs are handed on in pieces of this size
FLUSH_OUTPUTS = 1024
#: how long one unit of work should take; units of fast items grow until they take about this
TARGET_UNIT_S = 0.002
MAX_UNIT = 2048


class Work(Protocol):
    """What one worker runs: ``setup`` before its first item, ``call`` per item, ``teardown``."""

    def setup(self) -> Any: ...

    def call(self, item: Any) -> Any: ...

    def teardown(self) -> Any: ...


@dataclass(frozen=True)
class StepSpec:
    """How a source wants its work run: by which kind, on how many workers, doing what."""

    name: str
    kind: str
    mode: str
    workers: int
    make_work: Callable[[], Work]
    ordered: bool = False
    key: Callable[[Any], Hashable] | None = None
    policy: Any = "raise"
    #: the time limit of each item, unless its unit says otherwise (``Unit.timeout_s``)
    timeout_s: float | None = None
    rate: float | None = None
    window: int = 1024
    options: tuple[tuple[str, Any], ...] = ()
    #: True when some units carry their own time limit (the kinds then watch every item)
    timed_units: bool = False
    #: True when a unit may be ended from outside while it runs (``WorkerPool.cancel``)
    cancellable: bool = False

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def timed(self) -> bool:
        """Whether any item of this source has a time limit."""
        return self.timeout_s is not None or self.timed_units


class Unit:
    """Items taken together, run one after another on one worker.

    ``seq`` orders the units of an ordered step; ``keys`` are the keys the unit holds (a keyed
    step) and ``item_keys`` each item's key (items of one key must run in order; items of
    different keys may run at once, as the async kind does); ``timeout_s`` overrides the spec's
    time limit for each of its items; ``ref`` is the source's own (the job a unit stands for,
    say): kinds never look at it and never send it to another process."""

    __slots__ = ("attempt", "item_keys", "items", "keys", "ref", "seq", "started", "timeout_s")

    def __init__(self, seq: int, items: list[Any]) -> None:
        self.seq = seq
        self.items = items
        self.keys: tuple[Hashable, ...] = ()
        self.item_keys: list[Hashable] | None = None
        self.attempt = 1
        self.started = 0.0
        self.timeout_s: float | None = None
        self.ref: Any = None


#: returned by ``take`` when the pool was kicked (it wants its workers to look at their orders)
WOKEN = Unit(-2, [])


class Source(Protocol):
    """Where a worker kind's units come from and where their outcomes go (see the module)."""

    spec: StepSpec
    name: str
    mode: str
    #: set when the work must stop now; kinds unwind their workers
    stop: threading.Event
    clock: Clock
    latency: LatencyRing
    #: how long a unit should take (a kind whose hand-off costs more raises it)
    target_unit_s: float

    def take(self, limit: int | None = None, wait: bool = True) -> Unit | None: ...

    def unit_limit(self) -> int: ...

    def kick(self) -> None:
        """Wake workers waiting in ``take`` (they get :data:`WOKEN`)."""
        ...

    def apply(self, item: Any, result: Any, out: list[Any]) -> None: ...

    def on_failure(self, item: Any, error: BaseException, attempt: int) -> float | None: ...

    def complete(self, unit: Unit, outputs: list[Any]) -> None: ...

    def emit_early(self, outputs: list[Any]) -> None: ...

    def release(self, unit: Unit) -> Unit | None: ...

    def measured(self, n_items: int, seconds: float) -> None: ...

    def fatal(self, error: BaseException) -> None: ...

    def close_output(self) -> None: ...


class UnitSizer:
    """How many items a unit should hold so that it takes about ``target_unit_s``: many fast
    items, or one slow one. It learns from the time each finished unit took (smoothed), so a
    hand-off's cost is paid once per unit while a slow item never waits behind many."""

    __slots__ = ("item_s", "target_unit_s")

    def __init__(self, target_unit_s: float = TARGET_UNIT_S) -> None:
        self.target_unit_s = target_unit_s
        #: seconds per item, smoothed; None until a unit has finished
        self.item_s: float | None = None

    def limit(self) -> int:
        item_s = self.item_s
        if item_s is None:
            return 1
        return max(1, min(MAX_UNIT, int(self.target_unit_s / max(item_s, 1e-9))))

    def measured(self, n_items: int, seconds: float) -> float | None:
        """Learn from a finished unit; returns its seconds per item (None for no items)."""
        if n_items <= 0:
            return None
        per = seconds / n_items
        prev = self.item_s
        self.item_s = per if prev is None else prev * 0.7 + per * 0.3
        return per


def apply_result(mode: str, item: Any, result: Any, out: list[Any]) -> None:
    """Add what ``result`` (of the user's function on ``item``) means to ``out``."""
    if mode == MAP:
        out.append(result)
    elif mode == FILTER:
        if result:
            out.append(item)
    elif mode == FLAT and result is not None:
        out.extend(result)


def timeout_of(source: Source, unit: Unit) -> float | None:
    """The time limit of each item of ``unit``."""
    return unit.timeout_s if unit.timeout_s is not None else source.spec.timeout_s
