"""Stage definitions: the ``Stage`` base class, the adaptors that turn what a user gives into
per-worker work, and the checks that reject bad options when the pipeline is built."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from .._engine import KINDS, StepSpec, check_policy, kind_names
from .._errors import ConfigurationError

In = TypeVar("In")
Out = TypeVar("Out")


class Stage(Generic[In, Out]):
    """Subclass this for a stage with per-worker state.

    Each worker of the stage gets its own instance: ``setup()`` runs in that worker before its
    first item, ``process(item)`` once per item, ``teardown()`` after its last item (also when the
    stage shrinks or the run stops). Give the class (instantiated once per worker with no
    arguments) or an instance (shallow-copied once per worker) to ``map``, ``filter``,
    ``flat_map`` or ``each``. For ``kind="async"``, write ``async def process`` (``setup`` and
    ``teardown`` may be ``async def`` too).
    """

    def setup(self) -> Any:
        """Runs in the worker before its first item."""

    def process(self, item: In) -> Out | Awaitable[Out]:
        raise NotImplementedError(f"{type(self).__name__} must define process(item)")

    def teardown(self) -> Any:
        """Runs in the worker after its last item."""


class _FunctionWork:
    __slots__ = ("call",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.call = fn

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        return None


class _StageWork:
    __slots__ = ("call", "setup", "teardown")

    def __init__(self, stage: Stage[Any, Any]) -> None:
        self.call = stage.process
        self.setup = stage.setup
        self.teardown = stage.teardown


def _is_async_callable(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own __call__
    return call is not None and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


def describe(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if name is None:
        name = type(fn).__name__
    return str(name)


def work_factory(fn: Any) -> tuple[Callable[[], Any], bool, str]:
    """``(make_work, is_async, default_name)`` for a function, a Stage class or a Stage instance."""
    if isinstance(fn, type) and issubclass(fn, Stage):
        if fn.process is Stage.process:
            raise ConfigurationError(f"{fn.__name__} must define process(item)")
        cls = fn
        return (lambda: _StageWork(cls())), _is_async_callable(cls.process), cls.__name__
    if isinstance(fn, Stage):
        if type(fn).process is Stage.process:
            raise ConfigurationError(f"{type(fn).__name__} must define process(item)")
        proto = fn
        return (
            (lambda: _StageWork(copy.copy(proto))),
            _is_async_callable(type(fn).process),
            type(fn).__name__,
        )
    if isinstance(fn, type) and not callable(getattr(fn, "__call__", None)):  # noqa: B004
        raise ConfigurationError(f"{fn!r} is a class but not a Stage subclass")
    if not callable(fn):
        raise ConfigurationError(
            f"a stage needs a function or a Stage subclass, not {type(fn).__name__} ({fn!r})"
        )
    shared = _FunctionWork(fn)
    return (lambda: shared), _is_async_callable(fn), describe(fn)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise ConfigurationError(
            f"{name} must be a positive number of seconds or None, not {value!r}"
            if name.endswith("_s")
            else f"{name} must be a positive number or None, not {value!r}"
        )
    return float(value)


DEFAULT_MAXSIZE = 4096


def build_spec(
    mode: str,
    fn: Any,
    *,
    name: str | None,
    workers: int,
    kind: str,
    ordered: bool,
    key: Callable[[Any], Hashable] | None,
    maxsize: int | None,
    on_error: Any,
    timeout_s: float | None,
    rate: float | None,
    kind_options: dict[str, Any] | None = None,
) -> tuple[StepSpec, int]:
    """Check every option and return the step's spec and its inbox capacity."""
    make_work, is_async, default_name = work_factory(fn)
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigurationError(
            f"unknown kind {kind!r}: choose one of {', '.join(repr(k) for k in kind_names())}"
        )
    label = name or default_name
    if not KINDS[kind].runs_here and (
        isinstance(fn, Stage) or (isinstance(fn, type) and issubclass(fn, Stage))
    ):
        raise ConfigurationError(
            f"kind={kind!r} sends each call to an executor: give {label} as a function (a "
            "Stage's setup and teardown would run in this process, not where process runs)"
        )
    wants_async = KINDS[kind].wants_async
    if is_async and not wants_async:
        raise ConfigurationError(
            f"{label} is an async def function: give kind='async' to run it on an event loop "
            f"(kind={kind!r} would call it and get a coroutine back)"
        )
    if wants_async and not is_async:
        raise ConfigurationError(
            f"kind={kind!r} runs coroutines, but {label} is a plain function: "
            "make it async def, or use kind='thread'"
        )
    workers = _positive_int("workers", workers)
    cap = KINDS[kind].default_maxsize if maxsize is None else _positive_int("maxsize", maxsize)
    if not isinstance(ordered, bool):
        raise ConfigurationError(f"ordered must be True or False, not {ordered!r}")
    if key is not None and not callable(key):
        raise ConfigurationError(f"key must be a function of the item, not {key!r}")
    check_policy(on_error)
    spec = StepSpec(
        name=label,
        kind=kind,
        mode=mode,
        workers=workers,
        make_work=make_work,
        ordered=ordered,
        key=key,
        policy=on_error,
        timeout_s=_positive_number("timeout_s", timeout_s),
        rate=_positive_number("rate", rate),
        window=cap,
        options=tuple((k, v) for k, v in (kind_options or {}).items() if v is not None),
    )
    KINDS[kind].validate(spec)
    return spec, cap
