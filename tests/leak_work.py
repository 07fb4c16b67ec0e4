"""What the leak test's worker processes run: a module of its own that imports nothing heavy,
so a worker process that imports it to find a function starts at once (the test module would
bring pytest along, fifty times over)."""

from __future__ import annotations

import asyncio
from typing import Any


def square(x: int) -> int:
    return x * x


async def slow_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def echo(end: Any) -> None:
    for msg in end:
        end.send("ECHO", msg.data)
    end.close()
