"""Ordered, keyed and plain stages of every kind, 200k items, 20 times: none may hang, and
every item comes out exactly once (in order, or in order per key, where asked).

This is the test that found a driver of an ordered process stage waiting for room in the
reorder window that only its own units in flight could make. It takes a couple of minutes, so
``scripts/test`` runs it on the first claimed Python only (``-m stress`` selects it).
"""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import Pipeline

N = 200_000
ROUNDS = 20
WORKERS = {"thread": 4, "process": 2, "async": 256}


def ident(x: int) -> int:
    return x


async def aident(x: int) -> int:
    return x


def key(x: int) -> int:
    return x % 7


@pytest.mark.stress
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["thread", "process", "async"])
def test_stages_of_every_kind_never_hang_at_volume(kind: str) -> None:
    fn: Any = aident if kind == "async" else ident
    for _ in range(ROUNDS):
        ordered = list(Pipeline(range(N), ordered=True).map(fn, kind=kind, workers=WORKERS[kind]))
        assert ordered == list(range(N))
        keyed = list(Pipeline(range(N)).map(fn, kind=kind, workers=WORKERS[kind], key=key))
        assert sorted(keyed) == list(range(N))
        for k in range(7):
            mine = [x for x in keyed if x % 7 == k]
            assert mine == sorted(mine)
        plain = list(Pipeline(range(N)).map(fn, kind=kind, workers=WORKERS[kind]))
        assert sorted(plain) == list(range(N))
