"""Per-model circuit breaker: repeated model failures stop sending work to a broken model for a while.

Pure logic with an injected clock. CLOSED lets everything through; ``failures`` consecutive failed
batches open it; while OPEN every request fails fast with UNAVAILABLE; after ``cooldown_ns`` it is
HALF_OPEN and the next batch is the probe (the worker computes one batch at a time, so there is
exactly one): success closes it, failure opens it again for another cool-down.
"""

from __future__ import annotations

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class CircuitBreaker:
    """Breaker state of one model on one worker. ``failures`` 0 disables it (always closed)."""

    __slots__ = ("consecutive", "cooldown_ns", "failures", "opened_at", "state", "trips")

    def __init__(self, failures: int, cooldown_ns: int) -> None:
        self.failures = failures
        self.cooldown_ns = cooldown_ns
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0
        self.trips = 0

    def allow(self, now_ns: int) -> bool:
        """May a batch of this model be computed now? Moves OPEN to HALF_OPEN once cooled down."""
        if self.state == OPEN and now_ns - self.opened_at >= self.cooldown_ns:
            self.state = HALF_OPEN
        return self.state != OPEN

    def record(self, success: bool, now_ns: int) -> None:
        """Account one computed batch."""
        if success:
            self.consecutive = 0
            self.state = CLOSED
            return
        self.consecutive += 1
        if self.failures and (self.state == HALF_OPEN or self.consecutive >= self.failures):
            self.state = OPEN
            self.opened_at = now_ns
            self.trips += 1

    def retry_in_s(self, now_ns: int) -> float:
        """Seconds until the next probe may run (0 unless OPEN)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, (self.opened_at + self.cooldown_ns - now_ns) / 1e9)
