"""The worker-kind interface.

A worker kind runs the workers of one :class:`~conveyor._engine.step.Step`. It knows how to start
them, grow and shrink them, tear them down and count them; everything about *what* a step does
(units, order, keys, failures, statistics) lives in the step. A new kind is one module with one
subclass of :class:`WorkerPool`, registered under its name; nothing above the engine changes.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from .step import Step


@dataclass
class PoolContext:
    """What a pool may need from the run that owns it."""

    #: the event loop async workers run on (started on first use)
    get_loop: Callable[[], asyncio.AbstractEventLoop] | None = None
    thread_name: str = "conveyor"
    extra: dict[str, object] = field(default_factory=dict)


class WorkerPool(ABC):
    """The workers of one step, of one kind."""

    kind: ClassVar[str]
    #: True if the user's callable must be an ``async def`` (False: must not be)
    wants_async: ClassVar[bool] = False

    def __init__(self, step: Step, context: PoolContext) -> None:
        self.step = step
        self.context = context
        #: set once every worker has left (after the end of the input, or a teardown)
        self.gone = threading.Event()

    @abstractmethod
    def start(self) -> None:
        """Start ``step.spec.workers`` workers."""

    @abstractmethod
    def resize(self, n: int) -> None:
        """Grow at once, or shrink by letting workers retire after their current item."""

    @abstractmethod
    def abort(self) -> None:
        """The run is being torn down: stop whatever the buffers cannot reach."""

    @property
    @abstractmethod
    def workers(self) -> int:
        """Workers now counted towards the target."""

    @property
    @abstractmethod
    def busy(self) -> int:
        """Workers now inside the user's code."""


KINDS: dict[str, type[WorkerPool]] = {}


def register_kind(cls: type[WorkerPool]) -> type[WorkerPool]:
    KINDS[cls.kind] = cls
    return cls


def kind_names() -> list[str]:
    return sorted(KINDS)
