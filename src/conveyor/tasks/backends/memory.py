"""``memory://``: the reference backend, in this process only.

One lock guards everything, so every method is trivially atomic. Waiting uses a condition that
every change notifies: workers in the same process wake at once, without polling.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .base import (
    ABORTED,
    DEAD,
    DONE,
    PARKED_S,
    QUEUED,
    RUNNING,
    WAITING,
    WORKER_KEPT_S,
    Attempt,
    Backend,
    Job,
    Lease,
    Limit,
    NewJob,
    QueueCounts,
    ScheduleInfo,
    WorkerInfo,
    check_listing,
    fresh_job,
    kept_error,
    not_run_because,
    rate_step,
    replaceable,
    reservation_kept_s,
    taken_whole,
)


class _Queue:
    def __init__(self) -> None:
        # (-priority, seq, id) of queued jobs; entries go stale and are skipped when popped
        self.heap: list[tuple[int, int, str]] = []
        # key -> seqs of its queued jobs, in enqueue order
        self.key_queued: dict[str, deque[int]] = {}
        self.key_running: set[str] = set()
        # (lease_until, id, token) of leases handed out or extended; stale entries are skipped
        self.leases: list[tuple[float, str, str]] = []


class MemoryBackend(Backend):
    wakes_without_polling = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._schedules: dict[str, ScheduleInfo] = {}
        #: per limit group: the runs holding a place (token -> job id), the rate's bucket,
        #: and the jobs waiting for a place, in order
        self._places: dict[str, dict[str, str]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._parked: dict[str, list[str]] = {}
        #: per rate: the jobs refused that hold a start, and from when
        self._reserved: dict[str, dict[str, float]] = {}
        self._seq: dict[str, int] = {}
        self._queues: dict[str, _Queue] = {}
        self._next_seq = 0
        self._closed = False

    def _q(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    # -- queued bookkeeping (lock held) -----------------------------------------------------------
    def _push(self, job: Job, seq: int) -> None:
        q = self._q(job.queue)
        heapq.heappush(q.heap, (-job.priority, seq, job.id))
        if job.key is not None:
            seqs = q.key_queued.setdefault(job.key, deque())
            if seqs and seqs[-1] > seq:  # a reclaimed job goes back to its place
                seqs.append(seq)
                q.key_queued[job.key] = deque(sorted(seqs))
            else:
                seqs.append(seq)

    def _unqueue_key(self, job: Job, seq: int) -> None:
        if job.key is None:
            return
        q = self._q(job.queue)
        seqs = q.key_queued.get(job.key)
        if seqs is not None:
            with contextlib.suppress(ValueError):
                seqs.remove(seq)
            if not seqs:
                del q.key_queued[job.key]

    def _set(self, job: Job) -> Job:
        self._jobs[job.id] = job
        self._changed.notify_all()
        return job

    def _leave_running(self, job: Job) -> None:
        if job.state == RUNNING and job.key is not None:
            self._q(job.queue).key_running.discard(job.key)

    # -- the contract ---------------------------------------------------------------------------
    def enqueue(
        self, jobs: Sequence[NewJob], now: float, whole: bool = False
    ) -> list[tuple[Job, bool]]:
        with self._lock:
            if whole:
                taken = taken_whole(jobs, [self._jobs.get(new.id) for new in jobs], now)
                if taken is not None:
                    return taken
            return self._enqueue(jobs, now)

    def _enqueue(self, jobs: Sequence[NewJob], now: float) -> list[tuple[Job, bool]]:
        out: list[tuple[Job, bool]] = []
        for new in jobs:
            old = self._jobs.get(new.id)
            if old is not None and not replaceable(old, now):
                out.append((old, False))
                continue
            if old is not None:
                self._forget(old)
            job = fresh_job(new, now)
            seq = self._next_seq
            self._next_seq += 1
            self._seq[job.id] = seq
            self._set(job)
            if job.state == QUEUED:
                self._push(job, seq)
            out.append((job, True))
        return out

    def _follow(self, job: Job, now: float) -> None:
        """``job`` is now done or dead: tell the jobs that wait for it (see the contract)."""
        if job.state == DONE:
            for dep_id, place in job.then:
                dep = self._jobs.get(dep_id)
                if dep is None or dep.state != WAITING:
                    continue
                left = dep.waits_for - 1
                dep = replace(
                    dep,
                    waits_for=left,
                    inputs=tuple(sorted((*dep.inputs, (place, job.result)), key=lambda x: x[0])),
                    state=QUEUED if left <= 0 else WAITING,
                )
                self._set(dep)
                if dep.state == QUEUED:
                    self._push(dep, self._seq[dep.id])
            return
        blocked = [job]
        while blocked:
            dead = blocked.pop()
            for dep_id, _ in dead.then:
                dep = self._jobs.get(dep_id)
                if dep is not None and dep.state == WAITING:
                    error = not_run_because(dead.id, dead.task, dead.error)
                    blocked.append(
                        self._set(replace(dep, state=DEAD, error=error, finished_at=now))
                    )

    def _forget(self, job: Job) -> None:
        self._leave_running(job)
        seq = self._seq.pop(job.id, None)
        if job.state == QUEUED and seq is not None:
            self._unqueue_key(job, seq)
        del self._jobs[job.id]

    def _reclaim_lapsed(self, queue: str, now: float) -> None:
        leases = self._q(queue).leases
        while leases and leases[0][0] <= now:
            _until, job_id, token = heapq.heappop(leases)
            job = self._jobs.get(job_id)
            if job is None or job.state != RUNNING or job.token != token:
                continue
            if job.lease_until is not None and job.lease_until > now:
                continue  # extended since: a newer entry stands for it
            self._leave_running(job)
            lost = self._ended(job, job.lease_until, "lost", None)
            back = self._set(
                replace(
                    job, state=QUEUED, token=None, lease_until=None, lost=job.lost + 1, history=lost
                )
            )
            self._push(back, self._seq[job.id])

    def claim(
        self, queue: str, worker: str, lease_s: float, now: float, limit: int = 1
    ) -> list[Lease]:
        leases: list[Lease] = []
        with self._lock:
            self._reclaim_lapsed(queue, now)
            q = self._q(queue)
            skipped: list[tuple[int, int, str]] = []
            while q.heap and len(leases) < limit:
                entry = heapq.heappop(q.heap)
                _, seq, job_id = entry
                job = self._jobs.get(job_id)
                if job is None or job.state != QUEUED or self._seq.get(job_id) != seq:
                    continue  # stale entry
                if job.run_at > now:
                    skipped.append(entry)
                    continue
                if job.key is not None:
                    head = q.key_queued.get(job.key)
                    if job.key in q.key_running or not head or head[0] != seq:
                        skipped.append(entry)
                        continue
                    head.popleft()
                    if not head:
                        del q.key_queued[job.key]
                    q.key_running.add(job.key)
                token = uuid.uuid4().hex
                taken = self._set(
                    replace(
                        job,
                        state=RUNNING,
                        attempts=job.attempts + 1,
                        token=token,
                        lease_until=now + lease_s,
                        worker=worker,
                        started_at=now,
                    )
                )
                heapq.heappush(q.leases, (now + lease_s, job_id, token))
                leases.append(Lease(taken, token))
            for entry in skipped:
                heapq.heappush(q.heap, entry)
        return leases

    def _held(self, job_id: str, token: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.state != RUNNING or job.token != token:
            return None
        return job

    def heartbeat(self, job_id: str, token: str, lease_s: float, now: float) -> bool:
        with self._lock:
            job = self._held(job_id, token)
            if job is None:
                return False
            self._jobs[job_id] = replace(job, lease_until=now + lease_s)
            heapq.heappush(self._q(job.queue).leases, (now + lease_s, job_id, token))
            return True

    @staticmethod
    def _ended(job: Job, at: float | None, outcome: str, error: str | None) -> tuple[Attempt, ...]:
        """The job's history with its attempt under way ended as ``outcome``."""
        attempt = Attempt(job.attempts, job.worker, job.started_at, at, outcome, kept_error(error))
        return (*job.history, attempt)

    def _end_lease(self, job_id: str, token: str, *, uncount: bool = False, **changes: Any) -> bool:
        """Apply ``changes`` to a running job if ``token`` holds it (``uncount``: the attempt
        does not count); a job going back to ``queued`` takes its old place in line."""
        with self._lock:
            return self._end_lease_held(job_id, token, uncount=uncount, **changes)

    def _end_lease_held(
        self, job_id: str, token: str, *, uncount: bool = False, **changes: Any
    ) -> bool:
        """``_end_lease``, with the lock held."""
        job = self._held(job_id, token)
        if job is None:
            return False
        self._leave_running(job)
        if uncount:
            changes["attempts"] = max(0, job.attempts - 1)
        ended = changes.pop("ended", None)
        if ended is not None:
            changes["history"] = self._ended(job, ended[1], ended[0], changes["error"])
        after = self._set(replace(job, token=None, lease_until=None, **changes))
        if after.state == QUEUED:
            self._push(after, self._seq[job_id])
        elif after.then:
            self._follow(after, after.finished_at or 0.0)
        return True

    def complete(
        self, job_id: str, token: str, result: bytes | None, keep_s: float | None, now: float
    ) -> bool:
        keep_until = None if keep_s is None else now + keep_s
        return self._end_lease(
            job_id, token, state=DONE, result=result, finished_at=now, keep_until=keep_until
        )

    def retry(self, job_id: str, token: str, run_at: float, error: str, now: float) -> bool:
        return self._end_lease(
            job_id, token, state=QUEUED, run_at=run_at, error=error, ended=("retried", now)
        )

    def fail(self, job_id: str, token: str, error: str, now: float) -> bool:
        return self._end_lease(
            job_id, token, state=DEAD, error=error, finished_at=now, ended=("dead", now)
        )

    def release(self, job_id: str, token: str, now: float, run_at: float | None = None) -> bool:
        at = now if run_at is None else run_at
        return self._end_lease(job_id, token, uncount=True, state=QUEUED, run_at=at)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def worker_beat(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.id] = info
            for old in [
                w for w in self._workers.values() if w.last_beat < info.last_beat - WORKER_KEPT_S
            ]:
                del self._workers[old.id]

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: -w.last_beat)

    def swap_schedule(
        self,
        name: str,
        expected: ScheduleInfo | None,
        new: ScheduleInfo | None,
        jobs: Sequence[NewJob] = (),
        now: float = 0.0,
    ) -> bool:
        with self._lock:
            if self._schedules.get(name) != expected:
                return False
            if new is None:
                self._schedules.pop(name, None)
            else:
                self._schedules[name] = new
            self._enqueue(jobs, now)
            return True

    def schedules(self) -> list[ScheduleInfo]:
        with self._lock:
            return [self._schedules[name] for name in sorted(self._schedules)]

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
        with self._lock:
            found = [
                job
                for job in self._jobs.values()
                if job.queue == queue
                and (state is None or job.state == state)
                and (task is None or job.task == task)
            ]
        found.sort(key=lambda job: (job.enqueued_at, job.id))
        return found[offset : offset + limit]

    def finish(self, job_id: str, now: float) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                seq = self._next_seq
                self._next_seq += 1
                self._seq[job_id] = seq
                self._set(
                    Job(
                        id=job_id,
                        queue="",
                        task="",
                        payload=b"",
                        state=DONE,
                        priority=0,
                        key=None,
                        attempts=0,
                        enqueued_at=now,
                        run_at=now,
                        finished_at=now,
                    )
                )
                return
            if job.state == QUEUED:
                self._unqueue_key(job, self._seq[job_id])
            self._leave_running(job)
            was = job.state
            done = self._set(
                replace(
                    job, state=DONE, token=None, lease_until=None, finished_at=now, keep_until=None
                )
            )
            if was != DONE:
                self._follow(done, now)

    def progress(self, job_id: str, token: str, fraction: float, note: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state != RUNNING or job.token != token:
                return False
            self._jobs[job_id] = replace(job, progress=fraction, progress_note=note)
            return True

    def cancel(self, job_id: str, reason: str, now: float) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in (QUEUED, WAITING):
                return False
            if job.state == QUEUED:
                self._unqueue_key(job, self._seq[job_id])
            self._follow(self._set(replace(job, state=DEAD, error=reason, finished_at=now)), now)
            return True

    def unfinish(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state != DONE:
                return False
            self._forget(job)
            self._changed.notify_all()
            return True

    def acquire(self, limits: Sequence[Limit], job_id: str, token: str, now: float) -> float | None:
        with self._lock:
            if self._held(job_id, token) is None:
                return PARKED_S  # that run does not hold the job (any more): it must not start
            wait = 0.0
            full: list[str] = []
            starts: dict[str, tuple[float, float]] = {}
            reserves: dict[str, tuple[tuple[float, float], float]] = {}
            for limit in limits:
                if limit.concurrency is not None:
                    places = self._places.setdefault(limit.group, {})
                    for held, holder in list(places.items()):
                        job = self._jobs.get(holder)
                        if job is None or job.state != RUNNING or job.token != held:
                            del places[held]  # that run is over: its place is free
                    if token not in places and len(places) >= limit.concurrency:
                        full.append(limit.group)
                        wait = max(wait, PARKED_S)
                if limit.rate is not None:
                    booked = self._reserved.setdefault(limit.group, {})
                    for other, at in list(booked.items()):
                        if at < now - reservation_kept_s(limit.rate):
                            del booked[other]  # its job never came back
                    state = self._buckets.get(limit.group)
                    need, bucket = rate_step(state, limit.rate, now, booked.get(job_id))
                    if need == 0:
                        starts[limit.group] = bucket
                    else:
                        wait = max(wait, need)
                        if job_id not in booked:
                            reserves[limit.group] = (bucket, now + need)
            if wait > 0:
                for group in full:
                    waiting = self._parked.setdefault(group, [])
                    if job_id not in waiting:
                        waiting.append(job_id)
                if not full:  # a job parked for a place reserves no start: it may wait long
                    for group, (bucket, at) in reserves.items():
                        self._buckets[group] = bucket
                        self._reserved[group][job_id] = at
                self._end_lease_held(job_id, token, uncount=True, state=QUEUED, run_at=now + wait)
                return wait
            for limit in limits:
                if limit.concurrency is not None:
                    self._places[limit.group][token] = job_id
                if limit.rate is not None:
                    self._reserved[limit.group].pop(job_id, None)
            self._buckets.update(starts)
            return None

    def release_places(self, limits: Sequence[Limit], token: str, now: float) -> None:
        with self._lock:
            for limit in limits:
                if limit.concurrency is None:
                    continue
                self._places.get(limit.group, {}).pop(token, None)
                waiting = self._parked.get(limit.group, [])
                while waiting:
                    job = self._jobs.get(waiting.pop(0))
                    if job is not None and job.state == QUEUED and job.run_at > now:
                        self._set(replace(job, run_at=now))  # its heap entry is looked at again
                        break

    def abort(self, job_id: str, by: str, now: float) -> str:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return "unknown"
            if job.state == RUNNING:
                self._jobs[job_id] = replace(job, abort_by=by)
                return "requested"
            if job.state not in (QUEUED, WAITING):
                return job.state
            if job.state == QUEUED:
                self._unqueue_key(job, self._seq[job_id])
            ended = self._set(
                replace(job, state=ABORTED, abort_by=by, error=f"aborted by {by}", finished_at=now)
            )
            self._follow(ended, now)
            return ABORTED

    def aborted(self, job_id: str, token: str, now: float) -> bool:
        with self._lock:
            job = self._held(job_id, token)
            by = job.abort_by if job is not None else None
        error = f"aborted by {by}"
        return self._end_lease(
            job_id, token, state=ABORTED, error=error, finished_at=now, ended=("aborted", now)
        )

    def abort_requests(self, job_ids: Sequence[str]) -> dict[str, str]:
        with self._lock:
            found = [self._jobs.get(job_id) for job_id in job_ids]
        return {j.id: j.abort_by for j in found if j and j.abort_by and j.state == RUNNING}

    def requeue(self, job_id: str, now: float) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state != DEAD:
                return False
            self._requeue(job, now)
            return True

    def _requeue(self, job: Job, now: float) -> None:
        back = self._set(
            replace(job, state=QUEUED, attempts=0, lost=0, run_at=now, finished_at=None)
        )
        self._push(back, self._seq[job.id])

    def requeue_dead(self, queue: str, now: float) -> int:
        with self._lock:
            dead = [j for j in self._jobs.values() if j.queue == queue and j.state == DEAD]
            for job in dead:
                self._requeue(job, now)
            return len(dead)

    def purge(self, queue: str) -> int:
        with self._lock:
            gone = [j for j in self._jobs.values() if j.queue == queue and j.state != RUNNING]
            for job in gone:
                self._forget(job)
            if queue in self._queues:
                q = self._queues[queue]
                q.heap = [e for e in q.heap if e[2] in self._jobs]
                heapq.heapify(q.heap)
            return len(gone)

    def expire(self, now: float) -> int:
        with self._lock:
            gone = [
                j
                for j in self._jobs.values()
                if j.state == DONE and j.keep_until is not None and j.keep_until <= now
            ]
            for job in gone:
                self._forget(job)
            return len(gone)

    def counts(self, queue: str, now: float) -> QueueCounts:
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.queue == queue]
        queued = [j for j in jobs if j.state == QUEUED]
        ready = [j for j in queued if j.run_at <= now]
        running = sorted(
            (j for j in jobs if j.state == RUNNING), key=lambda j: j.lease_until or 0.0
        )
        oldest = min((j.enqueued_at for j in ready), default=None)
        return QueueCounts(
            queued=len(queued),
            delayed=len(queued) - len(ready),
            running=len(running),
            done=sum(1 for j in jobs if j.state == DONE),
            dead=sum(1 for j in jobs if j.state == DEAD),
            oldest_waiting_s=None if oldest is None else max(0.0, now - oldest),
            leases=tuple((j.id, (j.lease_until or now) - now) for j in running),
            waiting=sum(1 for j in jobs if j.state == WAITING),
            aborted=sum(1 for j in jobs if j.state == ABORTED),
        )

    def next_run_at(self, queue: str) -> float | None:
        with self._lock:
            times = [
                j.run_at if j.state == QUEUED else (j.lease_until or 0.0)
                for j in self._jobs.values()
                if j.queue == queue and j.state in (QUEUED, RUNNING)
            ]
        return min(times, default=None)

    def wait_for_work(self, queue: str, timeout_s: float) -> None:
        with self._changed:
            if not self._closed:
                self._changed.wait(max(0.0, timeout_s))

    def close(self) -> None:
        """Wake every wait; the jobs stay (a memory queue lives as long as the process)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for_job(self, job_id: str, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(max(0.0, timeout_s))
