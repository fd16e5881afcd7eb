"""Many deadlines on one event-loop timer: a heap, instead of a loop timer per item.

Why: uvloop's ``call_later`` and the ``cancel`` that follows cost ~5 µs per item, as much as the rest
of admitting a request in the gateway, and almost every item ends long before its deadline. Here a
deadline is a heap push (~1.5 µs) and one timer waits for the earliest. An item that ends leaves its
entry behind: an entry that comes due for an item no longer live is dropped, and the heap is rebuilt
from the live items' entries when dead ones pile up (more than twice the live count plus a slack).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")

#: Entries of ended items the heap may hold beyond twice the live ones before it is rebuilt.
COMPACT_SLACK = 1024


class DeadlineHeap(Generic[K]):
    """Calls ``expire(key)`` once ``due_ns`` (`time.monotonic_ns`) passes for each watched, still live key.

    Args:
        loop: the event loop whose timer fires.
        expire: called with a key whose deadline passed while ``live(key)`` held.
        live: whether a key's item is still waiting (an ended one is not expired).
        live_count: how many items are live now (for the heap's compaction).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        expire: Callable[[K], None],
        live: Callable[[K], bool],
        live_count: Callable[[], int],
    ) -> None:
        self._loop = loop
        self._expire = expire
        self._live = live
        self._live_count = live_count
        self._heap: list[tuple[int, int, K]] = []  # (due, tie-break, key): keys need not compare
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop whose timer fires."""
        return self._loop

    def watch(self, due_ns: int, key: K) -> None:
        """Expire ``key`` at ``due_ns`` unless it has ended by then."""
        if self._closed:
            return
        heapq.heappush(self._heap, (due_ns, next(self._order), key))
        if self._timer is None or due_ns < self._due:
            self._arm(due_ns)
        elif len(self._heap) > 2 * self._live_count() + COMPACT_SLACK:
            live = self._live
            self._heap = [entry for entry in self._heap if live(entry[2])]
            heapq.heapify(self._heap)

    def close(self) -> None:
        """Stop the timer; nothing expires after this."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _arm(self, due_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = due_ns
        self._timer = self._loop.call_later(max(0.0, (due_ns - time.monotonic_ns()) / 1e9), self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap, live = self._heap, self._live
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now and not self._closed:
            key = heapq.heappop(heap)[2]
            if live(key):
                self._expire(key)
        while heap and not live(heap[0][2]):
            heapq.heappop(heap)  # ended: nothing to wake up for
        if heap and not self._closed:
            self._arm(heap[0][0])
