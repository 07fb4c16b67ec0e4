"""``create`` builds an engine from stage classes (or their dotted paths) and config objects."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

from .core.backend import Backend
from .core.engine import Engine, RuntimeContext
from .core.frontend import Frontend
from .core.transport import Transport

ENGINE_FRONTEND_CONFIG = SimpleNamespace(thread_num=1, queue_size=100)
ENGINE_TRANSPORT_CONFIG = SimpleNamespace(thread_num=3)
ENGINE_TRANSPORT_BRIDGE_CONFIG = ENGINE_TRANSPORT_CONFIG
ENGINE_BACKEND_CONFIG = SimpleNamespace(thread_num=1, queue_size=100)
ENGINE_CONFIG = SimpleNamespace(main_loop_wait=0.1)


def load_class(path_or_class: Any, base: type[Any]) -> type[Any]:
    """A class given as itself or as ``"package.module.Class"``, checked against ``base``."""
    cls = path_or_class
    if isinstance(path_or_class, str):
        module_path, _, name = path_or_class.rpartition(".")
        if not module_path:
            raise ValueError(f"not a dotted class path: {path_or_class!r}")
        cls = getattr(importlib.import_module(module_path), name, None)
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        raise TypeError(f"{path_or_class!r} is not a subclass of {base.__name__}")
    return cls


def _setting(config: Any, default: Any, name: str) -> Any:
    return getattr(config, name, getattr(default, name, None))


def _stage(cls: Any, base: type[Any], config: Any, default: Any, queue_size: int) -> Any:
    """``(class, config, threads, inbox size)``: the inbox holds at least two items a thread."""
    threads = _setting(config, default, "thread_num")
    return (load_class(cls, base), config, threads, max(queue_size, threads * 2))


def create(
    frontend_cls: Any = "conveyor.compat.os_m3_engine.ootb.StdinFrontend",
    transport_cls: Any = "conveyor.compat.os_m3_engine.ootb.LogTransport",
    backend_cls: Any = "conveyor.compat.os_m3_engine.ootb.LogBackend",
    app_config: Any = None,
    engine_config: Any = ENGINE_CONFIG,
    engine_frontend_config: Any = ENGINE_FRONTEND_CONFIG,
    engine_transport_config: Any = ENGINE_TRANSPORT_CONFIG,
    engine_backend_config: Any = ENGINE_BACKEND_CONFIG,
    runtime_context: RuntimeContext | None = None,
) -> Engine:
    """A three-stage engine (or two-stage, with ``transport_cls`` or ``backend_cls`` None).

    Thread counts come from each config's ``thread_num`` (1, 3 and 1 by default) and the
    buffers' sizes from ``queue_size`` (100, and at least twice the threads they feed).
    """
    if frontend_cls is None:
        raise ValueError("Not specifiy frontend_cls")
    if transport_cls is None and backend_cls is None:
        raise ValueError("Spiecify at least one of transport_cls/backend_cls")
    context = runtime_context if runtime_context is not None else RuntimeContext()

    front_size = _setting(engine_frontend_config, ENGINE_FRONTEND_CONFIG, "queue_size")
    stages: dict[str, Any] = {
        "frontend": _stage(
            frontend_cls, Frontend, engine_frontend_config, ENGINE_FRONTEND_CONFIG, front_size
        ),
    }
    if transport_cls is not None:
        stages["transport"] = _stage(
            transport_cls, Transport, engine_transport_config, ENGINE_TRANSPORT_CONFIG, front_size
        )
    if backend_cls is not None:
        back_size = _setting(engine_backend_config, ENGINE_BACKEND_CONFIG, "queue_size")
        stages["backend"] = _stage(
            backend_cls, Backend, engine_backend_config, ENGINE_BACKEND_CONFIG, back_size
        )
    return Engine(stages, app_config, context)
