"""``redis://`` and ``rediss://``: one queue shared by workers on many machines.

Every change of state is one Lua script (``redis_lua.py`` describes the keys), so it is atomic
on the server. Workers wait for work on a pub/sub channel that every enqueue, release and retry
publishes to, and ``job.result()`` waits on a channel of its own job: nothing polls.

Connections. A call that meets a broken connection (Redis restarting, a failover, ``CLIENT
KILL``) is sent again on a new one, with exponential back-off, for up to ``retry_s`` seconds
(20 by default), then raises :class:`~conveyor.BackendUnavailable`. A call sent again says so,
and a script whose first sending did reach the server (the reply was what got lost) then
answers as if it had just done its work, instead of reporting a lost lease. A wrong password or
user fails at once with an authentication error.

URL: ``redis://[[user]:password@]host[:port][/db][?prefix=conveyor:&retry_s=20]``; the other
query options are redis-py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..._errors import BackendError, BackendUnavailable, ConfigurationError, redacted
from . import redis_lua as lua
from .base import (
    ABORTED,
    DEAD,
    DONE,
    JOB_DEFAULTS,
    PARKED_S,
    QUEUED,
    RUNNING,
    WAITING,
    WORKER_KEPT_S,
    Backend,
    ClaimAfter,
    Job,
    Lease,
    Limit,
    NewJob,
    Outcomes,
    QueueCounts,
    ScheduleInfo,
    WorkerInfo,
    check_listing,
    fresh_job,
    kept_error,
    parse_history,
)

log = logging.getLogger("conveyor.tasks")

T = TypeVar("T")

_BROKEN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
#: answers that mean "not now" (full memory under noeviction, a replica being promoted, a
#: server loading its data): a script refused this way did nothing, and is sent again
_NOT_NOW = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY")
_PRIORITY_LIMIT = 2**31
# how many jobs one script call takes at most: a call blocks the server while it runs
_CHUNK = 1000


def _f(x: float) -> str:
    return repr(float(x))


#: the fields of a job's hash read as they are (text, or a number), by their Job names
_TEXTS = {b"key", b"token", b"error", b"progress_note", b"worker", b"abort_by"}
_NUMBERS = {b"lease_until", b"finished_at", b"keep_until", b"progress", b"started_at"}
#: a Job with every field that a hash may leave out at its default
_UNSET = JOB_DEFAULTS | {"key": None}


def _job(raw: Sequence[bytes] | dict[bytes, bytes]) -> Job:
    """A job from its hash (``HGETALL``: a dict, or the flat list a script returns). Made
    without the frozen dataclass's ``__init__``, as ``fresh_job`` is: a claim reads one per
    job it hands out."""
    h = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
    job: Job = object.__new__(Job)
    fields = job.__dict__
    fields.update(_UNSET)
    fields.update(
        id=h[b"id"].decode(),
        queue=h[b"queue"].decode(),
        task=h[b"task"].decode(),
        payload=h[b"payload"],
        state=h[b"state"].decode(),
        priority=int(h[b"priority"]),
        attempts=int(h[b"attempts"]),
        enqueued_at=float(h[b"enqueued_at"]),
        run_at=float(h[b"run_at"]),
        result=h.get(b"result"),
    )
    for name, value in h.items():
        if name in _TEXTS:
            fields[name.decode()] = value.decode()
        elif name in _NUMBERS:
            fields[name.decode()] = float(value)
        elif name == b"lost":
            fields["lost"] = int(value)
        elif name == b"waits_for":
            fields["waits_for"] = int(value)
        elif name == b"history":
            fields["history"] = parse_history(value)
        elif name == b"then":
            fields["then"] = tuple((dep, place) for dep, place in json.loads(value))
        elif name[:3] == b"in:":
            fields["inputs"] += ((int(name[3:]), value or None),)
    if fields["inputs"]:
        fields["inputs"] = tuple(sorted(fields["inputs"]))
    return job


def _leases(replies: Sequence[Any]) -> list[Lease]:
    return [Lease(job, job.token or "") for job in map(_job, replies)]


def _complete_args(
    done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
) -> list[Any]:
    """What the completing script takes of each job: five values."""
    args: list[Any] = []
    for job_id, token, result, keep_s in done:
        args += [
            job_id,
            token,
            "0" if result is None else "1",
            b"" if result is None else result,
            "" if keep_s is None else _f(now + keep_s),
        ]
    return args


def _job_args(jobs: Sequence[NewJob]) -> list[Any]:
    """What the scripts that enqueue take of each job: nine values."""
    args: list[Any] = []
    for new in jobs:
        if not -_PRIORITY_LIMIT < new.priority < _PRIORITY_LIMIT:
            raise ConfigurationError(
                f"priority {new.priority} is out of range for Redis (|priority| < 2**31)"
            )
        key = "" if new.key is None else new.key
        then = json.dumps([list(pair) for pair in new.then]) if new.then else ""
        args += [new.id, new.queue, new.task, new.payload, new.priority, key, _f(new.run_at)]
        args += [new.waits_for, then]
    return args


def _refused(where: str, prefix: str, exc: ResponseError) -> BackendError:
    """What a script's error means to the user: every script checks what it will change before
    its first write, so it was refused whole."""
    text = str(exc)
    if "WRONGTYPE" in text or "conveyor:wrongtype" in text:
        detail = text.split("conveyor:wrongtype", 1)[-1].strip(" :")
        return BackendError(
            f"Redis at {where}: a key under the prefix {prefix!r} is not what conveyor keeps "
            f"there ({detail}); another program wrote under the prefix. Nothing was changed; "
            "`conveyor doctor URL` lists the keys at fault"
        )
    return BackendError(f"Redis at {where} refused a change: {text}")


_QUEUE_PARTS = {
    "runat": "zset",
    "ready": "zset",
    "delayed": "zset",
    "leases": "zset",
    "done": "set",
    "dead": "set",
    "krun": "set",
    "waiting": "set",
    "aborted": "set",
    "kplaced": "hash",
}


def _kind_of(rest: str) -> str | None:
    """What conveyor keeps at ``prefix + rest`` (None: not a name of conveyor's)."""
    if rest == "seq":
        return "string"
    if rest == "expiry":
        return "zset"
    if rest.startswith("j:"):
        return "hash"
    if rest.startswith("w:"):
        return "string"
    if rest == "workers":
        return "zset"
    if rest == "schedules":
        return "hash"
    if rest.startswith(("lim:", "rate:")):
        return "hash"
    if rest.startswith(("park:", "resv:")):
        return "zset"
    if rest.startswith("q:"):
        part = rest.rsplit(":", 1)[-1]
        if part in _QUEUE_PARTS:
            return _QUEUE_PARTS[part]
        if ":k:" in rest:
            return "zset"
    return None


def _queue_of(rest: str) -> str:
    """The queue a ``q:<queue>:...`` name belongs to."""
    body = rest[2:]
    part = body.rsplit(":", 1)[-1]
    if part in _QUEUE_PARTS:
        return body[: -len(part) - 1]
    return body.split(":k:", 1)[0]


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for redis-py, and conveyor's own options taken out of its query."""
    parsed = urlparse(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if name in ("prefix", "retry_s"):
            ours[name] = value
        else:
            theirs.append((name, value))
    return urlunparse(parsed._replace(query=urlencode(theirs))), ours


class _Wakeups:
    """One pub/sub connection per backend, on a thread of its own, counting the wake-up notices
    of every queue. A waiter compares the count with the one seen by its last claim, so a
    notice sent between that claim and the wait is not missed."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self.counts: dict[str, int] = {}
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._listen, name="conveyor:redis-wake", daemon=True
        )
        self._thread.start()
        self._ready.wait(5)

    def _bump(self, queue: str | None) -> None:
        with self._cond:
            if queue is None:  # reconnected: anything may have been missed
                for name in self.counts:
                    self.counts[name] += 1
            else:
                self.counts[queue] = self.counts.get(queue, 0) + 1
            self._cond.notify_all()

    def _listen(self) -> None:
        pattern = self._backend.prefix + "wake:*"
        skip = len(self._backend.prefix) + len("wake:")
        delay = 0.05
        while not self._closed.is_set():
            pubsub = self._backend.client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.psubscribe(pattern)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "pmessage":
                        self._bump(message["channel"][skip:].decode())
                    elif message["type"] == "psubscribe":
                        # (re)subscribed: a notice sent while not listening may have been missed
                        self._bump(None)
                        self._ready.set()
                        delay = 0.05
            except _BROKEN as exc:
                if not self._closed.is_set():
                    log.debug("redis wake-up listener reconnecting: %s", exc)
                    self._closed.wait(delay)
                    delay = min(delay * 2, 2.0)
            except Exception:  # pragma: no cover - a bug must not kill the thread silently
                log.exception("redis wake-up listener failed; waiting falls back to timeouts")
                return
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone already
                    pubsub.close()

    def seen(self, queue: str) -> int:
        with self._cond:
            return self.counts.setdefault(queue, 0)

    def wait(self, queue: str, since: int | None, timeout_s: float) -> None:
        with self._cond:
            count = self.counts.setdefault(queue, 0)
            if since is not None and count != since:
                return
            self._cond.wait_for(
                lambda: self.counts[queue] != count or self._closed.is_set(), max(0.0, timeout_s)
            )

    def close(self) -> None:
        self._closed.set()
        with self._cond:  # waits under way end now
            self._cond.notify_all()
        with contextlib.suppress(*_BROKEN):  # wakes the listener now, not at its next timeout
            self._backend.client.publish(self._backend.prefix + "wake:", "")
        self._thread.join(2)


class RedisBackend(Backend):
    wakes_without_polling = True

    def __init__(
        self, url: str, *, prefix: str | None = None, retry_s: float | None = None
    ) -> None:
        redis_url, ours = _split_url(url)
        self.url = url
        self.where = redacted(url)
        self.prefix = prefix if prefix is not None else ours.get("prefix", "conveyor:")
        self.retry_s = retry_s if retry_s is not None else float(ours.get("retry_s", 20.0))
        try:
            self.client: redis.Redis = redis.Redis.from_url(
                redis_url,
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=5,
                socket_timeout=30,
                socket_keepalive=True,
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {self.where!r}: {exc}") from exc
        register = self.client.register_script
        self._s = {
            name: register(
                (lua.READS if name in ("COUNTS", "NEXT_RUN_AT") else lua.WRITES)
                + lua.PRELUDE
                + getattr(lua, name)
            )
            for name in (
                "ENQUEUE",
                "SWAP_SCHEDULE",
                "ABORT",
                "ABORTED",
                "ACQUIRE",
                "RELEASE_PLACES",
                "CLAIM",
                "HEARTBEAT",
                "COMPLETE",
                "RETRY",
                "FAIL",
                "RELEASE",
                "FINISH",
                "CANCEL",
                "PROGRESS",
                "UNFINISH",
                "REQUEUE",
                "PURGE",
                "EXPIRE",
                "COUNTS",
                "NEXT_RUN_AT",
                "DOCTOR_JOB",
                "DOCTOR_QUEUE",
            )
        }
        self._wakeups: _Wakeups | None = None
        self._wakeups_lock = threading.Lock()
        self._closed = False
        self._seen: dict[str, int] = {}
        self._call(self.client.ping)  # a wrong password or an unreachable server shows now

    # -- calls that survive a broken connection ---------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._again(lambda _replay: fn(*args))

    def _again(self, attempt: Callable[[str], T]) -> T:
        """Run ``attempt(replay)`` until the server answers; ``replay`` is "1" when sent again."""
        deadline: float | None = None
        delay = 0.05
        replay = "0"
        while True:
            try:
                return attempt(replay)
            except (AuthenticationError, NoPermissionError) as exc:
                raise BackendUnavailable(
                    f"Redis at {self.where} refused the credentials in the queue URL: {exc}"
                ) from exc
            except ResponseError as exc:
                text = str(exc)
                if "NOAUTH" in text or "WRONGPASS" in text:
                    raise BackendUnavailable(
                        f"Redis at {self.where} needs a password or user in the queue URL: {exc}"
                    ) from exc
                if not isinstance(exc, OutOfMemoryError | ReadOnlyError) and not any(
                    text.startswith(code) for code in _NOT_NOW
                ):
                    raise _refused(self.where, self.prefix, exc) from exc
                failure: Exception = exc
                why = "refuses writes for now"
            except _BROKEN as exc:
                failure = exc
                why = "unreachable"
                replay = "1"
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.retry_s
                log.warning("Redis at %s: %s; trying again", self.where, failure)
            if now >= deadline:
                raise BackendUnavailable(
                    f"Redis at {self.where} {why} for {self.retry_s:g} s: {failure}"
                ) from failure
            time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - now)))
            delay = min(delay * 2, 2.0)

    def _script(self, name: str, args: Sequence[Any]) -> Any:
        script = self._s[name]
        return self._again(lambda _replay: script(args=[self.prefix, *args]))

    def _tolerant(self, name: str, head: Sequence[Any], rest: Sequence[Any]) -> Any:
        """A script whose third argument says whether the call is sent again."""
        script = self._s[name]
        return self._again(lambda replay: script(args=[self.prefix, *head, replay, *rest]))

    def doctor(self, now: float, repair: bool = False) -> list[str]:
        """Every key under the prefix (with ``SCAN``), then each queue's indexes and each job
        (one script each, atomic: safe while workers run). A key of the wrong type is
        reported and left alone: it is not conveyor's to delete."""
        said: list[str] = []
        queues: set[str] = set()
        jobs: list[str] = []
        r = self.client
        for raw in self._call(lambda: list(r.scan_iter(match=self.prefix + "*", count=1000))):
            key = raw.decode(errors="replace")
            rest = key[len(self.prefix) :]
            kind = _kind_of(rest)
            if kind is None:
                continue
            answer = self._call(r.type, raw)
            actual = answer.decode() if isinstance(answer, bytes) else str(answer)
            if actual != kind:
                said.append(
                    f"key {key}: a {actual}, where conveyor keeps a {kind}; it is not "
                    f"conveyor's and is left alone (remove it: redis-cli DEL {key!r})"
                )
                continue
            if rest.startswith("j:"):
                jobs.append(rest[2:])
            elif rest.startswith("q:"):
                queues.add(_queue_of(rest))
        flag = "1" if repair else "0"
        for name, arg in [
            *(("DOCTOR_QUEUE", q) for q in sorted(queues)),
            *(("DOCTOR_JOB", j) for j in jobs),
        ]:
            try:
                found = self._script(name, [arg, _f(now), flag])
            except BackendError as exc:
                said.append(
                    f"{'queue' if name == 'DOCTOR_QUEUE' else 'job'} {arg}: not checked ({exc})"
                )
                continue
            said += [line.decode() + ("; put right" if repair else "") for line in found]
        return said

    def storage_time(self) -> float:
        """The server's clock (``TIME``), read once: a clock that cannot be read now is read
        again later, never waited for."""
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    # -- the contract ---------------------------------------------------------------------------
    def enqueue(
        self, jobs: Sequence[NewJob], now: float, whole: bool = False
    ) -> list[tuple[Job, bool]]:
        if whole:  # one script for the whole batch: all or none
            replies = self._script("ENQUEUE", [_f(now), "1", *_job_args(jobs)])
            if replies and replies[0] == -1:
                return [
                    (fresh_job(new, now) if reply == 0 else _job(reply), False)
                    for new, reply in zip(jobs, replies[1:], strict=True)
                ]
            return self._stored(jobs, replies, now)
        out: list[tuple[Job, bool]] = []
        for start in range(0, len(jobs), _CHUNK):
            chunk = jobs[start : start + _CHUNK]
            replies = self._script("ENQUEUE", [_f(now), "0", *_job_args(chunk)])
            out += self._stored(chunk, replies, now)
        return out

    @staticmethod
    def _stored(
        jobs: Sequence[NewJob], replies: Sequence[Any], now: float
    ) -> list[tuple[Job, bool]]:
        return [
            (fresh_job(new, now), True) if reply == 0 else (_job(reply), False)
            for new, reply in zip(jobs, replies, strict=True)
        ]

    def claim(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int = 1
    ) -> list[Lease]:
        replies = self._script("CLAIM", self._claim_args(queue, worker, lease_s, now, limit))
        return _leases(replies)

    def _claim_args(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int
    ) -> list[Any]:
        # a wake-up notice counted after this point ends the next wait at once
        self._seen[queue] = self._listener().seen(queue)
        base = f"{os.urandom(8).hex()}:"
        return [queue, _f(now), _f(now + lease_s), max(0, limit), base, worker]

    def complete_then_claim(
        self, done: Outcomes, queue: str, worker: str, lease_s: float, now: float, limit: int
    ) -> ClaimAfter:
        if not done or len(done) > _CHUNK:
            return super().complete_then_claim(done, queue, worker, lease_s, now, limit)
        complete, claim = self._s["COMPLETE"], self._s["CLAIM"]
        finished = _complete_args(done, now)
        claiming = self._claim_args(queue, worker, lease_s, now, limit)

        def attempt(replay: str) -> list[Any]:
            # both scripts in one round trip, each still its own change, by their hashes (a
            # pipeline of Script calls would first ask whether they are loaded)
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(complete.sha, 0, self.prefix, _f(now), replay, *finished)
            pipe.evalsha(claim.sha, 0, self.prefix, *claiming)
            return list(pipe.execute(raise_on_error=False))

        try:
            first, second = self._again(attempt)
        except Exception as exc:  # unreachable for retry_s: neither part is known done
            return exc, exc
        # a script refused (or forgotten by a restarted server) changed nothing: it is sent
        # again alone, which loads it, retries what may pass later, and says what went wrong
        results: list[bool] | Exception
        leases: list[Lease] | Exception
        try:
            if isinstance(first, Exception):
                first = self._tolerant("COMPLETE", [_f(now)], finished)
            results = [bool(r) for r in first]
        except Exception as exc:
            results = exc
        try:
            leases = _leases(
                self._script("CLAIM", claiming) if isinstance(second, Exception) else second
            )
        except Exception as exc:
            leases = exc
        return results, leases

    def heartbeat(self, job_id: str, token: str, lease_s: float, now: float) -> bool:
        return self.heartbeat_many([(job_id, token)], lease_s, now)[0]

    def heartbeat_many(
        self, held: Sequence[tuple[str, str]], lease_s: float, now: float
    ) -> list[bool]:
        flat = [x for pair in held for x in pair]
        return [bool(r) for r in self._tolerant("HEARTBEAT", [_f(now + lease_s)], flat)]

    def complete(
        self, job_id: str, token: str, result: bytes | None, keep_s: float | None, now: float
    ) -> bool:
        return self.complete_many([(job_id, token, result, keep_s)], now)[0]

    def complete_many(
        self, done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
    ) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(done), _CHUNK):
            args = _complete_args(done[start : start + _CHUNK], now)
            out += [bool(r) for r in self._tolerant("COMPLETE", [_f(now)], args)]
        return out

    def retry(self, job_id: str, token: str, run_at: float, error: str, now: float) -> bool:
        kept = kept_error(error)
        return bool(self._tolerant("RETRY", [_f(now)], [job_id, token, _f(run_at), error, kept]))

    def fail(self, job_id: str, token: str, error: str, now: float) -> bool:
        return bool(self._tolerant("FAIL", [_f(now)], [job_id, token, error, kept_error(error)]))

    def acquire(self, limits: Sequence[Limit], job_id: str, token: str, now: float) -> float | None:
        return self.acquire_many([(limits, job_id, token)], now)[0]

    def acquire_many(
        self, runs: Sequence[tuple[Sequence[Limit], str, str]], now: float
    ) -> list[float | None]:
        script = self._s["ACQUIRE"]
        calls = []
        for limits, job_id, token in runs:
            args: list[Any] = [self.prefix, job_id, token, _f(now), _f(PARKED_S)]
            for limit in limits:
                most = "" if limit.concurrency is None else limit.concurrency
                n, per = ("", "") if limit.rate is None else (limit.rate[0], _f(limit.rate[1]))
                args += [limit.group, most, n, per]
            calls.append(args)

        def attempt(_replay: str) -> list[Any]:
            # one round trip for the whole claim (each script still its own change), by its
            # hash: a pipeline of Script calls would first ask whether the script is loaded
            for _ in range(2):
                pipe = self.client.pipeline(transaction=False)
                for args in calls:
                    pipe.evalsha(script.sha, 0, *args)
                try:
                    return list(pipe.execute())
                except NoScriptError:
                    # the server restarted or was flushed: every call failed the same way,
                    # none ran; load the script and send them again
                    self.client.script_load(script.script)
            raise BackendError(f"Redis at {self.where} keeps forgetting conveyor's scripts")

        answers = self._again(attempt) if calls else []
        return [None if answer is None else float(answer) for answer in answers]

    def release_places(self, limits: Sequence[Limit], token: str, now: float) -> None:
        groups = [limit.group for limit in limits if limit.concurrency is not None]
        if groups:
            self._script("RELEASE_PLACES", [token, _f(now), *groups])

    def abort(self, job_id: str, by: str, now: float) -> str:
        answer = self._script("ABORT", [_f(now), job_id, by])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def aborted(self, job_id: str, token: str, now: float) -> bool:
        return bool(self._tolerant("ABORTED", [_f(now)], [job_id, token]))

    def abort_requests(self, job_ids: Sequence[str]) -> dict[str, str]:
        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(self.prefix + "j:" + job_id, ["state", "abort_by"])
            return list(pipe.execute())

        found = self._call(read) if job_ids else []
        return {
            job_id: by.decode()
            for job_id, (state, by) in zip(job_ids, found, strict=True)
            if state == b"running" and by is not None
        }

    def release(self, job_id: str, token: str, now: float, run_at: float | None = None) -> bool:
        at = now if run_at is None else run_at
        return bool(self._tolerant("RELEASE", [_f(now)], [job_id, token, _f(at)]))

    def get(self, job_id: str) -> Job | None:
        raw = self._call(self.client.hgetall, self.prefix + "j:" + job_id)
        return _job(cast("dict[bytes, bytes]", raw)) if raw else None

    def worker_beat(self, info: WorkerInfo) -> None:
        key, index = self.prefix + "w:" + info.id, self.prefix + "workers"

        def beat() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(key, info.to_json(), ex=int(WORKER_KEPT_S))
            pipe.zadd(index, {info.id: info.last_beat})
            pipe.zremrangebyscore(index, "-inf", info.last_beat - WORKER_KEPT_S)
            pipe.execute()

        self._call(beat)

    def swap_schedule(
        self,
        name: str,
        expected: ScheduleInfo | None,
        new: ScheduleInfo | None,
        jobs: Sequence[NewJob] = (),
        now: float = 0.0,
    ) -> bool:
        was = "" if expected is None else expected.expected()
        record = "" if new is None else new.to_json()
        args = [name, was, record, _f(now), *_job_args(jobs)]
        return bool(self._script("SWAP_SCHEDULE", args))

    def schedules(self) -> list[ScheduleInfo]:
        raw = self._call(self.client.hgetall, self.prefix + "schedules")
        named = {
            (k.decode(errors="replace") if isinstance(k, bytes) else k): v for k, v in raw.items()
        }
        return [ScheduleInfo.read(name, named[name]) for name in sorted(named)]

    def workers(self) -> list[WorkerInfo]:
        index = self.prefix + "workers"

        def read() -> list[WorkerInfo]:
            ids = cast("list[bytes]", self.client.zrevrange(index, 0, -1))
            if not ids:
                return []
            records = self.client.mget([self.prefix + "w:" + i.decode() for i in ids])
            return [WorkerInfo.from_json(r) for r in records if r is not None]

        return self._call(read)

    def jobs(
        self,
        queue: str,
        state: str | None = None,
        *,
        task: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        check_listing(state, limit, offset)
        q = f"{self.prefix}q:{queue}:"
        # each state's index: queued and running are sorted sets, done and dead plain sets
        reads = {
            QUEUED: lambda r: r.zrange(q + "runat", 0, -1),
            RUNNING: lambda r: r.zrange(q + "leases", 0, -1),
            DONE: lambda r: r.smembers(q + "done"),
            DEAD: lambda r: r.smembers(q + "dead"),
            WAITING: lambda r: r.smembers(q + "waiting"),
            ABORTED: lambda r: r.smembers(q + "aborted"),
        }
        wanted = [state] if state is not None else list(reads)

        def ids() -> list[bytes]:
            pipe = self.client.pipeline(transaction=True)  # one snapshot of the indexes
            for name in wanted:
                reads[name](pipe)
            return [job_id for found in pipe.execute() for job_id in found]

        found = self._call(ids)

        def order() -> list[tuple[float, str, bytes | None]]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in found:
                pipe.hmget(self.prefix + "j:" + job_id.decode(), ["enqueued_at", "task"])
            keys = []
            for job_id, (at, name) in zip(found, pipe.execute(), strict=True):
                if at is not None:  # gone since the indexes were read
                    keys.append((float(at), job_id.decode(), name))
            return keys

        keys = [k for k in sorted(self._call(order)) if task is None or k[2] == task.encode()]
        page = [job_id for _at, job_id, _task in keys[offset : offset + limit]]

        def read() -> list[Job]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in page:
                pipe.hgetall(self.prefix + "j:" + job_id)
            return [_job(raw) for raw in pipe.execute() if raw]

        return self._call(read)

    def finish(self, job_id: str, now: float) -> None:
        self._script("FINISH", [_f(now), job_id])

    def progress(self, job_id: str, token: str, fraction: float, note: str) -> bool:
        return bool(self._script("PROGRESS", [job_id, token, _f(fraction), note]))

    def cancel(self, job_id: str, reason: str, now: float) -> bool:
        return bool(self._script("CANCEL", [_f(now), job_id, reason]))

    def unfinish(self, job_id: str) -> bool:
        return bool(self._script("UNFINISH", [job_id]))

    def requeue(self, job_id: str, now: float) -> bool:
        return bool(self._script("REQUEUE", [_f(now), job_id]))

    def requeue_dead(self, queue: str, now: float) -> int:
        dead = self._call(self.client.smembers, f"{self.prefix}q:{queue}:dead")
        ids = sorted(dead)
        return sum(
            int(self._script("REQUEUE", [_f(now), *ids[i : i + _CHUNK]]))
            for i in range(0, len(ids), _CHUNK)
        )

    def purge(self, queue: str) -> int:
        return int(self._script("PURGE", [queue]))

    def expire(self, now: float) -> int:
        total = 0
        while True:
            n = int(self._script("EXPIRE", [_f(now), _CHUNK]))
            total += n
            if n < _CHUNK:
                return total

    def counts(self, queue: str, now: float) -> QueueCounts:
        queued, delayed, running, done, dead, oldest, flat, waiting, aborted = self._script(
            "COUNTS", [queue, _f(now)]
        )
        leases = tuple((flat[i].decode(), float(flat[i + 1]) - now) for i in range(0, len(flat), 2))
        return QueueCounts(
            queued=int(queued),
            delayed=int(delayed),
            running=int(running),
            done=int(done),
            dead=int(dead),
            oldest_waiting_s=None if oldest == b"" else max(0.0, now - float(oldest)),
            leases=leases,
            waiting=int(waiting),
            aborted=int(aborted),
        )

    def next_run_at(self, queue: str) -> float | None:
        at = self._script("NEXT_RUN_AT", [queue])
        return None if at == b"" else float(at)

    # -- waiting without polling ------------------------------------------------------------------
    def _listener(self) -> _Wakeups:
        with self._wakeups_lock:
            if self._wakeups is None:
                self._wakeups = _Wakeups(self)
                if self._closed:  # closed meanwhile: a wait on it returns at once
                    self._wakeups.close()
            return self._wakeups

    def wait_for_work(self, queue: str, timeout_s: float) -> None:
        wakeups = self._listener()
        wakeups.wait(queue, self._seen.get(queue), timeout_s)
        self._seen[queue] = wakeups.seen(queue)

    def wait_for_job(self, job_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.prefix + "ended:" + job_id)
            state = self.client.hget(self.prefix + "j:" + job_id, "state")
            if state in (None, b"done", b"dead"):
                return
            while (left := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=left)
                if message is not None and message["type"] == "message":
                    return
        except _BROKEN:
            # the caller looks at the job again; a short pause keeps an outage from spinning
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            pubsub.close()

    def close(self) -> None:
        with self._wakeups_lock:
            self._closed = True
            wakeups = self._wakeups
        if wakeups is not None:
            wakeups.close()
        self.client.close()
