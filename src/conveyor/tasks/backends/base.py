"""The task-queue backend contract.

A backend stores jobs and makes every state change atomic, so that many workers — threads,
processes, machines — can share one queue. The queue and the worker above it hold all policy
(retries, backoff, which exceptions count); a backend only moves jobs between states when told
to, and refuses a change made on behalf of a lease that is no longer held.

States::

    queued ──claim──▶ running ──complete──▶ done        (result kept until keep_until)
      ▲  ▲               │ │ └──fail──────▶ dead        (kept until requeued or purged)
      │  └──retry/release┘ └─lease lapses: any claim takes it again
      └──────────── requeue (dead → queued)

A job enqueued with ``waits_for > 0`` (a step of a workflow) is ``waiting``: never claimable,
until that many of the jobs that list it in their ``then`` are done. The change that makes a
job ``done`` (``complete``, ``finish``) also stores its result among the inputs of each job in
its ``then`` and counts down their ``waits_for``, queueing those that reach 0; the change that
makes it ``dead`` (``fail``, ``cancel``) makes every job waiting for it, and every job waiting
for those, ``dead`` too (``not_run_because``). So a crash between two steps can neither lose
nor repeat the next one, and nothing waits for a job that will never be done.

``abort(id)`` ends a queued (or waiting) job as ``aborted`` at once; a running one is marked
(``abort_by``) for its worker, which stops it and records ``aborted`` (``aborted``). Aborted is
an end, as dead is: never run again, the id free to enqueue afresh, not requeued.

``finish(id)`` puts a job in ``done`` from any state (or records a ``done`` id never seen);
``unfinish(id)`` forgets a ``done`` job so that its id can be enqueued again.

Rules every backend keeps (the conformance suite in ``tests/tasks/`` checks each one, on every
backend, including the races):

* **Ids.** ``enqueue`` of an id that is queued, running or done changes nothing and returns the
  existing job; an id that is dead, unknown, or done with its ``keep_until`` passed (its result
  expired) is enqueued afresh.
* **Order of claims.** Higher ``priority`` first; among equals, enqueue order. A job is not
  claimable before its ``run_at``. A job with a ``key`` is claimable only when no job of that key
  is running and no job of that key was enqueued before it and is still queued: one at a time,
  in enqueue order, keys in parallel.
* **Leases.** ``claim`` gives each job a fresh ``token`` and ``lease_until = now + lease_s`` and
  counts an attempt. A running job whose lease has lapsed is claimable again (by anyone), and
  the lapse is counted in ``lost``. Every call that names a token (``heartbeat``,
  ``complete``, ``retry``, ``fail``, ``release``) does nothing and returns False unless that
  token still holds the job, so a worker that lost its lease cannot overwrite the work of the
  one that took it over: exactly one outcome is kept.
* **History.** ``claim`` records which worker holds the job and since when (``worker``,
  ``started_at``). An attempt that ends without success — retried, dead, or lost to a lapsed
  lease — is appended to the job's ``history`` with its worker, times and error (the error's
  last ``HISTORY_ERROR_CHARS`` characters), in the same change; an attempt handed back by
  ``release`` is not counted and not kept. ``requeue`` keeps the history.
* **Schedules** are records changed only by compare-and-set (``swap_schedule``), together
  with the jobs of the ticks they move past, in one transaction: however many workers run a
  schedule, each tick's job is enqueued once (and its id, derived from the schedule and the
  tick, makes a second attempt a no-op besides).
* **Time** is passed in (``now``, seconds since the epoch): backends never read a clock for
  decisions, so tests can move time by hand. ``storage_time()`` says what the storage's clock
  reads; the queue corrects a real clock by it, so every worker judges leases on one clock.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, replace
from typing import Any

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
DEAD = "dead"
WAITING = "waiting"
ABORTED = "aborted"
STATES = (QUEUED, RUNNING, DONE, DEAD, WAITING, ABORTED)


@dataclass(frozen=True)
class NewJob:
    """What ``enqueue`` stores. ``payload`` is opaque bytes (the queue serialises arguments)."""

    id: str
    queue: str
    task: str
    payload: bytes
    priority: int = 0
    key: str | None = None
    run_at: float = 0.0
    waits_for: int = 0
    """how many jobs must be done before this one is queued (a step of a workflow): it is
    ``waiting`` until then"""
    then: tuple[tuple[str, int], ...] = ()
    """the jobs waiting for this one, each with the place its result takes among their
    inputs"""


@dataclass(frozen=True)
class Job:
    """A job as stored, at the moment it was read."""

    id: str
    queue: str
    task: str
    payload: bytes
    state: str
    priority: int
    key: str | None
    attempts: int
    enqueued_at: float
    run_at: float
    lease_until: float | None = None
    token: str | None = None
    result: bytes | None = None
    error: str | None = None
    finished_at: float | None = None
    keep_until: float | None = None
    lost: int = 0
    """attempts that ended with their lease lapsing: the worker died (or lost its storage)
    before it wrote an outcome"""
    progress: float | None = None
    """what the task last said of how far it is (0 to 1), with ``progress_note``"""
    progress_note: str | None = None
    worker: str | None = None
    """the worker that holds the job, or held it last"""
    started_at: float | None = None
    """when the attempt under way (or the last one) was claimed"""
    history: tuple[Attempt, ...] = ()
    """the attempts that ended without success, oldest first (see :meth:`runs`)"""
    waits_for: int = 0
    """how many of the jobs it waits for are not done yet (``waiting`` while > 0)"""
    then: tuple[tuple[str, int], ...] = ()
    """the jobs that wait for this one, and the place of its result among their inputs"""
    inputs: tuple[tuple[int, bytes | None], ...] = ()
    """the results of the jobs it waited for, as each was done, in the order of their places"""
    abort_by: str | None = None
    """who asked to abort it while it ran (its worker stops it and records ``aborted``)"""

    def runs(self) -> list[Attempt]:
        """Every attempt kept: the history, then the last attempt when it is under way
        (``running``) or succeeded (``succeeded``: the job is done since it ran)."""
        out = list(self.history)
        last = (out[-1].number, out[-1].started_at) if out else None
        if self.started_at is not None and (self.attempts, self.started_at) != last:
            if self.state == RUNNING:
                out.append(Attempt(self.attempts, self.worker, self.started_at, None, RUNNING))
            elif self.state == DONE:
                out.append(
                    Attempt(
                        self.attempts, self.worker, self.started_at, self.finished_at, "succeeded"
                    )
                )
        return out


#: how much of an error each attempt in a job's history keeps: its end, where the exception is
HISTORY_ERROR_CHARS = 4000


def kept_error(error: str | None) -> str | None:
    """What a job's history keeps of an attempt's error: its last ``HISTORY_ERROR_CHARS``
    characters, a NUL (which SQLite's text functions stop at) as U+FFFD. Every backend
    stores this, computed here, so that all keep the same."""
    if error is None:
        return None
    return storable(error[-HISTORY_ERROR_CHARS:]).replace("\x00", "\ufffd")


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with each lone surrogate (which no UTF-8 storage can hold: it comes from
    bytes decoded with ``surrogateescape``, as file names and some exceptions are) as
    U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if not text.isascii() else text


@dataclass(frozen=True)
class Attempt:
    """One attempt at a job, as the job's history keeps it."""

    number: int
    worker: str | None
    started_at: float | None
    ended_at: float | None
    outcome: str
    """running, succeeded, retried, dead, or lost (its lease lapsed: the worker died or lost
    its storage before it wrote an outcome)"""
    error: str | None = None

    @property
    def duration_s(self) -> float | None:
        """How long it ran (None while it runs, or when a time is not known)."""
        if self.ended_at is None or self.started_at is None:
            return None
        return self.ended_at - self.started_at

    def to_line(self) -> str:
        """The attempt as the backends store it: one JSON object on a line of its own."""
        import json

        record = {
            "n": self.number,
            "worker": self.worker,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "error": kept_error(self.error),
        }
        return json.dumps(record) + "\n"


def parse_history(text: str | bytes | None) -> tuple[Attempt, ...]:
    """A job's history as stored (JSON lines; times may be numbers or strings). A line that
    cannot be read is skipped: reading a job never fails on its history."""
    if not text:
        return ()
    import json

    def when(value: Any) -> float | None:
        return None if value is None else float(value)

    out = []
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for line in text.splitlines():
        try:
            r = json.loads(line)
            out.append(
                Attempt(
                    number=int(r["n"]),
                    worker=r.get("worker"),
                    started_at=when(r.get("started_at")),
                    ended_at=when(r.get("ended_at")),
                    outcome=str(r["outcome"]),
                    error=r.get("error"),
                )
            )
        except (ValueError, TypeError, KeyError):
            continue
    return tuple(out)


@dataclass(frozen=True)
class Lease:
    """A claimed job and the token that holds it."""

    job: Job
    token: str


@dataclass(frozen=True)
class QueueCounts:
    """One queue at one moment (``conveyor info``)."""

    queued: int
    delayed: int
    running: int
    done: int
    dead: int
    oldest_waiting_s: float | None
    leases: tuple[tuple[str, float], ...] = field(default=())
    """(job id, seconds left) of every running job, soonest to lapse first"""
    waiting: int = 0
    """jobs waiting for others to be done (steps of workflows)"""
    aborted: int = 0


@dataclass(frozen=True)
class Limit:
    """A limit shared by every worker of a storage: at most ``concurrency`` runs at once, and
    (``rate``) at most ``rate[0]`` starts per ``rate[1]`` seconds, of the jobs in ``group``
    (a task's, or one key's of a task)."""

    group: str
    concurrency: int | None = None
    rate: tuple[int, float] | None = None


#: how long a job that found its concurrency limit full waits before it looks again, at
#: most: the end of a run of its group brings one waiting job forward at once
PARKED_S = 5.0


def refill(
    state: tuple[float, float] | None, rate: tuple[int, float], now: float
) -> tuple[float, float]:
    """A rate's bucket at ``now``: ``(tokens, at)`` from what was stored (None: a full one).
    It holds up to ``rate[0]`` starts and refills at ``rate[0] / rate[1]`` a second; a start
    takes one. What it returns, with ``tokens < 1``, says the wait: ``(1 - tokens) / refill``."""
    n, per = rate
    tokens, at = state if state is not None else (float(n), now)
    return min(float(n), tokens + max(0.0, now - at) * n / per), now


def rate_step(
    state: tuple[float, float] | None,
    rate: tuple[int, float],
    now: float,
    reserved_at: float | None,
) -> tuple[float, tuple[float, float]]:
    """What a job asks of a rate's bucket at ``now``: ``(wait, bucket)``. ``wait == 0``: it
    starts, and ``bucket`` is the state to store. Otherwise it waits ``wait`` seconds and
    ``bucket`` holds its reservation: the start is taken now (the bucket may go below
    zero), so the next job refused waits one interval longer, and jobs come back one by
    one, not all at the next token. A job that holds a reservation (``reserved_at``)
    starts once its time has come, taking nothing more."""
    tokens, at = refill(state, rate, now)
    if reserved_at is not None:
        return (0.0 if reserved_at <= now + 0.001 else reserved_at - now), (tokens, at)
    if tokens >= 1:
        return 0.0, (tokens - 1, at)
    return (1 - tokens) * rate[1] / rate[0], (tokens - 1, at)


def reservation_kept_s(rate: tuple[int, float]) -> float:
    """How long a reservation whose job never came back is kept before it is dropped."""
    return max(60.0, 10 * rate[1])


#: how long a worker's record is kept after its last beat (a stopped or gone worker stays
#: visible for this long, then is forgotten)
WORKER_KEPT_S = 86400.0
#: beats a worker may miss before it is shown as gone
WORKER_MISSED_BEATS = 3


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as it last said of itself (``conveyor workers``)."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    started_at: float
    last_beat: float
    beat_s: float
    """how often it beats: it is gone once it has missed ``WORKER_MISSED_BEATS`` of them"""
    running: int = 0
    processed: int = 0
    failed: int = 0
    stopped_at: float | None = None
    """when it stopped (and said so); None while it runs, or if it died"""
    host_key: str = ""
    """its machine and process namespace (workers with the same key see the same pids)"""
    pid_started: int = 0
    """when its process started (clock ticks since boot): a pid taken by another process
    since has another start time"""
    reclaimed_at: float | None = None
    """when another worker found it dead and ended its leases"""

    def state(self, now: float) -> str:
        """``alive``, ``stopped`` (it said so) or ``gone`` (it stopped beating: it died, or
        lost its storage)."""
        if self.stopped_at is not None:
            return "stopped"
        if self.reclaimed_at is not None and self.reclaimed_at >= self.last_beat:
            return "gone"
        if now - self.last_beat > self.beat_s * WORKER_MISSED_BEATS:
            return "gone"
        return "alive"

    def to_json(self) -> str:
        import json

        record = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        import json

        record = json.loads(text)
        record["queues"] = tuple(record["queues"])
        known = cls.__dataclass_fields__
        return cls(**{name: value for name, value in record.items() if name in known})


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as stored: what it enqueues and when, and how far it has got.

    Exactly one of ``cron`` (five fields, read in ``tz``) and ``every_s`` (ticks at the
    multiples of ``every_s`` since the epoch, so every machine finds the same ticks) is set.
    ``through`` says up to when its ticks have been dealt with (enqueued, or skipped by the
    ``catch_up`` policy); each advance is a compare-and-set on the whole record, so two
    schedulers cannot both enqueue a tick.
    """

    name: str
    queue: str
    task: str
    payload: bytes
    """the arguments, as the queue's serializer wrote them"""
    cron: str | None = None
    every_s: float | None = None
    tz: str = "UTC"
    catch_up: str = "last"
    """``last``: after a gap, the latest missed tick runs; ``all``: every missed tick runs;
    ``none``: a tick more than ``SCHEDULE_LATE_S`` late is skipped"""
    priority: int = 0
    through: float = 0.0
    last_tick: float | None = None
    """the time of the last tick enqueued"""
    last_job: str | None = None
    """the id of that tick's job"""
    source: str = "code"
    """``code`` (``@q.periodic``, written by each worker as it starts) or ``api``
    (``q.schedule(...)``, kept until removed)"""
    problem: str | None = field(default=None, compare=False)
    """why the stored record cannot be read (see :meth:`read`): it never runs; it can be
    listed, replaced and removed"""
    stored: str | None = field(default=None, compare=False, repr=False)
    """the text as stored, for a record read from storage: what a change of it expects
    (``swap_schedule`` compares it, not this record written out again)"""

    def plan(self) -> tuple[Any, ...]:
        """What it enqueues and when, without how far it has got."""
        return (
            self.queue,
            self.task,
            self.payload,
            self.cron,
            self.every_s,
            self.tz,
            self.catch_up,
            self.priority,
        )

    def to_json(self) -> str:
        import base64
        import json

        record: dict[str, Any] = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("payload", "problem", "stored")
        }
        record["payload"] = base64.b64encode(self.payload).decode()
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ScheduleInfo:
        import base64
        import json

        record = json.loads(text)
        record["payload"] = base64.b64decode(record["payload"])
        known = cls.__dataclass_fields__
        return cls(**{name: value for name, value in record.items() if name in known})

    @classmethod
    def read(cls, name: str, text: str | bytes) -> ScheduleInfo:
        """The record stored under ``name``: one that cannot be read (not JSON, a field
        missing or of the wrong type: written by hand, or by another program) comes back
        with ``problem`` saying why, so that one bad record stops nothing else."""
        raw = text.decode(errors="replace") if isinstance(text, bytes) else text
        try:
            info = cls.from_json(text)
            wrong = [
                field_name
                for field_name, kinds in _SCHEDULE_FIELD_TYPES.items()
                if isinstance(getattr(info, field_name), bool)
                or not isinstance(getattr(info, field_name), kinds)
            ]
            if wrong:
                raise ValueError(f"field(s) of the wrong type: {', '.join(wrong)}")
        except Exception as exc:
            why = f"the stored record cannot be read ({type(exc).__name__}: {exc})"[:300]
            return cls(name=name, queue="", task="", payload=b"", problem=why, stored=raw)
        return replace(info, name=name, stored=raw)  # the name it is stored under counts

    def expected(self) -> str:
        """The text a change of this record expects to find in storage."""
        return self.stored if self.stored is not None else self.to_json()


_SCHEDULE_FIELD_TYPES: dict[str, Any] = {
    "name": str,
    "queue": str,
    "task": str,
    "cron": (str, type(None)),
    "every_s": (int, float, type(None)),
    "tz": str,
    "catch_up": str,
    "priority": int,
    "through": (int, float),
    "last_tick": (int, float, type(None)),
    "last_job": (str, type(None)),
}

#: how late a tick may be and still run under ``catch_up="none"``, seconds
SCHEDULE_LATE_S = 60.0


def check_listing(state: str | None, limit: int, offset: int) -> None:
    """Refuse a listing's arguments that name nothing (a typo of a state, a negative page)."""
    from ..._errors import ConfigurationError

    if state is not None and state not in STATES:
        raise ConfigurationError(f"state {state!r}: use one of {', '.join(STATES)}")
    for name, value in (("limit", limit), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"{name} is an int >= 0, not {value!r}")


def replaceable(job: Job, now: float) -> bool:
    """Dead, aborted, or done with its result expired: the id may be enqueued afresh."""
    return job.state in (DEAD, ABORTED) or (
        job.state == DONE and job.keep_until is not None and job.keep_until <= now
    )


def taken_whole(
    jobs: Sequence[NewJob], there: Sequence[Job | None], now: float
) -> list[tuple[Job, bool]] | None:
    """For an enqueue of ``whole``: if an id of the batch is taken (``there``: what is
    stored under each), what the enqueue returns, nothing added; None if all may be added."""
    if not any(old is not None and not replaceable(old, now) for old in there):
        return None
    return [
        (old if old is not None else fresh_job(new, now), False)
        for new, old in zip(jobs, there, strict=True)
    ]


def fresh_job(new: NewJob, now: float) -> Job:
    """The job ``new`` as it is stored when enqueued at ``now``. Made without the frozen
    dataclass's ``__init__`` (which sets each of its fields one call at a time): a batch of
    a thousand jobs makes a thousand of these, and nothing in a Job is computed."""
    job: Job = object.__new__(Job)
    job.__dict__.update(_FRESH)
    job.__dict__.update(
        id=new.id,
        queue=new.queue,
        task=new.task,
        payload=new.payload,
        state=WAITING if new.waits_for > 0 else QUEUED,
        priority=new.priority,
        key=new.key,
        enqueued_at=now,
        run_at=new.run_at,
        waits_for=new.waits_for,
        then=new.then,
    )
    return job


#: the fields of a job just enqueued that do not come from what was enqueued
#: the fields of a Job that have a default, at their defaults (for Jobs made without the
#: dataclass's ``__init__``)
JOB_DEFAULTS = {
    name: f.default for name, f in Job.__dataclass_fields__.items() if f.default is not MISSING
}
_FRESH = JOB_DEFAULTS | {"attempts": 0}


def not_run_because(job_id: str, task: str, error: str | None) -> str:
    """The error of a job that waited for ``job_id`` (of ``task``), dead with ``error``: the
    waiting job will not run either."""
    return (
        f"not run: job {job_id} ({task}), which it waited for, is dead:\n{kept_error(error) or ''}"
    )


#: outcomes to write: ``(job_id, token, result, keep_s)`` each, as ``complete`` takes them
Outcomes = Sequence[tuple[str, str, bytes | None, float | None]]
#: what ``complete_then_claim`` returns: each part's answer, or the error it met
ClaimAfter = tuple[list[bool] | Exception, list[Lease] | Exception]


class Backend(ABC):
    """Storage for jobs. Every method is atomic; see the module docstring for the rules."""

    #: True when waits are woken by the storage itself (no polling)
    wakes_without_polling: bool = False

    @abstractmethod
    def enqueue(
        self, jobs: Sequence[NewJob], now: float, whole: bool = False
    ) -> list[tuple[Job, bool]]:
        """Store each job unless its id is queued, running or done. ``whole`` (a workflow's
        steps): if any of them would not be added, none is.

        Returns, per job and in order, the job as stored and whether it was added (False: the
        existing job is returned and nothing changed). A dead job with the same id, or a done job
        whose ``keep_until`` has passed, is replaced.
        The whole batch is one transaction.
        """

    def enqueue_in(
        self, connection: Any, jobs: Sequence[NewJob], now: float
    ) -> list[tuple[Job, bool]]:
        """``enqueue`` inside the transaction of ``connection``, the caller's own connection
        to the same storage: the jobs exist if and only if that transaction commits. Only
        backends whose storage is a database the caller also writes to can do this."""
        from ..._errors import ConfigurationError

        raise ConfigurationError(
            f"_connection is for PostgreSQL queues: {type(self).__name__} cannot write a job "
            "in another connection's transaction"
        )

    @abstractmethod
    def claim(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int = 1
    ) -> list[Lease]:
        """Take up to ``limit`` claimable jobs of ``queue`` (see the rules) and lease them.

        Each taken job becomes running with ``attempts + 1``, a new token and
        ``lease_until = now + lease_s``. Jobs whose lease lapsed count as claimable. Returns the
        leases in claim order; an empty list if nothing is claimable now. Two concurrent calls
        never return the same job.
        """

    @abstractmethod
    def heartbeat(self, job_id: str, token: str, lease_s: float, now: float) -> bool:
        """Extend the lease to ``now + lease_s``; False if ``token`` no longer holds the job."""

    @abstractmethod
    def complete(
        self, job_id: str, token: str, result: bytes | None, keep_s: float | None, now: float
    ) -> bool:
        """Running → done, storing ``result``, kept until ``now + keep_s`` (forever if None).

        False (and nothing changes) if ``token`` no longer holds the job.
        """

    def complete_many(
        self, done: Sequence[tuple[str, str, bytes | None, float | None]], now: float
    ) -> list[bool]:
        """``complete`` for each ``(job_id, token, result, keep_s)``; a backend may do them in
        one transaction. Returns, in order, what each ``complete`` would have."""
        return [
            self.complete(job_id, token, result, keep_s, now)
            for job_id, token, result, keep_s in done
        ]

    def complete_then_claim(
        self, done: Outcomes, queue: str, worker: str, lease_s: float, now: float, limit: int
    ) -> ClaimAfter:
        """``complete_many(done, now)``, then ``claim(queue, worker, lease_s, now, limit)``, in
        as few round trips as the storage allows: what a worker sends when the jobs it ran
        make room for more. Each part succeeds or fails on its own, and what it would have
        raised is returned in its place, so the caller knows which took effect."""
        results: list[bool] | Exception
        leases: list[Lease] | Exception
        try:
            results = self.complete_many(done, now)
        except Exception as exc:
            results = exc
        try:
            leases = self.claim(queue, worker, lease_s, now, limit)
        except Exception as exc:
            leases = exc
        return results, leases

    def heartbeat_many(
        self, held: Sequence[tuple[str, str]], lease_s: float, now: float
    ) -> list[bool]:
        """``heartbeat`` for each ``(job_id, token)``, possibly in one transaction."""
        return [self.heartbeat(job_id, token, lease_s, now) for job_id, token in held]

    @abstractmethod
    def retry(self, job_id: str, token: str, run_at: float, error: str, now: float) -> bool:
        """Running → queued, claimable from ``run_at``, remembering ``error``; the attempt stays
        counted. False if ``token`` no longer holds the job."""

    @abstractmethod
    def fail(self, job_id: str, token: str, error: str, now: float) -> bool:
        """Running → dead with ``error``. False if ``token`` no longer holds the job."""

    @abstractmethod
    def release(self, job_id: str, token: str, now: float, run_at: float | None = None) -> bool:
        """Running → queued, claimable at once (or from ``run_at``), and the attempt is not
        counted: a worker shutting down gives the job back, or one that does not know its
        task hands it on. False if ``token`` no longer holds the job."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown (or forgotten after its result expired)."""

    @abstractmethod
    def jobs(
        self,
        queue: str,
        state: str | None = None,
        *,
        task: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """The jobs of ``queue`` (only those in ``state``, only those of ``task``, when given),
        in enqueue order (oldest first; ties by id), ``limit`` of them from ``offset``. Read
        only: listing never changes a job."""

    @abstractmethod
    def finish(self, job_id: str, now: float) -> None:
        """Mark ``job_id`` done from any state, kept forever; an unknown id is recorded as done
        (so it cannot be enqueued until ``unfinish``). A lease on it stops holding."""

    @abstractmethod
    def unfinish(self, job_id: str) -> bool:
        """Forget a done job so its id can be enqueued again; False if it was not done."""

    @abstractmethod
    def requeue(self, job_id: str, now: float) -> bool:
        """Dead → queued (attempts and lost reset to 0); False if the job is not dead."""

    @abstractmethod
    def progress(self, job_id: str, token: str, fraction: float, note: str) -> bool:
        """Store how far the running job is; False (nothing changes) unless ``token`` holds
        it. The last value stays with the job afterwards."""

    @abstractmethod
    def cancel(self, job_id: str, reason: str, now: float) -> bool:
        """Queued (or waiting) → dead with ``reason`` as its error (it never runs; ``requeue``
        brings it back); False, and nothing changes, if the job is neither."""

    @abstractmethod
    def acquire(self, limits: Sequence[Limit], job_id: str, token: str, now: float) -> float | None:
        """Take a place in every limit for the run ``token`` of ``job_id`` (running): all or
        none, in one transaction. None: taken; the place is held while that run holds the
        job (a place whose run ended, or whose lease was taken over, is free again, however
        the run ended). Otherwise, how many seconds to wait before trying again: the time
        until the rate allows a start, or ``PARKED_S`` when a concurrency limit is full —
        the job is then noted as waiting for that limit, and the end of a run of its group
        brings it forward (``release_places``). In that case the job is handed back in the
        same change, as ``release`` would (uncounted), claimable from ``now`` + the wait:
        no end of a run can slip in between and miss it. A ``token`` that does not hold the
        job gets ``PARKED_S`` and changes nothing: that run must not start."""

    def acquire_many(
        self, runs: Sequence[tuple[Sequence[Limit], str, str]], now: float
    ) -> list[float | None]:
        """``acquire`` for each ``(limits, job_id, token)``, in order (a backend may do them
        in one transaction, or one round trip)."""
        return [self.acquire(limits, job_id, token, now) for limits, job_id, token in runs]

    @abstractmethod
    def release_places(self, limits: Sequence[Limit], token: str, now: float) -> None:
        """The run ``token`` is over: free its places, and bring forward (claimable now)
        the first job noted as waiting for each of these limits, if it is still queued."""

    @abstractmethod
    def abort(self, job_id: str, by: str, now: float) -> str:
        """Ask for the job to be aborted, on behalf of ``by``. Queued or waiting: it is
        ``aborted`` at once (never run; the jobs waiting for it are dead, as for ``fail``),
        returns ``"aborted"``. Running: ``abort_by`` is set, for its worker to stop it,
        returns ``"requested"`` (a job claimed again with ``abort_by`` set is not run either:
        its worker records it aborted). Otherwise nothing changes, and the job's state is
        returned (``"unknown"`` for an id never seen)."""

    @abstractmethod
    def aborted(self, job_id: str, token: str, now: float) -> bool:
        """Running → aborted, as its ``abort_by`` asked (the attempt is kept in the history
        as ``aborted``; the jobs waiting for it are dead). False if ``token`` no longer holds
        the job."""

    @abstractmethod
    def abort_requests(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Of ``job_ids``, those running with an abort asked: id to who asked."""

    @abstractmethod
    def requeue_dead(self, queue: str, now: float) -> int:
        """Every dead job of ``queue`` back to queued; returns how many."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every job of ``queue`` that is not running; returns how many."""

    @abstractmethod
    def expire(self, now: float) -> int:
        """Forget done jobs whose ``keep_until`` has passed; returns how many."""

    @abstractmethod
    def counts(self, queue: str, now: float) -> QueueCounts:
        """Counts per state (``delayed``: queued with ``run_at`` in the future), the age of the
        oldest claimable job, and the running leases."""

    @abstractmethod
    def next_run_at(self, queue: str) -> float | None:
        """The earliest ``run_at`` (or lapsing ``lease_until``) that could make a job claimable
        later; None if the queue has nothing queued or running."""

    @abstractmethod
    def worker_beat(self, info: WorkerInfo) -> None:
        """Store what a worker says of itself (its first beat registers it; the last one, with
        ``stopped_at``, says it stopped). Records older than ``WORKER_KEPT_S`` are forgotten."""

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every worker record kept, newest beat first."""

    @abstractmethod
    def swap_schedule(
        self,
        name: str,
        expected: ScheduleInfo | None,
        new: ScheduleInfo | None,
        jobs: Sequence[NewJob] = (),
        now: float = 0.0,
    ) -> bool:
        """If the schedule stored under ``name`` is exactly ``expected`` (None: there is
        none), store ``new`` in its place (None: remove it) and enqueue ``jobs`` as
        ``enqueue`` would, all in one transaction, and return True. Otherwise change
        nothing and return False: someone else changed it first."""

    @abstractmethod
    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule stored, of every queue, by name."""

    def doctor(self, now: float, repair: bool = False) -> list[str]:
        """Look for what is out of step — a job whose indexes disagree with its state (left
        by a change that failed midway, or by hand), an entry naming no job, something under
        the backend's names that conveyor did not write — and say what, one line each; with
        ``repair``, put jobs right (from their own record, which is the truth) and say what
        was done. What is not conveyor's is reported, never touched. The default finds
        nothing: a backend whose every change is one transaction cannot be out of step."""
        return []

    def storage_time(self) -> float:
        """Seconds since the epoch on the storage's own clock, the one that leases are judged
        by (queues correct their clock by it). The default is this machine's: memory and
        SQLite live here. A backend on a server reads the server's."""
        import time

        return time.time()

    def wait_for_work(self, queue: str, timeout_s: float) -> None:
        """Return when a job of ``queue`` may have become claimable, or after ``timeout_s``.

        The default waits the whole timeout; a backend that can be woken (memory, Redis) returns
        as soon as something is enqueued, released or retried.
        """
        import time

        time.sleep(max(0.0, timeout_s))

    def wait_for_job(self, job_id: str, timeout_s: float) -> None:
        """Return when ``job_id`` may have changed state, or after ``timeout_s``."""
        import time

        time.sleep(max(0.0, timeout_s))

    def close(self) -> None:  # noqa: B027 - most backends have nothing to close
        """Release connections and files. A wait under way on another thread returns (a
        stopped worker does not wait for its last wait to end) and never sees a connection
        closed under it."""
