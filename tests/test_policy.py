from __future__ import annotations

import pytest

from conveyor import ConfigurationError, DeadLetter, Retry, Skip
from conveyor._engine import RateLimiter
from conveyor._engine.clock import ManualClock
from conveyor._engine.policy import DEAD, RAISE, RETRY, SKIP, decide


def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    r = Retry(attempts=6, backoff_s=1.0, max_backoff_s=5.0, jitter=0)
    assert [r.delay_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_spreads_within_bounds() -> None:
    lo = Retry(backoff_s=1.0, jitter=0.5, rng=lambda: 0.0)
    hi = Retry(backoff_s=1.0, jitter=0.5, rng=lambda: 1.0)
    assert lo.delay_s(1) == 0.5
    assert hi.delay_s(1) == 1.5


def test_decisions_follow_attempts_and_exception_types() -> None:
    r = Retry(attempts=2, on=(KeyError,), then=Skip())
    assert decide(r, KeyError(), 1).action == RETRY
    assert decide(r, KeyError(), 2).action == SKIP
    assert decide(r, ValueError(), 1).action == SKIP
    assert decide("raise", ValueError(), 1).action == RAISE
    assert decide(DeadLetter([]), ValueError(), 1).action == DEAD


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Retry(attempts=0),
        lambda: Retry(jitter=2),
        lambda: Retry(on=(42,)),  # type: ignore[arg-type]
        lambda: Retry(then=Retry()),  # type: ignore[arg-type]
        lambda: DeadLetter(42),
    ],
)
def test_bad_policies_are_refused_when_made(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        bad()  # type: ignore[operator]


def test_rate_limiter_spaces_reservations_on_the_clock() -> None:
    clock = ManualClock()
    limiter = RateLimiter(10, clock)
    waits = [limiter.reserve(1) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert limiter.max_batch() == 1
