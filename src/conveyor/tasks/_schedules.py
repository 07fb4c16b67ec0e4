"""Schedules: which ticks are due, and the one change that enqueues them.

A schedule is a record in the backend (``ScheduleInfo``). Every worker of its queue looks at it
at each beat and, when ticks are due (or due within ``lookahead_s``: they are enqueued a beat
early, with ``run_at`` at the tick, so they start on time), moves the record's ``through`` past
them with a compare-and-set that enqueues their jobs in the same transaction. Of many workers
looking at once, one wins; the others find the record changed and have nothing left to do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from .backends.base import SCHEDULE_LATE_S, NewJob, ScheduleInfo

if TYPE_CHECKING:
    from ._queue import TaskQueue

log = logging.getLogger("conveyor.schedules")

CATCH_UP = ("last", "all", "none")
#: the most ticks one pass enqueues for one schedule (a long gap under catch_up="all" is
#: worked off over several passes, a beat apart)
MAX_TICKS_PER_PASS = 1000


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:
        raise ConfigurationError(
            "cron schedules need the cronsim package: pip install 'conveyor[cron]' "
            "(or give every_s= instead)"
        ) from None
    return cronsim


def _zone(tz: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"unknown time zone {tz!r} (an IANA name: 'Europe/Paris')"
        ) from None


def check_plan(cron: object, every_s: object, tz: object, catch_up: object) -> None:
    """Refuse, with the reason, a schedule that could never tick as meant."""
    if (cron is None) == (every_s is None):
        raise ConfigurationError("a schedule takes a cron expression or every_s=, one of the two")
    if cron is not None:
        if not isinstance(cron, str):
            raise ConfigurationError(f"a cron expression is a string, not {cron!r}")
        cronsim = _cronsim()
        try:
            cronsim.CronSim(cron, datetime.now(UTC))
        except cronsim.CronSimError as exc:
            raise ConfigurationError(f"bad cron expression {cron!r}: {exc}") from None
    if every_s is not None and (
        isinstance(every_s, bool)
        or not isinstance(every_s, int | float)
        or not math.isfinite(every_s)
        or every_s < 0.001
    ):
        raise ConfigurationError(f"every_s is a number of seconds >= 0.001, not {every_s!r}")
    if not isinstance(tz, str):
        raise ConfigurationError(f"tz is a time zone name, not {tz!r}")
    _zone(tz)
    if catch_up not in CATCH_UP:
        raise ConfigurationError(f"catch_up is one of {CATCH_UP}, not {catch_up!r}")


def ticks_between(info: ScheduleInfo, after: float, upto: float, limit: int) -> list[float]:
    """The schedule's ticks ``t`` with ``after < t <= upto``, the first ``limit`` of them."""
    out: list[float] = []
    if info.every_s is not None:
        every = info.every_s
        k = math.floor(after / every) + 1
        while len(out) < limit:
            t = k * every
            if t > upto:
                break
            if t > after:
                out.append(t)
            k += 1
        return out
    assert info.cron is not None
    cronsim = _cronsim()
    zone = _zone(info.tz)
    found = cronsim.CronSim(info.cron, datetime.fromtimestamp(after, zone))
    while len(out) < limit:
        try:
            t = next(found).timestamp()
        except StopIteration:  # an expression that matches no date ever again
            break
        if t > upto:
            break
        if t > after:
            out.append(t)
    return out


def next_tick(info: ScheduleInfo, after: float) -> float | None:
    """The first tick after ``after`` (None if there is none within ten years)."""
    ticks = ticks_between(info, after, after + 10 * 366 * 86400.0, 1)
    return ticks[0] if ticks else None


def tick_id(name: str, tick: float) -> str:
    """The id of the job of ``name``'s tick at ``tick``: the same on every machine, so the
    backend's id check makes the job once even apart from the compare-and-set."""
    when = datetime.fromtimestamp(tick, UTC)
    spec = "milliseconds" if when.microsecond else "seconds"
    return f"{name}@{when.isoformat(timespec=spec).replace('+00:00', 'Z')}"


def last_tick_until(info: ScheduleInfo, t: float) -> float | None:
    """The schedule's latest tick at or before ``t`` (None if there is none)."""
    if info.every_s is not None:
        return math.floor(t / info.every_s) * info.every_s
    assert info.cron is not None
    found = _cronsim().CronSim(
        info.cron, datetime.fromtimestamp(t, _zone(info.tz)) + timedelta(microseconds=1), True
    )
    try:
        return float(next(found).timestamp())
    except StopIteration:
        return None


def due(info: ScheduleInfo, now: float, lookahead_s: float) -> tuple[list[float], float, bool]:
    """The ticks a pass at ``now`` enqueues, by the catch-up policy, with how far the record
    moves (``through``) and whether missed ticks were skipped on the way. Ticks still to come
    (within the lookahead) always run; of those already past, ``all`` runs each (a thousand
    per pass), ``last`` the latest, ``none`` those at most ``SCHEDULE_LATE_S`` late — the
    last two look only near ``now``, however long the gap."""
    through, upto = info.through, now + lookahead_s
    if info.catch_up == "all":
        ticks = ticks_between(info, through, upto, MAX_TICKS_PER_PASS)
        return ticks, (ticks[-1] if ticks else through), False
    if info.catch_up == "last":
        latest = last_tick_until(info, now)
        past = [latest] if latest is not None and latest > through else []
        edge = past[0] if past else through
    else:
        edge = max(through, now - SCHEDULE_LATE_S)
        past = []
    # a tick before the edge that is not the one that runs was missed
    first = ticks_between(info, through, edge, 1)
    skipped = bool(first) and (not past or first[0] != past[0])
    coming = ticks_between(info, edge, upto, MAX_TICKS_PER_PASS)
    picked = past + coming
    return picked, max(edge, picked[-1] if picked else through), skipped


def advance(queue: TaskQueue, info: ScheduleInfo, now: float, lookahead_s: float) -> list[str]:
    """Enqueue the due ticks of ``info`` (one change, or none if another worker changed the
    record first); the ids of the jobs enqueued."""
    picked, through, skipped = due(info, now, lookahead_s)
    if not picked and through == info.through:
        return []
    jobs = [
        NewJob(
            id=tick_id(info.name, t),
            queue=info.queue,
            task=info.task,
            payload=info.payload,
            priority=info.priority,
            run_at=t,
        )
        for t in picked
    ]
    new = replace(
        info,
        stored=None,
        through=through,
        last_tick=picked[-1] if picked else info.last_tick,
        last_job=jobs[-1].id if jobs else info.last_job,
    )
    if not queue.backend.swap_schedule(info.name, info, new, jobs, now):
        return []
    if skipped:
        log.warning(
            "schedule %s: ticks missed while no worker ran (after %s) were skipped (catch_up=%r)",
            info.name,
            datetime.fromtimestamp(info.through, UTC).isoformat(timespec="seconds"),
            info.catch_up,
        )
    return [job.id for job in jobs]
