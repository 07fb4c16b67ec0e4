"""Every exception conveyor raises, under one root.

The tree (mirrored in ``docs/exceptions.md``)::

    ConveyorError
    ├── ConfigurationError          bad input, refused where it is given (ValueError, TypeError)
    ├── TaskError
    │   ├── TaskFailed              a job ended dead (its last attempt failed, or it was cancelled)
    │   ├── JobNotFound             no job has that id
    │   └── BackendError            the queue's storage refused a change, or holds what conveyor
    │       │                       did not write (a key of the wrong type): not worth retrying
    │       └── BackendUnavailable  the storage is out of reach for now (down, locked, full,
    │                               read-only during a failover): retrying later may work
    ├── PipelineError
    │   ├── StageFailed             an item failed under on_error="raise"; carries the details
    │   ├── RunTimeout              a whole run went past its timeout_s (also TimeoutError)
    │   └── PipelineClosed          put() on a run that no longer takes input
    ├── ItemTimeout                 one item went past its stage's timeout_s (also TimeoutError)
    ├── ItemNotSendable             an item or a result cannot cross to or from a worker process
    ├── RemoteError                 an exception from a worker process that could not be sent whole
    ├── ClosedResourceError         this side closed the resource and then used it
    ├── BrokenResourceError         the other side went away (a peer died, a worker was killed;
    │                               pid: which process)
    │   └── WorkerCrashed           a worker process died while it held items
    └── WouldBlock                  a *_nowait call that would have had to wait

Control-flow signals are not errors and are not here: a task raises ``RetryTask(delay_s=)`` or
``CancelTask`` (``conveyor.tasks``) to steer its own job. Policy values (``Retry``, ``Skip``,
``DeadLetter``) are handed to a stage, never raised.
"""

from __future__ import annotations

import re as _re
import traceback as _tb
from typing import Any


def _rebuild(cls: type[ConveyorError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConveyorError(Exception):
    """The root of every exception that conveyor raises on its own account."""

    def __reduce__(self) -> tuple[Any, ...]:
        # subclasses take their own constructor arguments; pickle (to and from worker
        # processes) rebuilds them from the message and the attributes instead
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


class ConfigurationError(ConveyorError, ValueError, TypeError):
    """Something given to conveyor cannot work; raised where it is given, never later."""


class TaskError(ConveyorError):
    """Something about a task queue or a job."""


class TaskFailed(TaskError):
    """The job is dead: ``job_id``, ``task`` and the last ``error`` (text)."""

    def __init__(self, job_id: str, task: str, error: str) -> None:
        self.job_id = job_id
        self.task = task
        self.error = error
        lines = error.strip().splitlines()
        super().__init__(f"job {job_id!r} of task {task!r} failed: {lines[-1] if lines else '?'}")


class JobAborted(TaskFailed):
    """The job was aborted (``job.abort()``, ``conveyor abort``) before it ended: ``by`` is who
    asked. A ``TaskFailed``, so code that handles failed jobs handles these too."""

    def __init__(self, job_id: str, task: str, error: str) -> None:
        super().__init__(job_id, task, error)
        self.by = error.removeprefix("aborted by ")


class JobNotFound(TaskError, LookupError):
    """No job has that id (or its result was kept for less time than asked)."""


class BackendError(TaskError):
    """The queue's storage refused a change for a reason that retrying will not fix: it holds
    something conveyor did not write there (a key of the wrong type under the prefix, a damaged
    file). Nothing was half-applied; ``conveyor doctor URL`` finds and repairs what is
    inconsistent."""


class BackendUnavailable(BackendError):
    """The queue's storage is out of reach for now: unreachable, locked by another writer for
    longer than the wait allows, full, out of memory, or read-only while a replica is promoted.
    Trying again later may work (a worker does, for as long as it takes)."""


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


class ItemNotSendable(ConveyorError, TypeError):
    """An item (or a result) cannot be pickled to cross to (or from) a worker process."""

    def __init__(self, what: str, value: object, reason: BaseException) -> None:
        self.type_name = type(value).__name__
        super().__init__(
            f"{what} of type {self.type_name} cannot be sent between processes: {reason}"
        )


class RemoteError(ConveyorError):
    """An exception raised in a worker process that could not be pickled back as itself.

    ``type_name`` is its class's name; the message and the worker's traceback are kept.
    """

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


class ClosedResourceError(ConveyorError):
    """The resource was closed by this side and then used."""


class BrokenResourceError(ConveyorError):
    """The other side of the resource is gone: ``pid`` is the process that went (None when
    it is not known). On a channel, ``undelivered`` holds the messages sent to that process
    that it never took (read back after its death; on a queue channel, those addressed to it:
    the others went on to another child)."""

    def __init__(self, *args: object, pid: int | None = None) -> None:
        super().__init__(*args)
        self.pid = pid
        self.undelivered: list[Any] = []


class WorkerCrashed(BrokenResourceError):
    """A worker process died (killed by a signal, or exited) while it held items."""

    def __init__(self, stage: str, pid: int | None, exitcode: int | None) -> None:
        self.stage = stage
        self.pid = pid
        self.exitcode = exitcode
        self.signal: int | None = -exitcode if exitcode is not None and exitcode < 0 else None
        if self.signal is not None:
            import signal as _signal

            try:
                how = f"was killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                how = f"was killed by signal {self.signal}"
        elif exitcode is not None:
            how = f"exited with code {exitcode}"
        else:
            how = "stopped answering"
        #: what happened to it, in words ("was killed by SIGKILL", "exited with code 1")
        self.how = how
        super().__init__(f"worker process {pid} of {stage!r} {how}", pid=pid)


class WouldBlock(ConveyorError):
    """A non-blocking call found that it would have to wait."""


# -- what messages may show ---------------------------------------------------------------
_USERINFO = _re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(?P<secret>.*)@")
_SECRET_OPTION = _re.compile(r"(?i)([?&](?:password|passwd|pass|sslpassword)=)[^&#]*")


def redacted(url: str) -> str:
    """``url`` with its passwords replaced by ``***``, fit for logs and messages: the one
    after ``user:`` (up to the last ``@``, so that one containing ``@``, ``/`` or ``#``
    unencoded is masked whole) and any given as a query option (``?password=``)."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}:***@", url, count=1)
    return _SECRET_OPTION.sub(lambda m: f"{m.group(1)}***", masked)
