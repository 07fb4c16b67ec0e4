"""chihuo on conveyor: ``from conveyor.compat import chihuo``.

Each ``ChihuoLoop`` subclass is a named conveyor ``TaskQueue`` whose one task calls
``make_task(task_id, task)``, with a worker of ``CONCURRENCY``. ``chihuo.run(A, B)`` runs every
loop on one event loop until SIGINT, which stops them all, sends running tasks back to the head
of their queue and returns.

A task that raises is tried again up to ``RETRIES`` times (3) with exponential backoff from
``BACKOFF_S`` (1 s), then set aside as dead (``conveyor requeue URL --dead`` puts it back).

The server config (a dict, or a file of ``key=value`` lines: ``backend``, ``ip``, ``port``,
and for SQLite ``path``; blank and ``#`` lines allowed) chooses ``backend=memory``,
``backend=sqlite`` or ``backend=redis`` (``ip`` and ``port``, and optionally ``db``, ``user``,
``password`` and ``prefix``: many loops on many machines share the queue). Unlike the
original, waiting for tasks does not poll once a second, and a task that raises is retried
under the queue's policy (with backoff, then set aside as dead) instead of at once and forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, ClassVar

from conveyor import ConfigurationError, TaskQueue

from .common import SERVER_DEFAULT_CONFIG_PATH, Direction, TaskId, TaskType

__all__ = ["SERVER_DEFAULT_CONFIG_PATH", "ChihuoLoop", "Direction", "TaskId", "TaskType", "run"]

log = logging.getLogger("conveyor.compat.chihuo")

SUPPORTED_BACKENDS = ("memory", "sqlite", "redis")


def parse_server_config(config: dict[str, Any] | str) -> dict[str, str]:
    """The settings of a server config: a dict, or a file of ``key=value`` lines."""
    if isinstance(config, dict):
        return {str(k).lower(): str(v) for k, v in config.items()}
    path = config
    if (
        not os.path.exists(path)
        and path == SERVER_DEFAULT_CONFIG_PATH
        and os.path.exists("server.json")
    ):
        path = "server.json"  # the name chihuo's own page uses
    if not isinstance(path, str) or not os.path.exists(path):
        raise ConfigurationError(
            f"chihuo server config {config!r} not found: write a file of key=value lines "
            f"(backend=sqlite, path=tasks.db) or pass a dict"
        )
    settings: dict[str, str] = {}
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ConfigurationError(f"{path}:{number}: expected key=value, got {line!r}")
            key, value = (part.strip() for part in line.split("=", 1))
            settings[key.lower()] = value
    return settings


def queue_url(settings: dict[str, str]) -> str:
    backend = settings.get("backend", "").lower()
    if backend == "memory":
        return "memory://chihuo"
    if backend == "sqlite":
        return f"sqlite:///{settings.get('path', 'chihuo.db')}"
    if backend == "redis":
        return redis_url(settings)
    raise ConfigurationError(
        f"chihuo backend {backend or '(none)'!r} is not supported: use one of "
        f"{', '.join(SUPPORTED_BACKENDS)}"
        + (
            "; Lodis servers cannot be installed from any package registry"
            if backend == "lodis"
            else ""
        )
    )


def redis_url(settings: dict[str, str]) -> str:
    """chihuo's ``ip``/``port`` (and our optional ``db``, ``user``, ``password``, ``prefix``)."""
    from urllib.parse import quote

    user = quote(settings.get("user", ""), safe="")
    password = quote(settings.get("password", ""), safe="")
    auth = f"{user}:{password}@" if user or password else ""
    host = f"{settings.get('ip') or '127.0.0.1'}:{settings.get('port') or '6379'}"
    url = f"redis://{auth}{host}/{settings.get('db') or '0'}"
    if settings.get("prefix"):
        url += "?prefix=" + quote(settings["prefix"], safe="")
    return url


class ChihuoLoop:
    """Subclass with ``NAME``, ``CONCURRENCY``, ``SERVER_CONFIG`` and ``async def make_task``;
    optionally ``async def start`` to add the first tasks."""

    NAME: ClassVar[str | None] = None
    CONCURRENCY: ClassVar[int] = 1
    SERVER_CONFIG: ClassVar[dict[str, Any] | str] = SERVER_DEFAULT_CONFIG_PATH
    #: conveyor's addition: how often a failing task is tried again, and the first wait
    RETRIES: ClassVar[int] = 3
    BACKOFF_S: ClassVar[float] = 1.0

    def __init__(
        self,
        name: str | None = None,
        concurrency: int | None = None,
        server_config: dict[str, Any] | str | None = None,
        run_forever: bool = True,
    ) -> None:
        self._name = name or self.NAME
        if not self._name:
            raise ConfigurationError(f"{type(self).__name__}.NAME must be given")
        self._concurrency = concurrency or self.CONCURRENCY
        if self._concurrency < 1:
            raise ConfigurationError("concurrency must be > 0")
        self._settings = parse_server_config(server_config or self.SERVER_CONFIG)
        # a completed task may be added again (unless task_finish marked it): no result kept
        self._queue = TaskQueue(queue_url(self._settings), name=self._name, keep_result_s=0)
        self._queue.task(
            self._make, name=f"chihuo:{self._name}", retries=self.RETRIES, backoff_s=self.BACKOFF_S
        )
        self._run_forever = run_forever
        self._stop = False
        self._worker: Any = None

    async def _make(self, task_id: str, task: Any) -> None:
        await self.make_task(task_id, task)

    async def make_task(self, task_id: TaskId, task: Any) -> None:
        raise NotImplementedError("ChihuoLoop.make_task must be implemented")

    @property
    def stop(self) -> bool:
        """True once the loop is stopping: set by the code (``self.stop = True``), or by
        SIGINT/SIGTERM, which stop every loop of the process."""
        worker = self._worker
        return self._stop or (worker is not None and worker.stopping)

    @stop.setter
    def stop(self, value: bool) -> None:
        self._stop = value
        if value and self._worker is not None:
            self._worker.stop(now=True)

    @property
    def concurrency(self) -> int:
        return self._concurrency

    async def add_task(
        self,
        *pairs: tuple[TaskId, Any],
        finished: bool = True,
        ignore_running: bool = True,
        direction: Direction = Direction.Forward,
    ) -> None:
        """Add ``(task_id, task_info)`` pairs; ``task_info`` must be JSON. With
        ``finished=True`` (the default) a task marked finished is not added."""
        for task_id, task in pairs:
            job_id = self._id(task_id)
            if not finished:
                await asyncio.to_thread(self._queue.unfinish, job_id)
            await asyncio.to_thread(
                self._queue.enqueue, f"chihuo:{self._name}", _plain(task_id), task, _id=job_id
            )

    async def task_finish(self, task_id: TaskId) -> None:
        """Mark the task finished: it cannot be added again until ``task_unfinish``."""
        await asyncio.to_thread(self._queue.finish, self._id(task_id))

    async def task_unfinish(self, task_id: TaskId) -> None:
        await asyncio.to_thread(self._queue.unfinish, self._id(task_id))

    async def task_finished(self, task_id: TaskId) -> bool:
        job = await asyncio.to_thread(self._queue.backend.get, self._id(task_id))
        return job is not None and job.state == "done" and job.keep_until is None

    def _id(self, task_id: TaskId) -> str:
        # job ids are unique per storage; chihuo's are unique per loop NAME
        return f"{self._name}:{_plain(task_id)}"

    async def _arun(self) -> None:
        self._worker = self._queue.worker(
            concurrency=self._concurrency,
            burst=not self._run_forever,
            shutdown_grace_s=0,
            poll_s=0.5,
        )
        starter = getattr(self, "start", None)
        first = asyncio.ensure_future(starter()) if callable(starter) else None
        try:
            if first is not None and not self._run_forever:
                await first  # burst: the first tasks must be in before draining starts
            await self._worker.arun()
        except BaseException:
            if first is not None and not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            raise
        if first is not None:
            # stop means stop taking tasks, not adding them: what start() adds gets in
            await first


def _plain(task_id: TaskId) -> str:
    return task_id.decode() if isinstance(task_id, bytes) else str(task_id)


def _instances(*classes_or_instances: Any) -> list[ChihuoLoop]:
    loops = []
    for obj in classes_or_instances:
        if isinstance(obj, ChihuoLoop):
            loops.append(obj)
        elif isinstance(obj, type) and issubclass(obj, ChihuoLoop):
            loops.append(obj())
        else:
            raise TypeError("factory must be a subclass of ChihuoLoop or instance of ChihuoLoop")
    return loops


def run(*classes_or_instances: Any) -> None:
    """Run the loops on one event loop until SIGINT (or, for loops made with
    ``run_forever=False``, until their queues are drained)."""
    if not classes_or_instances:
        raise TypeError("No provide factory class or instance")
    loops = _instances(*classes_or_instances)

    async def main() -> None:
        await asyncio.gather(*(loop._arun() for loop in loops))

    asyncio.run(main())
