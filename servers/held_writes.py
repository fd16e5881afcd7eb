"""Memory written without a copy, released once the transport is done with it.

The ZMQ and gRPC front-ends write large outputs from where the worker put them (shared memory):
the transport references what the kernel did not take at once, so the result those bytes belong to
must stay unreleased until the transport's write buffer is empty. `HeldWrites` runs each release
then: at once when the kernel took everything, else when a backing-off timer finds the buffer
drained, or when the connection is lost (`release_all`). A peer that never reads holds what it was
sent until it disconnects; the front-ends stop reading it meanwhile (the write buffer's high-water
mark), so it cannot make them hold more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Release = Callable[[], None]

#: first and longest wait between two looks at a write buffer that still holds data
FIRST_LOOK_S = 0.0002
LONGEST_LOOK_S = 0.01


class HeldWrites:
    """The releases of one connection's zero-copy writes that the transport may still reference."""

    __slots__ = ("_delay", "_get_transport", "_held", "_loop", "_prefix", "_timer")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        get_transport: Callable[[], asyncio.WriteTransport | None],
        prefix: str,
    ) -> None:
        self._loop = loop
        self._get_transport = get_transport
        self._prefix = prefix
        self._held: list[Release] = []
        self._timer: asyncio.TimerHandle | None = None
        self._delay = 0.0

    def __len__(self) -> int:
        return len(self._held)

    def written(self, releases: list[Release]) -> None:
        """``releases`` belong to data just handed to the transport: run them now when it holds
        nothing, else once its write buffer has drained. Takes the list's items (it is cleared)."""
        if not releases:
            return
        transport = self._get_transport()
        if transport is None or not transport.get_write_buffer_size():
            run_releases(releases, self._prefix)
            return
        self._held.extend(releases)
        releases.clear()
        if self._timer is None:
            self._delay = FIRST_LOOK_S
            self._timer = self._loop.call_later(self._delay, self._look)

    def release_all(self) -> None:
        """The connection is gone: nothing it held will be sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        run_releases(self._held, self._prefix)

    def _look(self) -> None:
        self._timer = None
        transport = self._get_transport()
        if transport is not None and transport.get_write_buffer_size():
            self._delay = min(self._delay * 2, LONGEST_LOOK_S)
            self._timer = self._loop.call_later(self._delay, self._look)
            return
        run_releases(self._held, self._prefix)


def run_releases(releases: list[Release], prefix: str) -> None:
    """Run every release of ``releases`` (one failing does not stop the others), then clear it."""
    for release in releases:
        try:
            release()
        except Exception:
            log.exception("%s: releasing a result failed", prefix)
    releases.clear()
