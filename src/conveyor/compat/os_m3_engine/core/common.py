"""The component base shared by frontends, transports and backends."""

from __future__ import annotations

from typing import Any


class Configurable:
    def __init__(self, config: Any) -> None:
        self._config = config

    @property
    def config(self) -> Any:
        """The ``app_config`` given to ``create``."""
        return self._config


class StandardComponent(Configurable):
    """One component instance per thread: ``setup`` when its thread starts, ``cleanup`` when it
    stops."""

    def __init__(
        self,
        component_config: Any,
        engine_config: Any,
        runtime_context: Any,
        current_thread: Any,
    ) -> None:
        super().__init__(component_config)
        self._engine_config = engine_config
        self._runtime_context = runtime_context
        self._current_thread = current_thread

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass
