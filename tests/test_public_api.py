"""The public names: exactly what ``__all__`` says, each showing the public module path."""

from __future__ import annotations

import conveyor

EXPECTED = {
    "BrokenResourceError",
    "ClosedResourceError",
    "ConfigurationError",
    "ConveyorError",
    "DeadLetter",
    "Failure",
    "ItemTimeout",
    "ManualClock",
    "Pipeline",
    "PipelineClosed",
    "PipelineError",
    "Retry",
    "Run",
    "RunStats",
    "RunTimeout",
    "Skip",
    "Stage",
    "StageFailed",
    "StageHandle",
    "StageOptions",
    "StageStats",
    "WouldBlock",
}


def test_all_is_pinned() -> None:
    assert set(conveyor.__all__) == EXPECTED
    for name in conveyor.__all__:
        obj = getattr(conveyor, name)
        assert getattr(obj, "__module__", "conveyor") == "conveyor", name


def test_every_error_has_one_root() -> None:
    for name in conveyor.__all__:
        obj = getattr(conveyor, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, conveyor.ConveyorError), name


def test_policies_are_values_not_exceptions() -> None:
    for policy in (conveyor.Retry, conveyor.Skip, conveyor.DeadLetter):
        assert not issubclass(policy, BaseException)
