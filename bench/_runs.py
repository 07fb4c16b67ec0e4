"""Run records shared by the Redis queue benchmark and the job functions peers import by path
(rq refuses functions of ``__main__``)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

RUNS: Counter[int] = Counter()
_LOCK = threading.Lock()
#: the job body: "noop" (record the run), or "call" (also one call to the Redis server at
#: ``URL``: a blocking one from a thread, an awaited one from a coroutine)
BODY = {"kind": "noop", "url": ""}
_clients: dict[Any, Any] = {}


def mark(i: int) -> None:
    with _LOCK:
        RUNS[i] += 1
    if BODY["kind"] == "call":
        client = _clients.get("sync")
        if client is None:
            import redis

            client = _clients["sync"] = redis.Redis.from_url(BODY["url"])
        client.incr("bench:calls")


async def amark(i: int) -> None:
    """``mark`` for a coroutine: the call is awaited, on a client of the running loop."""
    with _LOCK:
        RUNS[i] += 1
    if BODY["kind"] == "call":
        loop = asyncio.get_running_loop()
        client = _clients.get(loop)
        if client is None:
            import redis.asyncio

            client = _clients[loop] = redis.asyncio.Redis.from_url(BODY["url"])
        await client.incr("bench:calls")


def rq_noop(i: int) -> None:
    mark(i)
