"""Every exception conveyor raises, under one root.

The tree (mirrored in ``docs/exceptions.md``)::

    ConveyorError
    ├── ConfigurationError          bad input, refused where it is given (ValueError, TypeError)
    ├── PipelineError
    │   ├── StageFailed             an item failed under on_error="raise"; carries the details
    │   ├── RunTimeout              a whole run went past its timeout_s (also TimeoutError)
    │   └── PipelineClosed          put() on a run that no longer takes input
    ├── ItemTimeout                 one item went past its stage's timeout_s (also TimeoutError)
    ├── ClosedResourceError         this side closed the resource and then used it
    ├── BrokenResourceError         the other side went away (a peer died, a worker was killed)
    └── WouldBlock                  a *_nowait call that would have had to wait

Control-flow signals and policy values are not here: ``Retry``, ``Skip`` and ``DeadLetter`` are
values handed to a stage, never raised.
"""

from __future__ import annotations

import traceback as _tb
from typing import Any


class ConveyorError(Exception):
    """The root of every exception that conveyor raises on its own account."""


class ConfigurationError(ConveyorError, ValueError, TypeError):
    """Something given to conveyor cannot work; raised where it is given, never later."""


class PipelineError(ConveyorError):
    """A pipeline run could not complete."""


class StageFailed(PipelineError):
    """An item failed in a stage whose policy is to raise.

    Attributes: ``stage`` (its name), ``item``, ``attempt`` (1 for the first try),
    ``error`` (the original exception, also the ``__cause__``) and ``traceback`` (its text).
    """

    def __init__(self, stage: str, item: Any, attempt: int, error: BaseException) -> None:
        self.stage = stage
        self.item = item
        self.attempt = attempt
        self.error = error
        self.traceback = "".join(_tb.format_exception(error))
        super().__init__(stage, item, attempt, error)
        self.__cause__ = error

    def __str__(self) -> str:
        shown = repr(self.item)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        return (
            f"stage {self.stage!r} failed on item {shown} (attempt {self.attempt}): "
            f"{type(self.error).__name__}: {self.error}"
        )


class RunTimeout(PipelineError, TimeoutError):
    """A run went past the ``timeout_s`` given to ``run()``; every worker was stopped."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"the run did not finish within {timeout_s} s")


class PipelineClosed(PipelineError):
    """``put()`` was called on a run that was stopped or has failed."""


class ItemTimeout(ConveyorError, TimeoutError):
    """An item took longer than its stage's ``timeout_s``."""

    def __init__(self, stage: str, timeout_s: float) -> None:
        self.stage = stage
        self.timeout_s = timeout_s
        super().__init__(f"an item of stage {stage!r} ran past timeout_s={timeout_s}")


class ClosedResourceError(ConveyorError):
    """The resource was closed by this side and then used."""


class BrokenResourceError(ConveyorError):
    """The other side of the resource is gone."""


class WouldBlock(ConveyorError):
    """A non-blocking call found that it would have to wait."""
