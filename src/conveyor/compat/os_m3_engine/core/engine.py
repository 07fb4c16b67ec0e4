"""The engine: a conveyor pipeline with a frontend source and transport/backend stages."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from conveyor import Pipeline, Run, Skip, Stage


class RuntimeContext:
    """A namespace shared by every component of one engine."""


class _Component(Stage[Any, Any]):
    """One component instance per worker thread, with its setup and cleanup."""

    def __init__(
        self,
        cls: type[Any],
        method: str,
        app_config: Any,
        engine_config: Any,
        context: RuntimeContext,
    ) -> None:
        self.cls = cls
        self.method = method
        self.app_config = app_config
        self.engine_config = engine_config
        self.context = context
        self.component: Any = None

    def setup(self) -> None:
        self.component = self.cls(
            self.app_config, self.engine_config, self.context, threading.current_thread()
        )
        self.component.setup()

    def process(self, item: Any) -> Any:
        return getattr(self.component, self.method)(item)

    def teardown(self) -> None:
        self.component.cleanup()


class Engine:
    """``start()`` blocks until every item is through; ``stop()`` (from a signal handler, say)
    stops the frontend and lets what it produced drain."""

    def __init__(
        self, stages: dict[str, Any], app_config: Any, runtime_context: RuntimeContext
    ) -> None:
        self._stages = stages
        self._app_config = app_config
        self._context = runtime_context
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._stopping = False
        self._run: Run[Any] | None = None

    def started(self) -> bool:
        return self._started

    def stopped(self) -> bool:
        return self._stopped

    def _produce(self, _which: int) -> Iterator[Any]:
        """One frontend: its own instance, set up, produced from and cleaned up on the thread
        that runs it (``thread_num`` of them run at once)."""
        cls, config, _threads, _size = self._stages["frontend"]
        component = cls(self._app_config, config, self._context, threading.current_thread())
        component.setup()
        try:
            for data in component.produce():
                if self._stopping:
                    break
                yield data
        finally:
            component.cleanup()

    def _pipeline(self) -> Pipeline[Any]:
        _cls, _config, frontends, _size = self._stages["frontend"]
        # one item per frontend; each worker of the first stage runs one frontend to its end,
        # its items going on as they come (unordered: one frontend never waits for another)
        pipeline: Pipeline[Any] = Pipeline(range(frontends)).flat_map(
            self._produce, name="frontend", workers=frontends, ordered=False, maxsize=frontends
        )
        transport = self._stages.get("transport")
        backend = self._stages.get("backend")
        for role, spec, method in (
            ("transport", transport, "transport"),
            ("backend", backend, "process"),
        ):
            if spec is None:
                continue
            cls, config, threads, size = spec
            stage = _Component(cls, method, self._app_config, config, self._context)
            options: dict[str, Any] = {
                "name": role,
                "workers": threads,
                "maxsize": size,
                "on_error": Skip(log=True),
            }
            if role == "transport" and backend is not None:
                pipeline = pipeline.map(stage, **options)
            else:
                pipeline = pipeline.each(stage, **options)
        return pipeline

    def start(self) -> None:
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("Can not start twice")
            self._started = True
        run = self._run = self._pipeline().start()
        if self._stopping:  # a stop() that came while the run was being built
            run.stop(drain=True, wait=False)
        try:
            run.wait()
        finally:
            self._stopped = True
            self._started = False

    def stop(self) -> None:
        """Stop producing and let the rest drain. Takes no lock: safe in a signal handler."""
        if not self._started and not self._stopped:
            raise RuntimeError("Can stop before start")
        self._stopping = True
        run = self._run
        if run is not None:
            run.stop(drain=True, wait=False)
