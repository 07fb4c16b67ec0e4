"""Items that carry acknowledgement tokens through a pipeline.

A source that must know when everything made from one of its items is over (a stream entry is
acknowledged only then) hands each item on as a :class:`Carried`: the value and the tokens of
the entries it came from. Each step runs the user's function on the value and hands on what it
gave carried by the same tokens (:func:`carry_spec` wraps the step's work and its key, so the
user's code never sees a ``Carried``); a ``batch`` merges its items' tokens.

A :class:`Ledger` counts, per token, the carried items alive in the run. A step that completes
a unit counts its outputs in before it hands them on and counts its inputs out after, so a
count reaches zero only when no output of the token is left anywhere: filtered, skipped,
dead-lettered, consumed by a sink or handed to the caller. Zero calls ``on_done`` with the
tokens that reached it. A unit that never completes (its run failed) counts nothing out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import replace
from typing import Any

from .source import EACH, FILTER, FLAT, MAP, StepSpec


class Carried:
    """A value and the tokens of the source entries it came from."""

    __slots__ = ("tokens", "value")

    def __init__(self, tokens: tuple[Hashable, ...], value: Any) -> None:
        self.tokens = tokens
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Carried, (self.tokens, self.value))

    def __repr__(self) -> str:
        return repr(self.value)


def plain(item: Any) -> Any:
    """The user's value of an item (itself, unless it is carried)."""
    return item.value if type(item) is Carried else item


def merge(items: list[Any]) -> Carried:
    """One carried list of ``items``' values, carried by all their tokens (once each)."""
    tokens: dict[Hashable, None] = {}
    for item in items:
        tokens.update(dict.fromkeys(item.tokens))
    return Carried(tuple(tokens), [item.value for item in items])


class Ledger:
    """How many carried items of each token are alive; see the module."""

    def __init__(
        self,
        on_done: Callable[[list[Hashable]], None],
        on_failed: Callable[[tuple[Hashable, ...], BaseException], None] | None = None,
    ) -> None:
        self._on_done = on_done
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._alive: dict[Hashable, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._alive)

    def tokens(self) -> list[Hashable]:
        """The tokens with items alive (a copy)."""
        with self._lock:
            return list(self._alive)

    def enter(self, items: Iterable[Carried]) -> None:
        """Count in items made from source entries (or from other items)."""
        with self._lock:
            alive = self._alive
            for item in items:
                for token in item.tokens:
                    alive[token] = alive.get(token, 0) + 1

    def leave(self, items: Iterable[Any]) -> None:
        """Count out items that are over; tokens that reach zero go to ``on_done``, under the
        lock: whoever sees the ledger empty finds them already handed on (``on_done`` must
        be quick and must not call back)."""
        done: list[Hashable] = []
        with self._lock:
            alive = self._alive
            for item in items:
                for token in item.tokens:
                    n = alive[token] - 1
                    if n:
                        alive[token] = n
                    else:
                        del alive[token]
                        done.append(token)
            if done:
                self._on_done(done)

    def failed(self, tokens: tuple[Hashable, ...], error: BaseException) -> None:
        """An item of ``tokens`` failed its run (which stops): the source may keep why."""
        if self._on_failed is not None:
            self._on_failed(tokens, error)


class _CarriedWork:
    """A worker's work on carried items: the user's work on their values, the outputs carried
    by the same tokens. Built where the work runs (in a worker process, too)."""

    __slots__ = ("_call", "_mode", "setup", "teardown")

    def __init__(self, inner: Any, mode: str) -> None:
        self._call = inner.call
        self._mode = mode
        self.setup = inner.setup
        self.teardown = inner.teardown

    def call(self, item: Carried) -> Any:
        res = self._call(item.value)
        if hasattr(res, "__await__"):
            return self._later(item.tokens, res)
        mode = self._mode
        if mode == MAP:
            return Carried(item.tokens, res)
        if mode == FLAT:
            if hasattr(res, "__aiter__"):
                return _carried_aiter(item.tokens, res)
            return None if res is None else [Carried(item.tokens, r) for r in res]
        return res  # filter: the kind hands on the carried item itself; each: nothing

    async def _later(self, tokens: tuple[Hashable, ...], pending: Any) -> Any:
        res = await pending
        mode = self._mode
        if mode == MAP:
            return Carried(tokens, res)
        if mode == FLAT:
            if hasattr(res, "__aiter__"):
                return [Carried(tokens, r) async for r in res]
            return None if res is None else [Carried(tokens, r) for r in res]
        return res


async def _carried_aiter(tokens: tuple[Hashable, ...], values: Any) -> Any:
    async for value in values:
        yield Carried(tokens, value)


class _MakeCarriedWork:
    """``make_work`` of a carried step (a class, so process workers can receive it)."""

    __slots__ = ("inner", "mode")

    def __init__(self, inner: Callable[[], Any], mode: str) -> None:
        self.inner = inner
        self.mode = mode

    def __call__(self) -> _CarriedWork:
        return _CarriedWork(self.inner(), self.mode)


class _CarriedKey:
    __slots__ = ("key",)

    def __init__(self, key: Callable[[Any], Hashable]) -> None:
        self.key = key

    def __call__(self, item: Carried) -> Hashable:
        return self.key(item.value)


def carry_spec(spec: StepSpec) -> StepSpec:
    """``spec`` for carried items: its work and its key see the values."""
    if spec.mode not in (MAP, FILTER, FLAT, EACH):
        return spec
    return replace(
        spec,
        make_work=_MakeCarriedWork(spec.make_work, spec.mode),
        key=None if spec.key is None else _CarriedKey(spec.key),
    )
