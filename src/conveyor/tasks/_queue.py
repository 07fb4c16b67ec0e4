"""``TaskQueue``: tasks, enqueueing, job handles."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import pickle
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    ParamSpec,
    Protocol,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    overload,
)
from urllib.parse import parse_qsl, urlparse

from .._engine import SYSTEM_CLOCK, Clock, SystemClock, shipping
from .._engine.policy import backoff_delay
from .._errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    JobAborted,
    JobNotFound,
    TaskFailed,
    redacted,
)
from ._schedules import advance, check_plan, next_tick
from ._workflows import Flow, Signature, WorkflowHandle, compile_workflow
from .backends import (
    ABORTED,
    DEAD,
    DONE,
    Backend,
    Job,
    MemoryBackend,
    NewJob,
    QueueCounts,
    SQLiteBackend,
)
from .backends.base import ScheduleInfo, WorkerInfo, replaceable

if TYPE_CHECKING:
    from ..tracing import Tracing
    from ._worker import Worker

P = ParamSpec("P")
R = TypeVar("R")

EXECUTORS = ("thread", "process", "inline")


class RetryTask(Exception):
    """Raised by a task to be run again after ``delay_s`` (counts as an attempt)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.delay_s = delay_s


class CancelTask(Exception):
    """Raised by a task to end its job now, without further attempts (it becomes dead)."""


# -- payloads ------------------------------------------------------------------------------------


#: how deep arguments may nest (lists in lists...): deeper ones are refused at enqueue, where
#: the encoder or a worker decoding them would run out of stack
MAX_NESTING = 200
_SCALARS = (str, int, float, bool, type(None))


def _positional_range(signature: inspect.Signature) -> tuple[int, int]:
    kinds = [p.kind for p in signature.parameters.values()]
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(kind not in plain for kind in kinds):
        return (1, 0)
    params = list(signature.parameters.values())
    required = sum(1 for p in params if p.default is inspect.Parameter.empty)
    return (required, len(params))


def _containers(
    args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    """The arguments that are not plain values, each with its name (made only for them)."""
    for i, a in enumerate(args):
        if not isinstance(a, _SCALARS):
            yield f"argument {i}", a
    for k, v in kwargs.items():
        if not isinstance(v, _SCALARS):
            yield f"argument {k!r}", v


def _arguments(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        *((f"argument {i}", a) for i, a in enumerate(args)),
        *((f"argument {k!r}", v) for k, v in kwargs.items()),
    ]


def check_shape(
    where: str, task: str, value: Any, keys: tuple[type, ...] | None, format_name: str = ""
) -> None:
    """Refuse what nests deeper than :data:`MAX_NESTING`, and a mapping key that is not one
    of ``keys`` (None: any): JSON would turn ``{1: "a", "1": "b"}`` into ``{"1": "b"}``
    without a word, and a tuple key comes back from MessagePack as a list, which cannot be a
    key at all. Walks with a stack of its own, so depth cannot overflow."""
    if isinstance(value, _SCALARS):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ConfigurationError(
                f"{where} of task {task!r} nests deeper than {MAX_NESTING} levels"
            )
        if isinstance(item, dict):
            for k, v in item.items():
                if keys is not None and not isinstance(k, keys):
                    allowed = ", ".join(t.__name__ for t in keys)
                    raise ConfigurationError(
                        f"{where} of task {task!r} has a key of type {type(k).__name__} "
                        f"({k!r}): {format_name} keys are {allowed}, so it would arrive "
                        "changed; use such keys, or create the queue with serializer='pickle'"
                    )
                if not isinstance(v, _SCALARS):
                    stack.append((v, depth + 1))
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend((v, depth + 1) for v in item if not isinstance(v, _SCALARS))


class JsonSerializer:
    name = "json"
    #: what mapping keys arrive as they were sent
    keys: tuple[type, ...] | None = (str,)

    def check(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for where, value in _arguments(args, kwargs):
            check_shape(where, task, value, self.keys, "JSON")
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"{where} of task {task!r} ({type(value).__name__}) cannot be sent as JSON: "
                    f"{exc}; send JSON values, or create the queue with serializer='pickle'"
                ) from None

    def dumps(self, value: Any) -> bytes:
        return _JSON_ENCODE(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


#: one encoder for every payload (``json.dumps`` with options makes one per call)
_JSON_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class PickleSerializer:
    name = "pickle"
    keys: tuple[type, ...] | None = None

    def check(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for where, value in _arguments(args, kwargs):
            check_shape(where, task, value, None)
            try:
                pickle.dumps(value)
            except Exception as exc:
                raise ConfigurationError(
                    f"{where} of task {task!r} ({type(value).__name__}) cannot be pickled: {exc}"
                ) from None

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class MsgpackSerializer:
    """MessagePack (``conveyor[msgpack]``): smaller and faster than JSON, and bytes and
    non-string keys arrive as they were sent; tuples arrive as lists."""

    name = "msgpack"
    keys: tuple[type, ...] | None = (str, bytes, int, float, type(None))

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise ConfigurationError(
                "serializer='msgpack' needs the msgpack package: pip install 'conveyor[msgpack]'"
            ) from None
        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def check(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for where, value in _arguments(args, kwargs):
            check_shape(where, task, value, self.keys, "MessagePack")
            try:
                self._packb(value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ConfigurationError(
                    f"{where} of task {task!r} ({type(value).__name__}) cannot be sent as "
                    f"MessagePack: {exc}; send plain values, or create the queue with "
                    "serializer='pickle'"
                ) from None

    def dumps(self, value: Any) -> bytes:
        return cast(bytes, self._packb(value))

    def loads(self, data: bytes) -> Any:
        return self._unpackb(data, strict_map_key=False)


class Serializer(Protocol):
    name: str
    keys: tuple[type, ...] | None

    def check(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


SERIALIZERS: dict[str, type[Serializer]] = {
    "json": JsonSerializer,
    "msgpack": MsgpackSerializer,
    "pickle": PickleSerializer,
}

_FORMAT_NAMES = {"json": "JSON", "msgpack": "MessagePack", "pickle": "pickle"}


def check_result(serializer: Serializer, task: str, value: Any) -> None:
    """Refuse a result that would not come back as it was returned (see ``check_shape``)."""
    check_shape("the result", task, value, serializer.keys, _FORMAT_NAMES[serializer.name])


#: the largest payload (a job's arguments, serialised) a queue takes by default: 1 MiB.
#: Storage of jobs is not storage of data: put big inputs where they belong, send their name.
MAX_PAYLOAD_BYTES = 1 << 20


#: how many times a change of a schedule is tried when others change it at the same moment
_SWAP_TRIES = 100

#: priorities are stored as 32-bit signed ints on every backend
PRIORITY_LIMIT = 2**31
#: the longest job id or key (they are stored and indexed as text)
MAX_NAME = 1024


_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|sec|second|m|min|minute|h|hour|d|day)s?\s*")
_UNIT_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_UNIT_S |= {"h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(what: str, rate: object) -> tuple[int, float] | None:
    """``"100/m"`` as (100 starts, per 60 s); also ``/s``, ``/h``, ``/d`` and ``"10/30s"``."""
    if rate is None:
        return None
    found = _RATE.fullmatch(rate) if isinstance(rate, str) else None
    if found is None or int(found.group(1)) < 1:
        raise ConfigurationError(
            f"{what} is starts per period, such as '100/m', '5/s', '1000/h' or '10/30s', "
            f"not {rate!r}"
        )
    per = float(found.group(2) or 1) * _UNIT_S[found.group(3)]
    if per <= 0:
        raise ConfigurationError(f"{what}: the period of {rate!r} is not positive")
    return int(found.group(1)), per


def check_priority(what: str, priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"{what} must be an int, not {priority!r}")
    if not -PRIORITY_LIMIT < priority < PRIORITY_LIMIT:
        raise ConfigurationError(f"{what} must be within ±(2**31 - 1), not {priority}")


def _seconds(what: str, value: object) -> float:
    """A finite number of seconds (``_delay_s`` must not be negative)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, not {value!r}")
    seconds = float(value)
    if what == "_eta" and not math.isfinite(seconds):
        raise ConfigurationError(
            f"_eta must be a finite time (seconds since the epoch), not {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return seconds


def _check_name(what: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{what} must be a non-empty string, not {value!r}")
    if len(value) > MAX_NAME or "\x00" in value:
        raise ConfigurationError(
            f"{what} must be at most {MAX_NAME} characters, without NUL: {value[:40]!r}..."
        )


log = logging.getLogger("conveyor.tasks")

#: how often a queue measures how far its clock is from its storage's
_SKEW_EVERY_S = 60.0
#: a smaller difference is noise (a round trip's), not a clock that is wrong
_SKEW_IGNORED_S = 0.01


def _module_name(fn: Callable[..., Any]) -> str:
    """The module a task's default name starts with. A script's functions live in ``__main__``
    when it runs and in ``__mp_main__`` in the processes that multiprocessing starts from it,
    and ``conveyor worker script:queue`` imports it as ``script``: all three name it by what
    it would be imported as (``python -m pkg.app``: ``pkg.app``; ``python app.py``: ``app``),
    so producers and workers agree."""
    module: str = getattr(fn, "__module__", None) or "__main__"
    if module not in ("__main__", "__mp_main__"):
        return module
    main = sys.modules.get(module)
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "__mp_main__"):
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if path:
        return os.path.splitext(os.path.basename(str(path)))[0]
    return "__main__"  # an interactive session


def _who() -> str:
    """Who is asking, for the record: ``user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a container)
        user = str(os.getuid()) if hasattr(os, "getuid") else "someone"
    return f"{user}@{socket.gethostname()}"


def new_id() -> str:
    """A unique job id that sorts by creation time: nanoseconds, then 64 random bits. Ids that
    grow keep index inserts at one end of the b-tree, which makes enqueueing much cheaper than
    with purely random ids."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


# -- backends by URL -----------------------------------------------------------------------------

_memory: dict[str, MemoryBackend] = {}
_memory_lock = threading.Lock()


def open_backend(url: str, create: bool = True) -> Backend:
    """``memory://[name]``, ``sqlite:///relative/or//absolute/path``, ``redis://...``. With
    ``create=False`` nothing is made: a SQLite file that does not exist is an error."""
    parsed = urlparse(url)
    scheme = parsed.scheme
    if scheme == "memory":
        name = parsed.netloc + parsed.path
        with _memory_lock:
            backend = _memory.get(name)
            if backend is None:
                backend = _memory[name] = MemoryBackend()
        return backend
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(
                f"a SQLite queue URL names a file: sqlite:///relative.db or "
                f"sqlite:////absolute.db, not {url!r}"
            )
        path, _, query = path.partition("?")
        options = dict(parse_qsl(query, strict_parsing=False))
        busy = options.pop("busy_s", "30")
        if options:
            raise ConfigurationError(
                f"unknown option(s) {sorted(options)} in a SQLite queue URL: it takes busy_s"
            )
        try:
            busy_s = float(busy)
        except ValueError:
            busy_s = math.nan
        if not math.isfinite(busy_s) or busy_s < 0:
            raise ConfigurationError(f"busy_s is a number of seconds >= 0, not {busy!r}")
        try:
            return SQLiteBackend(path, busy_s=busy_s, create=create)
        except (BackendError, ConfigurationError):
            raise
        except Exception as exc:
            raise BackendUnavailable(f"cannot open the SQLite queue {path!r}: {exc}") from exc
    if scheme in ("redis", "rediss"):
        try:
            from .backends.redis import RedisBackend
        except ImportError as exc:
            raise ConfigurationError(
                f"a {scheme}:// queue needs redis-py, which is not installed: "
                "pip install 'conveyor[redis]'"
            ) from exc
        return RedisBackend(url)
    if scheme in ("postgresql", "postgres"):
        opened: Backend = _postgres(scheme).PostgresBackend(url)
        return opened
    raise ConfigurationError(
        f"unknown queue URL {redacted(url)!r}: use memory://, sqlite:///path, "
        "redis://host:port/db or postgresql://user@host:5432/db"
    )


def _postgres(scheme: str) -> Any:
    """The PostgreSQL backend's module, or an error naming the extra that brings psycopg."""
    import importlib

    try:
        postgres = importlib.import_module(".backends.postgres", __package__)
    except ImportError as exc:
        raise ConfigurationError(
            f"a {scheme}:// queue needs psycopg 3, which is not installed: "
            "pip install 'conveyor[postgres]'"
        ) from exc
    return postgres


class _WallClock(SystemClock):
    """A clock made of a function giving seconds since the epoch (the older way to give a
    queue its time); it waits in real time."""

    follows_storage = False  # the caller's own time, taken as it is

    def __init__(self, fn: Callable[[], float]) -> None:
        self._fn = fn

    def now(self) -> float:
        return self._fn()

    def time(self) -> float:
        return self._fn()


# -- tasks and jobs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskOptions:
    retries: int
    backoff_s: float
    max_backoff_s: float
    jitter: float
    timeout_s: float | None
    priority: int
    executor: str
    keep_result_s: float | None
    max_crashes: int = 3
    #: limits shared by every worker: runs at once, and starts per period (see parse_rate),
    #: of the task's jobs, and of each ``_key``'s
    concurrency: int | None = None
    rate: tuple[int, float] | None = None
    key_concurrency: int | None = None
    key_rate: tuple[int, float] | None = None

    @property
    def key_limited(self) -> bool:
        return self.key_concurrency is not None or self.key_rate is not None

    def delay_s(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt``, as for a pipeline's ``Retry``."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s, self.jitter)


class Task(Generic[P, R]):
    """A function registered with a queue; call it directly, or ``enqueue`` it.

    ``R`` is what a job's result is: the function's return value (awaited, for ``async def``).
    """

    def __init__(
        self, queue: TaskQueue, fn: Callable[P, Any], name: str, options: TaskOptions
    ) -> None:
        self.queue = queue
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        #: how many positional arguments bind the function for sure when no keyword is
        #: given (a function with keyword-only parameters, or *args and **kwargs, binds
        #: nothing for sure: (1, 0))
        self.positional = _positional_range(self.signature)
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = fn.__doc__
        # as functools.wraps does: tools (and a process worker's unpickling) find the function
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    # A type checker sees the function's own parameters in the first form. The enqueue options
    # cannot be added to a ParamSpec, so a call that gives one is typed by the other forms:
    # the options are checked, the arguments are checked when the job is enqueued.
    @overload
    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self,
        *args: Any,
        _id: str,
        _delay_s: float | None = None,
        _eta: datetime | float | None = None,
        _priority: int | None = None,
        _key: str | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self,
        *args: Any,
        _delay_s: float,
        _priority: int | None = None,
        _key: str | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self,
        *args: Any,
        _eta: datetime | float,
        _priority: int | None = None,
        _key: str | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self, *args: Any, _priority: int, _key: str | None = None, **kwargs: Any
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(self, *args: Any, _key: str, **kwargs: Any) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self,
        *args: Any,
        _connection: Any,
        _id: str | None = None,
        _delay_s: float | None = None,
        _eta: datetime | float | None = None,
        _priority: int | None = None,
        _key: str | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]: ...
    def enqueue(self, *args: Any, **kwargs: Any) -> JobHandle[R]:
        """Add a job; options start with an underscore: ``_id``, ``_delay_s``, ``_eta``,
        ``_priority``, ``_key``, ``_connection`` (PostgreSQL: write the job in that
        connection's transaction). An id that is queued, running or done returns the
        existing job and adds nothing."""
        return self.queue.enqueue(self, *args, **kwargs)

    def enqueue_many(
        self,
        calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
        *,
        _connection: Any = None,
    ) -> list[JobHandle[R]]:
        """Add many jobs in one transaction: ``calls`` are ``(args, kwargs)`` pairs
        (``_connection``: that connection's transaction, as for ``enqueue``)."""
        return self.queue.enqueue_many(self, calls, _connection=_connection)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """This task's call, not made yet: a step of a workflow (``chain``, ``group``,
        ``chord``). In a chain, the result before it comes first, then ``args``."""
        return Signature(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} of {self.queue.where}>"


class TaskSettings(TypedDict, total=False):
    """The options of ``@q.task(...)`` (all keyword-only, all optional)."""

    #: the name jobs carry (default ``module.qualname``); workers find the function by it
    name: str | None
    #: attempts after the first that fails (default 3)
    retries: int
    #: the first wait before a retry, doubling each time up to ``max_backoff_s``
    backoff_s: float
    max_backoff_s: float
    #: a random share of each wait added or taken off (0.1: up to 10%)
    jitter: float
    #: time limit per attempt, in seconds
    timeout_s: float | None
    #: the default ``_priority`` of its jobs (higher first)
    priority: int
    #: "thread" (default for plain functions), "process", "async" or "inline"
    executor: str
    #: how long results are kept (default: the queue's)
    keep_result_s: float | None
    #: how many times the worker running a job may die under it (its lease lapses) before the
    #: job is dead instead of run again (default 3)
    max_crashes: int
    #: at most this many of its jobs run at once, across every worker of the storage
    concurrency: int | None
    #: at most this many of its jobs start per period, across every worker: "100/m", "5/s",
    #: "1000/h", "10/30s"
    rate: str | None
    #: the same, for each ``_key`` apart (per user, per tenant): with either, ``_key`` is a
    #: limit's name rather than a line of one job at a time
    key_concurrency: int | None
    key_rate: str | None


class TaskDecorator(Protocol):
    """What ``@q.task(...)`` with options returns: it registers the function it decorates."""

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class Hooks:
    """What a queue calls as its jobs move: lists of functions, called in the order they were
    added (see :meth:`TaskQueue.on_enqueue` and the others).

    A hook that raises — anything, ``SystemExit`` included — is logged with its traceback and
    changes nothing: the job's outcome is already written, and the next hook is still called.
    """

    def __init__(self) -> None:
        self.enqueued: list[Callable[[Job], object]] = []
        self.before_attempt: list[Callable[[Job], object]] = []
        self.after_attempt: list[Callable[[Job, str, float, str | None], object]] = []
        self.dead: list[Callable[[Job, str], object]] = []

    def __bool__(self) -> bool:
        return bool(self.enqueued or self.before_attempt or self.after_attempt or self.dead)


def call_hooks(hooks: list[Callable[..., object]], *args: Any) -> None:
    """Call each hook with ``args``; what one raises is logged and goes no further."""
    for hook in hooks:
        try:
            hook(*args)
        except BaseException:  # a hook's failure is not the job's, nor the worker's
            log.exception("hook %s raised; ignored", getattr(hook, "__qualname__", hook))


class JobHandle(Generic[R]):
    """A job enqueued (or found) by id; ``R`` is its result's type."""

    def __init__(self, queue: TaskQueue, job_id: str, task: str, added: bool = True) -> None:
        self.queue = queue
        self.id = job_id
        self.task = task
        #: False when the enqueue found the id already queued, running or done
        self.added = added

    def info(self) -> Job:
        job = self.queue.get(self.id)
        if job is None:
            raise JobNotFound(f"no job with id {self.id!r}")
        return job

    def status(self) -> str:
        """``queued``, ``running``, ``done``, ``dead``, ``aborted``, ``waiting`` (a step of a
        workflow), or ``unknown`` (never enqueued, or its result has expired)."""
        job = self.queue.get(self.id)
        return "unknown" if job is None else job.state

    def abort(self, by: str | None = None) -> str:
        """Abort the job: see :meth:`TaskQueue.abort`."""
        return self.queue.abort(self.id, by=by)

    def result(self, timeout_s: float | None = None) -> R:
        """Wait for the job to end and return its result; raise :class:`TaskFailed` if it is
        dead, ``TimeoutError`` after ``timeout_s``. Waits without polling where the backend
        can be woken (memory; Redis); SQLite is polled with back-off."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        backend = self.queue.backend
        while True:
            job = self.queue.get(self.id)
            if job is None:
                raise JobNotFound(f"no job with id {self.id!r}")
            if job.state == DONE:
                value = None if job.result is None else self.queue.serializer.loads(job.result)
                return cast(R, value)
            if job.state == DEAD:
                raise TaskFailed(self.id, job.task, job.error or "")
            if job.state == ABORTED:
                raise JobAborted(self.id, job.task, job.error or "")
            left = 0.5 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.id!r} did not end within {timeout_s} s")
            # a backend that is woken by its storage is asked again now and then only in
            # case a notice was lost; the others are polled
            backend.wait_for_job(self.id, min(left, 5.0 if backend.wakes_without_polling else 0.5))

    async def aresult(self, timeout_s: float | None = None) -> R:
        """``result()`` for async code (waits on a thread)."""
        import asyncio

        return await asyncio.to_thread(self.result, timeout_s)

    def __repr__(self) -> str:
        return f"<Job {self.id!r} of task {self.task!r}>"


class TaskQueue:
    """A named queue of jobs in a backend given by URL.

    ``TaskQueue("sqlite:///tasks.db")``; options: ``name`` (several queues can share a
    backend), ``serializer`` (``"json"``, the default, ``"msgpack"`` or ``"pickle"``),
    ``max_payload_bytes`` (the largest serialised arguments an enqueue takes; default 1 MiB,
    None for no limit), ``keep_result_s`` (how long results are kept; default one day),
    ``clock`` (the engine's :class:`Clock`, or a function giving seconds since the epoch;
    tests pass a ``ManualClock``).
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        name: str = "default",
        serializer: str = "json",
        max_payload_bytes: int | None = MAX_PAYLOAD_BYTES,
        keep_result_s: float | None = 86400.0,
        clock: Clock | Callable[[], float] = SYSTEM_CLOCK,
        create: bool = True,
        tracing: bool | Tracing = False,
    ) -> None:
        if serializer not in SERIALIZERS:
            raise ConfigurationError(
                f"serializer must be one of {sorted(SERIALIZERS)}, not {serializer!r}"
            )
        if max_payload_bytes is not None and (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or max_payload_bytes < 1
        ):
            raise ConfigurationError(
                f"max_payload_bytes is an int >= 1 or None, not {max_payload_bytes!r}"
            )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a queue name is a non-empty string, not {name!r}")
        self.url = url
        #: the URL without its password, for logs and messages
        self.where = redacted(url)
        self.name = name
        self.serializer: Serializer = SERIALIZERS[serializer]()
        self.max_payload_bytes = max_payload_bytes
        self.keep_result_s = keep_result_s
        self.clock: Clock = cast(Clock, clock) if hasattr(clock, "now") else _WallClock(clock)
        self.backend = open_backend(url, create=create)
        #: OpenTelemetry spans for enqueues and attempts (``conveyor[otel]``), or None
        self.tracing: Tracing | None = None
        if tracing is not False:
            from ..tracing import Tracing

            self.tracing = tracing if isinstance(tracing, Tracing) else Tracing()
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: functions called as jobs are enqueued, start, end and die (see on_enqueue...)
        self.hooks = Hooks()
        #: the schedules of ``@q.periodic``, by name, written by each worker as it starts
        self._periodic: dict[str, ScheduleInfo] = {}
        self._schedule_problems: set[tuple[str, str]] = set()
        if self.tracing is not None:
            self.tracing.watch(self)
        self._follows = bool(getattr(self.clock, "follows_storage", False))
        #: the storage's clock minus ours, and when it was measured (monotonic)
        self._skew = 0.0
        self._skew_at: float | None = None
        #: a worker running on an event loop measures the skew on its I/O threads instead:
        #: now() then never waits on the storage
        self.skew_measured_elsewhere = False

    def now(self) -> float:
        """The queue's time: seconds since the epoch, on the storage's clock. The real clock
        is corrected by how far it is from the storage's (measured now and then); a manual
        clock or a time function given by the caller is taken as it is."""
        t = self.clock.time()
        if self._follows:
            at = time.monotonic()
            if self._skew_at is None or (
                at - self._skew_at >= _SKEW_EVERY_S and not self.skew_measured_elsewhere
            ):
                self.measure_skew()
            t += self._skew
        return t

    def skew_due(self) -> bool:
        """The storage's clock has not been compared with ours for a while."""
        at = self._skew_at
        return self._follows and (at is None or time.monotonic() - at >= _SKEW_EVERY_S)

    def measure_skew(self) -> None:
        """Compare our clock with the storage's now (one round trip to a server). A clock
        that does not follow the storage's (a manual one, a time function) is left alone."""
        self._skew_at = time.monotonic()
        if not self._follows:
            return
        try:
            before = self.clock.time()
            storage = self.backend.storage_time()
            after = self.clock.time()
        except Exception as exc:  # out of reach: keep the last measure, try again later
            log.warning("%s: could not read the storage's clock (%s)", self.where, exc)
            return
        skew = storage - (before + after) / 2
        if abs(skew) >= _SKEW_IGNORED_S:
            if abs(skew - self._skew) >= _SKEW_IGNORED_S:
                log.warning(
                    "%s: this machine's clock is %+.3f s from the storage's; leases and "
                    "timestamps follow the storage's",
                    self.where,
                    -skew,
                )
            self._skew = skew
        else:
            self._skew = 0.0

    # -- registering -------------------------------------------------------------------------
    @overload
    def task(
        self, fn: Callable[P, Awaitable[R]], /, **options: Unpack[TaskSettings]
    ) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /, **options: Unpack[TaskSettings]) -> Task[P, R]: ...
    @overload
    def task(self, fn: None = None, /, **options: Unpack[TaskSettings]) -> TaskDecorator: ...
    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        jitter: float = 0.1,
        timeout_s: float | None = None,
        priority: int = 0,
        executor: str = "thread",
        keep_result_s: float | None = -1.0,
        max_crashes: int = 3,
        concurrency: int | None = None,
        rate: str | None = None,
        key_concurrency: int | None = None,
        key_rate: str | None = None,
    ) -> Any:
        """Register ``fn`` (``async def``, or a plain function run on a thread — or, with
        ``executor="process"``, a process). Use as ``@q.task`` or ``@q.task(retries=5)``."""

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            if not callable(f):
                raise ConfigurationError(f"a task is a function, not {f!r}")
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise ConfigurationError(f"retries must be an int >= 0, not {retries!r}")
            if isinstance(max_crashes, bool) or not isinstance(max_crashes, int) or max_crashes < 1:
                raise ConfigurationError(f"max_crashes must be an int >= 1, not {max_crashes!r}")
            for option, most in (
                ("concurrency", concurrency),
                ("key_concurrency", key_concurrency),
            ):
                if most is not None and (
                    isinstance(most, bool) or not isinstance(most, int) or most < 1
                ):
                    raise ConfigurationError(f"{option} must be an int >= 1 or None, not {most!r}")
            rates = (parse_rate("rate", rate), parse_rate("key_rate", key_rate))
            if executor not in EXECUTORS:
                raise ConfigurationError(f"executor must be one of {EXECUTORS}, not {executor!r}")
            if timeout_s is not None and (
                isinstance(timeout_s, bool)
                or not isinstance(timeout_s, int | float)
                or not timeout_s > 0
            ):
                raise ConfigurationError(f"timeout_s must be positive or None, not {timeout_s!r}")
            is_async = inspect.iscoroutinefunction(f)
            if is_async and executor in ("process", "inline"):
                raise ConfigurationError(
                    f"executor={executor!r} is for plain functions; an async def runs on the "
                    "worker's event loop"
                )
            if executor == "inline" and timeout_s is not None:
                raise ConfigurationError(
                    "an inline task runs on the worker's event loop, where nothing can stop "
                    "it: use executor='thread' (or 'process') for a time limit"
                )
            if executor == "process" and not shipping.travels_by_name(f):
                try:
                    shipping.dumps(f)
                except Exception as exc:
                    raise ConfigurationError(
                        f"task {f!r} cannot be sent to a worker process: {exc}"
                    ) from exc
            check_priority("priority", priority)
            task_name = name or f"{_module_name(f)}.{f.__qualname__}"
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            keep = self.keep_result_s if keep_result_s == -1.0 else keep_result_s
            options = TaskOptions(
                retries,
                backoff_s,
                max_backoff_s,
                jitter,
                timeout_s,
                priority,
                executor,
                keep,
                max_crashes,
                concurrency,
                rates[0],
                key_concurrency,
                rates[1],
            )
            task: Task[Any, Any] = Task(self, f, task_name, options)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    # -- schedules ---------------------------------------------------------------------------
    def periodic(
        self,
        cron: str | None = None,
        /,
        *,
        every_s: float | None = None,
        tz: str = "UTC",
        catch_up: str = "last",
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Unpack[TaskSettings],
    ) -> TaskDecorator:
        """Register a task and run it on a schedule: ``@q.periodic("*/5 * * * *")`` (cron, read
        in ``tz``; ``conveyor[cron]``) or ``@q.periodic(every_s=30)``, with ``args`` and
        ``kwargs``. The schedule is named after the task; each worker of this queue writes it
        as it starts, and each tick is enqueued once however many run. ``catch_up`` says what
        happens to ticks missed while no worker ran: ``last`` (the latest runs), ``all``, or
        ``none``. The other options are the task's (see :meth:`task`)."""
        check_plan(cron, every_s, tz, catch_up)
        register = self.task(**options)

        def schedule(fn: Callable[..., Any]) -> Task[Any, Any]:
            task = register(fn)
            self._periodic[task.name] = self._schedule_info(
                task.name, cron, task, args, kwargs, every_s, tz, catch_up, "code"
            )
            return task

        return cast(TaskDecorator, schedule)

    def schedule(
        self,
        name: str,
        cron: str | None,
        task: Task[Any, Any] | str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        every_s: float | None = None,
        tz: str = "UTC",
        catch_up: str = "last",
    ) -> ScheduleInfo:
        """Add (or change) the schedule ``name`` now, in storage, while workers run:
        ``q.schedule("report", "0 7 * * mon", "reports.weekly", [team])``, or ``cron=None``
        with ``every_s=``. A schedule changed keeps how far it had got; it is kept until
        :meth:`unschedule`."""
        check_plan(cron, every_s, tz, catch_up)
        info = self._schedule_info(name, cron, task, args, kwargs, every_s, tz, catch_up, "api")
        return self._put_schedule(info)

    def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name`` (of any queue, or one whose record cannot be read);
        False if there was none. A tick already enqueued (a beat ahead of its time) still
        runs: cancel it by its id if need be."""
        for _ in range(_SWAP_TRIES):
            current = self._stored_schedule(name)
            if current is None:
                return False
            if self.backend.swap_schedule(name, current, None):
                self._periodic.pop(name, None)
                return True
        raise BackendError(f"schedule {name!r} kept changing while it was being removed")

    def schedules(self, *, all_queues: bool = False) -> list[ScheduleInfo]:
        """This queue's schedules as stored (``all_queues``: those of every queue of the
        storage), by name; :meth:`next_tick` says when each runs."""
        found = self.backend.schedules()
        return found if all_queues else [info for info in found if info.queue == self.name]

    def next_tick(self, schedule: ScheduleInfo) -> float | None:
        """When ``schedule``'s next tick is due (seconds since the epoch), or None if it has
        none left."""
        return next_tick(schedule, max(self.now(), schedule.through))

    def publish_schedules(self) -> None:
        """Write this queue's ``@q.periodic`` schedules to storage (each worker does it as it
        starts): a schedule whose plan is unchanged keeps how far it had got."""
        for info in list(self._periodic.values()):
            self._put_schedule(info)

    def run_schedules(self, lookahead_s: float = 0.0) -> list[str]:
        """Enqueue the ticks due now (and within ``lookahead_s``) of this queue's schedules;
        the ids of the jobs enqueued. Workers do this at each beat; call it yourself to run
        schedules without a worker."""
        now = self.now()
        ids: list[str] = []
        for info in self.schedules():
            try:
                if info.problem is not None:
                    raise ConfigurationError(info.problem)
                ids += advance(self, info, now, lookahead_s)
            except BackendError:
                raise  # the storage failed: the whole pass is tried again at the next beat
            except Exception as exc:
                # one schedule that cannot run here (written by hand, or by a release that
                # knows more) stops no other; said once per queue object and reason
                said = (info.name, str(exc))
                if said not in self._schedule_problems:
                    self._schedule_problems.add(said)
                    log.error(
                        "schedule %s cannot run here and is skipped: %s (see conveyor "
                        "schedules; replace it with q.schedule or remove it)",
                        info.name,
                        exc,
                    )
        return ids

    def _schedule_info(
        self,
        name: str,
        cron: str | None,
        task: Task[Any, Any] | str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any] | None,
        every_s: float | None,
        tz: str,
        catch_up: str,
        source: str,
    ) -> ScheduleInfo:
        _check_name("a schedule's name", name)
        if not isinstance(args, tuple | list):
            raise ConfigurationError(f"args is a tuple or list, not {args!r}")
        extra = dict(kwargs or {})
        if any(k.startswith("_") for k in extra):
            raise ConfigurationError("a schedule's kwargs are the task's; _options do not apply")
        new = self._new_job(task, tuple(args), extra)
        return ScheduleInfo(
            name=name,
            queue=self.name,
            task=new.task,
            payload=new.payload,
            cron=cron,
            every_s=None if every_s is None else float(every_s),
            tz=tz,
            catch_up=catch_up,
            priority=new.priority,
            through=0.0,
            source=source,
        )

    def _stored_schedule(self, name: str) -> ScheduleInfo | None:
        return next((s for s in self.backend.schedules() if s.name == name), None)

    def _put_schedule(self, info: ScheduleInfo) -> ScheduleInfo:
        for _ in range(_SWAP_TRIES):
            current = self._stored_schedule(info.name)
            if current is not None and current.problem is not None:
                # a record that cannot be read is replaced whole
                fresh = replace(info, through=self.now(), stored=None)
                if self.backend.swap_schedule(info.name, current, fresh):
                    return self._stored_schedule(info.name) or info
                continue
            if current is not None and current.queue != self.name:
                raise ConfigurationError(
                    f"schedule {info.name!r} belongs to queue {current.queue!r}; schedule names "
                    "are shared by the queues of one storage"
                )
            if current is None:
                new = replace(info, through=self.now(), stored=None)  # ticks from now on
            else:
                new = replace(
                    info,
                    stored=None,
                    through=current.through,
                    last_tick=current.last_tick,
                    last_job=current.last_job,
                )
                if new == current:
                    return current
            if self.backend.swap_schedule(info.name, current, new):
                return new
        raise BackendError(f"schedule {info.name!r} kept changing while it was being written")

    # -- hooks -------------------------------------------------------------------------------
    def on_enqueue(self, hook: Callable[[Job], object]) -> Callable[[Job], object]:
        """Call ``hook(job)`` for each job an enqueue adds (not for an id already there),
        after it is stored, on the thread that enqueued. Usable as a decorator. The jobs of
        schedule ticks are enqueued by workers, beside their beats, and not told here: a
        slow hook there would hold up the beat that keeps the worker alive to the others."""
        self.hooks.enqueued.append(hook)
        return hook

    def before_attempt(self, hook: Callable[[Job], object]) -> Callable[[Job], object]:
        """Call ``hook(job)`` as a worker starts an attempt (``job.attempts`` counts it), on
        the worker's event loop, before the task runs: keep it quick, as for an inline
        task."""
        self.hooks.before_attempt.append(hook)
        return hook

    def after_attempt(
        self, hook: Callable[[Job, str, float, str | None], object]
    ) -> Callable[[Job, str, float, str | None], object]:
        """Call ``hook(job, outcome, duration_s, error)`` as an attempt ends, once its
        outcome is written, on the worker's event loop. ``outcome``: ``succeeded``,
        ``retried``, ``dead``, ``postponed`` (handed on to a worker that knows the task) or
        ``not kept`` (the lease was lost, or the outcome could not be written); ``error``:
        the traceback or the reason, for the outcomes that have one."""
        self.hooks.after_attempt.append(hook)
        return hook

    def on_dead(self, hook: Callable[[Job, str], object]) -> Callable[[Job, str], object]:
        """Call ``hook(job, error)`` when a job goes dead: its last attempt failed, it can
        never run (a worker said why), or it was cancelled before running (then on the
        thread that cancelled)."""
        self.hooks.dead.append(hook)
        return hook

    # -- enqueueing --------------------------------------------------------------------------
    def _new_job(
        self,
        task: Task[Any, Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carrier: dict[str, str] | None = None,
        after: tuple[str, int] | None = None,
    ) -> NewJob:
        """The job a call stands for, checked. ``after``: a step of a workflow, given what it
        waited for (how, and of how many) before ``args`` (see ``_workflows``)."""
        task_name = task if isinstance(task, str) else task.name
        options = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("_")} if kwargs else {}
        job_id = options.pop("_id", None)
        delay_s = options.pop("_delay_s", None)
        eta = options.pop("_eta", None)
        default_priority = 0 if isinstance(task, str) else task.options.priority
        priority = options.pop("_priority", default_priority)
        key = options.pop("_key", None)
        if options:
            raise ConfigurationError(
                f"unknown enqueue option(s) {sorted(options)}: the options are _id, _delay_s, "
                "_eta, _priority and _key"
            )
        serializer = self.serializer
        # containers may hide what the encoder would change or choke on (plain values, the
        # common case, cost one isinstance each)
        for where, value in _containers(args, kwargs):
            check_shape(where, task_name, value, serializer.keys, _FORMAT_NAMES[serializer.name])
        body: dict[str, Any] = {"args": list(args), "kwargs": kwargs}
        if carrier:
            body["trace"] = carrier
        if key is not None and not isinstance(task, str) and task.options.key_limited:
            # the key names a limit (see TaskSettings.key_concurrency), not a line
            _check_name("_key", key)
            body["limit_key"] = key
            key = None
        if after is not None:
            body["after"] = list(after)
        try:
            payload = serializer.dumps(body)
        except Exception:
            serializer.check(task_name, args, kwargs)  # names the argument at fault
            raise
        if self.max_payload_bytes is not None and len(payload) > self.max_payload_bytes:
            raise ConfigurationError(
                f"the arguments of task {task_name!r} are {len(payload):,} bytes as "
                f"{serializer.name}, over this queue's max_payload_bytes="
                f"{self.max_payload_bytes:,}: store large data elsewhere and send where it is, "
                "or raise the limit"
            )
        if not isinstance(task, str):
            given = args if after is None else (None, *args)  # what it waited for comes first
            low, high = task.positional
            if kwargs or not low <= len(given) <= high:  # else it binds: skip the binding
                try:
                    task.signature.bind(*given, **kwargs)
                except TypeError as exc:
                    raise ConfigurationError(f"task {task_name!r}: {exc}") from None
        now = self.now()
        run_at = now
        if delay_s is not None and eta is not None:
            raise ConfigurationError("give _delay_s or _eta, not both")
        if delay_s is not None:
            run_at = now + _seconds("_delay_s", delay_s)
        elif eta is not None:
            run_at = eta.timestamp() if isinstance(eta, datetime) else _seconds("_eta", eta)
        _check_name("_id", job_id)
        _check_name("_key", key)
        check_priority("_priority", priority)
        return NewJob(
            id=job_id or new_id(),
            queue=self.name,
            task=task_name,
            payload=payload,
            priority=priority,
            key=key,
            run_at=run_at,
        )

    @overload
    def enqueue(self, task: Task[Any, R], /, *args: Any, **kwargs: Any) -> JobHandle[R]: ...
    @overload
    def enqueue(self, task: str, /, *args: Any, **kwargs: Any) -> JobHandle[Any]: ...
    def enqueue(self, task: Task[Any, Any] | str, /, *args: Any, **kwargs: Any) -> JobHandle[Any]:
        """Enqueue ``task`` (a registered task, or a task name) with its arguments.
        ``_connection`` (PostgreSQL queues): a psycopg connection, or an SQLAlchemy session
        or connection, of the queue's database: the job is written in its transaction, and
        exists only if that commits."""
        connection = kwargs.pop("_connection", None)
        if self.tracing is not None:
            with self.tracing.sending(self.name, 1) as (carrier, named):
                new = self._new_job(task, args, kwargs, carrier)
                named([new.id])
                [(job, added)] = self._store([new], connection)
        else:
            new = self._new_job(task, args, kwargs)
            [(job, added)] = self._store([new], connection)
        if added and self.hooks.enqueued:
            call_hooks(self.hooks.enqueued, job)
        return JobHandle(self, job.id, job.task, added)

    def enqueue_many(
        self,
        task: Task[Any, Any] | str,
        calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
        *,
        _connection: Any = None,
    ) -> list[JobHandle[Any]]:
        """Enqueue many calls of one task in one transaction (``_connection``: that
        connection's, as for :meth:`enqueue`)."""
        if self.tracing is not None:
            calls = list(calls)
            with self.tracing.sending(self.name, len(calls)) as (carrier, named):
                news = [
                    self._new_job(task, tuple(args), dict(kwargs), carrier)
                    for args, kwargs in calls
                ]
                named([new.id for new in news])
                stored = self._store(news, _connection)
        else:
            news = [self._new_job(task, tuple(args), dict(kwargs)) for args, kwargs in calls]
            stored = self._store(news, _connection)
        if self.hooks.enqueued:
            for job, added in stored:
                if added:
                    call_hooks(self.hooks.enqueued, job)
        return [JobHandle(self, job.id, job.task, added) for job, added in stored]

    def _store(self, news: list[NewJob], connection: Any) -> list[tuple[Job, bool]]:
        if connection is None:
            return self.backend.enqueue(news, self.now())
        return self.backend.enqueue_in(connection, news, self.now())

    def enqueue_workflow(self, flow: Flow, *, _id: str | None = None) -> WorkflowHandle[Any]:
        """Enqueue a ``chain``, ``group`` or ``chord`` (or one ``task.s(...)``) whole, in one
        transaction. ``_id`` names the workflow (its steps are ``<id>.0``, ``<id>.1``...): a
        workflow enqueued again under the same id adds nothing while its steps are there."""
        _check_name("_id", _id)
        workflow_id = _id or new_id()
        news, exits, many = compile_workflow(self, flow, workflow_id)
        if self.tracing is not None:
            with self.tracing.sending(self.name, len(news)) as (carrier, named):
                news, exits, many = compile_workflow(self, flow, workflow_id, carrier)
                named([new.id for new in news])
                stored = self.backend.enqueue(news, self.now(), whole=True)
        else:
            stored = self.backend.enqueue(news, self.now(), whole=True)
        if self.hooks.enqueued:
            for job, added in stored:
                if added:
                    call_hooks(self.hooks.enqueued, job)
        ids = [new.id for new in news]
        return WorkflowHandle(self, workflow_id, ids, exits, many, any(a for _, a in stored))

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle for an existing job."""
        found = self.get(job_id)
        return JobHandle(self, job_id, found.task if found else "", added=False)

    def get(self, job_id: str) -> Job | None:
        """The job as stored, or None if unknown. A done job whose result has expired is
        unknown from the moment it expires, whether or not it has been swept yet."""
        job = self.backend.get(job_id)
        expired = job is not None and replaceable(job, self.now()) and job.state == DONE
        return None if expired else job

    # -- state -------------------------------------------------------------------------------
    def finish(self, job_id: str) -> None:
        """Mark ``job_id`` done (kept): it cannot be enqueued again until :meth:`unfinish`."""
        self.backend.finish(job_id, self.now())

    def unfinish(self, job_id: str) -> bool:
        """Make a done id enqueueable again; False if it was not done."""
        return self.backend.unfinish(job_id)

    def stats(self) -> QueueCounts:
        return self.backend.counts(self.name, self.now())

    def jobs(
        self,
        state: str | None = None,
        *,
        task: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """This queue's jobs as stored (in ``state``, of ``task``, when given), oldest first,
        ``limit`` of them from ``offset``."""
        return self.backend.jobs(self.name, state, task=task, limit=limit, offset=offset)

    def workers(self) -> list[WorkerInfo]:
        """The records of the workers of this queue's storage (the last day's), newest first."""
        return self.backend.workers()

    def requeue(self, job_id: str) -> bool:
        return self.backend.requeue(job_id, self.now())

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """A queued job will not run: it is dead with ``reason`` (``requeue`` brings it
        back). False if it is not queued (running, done, dead or unknown)."""
        cancelled = self.backend.cancel(job_id, reason, self.now())
        if cancelled and self.hooks.dead:
            job = self.backend.get(job_id)
            if job is not None:
                call_hooks(self.hooks.dead, job, reason)
        return cancelled

    def abort(self, job_id: str, *, by: str | None = None) -> str:
        """Abort a job: queued (or waiting), it is ``aborted`` at once and never runs
        (``"aborted"``); running, its worker stops it within a beat (a coroutine cancelled, a
        process killed, a thread told through ``current_job().abort_requested`` and abandoned
        after the worker's ``abort_grace_s``) and records it ``aborted`` (``"requested"``).
        Otherwise nothing changes and its state is returned (``"unknown"`` for no such job).
        ``by`` says who asked (default: this user at this host); it is kept in the error."""
        _check_name("by", by)
        who = by or _who()
        return self.backend.abort(job_id, who, self.now())

    def requeue_dead(self) -> int:
        return self.backend.requeue_dead(self.name, self.now())

    def purge(self) -> int:
        return self.backend.purge(self.name)

    # -- working -----------------------------------------------------------------------------
    @staticmethod
    def migrate(url: str) -> list[str]:
        """Create the storage's schema at ``url``, or bring it up to this conveyor's version;
        returns what was done, one line each (nothing: it was up to date). A PostgreSQL
        queue needs it before first use (``conveyor migrate URL``, from a deploy step); it is
        idempotent and safe from several machines at once, and refuses a schema made by a
        newer conveyor. SQLite files are brought up to date whenever they are opened, and
        Redis keeps no schema: for them it only checks that the storage can be reached."""
        scheme = urlparse(url).scheme
        if scheme in ("postgresql", "postgres"):
            done: list[str] = _postgres(scheme).migrate(url)
            return done
        open_backend(url, create=True).close()
        return []

    def worker(self, **options: Any) -> Worker:
        """A worker for this queue; see :class:`conveyor.tasks.Worker` for the options."""
        from ._worker import Worker

        return Worker([self], **options)

    def close(self) -> None:
        """Release the queue's connections (a memory queue keeps its jobs: nothing else holds
        them)."""
        if not isinstance(self.backend, MemoryBackend):
            self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TaskQueue {self.name!r} at {self.where}>"
