"""The worker-kind interface.

A worker kind runs the workers of one :class:`~conveyor._engine.source.Step`. It knows how to start
them, grow and shrink them, tear them down and count them; everything about *what* a step does
(units, order, keys, failures, statistics) lives in the source. A new kind is one module with one
subclass of :class:`WorkerPool`, registered under its name; nothing above the engine changes.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._errors import ConfigurationError
from .source import Source, StepSpec, Unit


@dataclass
class PoolContext:
    """What a pool may need from the run that owns it."""

    #: the event loop async workers run on (started on first use)
    get_loop: Callable[[], asyncio.AbstractEventLoop] | None = None
    thread_name: str = "conveyor"
    extra: dict[str, object] = field(default_factory=dict)


class WorkerPool(ABC):
    """The workers of one source, of one kind."""

    kind: ClassVar[str]
    #: True if the user's callable must be an ``async def`` (False: must not be)
    wants_async: ClassVar[bool] = False
    #: False for kinds that hand each call to something else to run (an executor): a Stage's
    #: setup and teardown would run here, not where its process runs
    runs_here: ClassVar[bool] = True
    #: options (in ``StepSpec.options``) that only this kind understands
    own_options: ClassVar[frozenset[str]] = frozenset()
    #: the inbox capacity when the stage gives no ``maxsize``: a hand-off between threads
    #: costs a wake-up, and an inbox that one unit of fast items empties pays several per
    #: unit; a round trip to a process costs tens of microseconds, so tiny items need large
    #: units, and a unit is never larger than the inbox's share of one worker
    default_maxsize: ClassVar[int] = 4096

    @classmethod
    def validate(cls, spec: StepSpec) -> None:
        """Refuse, when the work is defined (a pipeline built, a task registered), what this
        kind cannot run."""
        for name, _value in spec.options:
            if name not in cls.own_options:
                owners = sorted(k for k, c in KINDS.items() if name in c.own_options)
                where = f"kind={owners[0]!r}" if owners else "no kind"
                raise ConfigurationError(
                    f"stage {spec.name!r}: option {name!r} is for {where}, not kind={cls.kind!r}"
                )

    def __init__(self, source: Source, context: PoolContext) -> None:
        self.source = source
        self.context = context
        #: set once every worker has left (after the end of the input, or a teardown)
        self.gone = threading.Event()

    @abstractmethod
    def start(self) -> None:
        """Start ``source.spec.workers`` workers."""

    @abstractmethod
    def resize(self, n: int) -> None:
        """Grow at once, or shrink by letting workers retire after their current item."""

    @abstractmethod
    def abort(self) -> None:
        """The run is being torn down: stop whatever the buffers cannot reach."""

    def cancel(self, ref: object, error: BaseException) -> bool:
        """End now the unit whose ``ref`` is ``ref``, as its time limit would: its item fails
        with ``error`` (the source decides, as for any failure) and its worker is given up on
        and replaced. Needs ``spec.cancellable``. False if no worker is on that unit (not
        started yet, or over), or this kind cannot end one (an ``async`` coroutine is
        cancelled by the code that awaits it)."""
        return False

    def pids(self) -> list[int]:
        """Process ids of the workers, for kinds whose workers are processes."""
        return []

    @property
    @abstractmethod
    def workers(self) -> int:
        """Workers now counted towards the target."""

    @property
    @abstractmethod
    def busy(self) -> int:
        """Workers now inside the user's code."""


class Slot:
    """One worker's place in a :class:`SlotPool`."""

    __slots__ = ("abandoned", "index", "lock", "out", "progress", "retired", "unit")

    def __init__(self, index: int) -> None:
        self.index = index
        #: guards giving the worker up against the worker finishing its unit
        self.lock = threading.Lock()
        self.unit: Unit | None = None
        #: for timed work: ``(item index in the unit, outputs the unit had before it, not
        #: before)``, a new tuple at each item, so that a watchdog sees progress by identity
        #: (``not before``: a retry's backoff, which is not part of its time limit)
        self.progress: tuple[int, int, float] = (0, 0, 0.0)
        self.out: list[Any] = []
        self.abandoned = False
        self.retired = False


class SlotPool(WorkerPool):
    """A pool of workers counted one by one: the accounting shared by the thread and process
    kinds. A subclass starts a worker in :meth:`_launch`; the worker calls
    :meth:`_should_retire` between units and :meth:`_leave` on its way out."""

    def _begin(self) -> None:
        self._lock = threading.Lock()
        self._target = self.source.spec.workers
        self._live = 0
        self._slots: set[Slot] = set()
        self._count = 0
        self._eof = False
        with self._lock:
            for _ in range(self._target):
                self._spawn(None)

    @abstractmethod
    def _launch(self, slot: Slot, first: Any) -> None:
        """Start the worker of ``slot``; ``first`` (if not None) is the work of a worker it
        replaces, to finish before any other."""

    def _spawn(self, first: Any) -> None:
        # called with self._lock held
        slot = Slot(self._count)
        self._count += 1
        self._live += 1
        self._slots.add(slot)
        self._launch(slot, first)

    @property
    def workers(self) -> int:
        return self._live

    @property
    def busy(self) -> int:
        return sum(1 for s in list(self._slots) if s.unit is not None)

    def resize(self, n: int) -> None:
        with self._lock:
            if self._eof or self.gone.is_set():
                return
            self._target = n
            while self._live < n:
                self._spawn(None)
            shrinking = self._live > n
        if shrinking:
            # idle workers wait in take(); wake them so the extra ones can retire now
            self.source.kick()

    def _should_retire(self, slot: Slot) -> bool:
        if self._live <= self._target:
            return False  # the common case, read without the lock: a resize is seen next time
        with self._lock:
            if self._live > self._target and not self._eof:
                self._live -= 1
                self._slots.discard(slot)
                slot.retired = True
                return True
            return False

    def _replace(self, slot: Slot, first: Any) -> None:
        """Start a worker in the place of ``slot``'s, which the caller has just marked
        abandoned (under ``slot.lock``), handing it ``first``."""
        with self._lock:
            self._slots.discard(slot)
            self._live -= 1
            self._spawn(first)

    def _finished_unit(self, slot: Slot) -> bool:
        """The worker of ``slot`` is done with its unit: False if it was abandoned meanwhile
        (its result must then be dropped). Atomic with the abandoning, under ``slot.lock``."""
        with slot.lock:
            if slot.abandoned:
                return False
            slot.unit = None
            return True

    def _leave(self, slot: Slot, eof: bool) -> None:
        with self._lock:
            if eof:
                self._eof = True
            if not slot.retired:
                self._live -= 1
                self._slots.discard(slot)
            last = self._live == 0
        if last:
            if self._eof:
                self.source.close_output()
            self.gone.set()


KINDS: dict[str, type[WorkerPool]] = {}


def register_kind(cls: type[WorkerPool]) -> type[WorkerPool]:
    KINDS[cls.kind] = cls
    return cls


def kind_names() -> list[str]:
    return sorted(KINDS)
