"""Bad input is refused when the pipeline is built, with a message that says what to do."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor import ConfigurationError, Pipeline, Retry, Skip, Stage


def inc(x: int) -> int:
    return x + 1


async def ainc(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Pipeline([1]).map(42),  # type: ignore[call-overload]
            "not int (42)",
        ),
        (lambda: Pipeline([1]).map(inc, workers=0), "workers must be an int >= 1"),
        (lambda: Pipeline([1]).map(inc, workers=2.5), "workers must be an int >= 1"),  # type: ignore[call-overload]
        (lambda: Pipeline([1]).map(inc, workers=True), "workers must be an int >= 1"),
        (lambda: Pipeline([1]).map(ainc), "give kind='async'"),
        (lambda: Pipeline([1]).map(inc, kind="async"), "make it async def"),
        (lambda: Pipeline([1]).map(inc, kind="fiber"), "unknown kind 'fiber'"),
        (lambda: Pipeline([1]).map(inc, maxsize=0), "maxsize must be an int >= 1"),
        (lambda: Pipeline([1]).map(inc, timeout_s=-1), "timeout_s must be a positive number"),
        (lambda: Pipeline([1]).map(inc, rate=0), "rate must be a positive number"),
        (lambda: Pipeline([1]).map(inc, on_error="ignore"), "on_error must be"),
        (lambda: Pipeline([1]).map(inc, on_error=Skip), "write Skip(...), not the class"),
        (lambda: Pipeline([1]).map(inc, key=3), "key must be a function"),  # type: ignore[call-overload]
        (lambda: Pipeline([1]).map(inc, ordered="yes"), "ordered must be True or False"),  # type: ignore[call-overload]
        (lambda: Pipeline([1]).map(inc, name="a").map(inc, name="a"), "two stages are named"),
        (lambda: Pipeline([1]).map(inc, name=""), "non-empty string"),
        (lambda: Pipeline([1]).batch(0), "batch size must be an int >= 1"),
        (lambda: Pipeline([1]).batch(2, within_s=0), "within_s must be a positive number"),
        (lambda: Pipeline(42), "iterable or an async iterable"),  # type: ignore[call-overload]
        (lambda: Pipeline([1]).map(Stage), "must define process"),
        (lambda: Pipeline([1]).map(str, on_error=Retry(attempts=0)), "attempts"),
    ],
)
def test_bad_options_raise_at_build_time(build: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_unknown_option_is_a_type_error_at_build_time() -> None:
    with pytest.raises(TypeError, match="unknown stage option 'worker'; did you mean 'workers'"):
        Pipeline([1]).map(inc, worker=3)  # type: ignore[call-overload]


def test_a_pipeline_without_stages_cannot_run() -> None:
    with pytest.raises(ConfigurationError, match="at least one stage"):
        Pipeline([1]).run()


def test_configuration_error_is_also_value_and_type_error() -> None:
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, TypeError)


def test_duplicate_default_names_get_a_suffix() -> None:
    stats = Pipeline([1]).map(inc).map(inc).map(inc).run()
    assert [s.name for s in stats.stages] == ["inc", "inc-2", "inc-3"]


def test_process_options_are_refused_on_other_kinds() -> None:
    with pytest.raises(ConfigurationError, match="option 'start_method' is for kind='process'"):
        Pipeline([1]).map(inc, start_method="spawn")
