"""Durable boundaries between pipelines on different machines: Redis Streams.

``p.to_stream(url, name)`` ends a pipeline by appending its outputs to a stream;
``Pipeline.from_stream(url, name, group=...)`` starts one in any number of processes that
share the entries through a consumer group.

An entry is acknowledged (``XACK``) only when everything made from it in this process is over:
its items carry the entry's id through every stage (see ``_engine.carry``), and the run's
ledger reports the ids whose last item has been written by the last stage, consumed by a sink,
filtered out, skipped or dead-lettered by a stage's policy, or handed to the caller.

The reading loop runs on a worker of the thread kind, like any source. Besides reading it
acknowledges what is over, renews the entries it holds (``XCLAIM ... JUSTID`` resets their idle
time without counting a delivery) and takes over entries that another consumer has held past
the lease without renewing them (``XAUTOCLAIM``): that consumer died or hangs. An entry
delivered more than ``max_deliveries`` times, or that cannot be decoded, goes to the stream
``<name>:dead`` with the reason, and is acknowledged where it was.

Redis has no way to refuse a write to a full stream, so ``to_stream(..., max_lag=N)`` makes the
producer wait while a group has more than ``N`` entries it has not acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .._engine import SYSTEM_CLOCK, Buffer, BufferShutdown, Clock, StepSpec, StreamStats
from .._engine.carry import Carried, Ledger
from .._engine.source import EACH
from .._engine.stats import LatencyRing
from .._errors import ClosedResourceError, ConfigurationError, redacted
from ._feed import OneUnitSource
from ._stage import Stage, _FunctionWork

log = logging.getLogger("conveyor.stream")

#: the field of an entry that holds the value
FIELD = b"v"
#: the dead-letter stream of ``name``, and the hash of reasons kept for entries whose run failed
DEAD_SUFFIX = ":dead"
ERRORS_SUFFIX = ":errors"
#: the longest the reading loop blocks in one read, so acknowledgements and renewals keep up
_READ_BLOCK_S = 0.1
#: the first and the longest pause after the server could not be reached
_OUTAGE_FIRST_S = 0.1
_OUTAGE_MAX_S = 5.0
#: how often a producer waiting for the lag to fall looks again (the longest pause)
_LAG_POLL_MAX_S = 0.25


# -- what an entry holds ---------------------------------------------------------------------
class _Json:
    name = "json"

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"a {type(value).__name__} cannot be written to a stream as JSON ({exc}); "
                "write JSON values, or give serializer='pickle' to both ends"
            ) from None

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class _Pickle:
    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


_SERIALIZERS: dict[str, Callable[[], Any]] = {"json": _Json, "pickle": _Pickle}


def _serializer(name: Any) -> Any:
    if name not in _SERIALIZERS:
        raise ConfigurationError(
            f"serializer must be one of {', '.join(_SERIALIZERS)}, not {name!r}"
        )
    return _SERIALIZERS[name]()


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"a stream's url is like 'redis://host:6379/0', not {url!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme == "nats":
        raise ConfigurationError(
            "nats:// streams are not supported yet (see docs/beyond.md): use a redis:// url"
        )
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"a stream's url starts with redis://, rediss:// or unix://, not {redacted(url)!r}"
        )
    return url


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{what} is a non-empty string, not {value!r}")
    return value


def _positive(what: str, value: Any, *, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value <= 0:
        raise ConfigurationError(f"{what} must be a positive number, not {value!r}")
    return value


def _client(url: str) -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigurationError(
            "Redis streams need the redis package: pip install 'conveyor[redis]'"
        ) from None
    return redis.Redis.from_url(url, socket_timeout=30, health_check_interval=30)


def _outage_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the producer ----------------------------------------------------------------------------
def group_backlog(client: Any, name: str) -> int:
    """The most entries any group of ``name`` has not acknowledged (not yet delivered, or
    delivered and pending); before a group exists, the stream's length."""
    groups = client.xinfo_groups(name) if client.exists(name) else []
    if not groups:
        return int(client.xlen(name))
    worst = 0
    for g in groups:
        lag = g.get("lag")
        if lag is None:  # Redis cannot tell after some deletions: count what is left
            lag = 0
        worst = max(worst, int(lag) + int(g.get("pending", 0)))
    return worst


class StreamWriter(Stage[list[Any], None]):
    """``to_stream``'s sink: append each list of values to the stream (each worker its own
    connection)."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        max_lag: int | None,
        maxlen: int | None,
        serializer: str,
    ) -> None:
        self.url = _check_url(url)
        self.name = _check_name("a stream's name", name)
        if max_lag is not None:
            _positive("max_lag", max_lag, integer=True)
        if maxlen is not None:
            _positive("maxlen", maxlen, integer=True)
        self.max_lag = max_lag
        self.maxlen = maxlen
        self.serializer_name = serializer
        self._client: Any = None
        self._dumps: Callable[[Any], bytes] = _serializer(serializer).dumps

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"<to_stream {self.name!r} at {redacted(self.url)}>"

    def setup(self) -> None:
        self._client = _client(self.url)

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def process(self, values: list[Any]) -> None:
        client = self._client
        if client is None:
            self.setup()
            client = self._client
        data = [{FIELD: self._dumps(v)} for v in values]
        if self.max_lag is not None:
            self._wait_for_room(client, len(data))
        pipe = client.pipeline(transaction=False)
        for fields in data:
            if self.maxlen is None:
                pipe.xadd(self.name, fields)
            else:
                pipe.xadd(self.name, fields, maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def _wait_for_room(self, client: Any, n: int) -> None:
        """Wait while the groups are more than ``max_lag`` entries behind (a batch larger than
        the limit goes once nothing is behind)."""
        assert self.max_lag is not None
        pause = 0.005
        while True:
            behind = group_backlog(client, self.name)
            if behind == 0 or behind + n <= self.max_lag:
                return
            time.sleep(pause)  # a wait for other machines: nothing here can wake it sooner
            pause = min(pause * 2, _LAG_POLL_MAX_S)


# -- the consumer ----------------------------------------------------------------------------
class StreamInput:
    """What ``Pipeline.from_stream`` reads: a stream, a group, this process's consumer."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        group: str,
        consumer: str | None,
        lease_s: float,
        max_deliveries: int,
        serializer: str,
        count: int,
        burst: bool,
        start: str,
    ) -> None:
        self.url = _check_url(url)
        self.name = _check_name("a stream's name", name)
        self.group = _check_name("group", group)
        self.consumer = (
            _check_name("consumer", consumer)
            if consumer is not None
            else f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.lease_s = float(_positive("lease_s", lease_s))
        self.max_deliveries = int(_positive("max_deliveries", max_deliveries, integer=True))
        self.serializer = _serializer(serializer)
        self.count = int(_positive("count", count, integer=True))
        if not isinstance(burst, bool):
            raise ConfigurationError(f"burst must be True or False, not {burst!r}")
        self.burst = burst
        if start not in ("0", "$"):
            raise ConfigurationError(
                f"start is '0' (a new group reads the stream from its first entry) or '$' "
                f"(from entries added after it is made), not {start!r}"
            )
        self.start = start

    def __repr__(self) -> str:
        return f"<stream {self.name!r} group {self.group!r} at {redacted(self.url)}>"


class StreamFeed(OneUnitSource):
    """The source of work "read the stream": one unit, for one worker of the thread kind."""

    def __init__(
        self,
        where: StreamInput,
        first: Buffer[Any],
        *,
        stop: threading.Event,
        stopped: Callable[[], bool],
        on_fatal: Callable[[BaseException], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.where = where
        self.first = first
        self.stop = stop
        self.stopped = stopped
        self.clock = clock
        self.latency = LatencyRing()
        self._on_fatal = on_fatal
        self.ledger = Ledger(self._over, self._failed)
        # ids whose items are over, waiting for their XACK (appended from any thread)
        self._to_ack: deque[Hashable] = deque()
        self._errors: dict[Hashable, str] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.read = 0
        self.reclaimed = 0
        self.acknowledged = 0
        self.dead_lettered = 0
        # the work of the feed's one worker: the reading loop
        reading = _FunctionWork(lambda _: self.read_all())
        self.spec = StepSpec(
            name="source", kind="thread", mode=EACH, workers=1, make_work=lambda: reading
        )

    # -- the ledger's word ---------------------------------------------------------------------
    def _over(self, ids: list[Hashable]) -> None:
        self._to_ack.extend(ids)
        self._wake.set()

    def _failed(self, ids: tuple[Hashable, ...], error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        with self._lock:
            for i in ids:
                self._errors[i] = text

    def stats(self) -> StreamStats:
        w = self.where
        return StreamStats(
            stream=w.name,
            group=w.group,
            consumer=w.consumer,
            read=self.read,
            reclaimed=self.reclaimed,
            acknowledged=self.acknowledged,
            dead_lettered=self.dead_lettered,
            in_flight=len(self.ledger),
        )

    # -- the reading loop ------------------------------------------------------------------------
    def read_all(self) -> None:
        w = self.where
        client = _client(w.url)
        outage = _outage_errors()
        self._make_group(client)
        beat_every = w.lease_s / 4
        reclaim_every = w.lease_s / 2
        now = time.monotonic()
        next_beat = now + beat_every
        next_reclaim = now  # at once: a consumer that died before this one started left work
        # this consumer's own entries from an earlier life come first, read page by page
        # (a read from an id gives the pending entries after it, again until acknowledged)
        history: bytes | str | None = "0"
        pause = _OUTAGE_FIRST_S
        try:
            while not self.stopped() and not self.stop.is_set():
                try:
                    self._acknowledge(client)
                    now = time.monotonic()
                    if now >= next_beat:
                        self._renew(client)
                        next_beat = now + beat_every
                    if now >= next_reclaim:
                        if self._reclaim(client) < w.count:
                            next_reclaim = now + reclaim_every
                        continue
                    if history is not None:
                        history = self._read(client, history, block=False)
                        continue
                    got = self._read(client, ">", block=True)
                    pause = _OUTAGE_FIRST_S
                    if not got and w.burst and self._drained(client):
                        break
                except outage as exc:
                    log.error(
                        "stream %r: %s unreachable (%s); trying again in %.1f s",
                        w.name,
                        redacted(w.url),
                        exc,
                        pause,
                    )
                    if self.stop.wait(pause):
                        break
                    pause = min(pause * 2, _OUTAGE_MAX_S)
            if not self.stop.is_set():
                self.first.close()
                self._drain(client, beat_every)
        except (BufferShutdown, ClosedResourceError):
            pass
        finally:
            try:
                self._last_words(client)
            except Exception as exc:
                log.error("stream %r: acknowledgements not written at the end (%s)", w.name, exc)
            client.close()

    def _make_group(self, client: Any) -> None:
        import redis

        w = self.where
        try:
            client.xgroup_create(w.name, w.group, id=w.start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, client: Any, from_id: bytes | str, *, block: bool) -> bytes | None:
        """Read entries (new ones with ``>``, this consumer's own pending ones after an id)
        into the first buffer; returns the last one's id (None: there were none)."""
        w = self.where
        reply = client.xreadgroup(
            w.group,
            w.consumer,
            {w.name: from_id},
            count=w.count,
            block=int(_READ_BLOCK_S * 1000) if block else None,
        )
        entries = reply[0][1] if reply else []
        if not entries:
            return None
        if from_id == ">":
            self.read += len(entries)
            self._take(client, entries, {})
        else:
            self.reclaimed += len(entries)
            self._take(client, entries, self._deliveries(client, entries))
        last: bytes = entries[-1][0]
        return last

    def _take(self, client: Any, entries: list[Any], deliveries: dict[bytes, int]) -> None:
        """Hand decodable entries to the first stage; dead-letter the others and those
        delivered too often."""
        w = self.where
        loads = w.serializer.loads
        items: list[Carried] = []
        dead: list[tuple[bytes, Any, str]] = []
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while it was pending: nothing to do
                self._to_ack.append(entry_id)
                continue
            n = deliveries.get(entry_id, 1)
            if n > w.max_deliveries:
                dead.append((entry_id, fields, f"delivered {n} times"))
                continue
            try:
                value = loads(fields[FIELD])
            except Exception as exc:
                dead.append((entry_id, fields, f"cannot be decoded: {type(exc).__name__}: {exc}"))
                continue
            items.append(Carried((entry_id,), value))
        if dead:
            self._bury(client, dead)
        if items:
            self.ledger.enter(items)
            self._push(client, items)

    def _push(self, client: Any, items: list[Carried]) -> None:
        """Put ``items`` into the first buffer, keeping acknowledgements and renewals going
        while it is full."""
        first = self.first
        n = first.offer_many(items)
        beat_every = self.where.lease_s / 4
        next_beat = time.monotonic() + beat_every
        while n < len(items):
            if first.put(items[n], _READ_BLOCK_S):
                n += 1
                continue
            if self.stop.is_set():
                raise BufferShutdown
            self._acknowledge(client)
            if time.monotonic() >= next_beat:
                self._renew(client)
                next_beat = time.monotonic() + beat_every

    def _acknowledge(self, client: Any) -> None:
        pending = self._to_ack
        if not pending:
            return
        ids = []
        while pending:
            ids.append(pending.popleft())
        w = self.where
        try:
            pipe = client.pipeline(transaction=False)
            for i in range(0, len(ids), 1000):
                pipe.xack(w.name, w.group, *ids[i : i + 1000])
            pipe.execute()
        except BaseException:
            pending.extendleft(reversed(ids))
            raise
        self.acknowledged += len(ids)
        with self._lock:
            if self._errors:
                for entry_id in ids:
                    self._errors.pop(entry_id, None)

    def _renew(self, client: Any) -> None:
        """Reset the idle time of every entry this consumer holds (not their delivery count)."""
        ids = self.ledger.tokens()
        w = self.where
        for i in range(0, len(ids), 1000):
            client.xclaim(w.name, w.group, w.consumer, 0, ids[i : i + 1000], justid=True)

    def _reclaim(self, client: Any) -> int:
        """Take over entries held past the lease by consumers that stopped renewing them;
        returns how many were looked at."""
        w = self.where
        reply = client.xautoclaim(
            w.name, w.group, w.consumer, int(w.lease_s * 1000), start_id="0-0", count=w.count
        )
        entries = reply[1]
        for entry_id in reply[2] if len(reply) > 2 else []:
            log.warning("stream %r: entry %s was deleted before it was done", w.name, entry_id)
        if not entries:
            return 0
        deliveries = self._deliveries(client, entries)
        self.reclaimed += len(entries)
        log.warning(
            "stream %r: took over %d entr%s held past the lease by another consumer",
            w.name,
            len(entries),
            "y" if len(entries) == 1 else "ies",
        )
        self._take(client, entries, deliveries)
        return len(entries)

    def _deliveries(self, client: Any, entries: list[Any]) -> dict[bytes, int]:
        """How many times each of ``entries`` (held by this consumer) has been delivered."""
        w = self.where
        pipe = client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(w.name, w.group, entry_id, entry_id, 1, w.consumer)
        deliveries: dict[bytes, int] = {}
        for row in pipe.execute():
            if row:
                deliveries[row[0]["message_id"]] = int(row[0]["times_delivered"])
        return deliveries

    def _bury(self, client: Any, dead: list[tuple[bytes, Any, str]]) -> None:
        """Move entries to ``<name>:dead`` with their reasons and acknowledge them here."""
        w = self.where
        errors_key = w.name + ERRORS_SUFFIX
        known = client.hmget(errors_key, [entry_id for entry_id, _, _ in dead])
        pipe = client.pipeline(transaction=True)
        for (entry_id, fields, why), last_error in zip(dead, known, strict=True):
            reason = why if last_error is None else f"{why}; last error: {_text(last_error)}"
            record = {
                b"id": entry_id,
                b"group": w.group,
                b"consumer": w.consumer,
                b"error": reason,
                FIELD: fields.get(FIELD, b""),
            }
            pipe.xadd(w.name + DEAD_SUFFIX, record)
            pipe.xack(w.name, w.group, entry_id)
            pipe.hdel(errors_key, entry_id)
            log.error("stream %r: entry %s dead-lettered (%s)", w.name, _text(entry_id), reason)
        pipe.execute()
        self.dead_lettered += len(dead)

    def _drained(self, client: Any) -> bool:
        """Whether the group has nothing left for this consumer to read: nothing undelivered,
        and nothing pending but what this consumer holds (which its run finishes)."""
        w = self.where
        for g in client.xinfo_groups(w.name):
            if _text(g["name"]) == w.group:
                if g.get("lag"):
                    return False
                # counted in this order, an entry on its way from the ledger to its XACK is
                # missed rather than counted twice: the answer errs towards reading on
                mine = len(self._to_ack)
                mine += len(self.ledger)
                return int(g.get("pending", 0)) <= mine
        return True

    def _drain(self, client: Any, beat_every: float) -> None:
        """After the last read: acknowledge entries as their items end, renewing the others,
        until none is left or the run is torn down."""
        next_beat = time.monotonic() + beat_every
        while len(self.ledger) and not self.stop.is_set():
            self._wake.wait(min(beat_every, _READ_BLOCK_S))
            self._wake.clear()
            self._acknowledge(client)
            if time.monotonic() >= next_beat:
                self._renew(client)
                next_beat = time.monotonic() + beat_every

    def _last_words(self, client: Any) -> None:
        """Acknowledge what is over, and keep the reasons of entries whose run failed for the
        consumer that dead-letters them."""
        self._acknowledge(client)
        with self._lock:
            errors, self._errors = self._errors, {}
        if errors:
            client.hset(self.where.name + ERRORS_SUFFIX, mapping=errors)


# -- the dead-letter stream, for the CLI -----------------------------------------------------
def dead_entries(url: str, name: str, limit: int = 100) -> list[dict[str, str]]:
    """The entries of ``<name>:dead``, oldest first: id, original id, group, error."""
    client = _client(_check_url(url))
    try:
        rows = client.xrange(name + DEAD_SUFFIX, count=limit)
    finally:
        client.close()
    return [
        {
            "dead_id": _text(dead_id),
            "id": _text(fields.get(b"id", b"")),
            "group": _text(fields.get(b"group", b"")),
            "error": _text(fields.get(b"error", b"")),
        }
        for dead_id, fields in rows
    ]


def requeue_dead(url: str, name: str, ids: Iterable[str] | None = None) -> int:
    """Append dead entries (``ids`` of ``<name>:dead``; None: all of them) to ``name`` again
    as new entries, and remove them from the dead-letter stream; returns how many."""
    client = _client(_check_url(url))
    dead_key = name + DEAD_SUFFIX
    moved = 0
    try:
        if ids is None:
            rows = client.xrange(dead_key)
        else:
            rows = []
            for i in ids:
                rows.extend(client.xrange(dead_key, i, i))
        for dead_id, fields in rows:
            pipe = client.pipeline(transaction=True)
            pipe.xadd(name, {FIELD: fields.get(FIELD, b"")})
            pipe.xdel(dead_key, dead_id)
            pipe.execute()
            moved += 1
    finally:
        client.close()
    return moved
