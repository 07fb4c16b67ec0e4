"""What happens when an item fails: the ``on_error`` policy values and the decision they make.

Policies are plain frozen values handed to a stage; they are never raised. A worker of any kind
asks :func:`decide` what to do about one failure and acts on the answer, so the rules live here
once and every worker kind follows them alike.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import ConfigurationError

log = logging.getLogger("conveyor")


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed item, as a dead-letter sink receives it."""

    stage: str
    item: Any
    attempt: int
    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Drop the failed item and go on; count it as skipped (and log it if ``log``)."""

    log: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Hand the failed item to ``sink`` and go on.

    ``sink`` is a callable taking a :class:`Failure`, or anything with an ``append`` or ``put``
    method (a list, a ``queue.Queue``). If the sink itself raises, the run fails: an item that can
    be neither processed nor set aside must not vanish quietly.
    """

    sink: Any

    def __post_init__(self) -> None:
        if not (callable(self.sink) or hasattr(self.sink, "append") or hasattr(self.sink, "put")):
            raise ConfigurationError(
                "DeadLetter(sink): sink must be callable or have an append() or put() method, "
                f"not {type(self.sink).__name__}"
            )

    def deliver(self, failure: Failure) -> None:
        sink = self.sink
        if hasattr(sink, "append"):
            sink.append(failure)
        elif hasattr(sink, "put"):
            sink.put(failure)
        else:
            sink(failure)


def backoff_delay(
    attempt: int,
    backoff_s: float,
    max_backoff_s: float,
    jitter: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """The wait after failed try number ``attempt`` (1-based): ``backoff_s * 2**(attempt-1)``,
    capped at ``max_backoff_s``, spread by ``± jitter`` (a fraction). Pipelines' ``Retry`` and
    task queues' retries both wait this long."""
    # doubling past 2**60 only ever meets the cap: stop there, so a large attempt number
    # cannot overflow the float power
    base = min(max_backoff_s, backoff_s * (2.0 ** min(attempt - 1, 60)))
    if jitter:
        base *= 1 + jitter * (2 * float(rng()) - 1)
    return max(0.0, base)


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the item again, up to ``attempts`` tries in all (the first one included).

    The wait before try *n+1* is ``backoff_s * 2**(n-1)``, capped at ``max_backoff_s`` and spread
    by ``± jitter`` (a fraction). Only exceptions that are instances of ``on`` are retried; any
    other failure, and the last one, go to ``then`` (``"raise"`` unless told otherwise).
    """

    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 30.0
    jitter: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)
    then: Literal["raise"] | Skip | DeadLetter = "raise"
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigurationError(
                f"Retry(attempts=...) must be an int >= 1, not {self.attempts!r}"
            )
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigurationError("Retry backoff times cannot be negative")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(
                f"Retry(jitter=...) is a fraction in [0, 1], not {self.jitter!r}"
            )
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        for cls in on:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise ConfigurationError(f"Retry(on=...) takes exception classes, not {cls!r}")
        object.__setattr__(self, "on", on)
        check_policy(self.then, allow_retry=False)

    def delay_s(self, attempt: int) -> float:
        """The wait after failed try number ``attempt`` (1-based)."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s, self.jitter, self.rng)


def check_policy(policy: object, *, allow_retry: bool = True) -> None:
    """Raise :class:`ConfigurationError` unless ``policy`` is a valid ``on_error`` value."""
    if policy == "raise" or isinstance(policy, Skip | DeadLetter):
        return
    if isinstance(policy, Retry) and allow_retry:
        return
    if isinstance(policy, type) and policy in (Skip, Retry, DeadLetter):
        raise ConfigurationError(
            f"on_error takes a policy value: write {policy.__name__}(...), not the class"
        )
    allowed = (
        "'raise', Skip(), Retry(...) or DeadLetter(sink)"
        if allow_retry
        else ("'raise', Skip() or DeadLetter(sink)")
    )
    raise ConfigurationError(f"on_error must be {allowed}, not {policy!r}")


# The decision a worker acts on.
RAISE = "raise"
SKIP = "skip"
DEAD = "dead"
RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    delay_s: float = 0.0


def decide(policy: Any, error: BaseException, attempt: int) -> Decision:
    """What to do after try number ``attempt`` of an item failed with ``error``."""
    if isinstance(policy, Retry):
        if attempt < policy.attempts and isinstance(error, policy.on):
            return Decision(RETRY, policy.delay_s(attempt))
        policy = policy.then
    if isinstance(policy, Skip):
        return Decision(SKIP)
    if isinstance(policy, DeadLetter):
        return Decision(DEAD)
    return Decision(RAISE)


def final_policy(policy: Any) -> Any:
    """The policy that applies once retrying is over."""
    return policy.then if isinstance(policy, Retry) else policy


def make_failure(stage: str, item: Any, attempt: int, error: BaseException) -> Failure:
    return Failure(stage, item, attempt, error, "".join(traceback.format_exception(error)))


def log_skip(stage: str, item: Any, error: BaseException) -> None:
    log.error(
        "stage %r skipped item %r after %s: %s",
        stage,
        item,
        type(error).__name__,
        error,
        exc_info=error,
    )
