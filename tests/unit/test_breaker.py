"""`engine.worker.breaker.CircuitBreaker` on a fake clock: opens after N failures, fails fast, probes."""

from __future__ import annotations

import pytest

from engine.worker.breaker import CLOSED, HALF_OPEN, OPEN, STATE_NAMES, CircuitBreaker

S = 1_000_000_000  # one second in ns
COOLDOWN = 5 * S


def failing(n: int, at: int = 0) -> CircuitBreaker:
    """A breaker (3 failures, 5 s cool-down) after ``n`` failed batches at time ``at``."""
    breaker = CircuitBreaker(3, COOLDOWN)
    for _ in range(n):
        assert breaker.allow(at)
        breaker.record(False, at)
    return breaker


def test_starts_closed() -> None:
    breaker = CircuitBreaker(3, COOLDOWN)
    assert breaker.state == CLOSED and breaker.trips == 0
    assert breaker.allow(0)
    assert breaker.retry_in_s(0) == 0.0


def test_opens_after_n_consecutive_failures() -> None:
    breaker = failing(2)
    assert breaker.state == CLOSED and breaker.allow(0)
    breaker.record(False, 10)
    assert breaker.state == OPEN and breaker.trips == 1
    assert breaker.consecutive == 3


def test_a_success_resets_the_count() -> None:
    breaker = failing(2)
    breaker.record(True, 0)
    breaker.record(False, 0)
    breaker.record(False, 0)
    assert breaker.state == CLOSED, "two failures after a success must not open a 3-failure breaker"


def test_open_fails_fast_until_the_cooldown() -> None:
    breaker = failing(3, at=100)
    for now in (100, 100 + S, 100 + COOLDOWN - 1):
        assert not breaker.allow(now)
        assert breaker.state == OPEN
    assert breaker.retry_in_s(100) == pytest.approx(5.0)
    assert breaker.retry_in_s(100 + 2 * S) == pytest.approx(3.0)


def test_half_open_after_the_cooldown_lets_a_probe_through() -> None:
    breaker = failing(3, at=0)
    assert breaker.allow(COOLDOWN)
    assert breaker.state == HALF_OPEN
    assert breaker.retry_in_s(COOLDOWN) == 0.0


def test_probe_success_closes() -> None:
    breaker = failing(3)
    assert breaker.allow(COOLDOWN)
    breaker.record(True, COOLDOWN)
    assert breaker.state == CLOSED and breaker.consecutive == 0
    assert breaker.allow(COOLDOWN + 1)
    # it takes another full N failures to open again
    breaker.record(False, COOLDOWN + 1)
    breaker.record(False, COOLDOWN + 1)
    assert breaker.state == CLOSED


def test_probe_failure_reopens_for_another_cooldown() -> None:
    breaker = failing(3)
    assert breaker.allow(COOLDOWN)
    breaker.record(False, COOLDOWN + 7)
    assert breaker.state == OPEN and breaker.trips == 2
    assert not breaker.allow(COOLDOWN + 7 + COOLDOWN - 1)
    assert breaker.allow(COOLDOWN + 7 + COOLDOWN)
    assert breaker.state == HALF_OPEN


def test_failures_zero_disables_the_breaker() -> None:
    breaker = CircuitBreaker(0, COOLDOWN)
    for t in range(1000):
        assert breaker.allow(t)
        breaker.record(False, t)
    assert breaker.state == CLOSED and breaker.trips == 0


def test_zero_cooldown_probes_at_once() -> None:
    breaker = CircuitBreaker(1, 0)
    breaker.record(False, 50)
    assert breaker.state == OPEN
    assert breaker.allow(50) and breaker.state == HALF_OPEN


def test_state_names() -> None:
    assert STATE_NAMES == {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
    # statistics (engine.stats, read by front-ends too) mirror them without importing the worker
    from engine.stats import BREAKER_STATES

    assert BREAKER_STATES == STATE_NAMES
