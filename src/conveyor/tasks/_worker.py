"""The worker: takes jobs from one or more queues and runs them, at most ``concurrency`` at once.

Every backend call runs on a small thread pool of its own, so the event loop only ever runs
tasks and bookkeeping. A job runs under a lease that a heartbeat renews every third of
``lease_s``; whatever happens to the worker, a job it held becomes claimable again when the
lease lapses — or at once, when the worker shuts down cleanly and releases it.

Shutdown (SIGINT, SIGTERM, or :meth:`Worker.stop`): stop claiming; let running jobs finish for
up to ``shutdown_grace_s``; cancel the rest and release them, so another worker can start them
immediately. A second signal cancels and releases at once.

Supervision. The worker's loops — claiming, renewing leases, writing outcomes — run under one
supervisor (:meth:`Worker._supervise`). A :class:`BackendUnavailable` (storage down, locked,
full, read-only during a failover) is logged, backed off and retried for as long as it takes:
the worker never exits because its storage went away. Any other error is logged with its
traceback and retried the same way; if it keeps failing for longer than a lease, the worker
cannot keep its promises (its leases are lapsing), so it stops cleanly — running jobs finish
within the grace period or are handed back — and ``run()`` raises the error. A loop never dies
unnoticed and the worker never goes on as a zombie. An outcome that could not be written is
tried again with the same back-off until its lease must have lapsed; then the job runs again
elsewhere, and only one outcome is ever kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import re
import signal
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from .._errors import (
    BackendUnavailable,
    ConfigurationError,
    ItemNotSendable,
    ItemTimeout,
    JobAborted,
    WorkerCrashed,
)
from ._jobs import KIND_OF_EXECUTOR, JobContext, JobSource
from ._liveness import host_key, process_started, why_gone
from ._queue import CancelTask, RetryTask, Task, TaskQueue, _seconds, call_hooks, check_result
from ._workflows import waited_for
from .backends import RUNNING, Backend, Job, Lease, Limit
from .backends.base import WorkerInfo, storable

log = logging.getLogger("conveyor.worker")

#: how often a worker writes its record and looks for workers that died, at most
_BEAT_S = 1.0
#: how long a job of a task this worker does not know waits before another try (about)
_UNKNOWN_PAUSE_S = 5.0
#: how often expired results are swept, at most and at least (a queue that keeps results for
#: less than a minute is swept as often as they expire)
_EXPIRE_EVERY_S = 60.0
_EXPIRE_EVERY_MIN_S = 1.0
#: pauses between attempts while the backend is unavailable
_OUTAGE_FIRST_PAUSE_S = 0.5
_OUTAGE_MAX_PAUSE_S = 10.0
#: how long a stopping worker lets jobs whose function is over write their outcome
_SETTLE_AT_STOP_S = 5.0
#: the longest a worker waits on its storage in one call (see _wait_for_work)
_WAIT_SLICE_S = 1.0


class _SignalHub:
    """One set of handlers per event loop, shared by every worker running on it."""

    def __init__(self) -> None:
        self.workers: set[Worker] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> bool:
        if self.loop is not None and self.loop is not loop:
            return False
        if not self.workers:
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self._fire, sig)
            except (RuntimeError, ValueError, NotImplementedError):
                return False  # not the main thread, or no signals here
            self.loop = loop
        self.workers.add(worker)
        return True

    def remove(self, worker: Worker) -> None:
        self.workers.discard(worker)
        if not self.workers and self.loop is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    self.loop.remove_signal_handler(sig)
            self.loop = None

    def _fire(self, sig: int) -> None:
        for worker in list(self.workers):
            worker._signal(sig)


_HUB = _SignalHub()


class _Ack:
    """An outcome waiting to be written, and the future its job's task awaits."""

    __slots__ = ("data", "done", "failed_at", "keep_s", "lease")

    def __init__(
        self, lease: Lease, data: bytes | None, keep_s: float | None, done: asyncio.Future[bool]
    ) -> None:
        self.lease = lease
        self.data = data
        self.keep_s = keep_s
        self.done = done
        #: when writing it first failed (the worker's clock)
        self.failed_at: float | None = None


class _RaisedCancelled(Exception):
    """A task's own code raised ``CancelledError``: the job failed; the worker was not
    cancelled."""


class Worker:
    """Runs the jobs of ``queues``.

    Options: ``concurrency`` (jobs at once, default 10), ``burst`` (return once the queues are
    drained: nothing claimable, nothing running, nothing due within ``burst_horizon_s``),
    ``lease_s`` (30), ``shutdown_grace_s`` (10), ``poll_s`` (the longest wait between two looks
    at a queue that cannot wake us; default 1), ``handle_signals`` (True); for process tasks,
    ``start_method`` (as for process stages: ``forkserver`` on Linux) and
    ``max_items_per_worker`` (replace a worker process after that many jobs);
    ``unknown_task_s`` (3600: how long a job of a task this worker does not know is handed
    back for another worker before it is dead); ``abort_grace_s`` (5: how long a thread task
    asked to abort has to return before its thread is abandoned).
    """

    def __init__(
        self,
        queues: list[TaskQueue],
        *,
        concurrency: int = 10,
        burst: bool = False,
        lease_s: float = 30.0,
        shutdown_grace_s: float = 10.0,
        burst_horizon_s: float = 5.0,
        poll_s: float = 1.0,
        handle_signals: bool = True,
        name: str | None = None,
        start_method: str | None = None,
        max_items_per_worker: int | None = None,
        metrics_port: int | None = None,
        unknown_task_s: float = 3600.0,
        abort_grace_s: float = 5.0,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if lease_s <= 0 or shutdown_grace_s < 0 or poll_s <= 0:
            raise ConfigurationError("lease_s and poll_s must be positive, shutdown_grace_s >= 0")
        if not queues:
            raise ConfigurationError("a worker needs at least one queue")
        self.unknown_task_s = _seconds("unknown_task_s", unknown_task_s)
        self.abort_grace_s = _seconds("abort_grace_s", abort_grace_s)
        self.queues = queues
        #: the time leases, heartbeats and pauses follow: the first queue's clock
        self.clock = queues[0].clock
        self.concurrency = concurrency
        self.burst = burst
        self.lease_s = lease_s
        self.shutdown_grace_s = shutdown_grace_s
        self.burst_horizon_s = burst_horizon_s
        self.poll_s = poll_s
        self.handle_signals = handle_signals
        self.process_options = {
            "start_method": start_method,
            "max_items_per_worker": max_items_per_worker,
        }
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.processed = 0
        self.failed = 0
        #: runs by lease token, not job id: a worker that lost a job's lease (paused past it)
        #: and claimed the same job again holds two runs of it, each with its own heartbeat
        self._running: dict[str, tuple[asyncio.Task[None], TaskQueue, Lease]] = {}
        self._stopping: asyncio.Event | None = None
        self._hard: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: where jobs run: one source (and pool) per kind, made with the first job of it
        self._sources: dict[str, JobSource] = {}
        #: jobs handed to a source, by run key, until the source reports their outcome
        self._outcomes: dict[str, asyncio.Future[tuple[bool, Any]]] = {}
        #: the context and the kind of each run handed to a source (an abort reaches it)
        self._contexts: dict[str, tuple[JobContext, JobSource]] = {}
        #: runs asked to abort, by run key: who asked (their outcome is then "aborted")
        self._aborting: dict[str, str] = {}
        self._graces: set[asyncio.Future[None]] = set()  # thread runs given time to return
        self._freeing: set[asyncio.Future[None]] = set()  # places being freed
        #: the limits each run holds a place in, by run key
        self._places: dict[str, tuple[TaskQueue, list[Limit]]] = {}
        # completions waiting to be written, per queue, with the futures their jobs await
        self._acks: dict[TaskQueue, list[_Ack]] = {}
        self._ack_wake: asyncio.Event | None = None
        # runs (by token) whose outcome is being written: their lease is not renewed any more
        self._settling: set[str] = set()
        #: the claim loop waits for room, and claims (taking the outcomes waiting with it)
        #: as soon as there is enough: the outcomes are then left to it
        self._waiting_for_room = False
        self._freed: asyncio.Event | None = None
        #: set when a job ends: a burst worker waiting for work looks again at once
        self._ended: asyncio.Event | None = None
        self._next_expire = 0.0
        keeps = [q.keep_result_s for q in self.queues]
        keeps += [t.options.keep_result_s for q in self.queues for t in q.tasks.values()]
        shortest = min((k for k in keeps if k is not None), default=_EXPIRE_EVERY_S)
        self._expire_every_s = min(_EXPIRE_EVERY_S, max(_EXPIRE_EVERY_MIN_S, shortest))
        self._beat_overdue = False
        #: how often the worker writes its record (and looks for workers that died); leases
        #: are renewed every third of ``lease_s``, from ``_renew_at`` on (the worker's clock)
        self._beat_s = min(_BEAT_S, lease_s / 3)
        self._renew_at = 0.0
        #: when this worker last looked for dead workers (its clock)
        self._looked_at: float | None = None
        #: why the worker gave up (a loop that kept failing), raised by run() once stopped
        self.failure: BaseException | None = None
        self._saying: asyncio.Future[None] | None = None  # the record being written
        #: a lost job claimed, waiting for the others to end to run alone (see _take), and
        #: the run key of the one running alone
        self._suspect: tuple[TaskQueue, Lease] | None = None
        self._alone: str | None = None
        self._scheduling: asyncio.Future[None] | None = None  # the schedules' pass under way
        #: the queues whose ``@q.periodic`` schedules this worker has written
        self._published: set[TaskQueue] = set()
        self._scheduled_once = False
        # the error of each run that failed, by lease token, until the hooks are told
        self._errors: dict[str, str] = {}
        if metrics_port is not None:
            from ..metrics import Metrics

            self.metrics: Metrics | None = Metrics()
            self.metrics.watch(self)
            self.metrics_port = metrics_port
        else:
            self.metrics = None

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        """Run until stopped (or drained, in burst mode), on an event loop of its own."""
        asyncio.run(self.arun())

    async def arun(self) -> None:
        """Run on the current event loop; several workers (and queues) can share one loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        self._hard = asyncio.Event()
        # the backend's own I/O (claims, acks, waits for work), off the event loop; no user
        # code runs on these threads: tasks run on the engine's kinds (see _source_for)
        self._io = ThreadPoolExecutor(2, thread_name_prefix="conveyor:queue-io")
        # the backend's waits for work (no user code either), apart so a wait never holds a claim
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="conveyor:queue-wait")
        self._ack_wake = asyncio.Event()
        self._freed = asyncio.Event()
        for queue in self.queues:
            # the storage's clock is read here and by the heartbeat, off the loop: the
            # queue's now() then never waits on a server while the loop runs
            queue.skew_measured_elsewhere = True
            await self._io_call(queue.measure_skew)
        self._ended = asyncio.Event()
        self._started_at = self.queues[0].now()
        self._renew_at = self.clock.now() + self.lease_s / 3
        await self._beat()
        await self._run_schedules()
        server = None
        if self.metrics is not None:
            server = self.metrics_server = self.metrics.serve(self.metrics_port)
        helpers = [
            asyncio.ensure_future(self._supervise("acknowledgement", self._ack_round)),
            asyncio.ensure_future(self._supervise("heartbeat", self._heartbeat_round)),
        ]
        for helper in helpers:
            helper.add_done_callback(self._helper_ended)
        signals = self.handle_signals and _HUB.add(self, loop)
        try:
            await self._supervise("claim", self._claim_and_run)
        finally:
            await self._shutdown()
            await self._last_acks()
            for helper in helpers:
                helper.remove_done_callback(self._helper_ended)
                helper.cancel()
            if signals:
                _HUB.remove(self)
            await self._close_sources()
            for under_way in (self._saying, self._scheduling, *self._freeing):
                if under_way is not None:
                    with contextlib.suppress(BaseException):
                        await under_way
            for grace in list(self._graces):
                grace.cancel()
            await self._say_who(stopped=True)
            if server is not None:
                server.close()
            self._io.shutdown(wait=False)
            self._waiter.shutdown(wait=False)
            for queue in self.queues:
                queue.skew_measured_elsewhere = False
        if self.failure is not None:
            raise self.failure

    @property
    def stopping(self) -> bool:
        """A stop was asked (by a signal, :meth:`stop`, or a loop that gave up)."""
        return self._stopping is not None and self._stopping.is_set()

    def stop(self, *, now: bool = False) -> None:
        """Ask the worker to stop (thread-safe); ``now=True`` skips the grace period."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._request_stop, now)

    def _signal(self, sig: int) -> None:
        assert self._stopping is not None
        hard = self._stopping.is_set()
        log.warning(
            "worker %s: %s, %s",
            self.id,
            signal.Signals(sig).name,
            "stopping now" if hard else "finishing running jobs",
        )
        self._request_stop(hard)

    def _request_stop(self, now: bool) -> None:
        assert self._stopping is not None and self._hard is not None
        self._stopping.set()
        if self._freed is not None:
            self._freed.set()
        if now:
            self._hard.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the worker's clock, waking early if a stop is asked."""
        assert self._stopping is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        nap = asyncio.ensure_future(self.clock.sleep(seconds))
        await asyncio.wait([stop, nap], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        nap.cancel()

    async def _io_call(self, fn: Any, *args: Any) -> Any:
        """A backend call (claim, ack, beat, ...) on the worker's I/O threads: the backend's
        own I/O only, never a task's code (tasks run on the engine's kinds)."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._io, fn, *args)

    async def _supervise(self, name: str, one_round: Any) -> None:
        """Run ``one_round()`` until the worker stops. A storage outage is waited out with
        back-off, however long; any other error too, but one that keeps coming for longer
        than a lease stops the worker (see the module), never leaving it half alive."""
        assert self._stopping is not None
        pause = _OUTAGE_FIRST_PAUSE_S
        failing_since: float | None = None
        while not self._stopping.is_set():
            try:
                await one_round()
                pause = _OUTAGE_FIRST_PAUSE_S
                failing_since = None
                continue
            except asyncio.CancelledError:
                raise
            except BackendUnavailable as exc:
                log.error("worker %s: %s (%s); trying again in %.1f s", self.id, exc, name, pause)
            except Exception as exc:
                now = self.clock.now()
                if failing_since is None:
                    failing_since = now
                if now - failing_since >= self.lease_s:
                    log.critical(
                        "worker %s: the %s loop has failed for %.0f s (%r): stopping; running "
                        "jobs finish or are handed back",
                        self.id,
                        name,
                        now - failing_since,
                        exc,
                        exc_info=exc,
                    )
                    if self.failure is None:
                        self.failure = exc
                    self._request_stop(False)
                    return
                log.error(
                    "worker %s: the %s loop failed; trying again in %.1f s",
                    self.id,
                    name,
                    pause,
                    exc_info=exc,
                )
            await self._sleep(pause)
            pause = min(pause * 2, _OUTAGE_MAX_PAUSE_S)

    def _helper_ended(self, helper: asyncio.Future[None]) -> None:
        """A supervised loop ended while the worker runs: it gave up, or something beyond
        an ``Exception`` escaped it. Either way the worker must not go on without it."""
        if helper.cancelled():
            return
        error = helper.exception()
        if error is not None:
            log.critical("worker %s: a loop died: %r; stopping", self.id, error, exc_info=error)
            if self.failure is None:
                self.failure = error
        if self._stopping is not None and not self._stopping.is_set():
            self._request_stop(False)

    async def _claim_and_run(self) -> None:
        """Claim and start jobs until stopped (or drained in burst mode)."""
        assert self._stopping is not None and self._ack_wake is not None
        try:
            await self._claim_rounds()
        finally:
            self._waiting_for_room = False
            if self._acks:
                self._ack_wake.set()

    def _room(self) -> int:
        """How many jobs to claim now: 0 while too few slots are free. Claims come in
        groups: while jobs run, the loop waits until half the slots are free, so one
        transaction hands out several jobs. A job whose function has returned no longer
        takes a slot while its outcome is written (in batches); those writes may hold up to
        another ``concurrency`` jobs."""
        active = len(self._running) - len(self._settling)
        free = min(self.concurrency - active, 2 * self.concurrency - len(self._running))
        if free <= 0 or (active and free < max(1, self.concurrency // 2)):
            return 0
        return free

    async def _claim_rounds(self) -> None:
        assert self._stopping is not None and self._ended is not None
        assert self._ack_wake is not None
        while not self._stopping.is_set():
            # a job that ends from here on ends the next wait for work at once
            self._ended.clear()
            if self._suspect is not None or (self._alone is not None and self._running):
                # a job that was running when its worker died runs alone: once the others
                # are over, and with nothing beside it until it ends
                if self._suspect is not None and not self._running:
                    queue, lease = self._suspect
                    self._suspect = None
                    if await self._admit(queue, [lease]):
                        self._alone = lease.token
                        self._start(queue, lease)
                    continue
                await self._wait_any()
                continue
            self._alone = None
            free = self._room()
            if not free:
                # the outcomes written meanwhile make the room: the claim takes them along
                self._waiting_for_room = True
                try:
                    await self._wait_any()
                finally:
                    self._waiting_for_room = False
                continue
            claimed = 0
            for queue in self.queues:
                if free <= 0:
                    break
                leases = await self._claim_from(queue, free)
                await self._take(queue, leases)
                claimed += len(leases)
                free -= len(leases)
            if self._acks:  # of the queues not claimed from: the acknowledgement loop's
                self._ack_wake.set()
            now = self.queues[0].now()
            if now >= self._next_expire:
                self._next_expire = now + self._expire_every_s
                for queue in self.queues:
                    await self._io_call(queue.backend.expire, now)
            if claimed:
                continue
            if self.burst and not self._running and await self._drained():
                self._stopping.set()
                return
            await self._wait_for_work()

    async def _claim_from(self, queue: TaskQueue, limit: int) -> list[Lease]:
        """Claim up to ``limit`` jobs of ``queue``, writing the outcomes of its jobs that wait
        to be written in the same call (one round trip where the storage allows)."""
        batch = self._acks.pop(queue, None)
        if not batch:
            return cast(
                "list[Lease]",
                await self._io_call(
                    queue.backend.claim, queue.name, self.id, self.lease_s, queue.now(), limit
                ),
            )
        results: list[bool] | Exception
        claimed: list[Lease] | Exception
        try:
            results, claimed = await self._io_call(
                queue.backend.complete_then_claim,
                _outcomes_of(batch),
                queue.name,
                self.id,
                self.lease_s,
                queue.now(),
                limit,
            )
        except BaseException:
            # raised, not returned (a backend's bug, or this worker cancelled): the outcomes
            # are kept as they were, for the acknowledgement loop or the last try at shutdown
            self._acks.setdefault(queue, [])[:0] = batch
            assert self._ack_wake is not None
            self._ack_wake.set()
            raise
        if isinstance(results, Exception):
            # kept for the acknowledgement loop, which tries again (and backs off)
            self._ack_failed(queue, batch, results)
            assert self._ack_wake is not None
            self._ack_wake.set()
        else:
            _acked(batch, results)
        if isinstance(claimed, Exception):
            raise claimed
        return claimed

    async def _take(self, queue: TaskQueue, leases: list[Lease]) -> None:
        """Start what a claim gave, but a job that was running when its worker died (it was
        lost) is a suspect: it may be what killed that worker. Run beside others, it would
        take their lives too, and their crash budgets (``max_crashes``). So the first suspect
        is kept to run alone, and the rest of the claim is handed back, uncounted."""
        back: list[Lease] = []
        taken: list[Lease] = []
        for lease in leases:
            if self._suspect is not None:
                back.append(lease)
            elif self.concurrency > 1 and self._lost_elsewhere(lease.job):
                self._suspect = (queue, lease)
            else:
                taken.append(lease)
        for lease in await self._admit(queue, taken):
            self._start(queue, lease)
        for lease in back:
            try:
                await self._io_call(queue.backend.release, lease.job.id, lease.token, queue.now())
            except Exception as exc:
                log.error("job %s: not handed back (%s); its lease will lapse", lease.job.id, exc)

    def _limits_of(self, queue: TaskQueue, job: Job) -> list[Limit]:
        """The limits shared by all workers that a run of ``job`` must find a place in."""
        task = queue.tasks.get(job.task)
        if task is None:
            return []
        options = task.options
        found = []
        if options.concurrency is not None or options.rate is not None:
            group = f"task:{queue.name}:{task.name}"
            found.append(Limit(group, options.concurrency, options.rate))
        if options.key_limited:
            try:
                key = queue.serializer.loads(job.payload).get("limit_key")
            except Exception:  # it fails as it runs, with the reason
                key = None
            if isinstance(key, str):
                group = f"key:{queue.name}:{task.name}:{key}"
                found.append(Limit(group, options.key_concurrency, options.key_rate))
        return found

    async def _admit(self, queue: TaskQueue, leases: list[Lease]) -> list[Lease]:
        """Of ``leases``, those that may start: each takes its places in its limits (one
        round trip for all); one whose limit is full (or its rate spent) is handed back by
        the storage, claimable again when the limit may allow it (a run of its group that
        ends brings it forward at once): it waits in the queue, not in a worker's slot."""
        limited = [(lease, self._limits_of(queue, lease.job)) for lease in leases]
        asked = [(limits, lease.job.id, lease.token) for lease, limits in limited if limits]
        if not asked:
            return leases
        try:
            waits = iter(await self._io_call(queue.backend.acquire_many, asked, queue.now()))
        except Exception as exc:  # their leases lapse, and they are claimed again
            log.error("the limits of %d job(s) could not be looked at (%s)", len(asked), exc)
            return [lease for lease, limits in limited if not limits]
        admitted = []
        for lease, limits in limited:
            if not limits:
                admitted.append(lease)
            elif next(waits) is None:
                if any(limit.concurrency is not None for limit in limits):
                    self._places[lease.token] = (queue, limits)
                admitted.append(lease)
        return admitted

    def _free_places(self, token: str) -> None:
        """A run is over: free its places (the storage frees them anyway once it sees the
        run over; this brings the next waiting job forward now)."""
        held = self._places.pop(token, None)
        if held is None:
            return
        queue, limits = held

        async def free() -> None:
            try:
                await self._io_call(queue.backend.release_places, limits, token, queue.now())
            except Exception as exc:
                log.warning("the places of a run could not be freed now (%s)", exc)

        later = asyncio.ensure_future(free())
        self._freeing.add(later)
        later.add_done_callback(self._freeing.discard)

    def _lost_elsewhere(self, job: Job) -> bool:
        """The job's last run ended lost on another worker, which therefore died (or lost
        its storage) under it. One this worker lost itself (a pause, an outage: it is alive)
        proves nothing against the job."""
        if job.lost == 0:
            return False
        lost = [a for a in job.history if a.outcome == "lost"]
        return not lost or lost[-1].worker != self.id

    async def _drained(self) -> bool:
        for queue in self.queues:
            now = queue.now()
            counts = await self._io_call(queue.backend.counts, queue.name, now)
            if counts.queued - counts.delayed > 0 or counts.running > 0:
                return False
            at = await self._io_call(queue.backend.next_run_at, queue.name)
            if at is not None and at - now <= self.burst_horizon_s:
                return False
        return True

    async def _wait_for_work(self) -> None:
        """Until a queue may have work, a running job ends, or a stop is asked."""
        assert self._loop is not None and self._stopping is not None
        wait_s = self.poll_s
        for queue in self.queues:
            at = await self._io_call(queue.backend.next_run_at, queue.name)
            if at is not None:
                wait_s = min(wait_s, max(0.0, at - queue.now()) + 0.001)
        if len(self.queues) == 1:
            queue = self.queues[0]
            # the backend's wait for work, on the waiter thread (no user code runs there). A
            # stopped worker does not wait for its last wait to end: keeping each one short
            # bounds how long that thread outlives the worker (and holds up interpreter exit)
            woken = self._loop.run_in_executor(
                self._waiter, queue.backend.wait_for_work, queue.name, min(wait_s, _WAIT_SLICE_S)
            )
        else:
            woken = asyncio.ensure_future(asyncio.sleep(min(wait_s, 0.05)))
        assert self._ended is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(woken), stop, ended]
        await asyncio.wait(waits, timeout=wait_s + 0.1, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        ended.cancel()

    async def _wait_any(self) -> None:
        """Until a job ends or settles (its function returned), or a stop is asked: each
        of them sets ``_freed``."""
        assert self._stopping is not None and self._freed is not None
        if self._stopping.is_set():
            return
        self._freed.clear()
        await self._freed.wait()

    def _settle(self, token: str) -> None:
        """The run's function is over; its outcome is being written (its lease not renewed)."""
        assert self._freed is not None
        self._settling.add(token)
        self._freed.set()

    # -- one job -----------------------------------------------------------------------------
    def _start(self, queue: TaskQueue, lease: Lease) -> None:
        task = asyncio.ensure_future(self._run(queue, lease))
        token = lease.token
        self._running[token] = (task, queue, lease)

        def forget(_: asyncio.Task[None]) -> None:
            self._running.pop(token, None)
            self._settling.discard(token)
            if token in self._places:
                self._free_places(token)
            if self._ended is not None:
                self._ended.set()
            if self._freed is not None:
                self._freed.set()

        task.add_done_callback(forget)

    async def _heartbeat_round(self) -> None:
        """One beat: every third of ``lease_s``, renew every running job's lease (one call
        per queue); every ``beat_s`` (a second, or less with a short lease), write this
        worker's record and look for workers that died. After a round that failed, the next
        one runs after the supervisor's back-off alone: the leases are running out."""
        if not self._beat_overdue:
            wait = min(self._beat_s, max(0.0, self._renew_at - self.clock.now()))
            await self.clock.sleep(wait)
        self._beat_overdue = True
        for queue in self.queues:
            if queue.skew_due():
                await self._io_call(queue.measure_skew)
        if self.clock.now() >= self._renew_at:
            await self._renew_leases()
            self._renew_at = self.clock.now() + self.lease_s / 3
        self._beat_overdue = False
        # the record is written beside the next sleep, not before it: the leases' beat keeps
        # its rhythm whatever the storage takes to store the record
        if self._saying is None or self._saying.done():
            self._saying = asyncio.ensure_future(self._beat())
        # schedules beside the record, not inside it: a slow pass never delays the record
        # that tells the other workers this one is alive
        if self._scheduling is None or self._scheduling.done():
            self._scheduling = asyncio.ensure_future(self._run_schedules())

    async def _renew_leases(self) -> None:
        per_queue: dict[TaskQueue, list[Lease]] = {}
        for _, queue, lease in list(self._running.values()):
            if lease.token not in self._settling:
                per_queue.setdefault(queue, []).append(lease)
        if self._suspect is not None:  # held, not started yet
            per_queue.setdefault(self._suspect[0], []).append(self._suspect[1])
        for queue, leases in per_queue.items():
            held = await self._io_call(
                queue.backend.heartbeat_many,
                [(lease.job.id, lease.token) for lease in leases],
                self.lease_s,
                queue.now(),
            )
            for lease, ok in zip(leases, held, strict=True):
                # a job whose function returned meanwhile may have its outcome written by now
                # (then its token no longer holds it): only a job still running lost its lease
                if not ok and self._still_held(lease.token):
                    log.warning(
                        "job %s: lease lost; its outcome here will not be kept", lease.job.id
                    )

    def _still_held(self, token: str) -> bool:
        """The job of ``token`` runs here (or waits to run alone), its function not over."""
        if self._suspect is not None and self._suspect[1].token == token:
            return True
        return token in self._running and token not in self._settling

    async def _beat(self) -> None:
        await self._say_who()
        try:
            await self._look_for_the_dead()
        except Exception as exc:  # looked for again at the next beat; the leases still hold
            log.warning("worker %s: could not look for workers that died (%s)", self.id, exc)
        try:
            await self._look_for_aborts()
        except Exception as exc:  # looked for again at the next beat
            log.warning("worker %s: could not look for jobs asked to abort (%s)", self.id, exc)

    async def _run_schedules(self) -> None:
        """Enqueue the ticks of the queues' schedules that are due within two beats (with
        ``run_at`` at the tick: they start on time). A burst worker enqueues what is due as it
        starts, and no more: it would otherwise never find its queue drained."""
        if self.burst and self._scheduled_once:
            return
        lookahead_s = 0.0 if self.burst else 2 * self._beat_s
        for queue in self.queues:
            try:
                if queue not in self._published:
                    await self._io_call(queue.publish_schedules)
                    self._published.add(queue)
                await self._io_call(queue.run_schedules, lookahead_s)
            except Exception as exc:  # tried again at the next beat: nothing is lost by waiting
                log.warning("worker %s: could not run the schedules (%s)", self.id, exc)
        self._scheduled_once = True

    async def _look_for_the_dead(self) -> None:
        """End at once the leases of every worker found dead (see ``_liveness``): their jobs
        are claimable now, not when their leases lapse, and count as lost like any lapse."""
        at = self.clock.now()
        judge_beats = self._looked_at is not None and at - self._looked_at <= 2 * self._beat_s
        self._looked_at = at
        for queue in {id(q.backend): q for q in self.queues}.values():
            records = await self._io_call(queue.backend.workers)
            now = queue.now()
            for record in records:
                why = why_gone(record, self.id, now, judge_beats)
                if why is not None:
                    ended = await self._io_call(_end_leases_of, queue.backend, record, now)
                    log.warning(
                        "worker %s found worker %s (%s, pid %d) dead: %s; %s",
                        self.id,
                        record.id,
                        record.host,
                        record.pid,
                        why,
                        f"its {ended} job(s) run again now" if ended else "it held no job",
                    )
                    if ended and self._ended is not None:
                        self._ended.set()  # look for work at once

    async def _say_who(self, stopped: bool = False) -> None:
        """Write this worker's record (``conveyor workers``) to each storage it works from.
        A storage that cannot take it is logged, never a reason to stop: leases come first."""
        backends = {id(q.backend): q for q in self.queues}
        for queue in backends.values():
            now = queue.now()
            info = WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=tuple(q.name for q in self.queues if q.backend is queue.backend),
                concurrency=self.concurrency,
                started_at=self._started_at,
                last_beat=now,
                beat_s=self._beat_s,
                running=len(self._running),
                processed=self.processed,
                failed=self.failed,
                stopped_at=now if stopped else None,
                host_key=host_key(),
                pid_started=max(0, process_started(os.getpid()) or 0),
            )
            try:
                await self._io_call(queue.backend.worker_beat, info)
            except Exception as exc:
                log.warning(
                    "worker %s: its record was not written to %s (%s)", self.id, queue.where, exc
                )

    async def _ack(
        self, queue: TaskQueue, lease: Lease, data: bytes | None, keep_s: float | None
    ) -> bool:
        """Complete the job in the next batch; True if the lease still held it."""
        assert self._loop is not None and self._ack_wake is not None
        self._settle(lease.token)
        done: asyncio.Future[bool] = self._loop.create_future()
        self._acks.setdefault(queue, []).append(_Ack(lease, data, keep_s, done))
        self._ack_wake.set()
        return await done

    async def _ack_round(self) -> None:
        """Write the outcomes waiting (after a failed write, at once: the supervisor has
        backed off already), unless the claim loop is about to take them with its claim."""
        assert self._ack_wake is not None
        while not self._acks or (self._waiting_for_room and self._room()):
            self._ack_wake.clear()
            await self._ack_wake.wait()
        self._ack_wake.clear()
        await self._flush_acks()

    async def _flush_acks(self) -> None:
        """Write every waiting outcome, a batch per queue. A batch that fails is kept to be
        written again (the supervisor backs off), except outcomes whose lease must have
        lapsed by now: their jobs run again elsewhere, and their own tasks say so."""
        while self._acks:
            queue, batch = self._acks.popitem()
            try:
                results = await self._io_call(
                    queue.backend.complete_many, _outcomes_of(batch), queue.now()
                )
            except Exception as exc:
                self._ack_failed(queue, batch, exc)
                raise
            _acked(batch, results)

    def _ack_failed(self, queue: TaskQueue, batch: list[_Ack], error: Exception) -> None:
        """Keep a batch whose write failed, to be written again first, but for outcomes
        whose lease must have lapsed by now: those fail with ``error``."""
        now = self.clock.now()
        kept = []
        for ack in batch:
            if ack.failed_at is None:
                ack.failed_at = now
            if now - ack.failed_at < self.lease_s:
                kept.append(ack)
            elif not ack.done.done():
                ack.done.set_exception(error)
        if kept:
            self._acks.setdefault(queue, [])[:0] = kept

    async def _last_acks(self) -> None:
        """At shutdown: one more try at the outcomes still waiting; what cannot be written
        now runs again when its lease lapses."""
        try:
            await self._flush_acks()
        except Exception as exc:
            log.error("worker %s: outcomes not written at shutdown (%s)", self.id, exc)
        for batch in self._acks.values():
            for ack in batch:
                if not ack.done.done():
                    ack.done.set_exception(BackendUnavailable("the worker stopped first"))
        self._acks.clear()

    async def _run(self, queue: TaskQueue, lease: Lease) -> None:
        """Run one job to its outcome; one heartbeat loop renews every lease meanwhile. The
        queue's hooks are told as the attempt starts and ends (and as the job dies): the
        start just before the task's function is called, or, for a job that never gets that
        far (dead, aborted, handed on), once its outcome is written, so that what a slow hook
        holds up is never the end of a job that must not run."""
        hooks = queue.hooks
        began = time.perf_counter()
        payload: Any = None
        try:
            payload = queue.serializer.loads(lease.job.payload)
        except Exception as exc:  # the job fails on it below, as dead
            payload = exc
        told = False

        # hooks are the worker's own callbacks (as a logging handler is), not work: they are
        # called here, on the loop the async kind runs on, as an inline task would be, and
        # must be quick; the jobs' code runs on the kinds
        def starting() -> None:
            nonlocal told
            if not told:
                told = True
                if hooks.before_attempt:
                    call_hooks(hooks.before_attempt, lease.job)

        outcome = "not kept"
        try:
            outcome = await self._run_job(queue, lease, payload, starting)
        except Exception as exc:
            log.error(
                "job %s: its outcome could not be written (%s); it runs again when its lease "
                "lapses",
                lease.job.id,
                exc,
                exc_info=None if isinstance(exc, BackendUnavailable) else exc,
            )
        finally:
            took = time.perf_counter() - began
            error = self._errors.pop(lease.token, None)
            starting()
            if hooks.after_attempt:
                call_hooks(hooks.after_attempt, lease.job, outcome, took, error)
            if outcome == "dead" and hooks.dead:
                call_hooks(hooks.dead, lease.job, error or "")

    async def _run_job(
        self, queue: TaskQueue, lease: Lease, payload: Any, starting: Callable[[], None]
    ) -> str:
        """Run the job and write its outcome; returns it: succeeded, retried, dead, aborted,
        postponed, or not kept (its lease was lost). ``starting`` is called just before the
        task's function."""
        job = lease.job
        # asked while an earlier attempt ran, or while this one waited to run alone
        asked = job.abort_by or self._aborting.get(lease.token)
        if asked is not None:
            return await self._end_aborted(queue, lease, asked)
        task = queue.tasks.get(job.task)
        if task is None:
            return await self._unknown(queue, lease)
        if job.lost >= task.options.max_crashes:
            # every lapse is counted when the job is claimed again: a job that keeps killing
            # its worker (or whose worker keeps losing its storage) is not run forever
            times = "once" if job.lost == 1 else f"{job.lost} times"
            return await self._dead(
                queue,
                lease,
                f"the worker running it died {times} before writing an outcome (found dead, "
                f"or its lease lapsed); with max_crashes={task.options.max_crashes} it is not "
                "run again",
            )
        try:
            if isinstance(payload, Exception):
                raise payload
            args, kwargs = list(payload["args"]), dict(payload["kwargs"])
            if "after" in payload:  # a step of a workflow: what it waited for comes first
                args.insert(0, waited_for(queue, job, payload["after"]))
        except ValueError as exc:
            return await self._dead(queue, lease, f"the job cannot run: {exc}")
        except Exception as exc:
            return await self._dead(queue, lease, f"the job's arguments cannot be read: {exc!r}")
        starting()
        try:
            try:
                context = JobContext(
                    id=job.id,
                    queue=queue.name,
                    task=job.task,
                    attempt=job.attempts,
                    enqueued_at=job.enqueued_at,
                    lease_until=job.lease_until,
                    url=queue.url,
                    token=lease.token,
                    trace=None
                    if queue.tracing is None
                    else queue.tracing.context_of(job, portable=task.options.executor == "process"),
                )
                result = await self._call(task, lease.token, args, kwargs, context)
            except asyncio.CancelledError:
                raise
            except BaseException:
                # whatever a run asked to abort did at its end (raised, timed out, was
                # killed), it ends aborted
                if lease.token in self._aborting:
                    return await self._end_aborted(queue, lease, self._aborting[lease.token])
                raise
            if lease.token in self._aborting:
                return await self._end_aborted(queue, lease, self._aborting[lease.token])
        except RetryTask as signal_:
            return await self._retry_or_dead(queue, lease, task, "RetryTask", signal_.delay_s)
        except CancelTask as signal_:
            return await self._dead(queue, lease, f"cancelled by the task: {signal_}")
        except asyncio.CancelledError:
            raise
        except ItemNotSendable as exc:
            # the job cannot cross to its process, or its result cannot come back: no retry
            # can change that
            return await self._dead(queue, lease, f"{exc}")
        except ItemTimeout:
            error = f"task {task.name!r} ran past timeout_s={task.options.timeout_s}"
            return await self._retry_or_dead(queue, lease, task, error, None)
        except WorkerCrashed as exc:
            error = f"the worker process running it (pid {exc.pid}) {exc.how}"
            return await self._retry_or_dead(queue, lease, task, error, None)
        except BaseException as exc:
            # arguments that no longer fit the function are not worth retrying; they are only
            # checked on a TypeError, so the common case pays nothing for it
            mismatch = isinstance(exc, TypeError) and _mismatch(task, args, kwargs)
            if mismatch:
                return await self._dead(
                    queue,
                    lease,
                    f"the job's arguments no longer match {task.name}{task.signature}: {mismatch}",
                )
            return await self._retry_or_dead(queue, lease, task, _user_traceback(exc), None)
        try:
            if result is not None:
                check_result(queue.serializer, task.name, result)
            data = None if result is None else queue.serializer.dumps(result)
        except Exception as exc:
            return await self._dead(
                queue, lease, f"the result ({type(result).__name__}) cannot be stored: {exc}"
            )
        if await self._ack(queue, lease, data, task.options.keep_result_s):
            self.processed += 1
            return "succeeded"
        return "not kept"

    async def _call(
        self,
        task: Task[Any, Any],
        run_key: str,
        args: list[Any],
        kwargs: dict[str, Any],
        context: JobContext,
    ) -> Any:
        """Run the job on its kind's pool and wait for what it returned (or raise what it
        raised)."""
        assert self._loop is not None
        source = self._source_for(task)
        outcome: asyncio.Future[tuple[bool, Any]] = self._loop.create_future()
        self._outcomes[run_key] = outcome
        self._contexts[run_key] = (context, source)
        try:
            source.feed(run_key, _task_key(task), args, kwargs, task.options.timeout_s, context)
            returned, value = await outcome
        finally:
            self._outcomes.pop(run_key, None)
            self._contexts.pop(run_key, None)
        if returned:
            return value
        if isinstance(value, asyncio.CancelledError):
            # raised by the task's own code: its job's failure, not this worker's cancellation
            raise _RaisedCancelled("the task raised CancelledError") from value
        raise value

    def _source_for(self, task: Task[Any, Any]) -> JobSource:
        kind = "async" if task.is_async else KIND_OF_EXECUTOR[task.options.executor]
        source = self._sources.get(kind)
        if source is None:
            assert self._loop is not None
            tasks = [
                t
                for q in self.queues
                for t in q.tasks.values()
                if ("async" if t.is_async else KIND_OF_EXECUTOR[t.options.executor]) == kind
            ]
            source = JobSource(
                kind,
                name=f"conveyor:task:{kind}",
                workers=self.concurrency,
                functions={_task_key(t): t.fn for t in tasks},
                timed=any(t.options.timeout_s is not None for t in tasks),
                options=self.process_options if kind == "process" else {},
                outcomes=self,
                loop=self._loop,
            )
            self._sources[kind] = source
        return source

    # -- outcomes, from the sources (on the loop) ------------------------------------------------
    def job_returned(self, run_key: str, value: Any) -> None:
        outcome = self._outcomes.get(run_key)
        if outcome is not None and not outcome.done():
            outcome.set_result((True, value))

    def job_raised(self, run_key: str, error: BaseException) -> None:
        outcome = self._outcomes.get(run_key)
        if outcome is not None and not outcome.done():
            outcome.set_result((False, error))

    def pool_failed(self, kind: str, error: BaseException) -> None:
        """The pool of ``kind`` cannot go on (a fault of conveyor's, or a process task whose
        worker cannot start): its jobs fail with the reason, and it is made again."""
        log.error("worker %s: the %s pool failed: %r", self.id, kind, error)
        source = self._sources.pop(kind, None)
        if source is not None:
            source.abort()
        for outcome in list(self._outcomes.values()):
            if not outcome.done():
                outcome.set_result((False, error))

    async def _close_sources(self) -> None:
        sources = list(self._sources.values())
        self._sources.clear()
        for source in sources:
            source.close()
        for source in sources:
            # a thread of the loop's default executor that only waits for the kind's workers
            # to leave: no user code runs on it (tasks run on the engine's kinds)
            if not await asyncio.to_thread(source.pool.gone.wait, 5):
                source.abort()

    async def _retry_or_dead(
        self,
        queue: TaskQueue,
        lease: Lease,
        task: Task[Any, Any],
        error: str,
        delay_s: float | None,
    ) -> str:
        error = storable(error)  # it is stored as text: no storage holds a lone surrogate
        job = lease.job
        self._settle(lease.token)
        # attempts its worker died in are counted by max_crashes, not by retries
        if job.attempts - job.lost > task.options.retries:
            return await self._dead(queue, lease, error)
        self._errors[lease.token] = error
        wait = task.options.delay_s(job.attempts) if delay_s is None else delay_s
        now = queue.now()
        await self._io_call(queue.backend.retry, job.id, lease.token, now + wait, error, now)
        return "retried"

    async def _unknown(self, queue: TaskQueue, lease: Lease) -> str:
        """A job of a task this worker does not know (a rolling deploy: a newer producer, an
        older worker) goes back to the queue for a worker that knows it, a little later and
        without counting the attempt; it is dead once it has waited ``unknown_task_s``."""
        job = lease.job
        known = ", ".join(sorted(queue.tasks)) or "none"
        now = queue.now()
        if now - job.enqueued_at >= self.unknown_task_s:
            return await self._dead(
                queue,
                lease,
                f"no worker that knows task {job.task!r} took it within unknown_task_s="
                f"{self.unknown_task_s:g} (the last that tried knows: {known})",
            )
        self._settle(lease.token)
        pause = _UNKNOWN_PAUSE_S * (0.5 + random.random())
        if self.burst:  # a burst worker drains what it can run: this one is left for others
            pause = max(pause, self.burst_horizon_s + 1.0)
        later = now + pause
        log.warning(
            "job %s: this worker does not know task %r (it knows: %s); handed back for a "
            "worker that does",
            job.id,
            job.task,
            known,
        )
        await self._io_call(queue.backend.release, job.id, lease.token, now, later)
        return "postponed"

    async def _end_aborted(self, queue: TaskQueue, lease: Lease, by: str) -> str:
        """Record the run's job aborted, as ``by`` asked."""
        self._aborting.pop(lease.token, None)
        self._settle(lease.token)
        self._errors[lease.token] = f"aborted by {by}"
        log.warning("job %s (%s) is aborted, as %s asked", lease.job.id, lease.job.task, by)
        ok = await self._io_call(queue.backend.aborted, lease.job.id, lease.token, queue.now())
        return "aborted" if ok else "not kept"

    async def _look_for_aborts(self) -> None:
        """Ask the storage which running jobs someone asked to abort, and stop them."""
        per_queue: dict[TaskQueue, list[str]] = {}
        held = [(queue, lease) for _, queue, lease in list(self._running.values())]
        if self._suspect is not None:  # claimed, waiting to run alone
            held.append(self._suspect)
        for queue, lease in held:
            if lease.token not in self._aborting and lease.token not in self._settling:
                per_queue.setdefault(queue, []).append(lease.job.id)
        for queue, ids in per_queue.items():
            asked = await self._io_call(queue.backend.abort_requests, ids)
            for q, lease in held:
                by = asked.get(lease.job.id) if q is queue else None
                if by is not None and lease.token not in self._aborting:
                    self._stop_run(lease, by)

    def _stop_run(self, lease: Lease, by: str) -> None:
        """Stop a run asked to abort, as its kind allows: a coroutine is cancelled where it
        awaits, a process killed; a thread is told (``abort_requested``) and, if it has not
        returned within ``abort_grace_s``, abandoned. Its outcome is then ``aborted``."""
        assert self._loop is not None
        self._aborting[lease.token] = by
        found = self._contexts.get(lease.token)
        if found is None:  # not handed to its kind yet: it ends aborted as soon as it returns
            return
        context, source = found
        context.abort.request(by, self._loop.time())
        error = JobAborted(lease.job.id, lease.job.task, f"aborted by {by}")
        if source.kind == "process":
            source.cancel(lease.token, error)
        elif source.kind == "thread":
            later = asyncio.ensure_future(self._abandon_after_grace(lease.token, source, error))
            self._graces.add(later)
            later.add_done_callback(self._graces.discard)

    async def _abandon_after_grace(
        self, run_key: str, source: JobSource, error: BaseException
    ) -> None:
        await self._sleep(self.abort_grace_s)
        still = run_key in self._contexts and run_key in self._aborting
        if still and source.cancel(run_key, error):
            log.warning(
                "a thread task asked to abort did not return within abort_grace_s=%g: "
                "its thread is abandoned (it runs on, unseen, until it returns)",
                self.abort_grace_s,
            )

    async def _dead(self, queue: TaskQueue, lease: Lease, error: str) -> str:
        self._errors[lease.token] = error
        self.failed += 1
        self._settle(lease.token)
        log.error("job %s (%s) is dead: %s", lease.job.id, lease.job.task, error.strip())
        ok = await self._io_call(queue.backend.fail, lease.job.id, lease.token, error, queue.now())
        return "dead" if ok else "not kept"

    # -- shutdown ----------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        assert self._hard is not None
        if self._running and not self._hard.is_set():
            tasks = [t for t, _, _ in self._running.values()]
            hard: asyncio.Future[Any] = asyncio.ensure_future(self._hard.wait())
            everyone: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.wait(
                [everyone, hard],
                timeout=self.shutdown_grace_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            hard.cancel()
        # a job whose function has returned (or raised) is over, even in a hard stop: let it
        # write its outcome, so it is not handed back and run again
        over = [
            task
            for task, _, lease in self._running.values()
            if lease.token in self._settling
            or (lease.token in self._outcomes and self._outcomes[lease.token].done())
        ]
        if over:
            await asyncio.wait(over, timeout=_SETTLE_AT_STOP_S)
        # jobs that finished and wait for their batched ack are done: write them first, so
        # none of them is handed back and run twice
        with contextlib.suppress(Exception):
            await self._flush_acks()
        await asyncio.sleep(0)
        left = list(self._running.values())
        if left:
            # what still runs is stopped where it runs: processes killed, coroutines
            # cancelled, threads abandoned (they cannot be stopped; their outcome is dropped)
            for source in list(self._sources.values()):
                source.abort()
            self._sources.clear()
        for task, _, _ in left:
            task.cancel()
        held = [(queue, lease) for _, queue, lease in left]
        for task, _, _ in left:
            with contextlib.suppress(BaseException):
                await task
        if self._suspect is not None:  # claimed, never started
            held.append(self._suspect)
            self._suspect = None
        for queue, lease in held:
            # hand it back at once: another worker may start it now, not after the lease
            try:
                await self._io_call(queue.backend.release, lease.job.id, lease.token, queue.now())
            except Exception as exc:
                log.error("job %s: not handed back (%s); its lease will lapse", lease.job.id, exc)
        self._running.clear()


#: conveyor's own source files: their frames are dropped from the tracebacks a job keeps
_OWN_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


_FRAME = re.compile(r'^(\s*)File "([^"]+)", line \d+')


def _outcomes_of(batch: list[_Ack]) -> list[tuple[str, str, bytes | None, float | None]]:
    return [(a.lease.job.id, a.lease.token, a.data, a.keep_s) for a in batch]


def _acked(batch: list[_Ack], results: list[bool]) -> None:
    for ack, ok in zip(batch, results, strict=True):
        if not ack.done.done():
            ack.done.set_result(ok)


def _user_traceback(error: BaseException) -> str:
    """The traceback a failed job keeps: the task's own frames, without conveyor's on the way
    to them (the worker, the kind, the call; also in a traceback sent back from a worker
    process as text). A traceback with no frame but conveyor's keeps them all: it is then
    conveyor's own failure."""
    lines = "".join(traceback.format_exception(error)).splitlines(keepends=True)
    frames = [m.group(2) for m in map(_FRAME.match, lines) if m]
    if all(path.startswith(_OWN_SOURCE) for path in frames):
        return "".join(lines)
    kept: list[str] = []
    skipping: int | None = None  # the indentation of the frame being dropped
    for line in lines:
        found = _FRAME.match(line)
        if found:
            own = found.group(2).startswith(_OWN_SOURCE)
            skipping = len(found.group(1)) if own else None
            if own:
                continue
        elif skipping is not None:
            if line.strip() and len(line) - len(line.lstrip()) > skipping:
                continue  # the dropped frame's source line and its carets
            skipping = None
        kept.append(line)
    return "".join(kept)


def _mismatch(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> str:
    """Why ``args`` and ``kwargs`` do not fit the task's signature; empty if they do."""
    try:
        task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc) or "they do not bind"
    return ""


def _end_leases_of(backend: Backend, record: WorkerInfo, now: float) -> int:
    """End now the lease of every job the dead worker of ``record`` holds, then mark its
    record (so that it is not looked at again until it beats, if it ever does). A lease ended
    is one heartbeat of no length: it still names the dead worker's token, so a job claimed by
    someone else meanwhile is not touched; the next claim takes the job and counts it lost.
    Built on the backend contract alone (listing and heartbeats), so every backend has it."""
    held: list[tuple[str, str]] = []
    page = 1000
    for name in record.queues:
        offset = 0
        while True:
            running = backend.jobs(name, RUNNING, limit=page, offset=offset)
            held += [(j.id, j.token) for j in running if j.worker == record.id and j.token]
            if len(running) < page:
                break
            offset += page
    ended = sum(backend.heartbeat_many(held, 0.0, now)) if held else 0
    backend.worker_beat(dataclasses.replace(record, reclaimed_at=now))
    return ended


def _task_key(task: Task[Any, Any]) -> str:
    """How a job names its function to the pool (queues may share task names)."""
    return f"{task.queue.name}\x00{task.name}"
