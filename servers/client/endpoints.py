"""`EndpointPool`: the scale-out policy the shipped clients share across several server addresses.

Requests go round robin over the endpoints. An endpoint that fails (its connection is refused or
drops, or it answers UNAVAILABLE because it is draining or its worker is down) is marked down for a
short cool-down: it is skipped while others are up, and tried again once the cool-down is over, or at
once when the client learns it is back (a ZMQ reconnect). When every endpoint is down they are all
still offered, oldest failure first, so a client never refuses to try.

The pool is pure bookkeeping (no sockets, no I/O) and thread-safe, so the blocking gRPC client may be
shared by threads; the clients do the sending and tell the pool what happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence

#: Seconds an endpoint that failed is skipped (while another is up) before it is tried again.
DEFAULT_COOLDOWN_S = 2.0


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """The endpoints as a tuple: one address, a comma-separated list, or a sequence of addresses.

    Raises:
        ValueError: no endpoint, an empty one, or one listed twice.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = tuple(str(item).strip() for item in items)
    if not parsed or any(not item for item in parsed):
        raise ValueError(f"expected one or more endpoints (comma-separated), got {endpoints!r}")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"an endpoint is listed twice in {endpoints!r}; list each once")
    return parsed


class EndpointPool:
    """Round robin with failover over a fixed list of endpoints.

    Args:
        endpoints: one address, a comma-separated list, or a sequence of addresses.
        cooldown_s: how long an endpoint marked down is skipped while others are up.
        clock: monotonic time source (tests pass a fake one).

    Attributes:
        endpoints: the addresses, in the order given; the clients index them.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.endpoints = parse_endpoints(endpoints)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        n = len(self.endpoints)
        #: start -> the rotation from there
        self._orders = [tuple((start + k) % n for k in range(n)) for start in range(n)]
        #: index -> when it was marked down (absent: up)
        self._down_since: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    def candidates(self, exclude: Collection[int] = ()) -> list[int]:
        """Endpoint indexes to try for one request, best first.

        Up endpoints come first, in round-robin order from this call's turn; endpoints still in their
        cool-down follow, the one that failed longest ago first. ``exclude`` (endpoints that already
        failed this request) are left out, so the list may be empty. A call for a fresh request
        (nothing excluded) moves the rotation on; a retry's call does not, so an endpoint that keeps
        failing does not shift the turns of the others.
        """
        with self._lock:
            n = len(self.endpoints)
            start = self._next
            if not exclude:
                self._next = (start + 1) % n
                if not self._down_since:
                    return list(self._orders[start])  # the common case, kept cheap: all up
            now = self._clock()
            for index, since in list(self._down_since.items()):
                if now - since >= self.cooldown_s:
                    del self._down_since[index]  # cool-down over: back on probation
            up = [i for i in self._orders[start] if i not in self._down_since and i not in exclude]
            down = sorted(
                (i for i in self._down_since if i not in exclude), key=lambda i: self._down_since[i]
            )
            return up + down

    def mark_down(self, index: int) -> None:
        """Record that endpoint ``index`` failed: skip it for ``cooldown_s`` while others are up."""
        with self._lock:
            self._down_since[index] = self._clock()

    def mark_up(self, index: int) -> None:
        """Record that endpoint ``index`` is reachable again (ends its cool-down at once)."""
        with self._lock:
            self._down_since.pop(index, None)

    def is_down(self, index: int) -> bool:
        """Whether endpoint ``index`` is in its cool-down now."""
        with self._lock:
            since = self._down_since.get(index)
            return since is not None and self._clock() - since < self.cooldown_s

    def down(self) -> list[str]:
        """Addresses of the endpoints in their cool-down now (for logs and status)."""
        return [address for i, address in enumerate(self.endpoints) if self.is_down(i)]


__all__ = ["DEFAULT_COOLDOWN_S", "EndpointPool", "parse_endpoints"]
