"""jobq on conveyor: ``from conveyor.compat import jobq``.

Each worker of the list becomes one pipeline stage; ``(fn, n)`` gives it ``n`` threads and
``(fn, n, dispatcher)`` keeps the order of items that the dispatcher sends to the same thread
number (a keyed stage). A worker that raises has the error logged and its item dropped, as in
jobq; a worker that returns :data:`EmptyRst` passes nothing on, and one that returns a generator
passes on every element.

Unlike the original, memory stays bounded whatever the speed of each stage, and ``join`` never
waits for a queue that nobody drains.
"""

from __future__ import annotations

import contextlib
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from conveyor import Pipeline, Run, RunTimeout, Skip

__all__ = [
    "EmptyRst",
    "Finish",
    "JobManager",
    "JobWorkerError",
    "JobWorkerNotFound",
    "limit_job_speed",
    "run",
    "stat",
]


class EmptyRst:
    """Return this from a worker to pass nothing to the next one."""


class Finish:
    """Kept for code that imports it; conveyor ends a run without in-band markers."""


class JobWorkerError(Exception):
    pass


class JobWorkerNotFound(JobWorkerError):
    pass


_QUEUE_SIZE = 1024


def _check_thread_num(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"thread number must be int, but: {n!r}")
    if n <= 0:
        raise ValueError(f"thread number must be positive, but: {n!r}")
    return n


def _results(rst: Any) -> Iterable[Any]:
    if rst is EmptyRst:
        return ()
    if isinstance(rst, types.GeneratorType):
        return (r for r in rst if r is not EmptyRst)
    return (rst,)


def _stage_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "builtin"
    return f"{module}.{getattr(fn, '__name__', type(fn).__name__)}"


class _Group:
    def __init__(self, worker: Any) -> None:
        if callable(worker):
            worker = (worker, 1)
        if not isinstance(worker, tuple) or not 1 <= len(worker) <= 3:
            raise TypeError(
                f"a worker is a function, (function, n) or (function, n, dispatcher): {worker!r}"
            )
        fn, n, dispatcher = (*worker, 1, None)[:3] if len(worker) == 1 else (*worker, None)[:3]
        if not callable(fn):
            raise TypeError(f"a worker must be callable: {fn!r}")
        self.fn: Callable[[Any], Any] = fn
        self.n = _check_thread_num(n)
        self.dispatcher: Callable[[Any], int] | None = dispatcher
        self.name = ""


class JobManager:
    """Workers started at once and fed with :meth:`put`; :meth:`join` waits for them."""

    def __init__(
        self,
        workers: list[Any],
        queue_size: int = _QUEUE_SIZE,
        probe: dict[str, Any] | None = None,
        keep_order: bool = False,
    ) -> None:
        self._groups = _groups(workers)
        self._joined = False
        self._lock = threading.Lock()
        self.probe = {} if probe is None else probe
        self._run = _pipeline(Pipeline(), self._groups, keep_order, queue_size).start()
        _fill_probe(self.probe, self._run, self._groups, keep_order)

    def put(self, elt: Any) -> None:
        """Put anything as an input element."""
        self._run.put(elt)

    def join(self, timeout: float | None = None) -> None:
        """Wait for every worker to finish; after ``timeout`` seconds stop waiting (workers quit
        after the job they are doing)."""
        with self._lock:
            self._joined = True
        self._run.stop(drain=True, wait=False)
        _wait(self._run, timeout)

    def set_thread_num(self, worker: Callable[[Any], Any], n: int) -> None:
        """Change the number of threads of ``worker`` while it runs."""
        _check_thread_num(n)
        for group in self._groups:
            if group.fn != worker:
                continue
            if group.dispatcher is not None:
                raise JobWorkerError(
                    "worker-group with dispatcher does not allow to change thread number"
                )
            with self._lock:
                if self._joined:
                    return
                self._run.stage(group.name).resize(n)
            group.n = n
            return
        raise JobWorkerNotFound(worker)

    def stat(self) -> dict[str, Any]:
        return stat(self.probe)


def _groups(workers: list[Any]) -> list[_Group]:
    groups = [_Group(w) for w in workers]
    seen: dict[str, int] = {}
    for g in groups:
        base = _stage_name(g.fn)
        seen[base] = seen.get(base, 0) + 1
        g.name = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return groups


def _pipeline(
    pipeline: Pipeline[Any], groups: list[_Group], keep_order: bool, queue_size: int
) -> Pipeline[Any]:
    for i, g in enumerate(groups):
        fn = g.fn
        key = None
        ordered = keep_order
        if g.dispatcher is not None:
            dispatcher, n = g.dispatcher, g.n

            def key(args: Any, dispatcher: Callable[[Any], int] = dispatcher, n: int = n) -> int:
                return dispatcher(args) % n

            ordered = True
        options: dict[str, Any] = {
            "name": g.name,
            "workers": g.n,
            "ordered": ordered,
            "key": key,
            "maxsize": queue_size if i == 0 else _QUEUE_SIZE,
            "on_error": Skip(log=True),
        }
        if i == len(groups) - 1:
            # the last worker's results go nowhere: consume them here, so no queue fills up
            def last(args: Any, fn: Callable[[Any], Any] = fn) -> None:
                for _ in _results(fn(args)):
                    pass

            pipeline = pipeline.each(last, **options)
        else:

            def step(args: Any, fn: Callable[[Any], Any] = fn) -> Iterable[Any]:
                return _results(fn(args))

            pipeline = pipeline.flat_map(step, **options)
    return pipeline


def _fill_probe(
    probe: dict[str, Any], run_: Run[Any], groups: list[_Group], keep_order: bool
) -> None:
    probe["run"] = run_
    probe["groups"] = groups
    probe["keep_order"] = keep_order


def _wait(run_: Run[Any], timeout: float | None) -> None:
    # jobq's contract: after the timeout, return; workers quit after their current job
    with contextlib.suppress(RunTimeout):
        run_.wait(timeout)


def run(
    input_it: Iterable[Any],
    workers: list[Any],
    keep_order: bool = False,
    timeout: float | None = None,
    probe: dict[str, Any] | None = None,
) -> None:
    """Process every element of ``input_it`` through ``workers``; return once all are done
    (or after ``timeout`` seconds)."""
    groups = _groups(workers)
    # no job starts before the probe is complete: a worker (or another thread) may call
    # stat(probe) from the very first job
    probe_ready = threading.Event()

    def gated() -> Iterator[Any]:
        probe_ready.wait()
        yield from input_it

    handle = _pipeline(Pipeline(gated()), groups, keep_order, _QUEUE_SIZE).start()
    if probe is not None:
        _fill_probe(probe, handle, groups, keep_order)
    probe_ready.set()
    _wait(handle, timeout)


def stat(probe: dict[str, Any]) -> dict[str, Any]:
    """Counters of a running or finished session, read from the ``probe`` given to it."""
    handle: Run[Any] = probe["run"]
    stats = handle.stats()
    total_in = sum(s.received for s in stats.stages)
    total_out = sum(s.finished for s in stats.stages)
    workers = []
    for s, group in zip(stats.stages, probe["groups"], strict=True):
        entry: dict[str, Any] = {
            "name": group.name,
            "input": {"size": s.queue_depth, "capa": s.queue_capacity},
            "nr_worker": group.n,
        }
        if probe["keep_order"] or group.dispatcher is not None:
            entry["coordinator"] = {"size": s.in_flight, "capa": s.queue_capacity}
        workers.append(entry)
    return {"in": total_in, "out": total_out, "doing": total_in - total_out, "workers": workers}


def limit_job_speed(
    max_job_speed: float | Callable[[], float], job_step: int = 1
) -> Callable[[Any], Any]:
    """A worker that passes its argument on, sleeping as needed so that no more than
    ``max_job_speed`` jobs (each counting ``job_step``) go through per second. The speed may be
    a function, asked again at every job."""
    lock = threading.Lock()
    next_free = [time.monotonic()]

    def _limit(args: Any) -> Any:
        speed = max_job_speed() if callable(max_job_speed) else max_job_speed
        with lock:
            now = time.monotonic()
            start = max(now, next_free[0])
            next_free[0] = start + job_step / float(speed)
        if start > now:
            time.sleep(start - now)
        return args

    return _limit
