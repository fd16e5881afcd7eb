"""The dynamic batcher: pure queueing logic that decides which requests form the next batch, and when.

No torch, no I/O, no clock of its own: every method that depends on time takes ``now_ns`` (any
monotonic nanosecond clock, the same one the items' ``arrival_ns`` and ``deadline_ns`` use), so the
worker drives it with ``time.monotonic_ns()`` and the tests with a fake clock.

Rules (one ``Batcher`` per model):

- Items batch only with items of the same ``group`` (same non-batch dims), in FIFO order, and an item
  is never split across batches.
- ``max_batch_size == 0``: the model does not batch; every item is a batch of its own, at once.
- Otherwise a group is sent when (checked in this order, first match decides the batch size):
  1. its queued rows reach ``max_batch_size``: the longest FIFO prefix of whole items that fits;
  2. its oldest item has waited ``>= max_queue_delay_ns``: the longest prefix that fits;
  3. its queued rows reach ``pipeline_rows`` (when set): all of them, up to ``max_batch_size``;
  4. a FIFO prefix sums exactly to a preferred batch size: the largest such size.
- Among groups ready at once, the group with the oldest item goes first.
- An item whose deadline has passed (``deadline_ns <= now_ns``) leaves the queue through
  `Batcher.pop_expired` and is never part of a batch.

Cost per item is amortized O(log G) for G groups: a deque per group, a heap of group heads (lazy
deletion), a heap of deadlines (lazy deletion with compaction), and per group a map from the running
row total at each item's end so that "does a prefix hit a preferred size" is a dictionary lookup per
preferred size instead of a scan.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Generic, Protocol, TypeVar


class BatchItem(Protocol):
    """What the batcher reads from a queued request."""

    @property
    def rows(self) -> int:
        """Size of the request's batch dimension (1 for models with ``max_batch_size`` 0)."""
        ...

    @property
    def group(self) -> Hashable:
        """Requests batch only with requests of the same group (same non-batch dims)."""
        ...

    @property
    def deadline_ns(self) -> int:
        """Absolute deadline on the batcher's clock; 0 means none."""
        ...

    @property
    def arrival_ns(self) -> int:
        """When the request was queued, on the batcher's clock."""
        ...


T = TypeVar("T", bound=BatchItem)

#: Rebuild a lazy-deletion heap once it holds this many more dead entries than live ones.
_COMPACT_SLACK = 64


class _Entry:
    """One queued item plus the bookkeeping the batcher needs about it."""

    __slots__ = ("arrival", "deadline", "done", "end", "group", "item", "rows", "seq")

    def __init__(
        self, item: object, group: Hashable, seq: int, rows: int, arrival: int, deadline: int
    ) -> None:
        self.item = item
        self.group = group
        self.seq = seq
        self.rows = rows
        self.arrival = arrival
        self.deadline = deadline
        #: running row total of the group up to and including this item
        self.end = 0
        #: True once the item left the queue (batched or expired); heap entries for it are dead
        self.done = False


class _Group:
    """The FIFO of one group."""

    __slots__ = ("base", "ends", "entries", "heap_seq", "key", "rows", "total")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.entries: deque[_Entry] = deque()
        self.rows = 0
        #: running row total of everything ever queued in the group (since the last rebuild)
        self.total = 0
        #: running row total at the end of the item just before the head
        self.base = 0
        #: running row total at an item's end -> how many queued items end there (0-row items share)
        self.ends: dict[int, int] = {}
        #: seq of the head whose entry is in the group heap (-1: none)
        self.heap_seq = -1

    def push(self, entry: _Entry) -> None:
        self.total += entry.rows
        self.rows += entry.rows
        entry.end = self.total
        self.ends[entry.end] = self.ends.get(entry.end, 0) + 1
        self.entries.append(entry)

    def pop(self) -> _Entry:
        entry = self.entries.popleft()
        self.rows -= entry.rows
        self.base = entry.end
        left = self.ends[entry.end] - 1
        if left:
            self.ends[entry.end] = left
        else:
            del self.ends[entry.end]
        return entry

    def rebuild(self) -> None:
        """Drop items that left out of order (expired) and recompute the running totals."""
        live = [e for e in self.entries if not e.done]
        self.entries = deque()
        self.rows = self.total = self.base = 0
        self.ends = {}
        for entry in live:
            self.push(entry)


def _head_key(group: _Group) -> tuple[int, int]:
    head = group.entries[0]
    return head.arrival, head.seq


class Batcher(Generic[T]):
    """Queues the requests of one model and hands out batches by the rules of the module docstring.

    Args:
        max_batch_size: largest batch in rows; 0 means the model does not batch.
        max_queue_delay_ns: longest the oldest item of a group waits for companions.
        preferred_batch_sizes: batch sizes sent as soon as a FIFO prefix fills one exactly; each must
            be in ``1..max_batch_size`` (unused when ``max_batch_size`` is 0).
        pipeline_rows: when > 0, a group of at least this many queued rows is ready at once, and
            sends all of them (up to ``max_batch_size``); in ``0..max_batch_size``.

    Raises:
        ValueError: a negative size or delay, or a preferred size out of range.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_queue_delay_ns: int,
        preferred_batch_sizes: Sequence[int] = (),
        pipeline_rows: int = 0,
    ) -> None:
        if max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
        if max_queue_delay_ns < 0:
            raise ValueError(f"max_queue_delay_ns must be >= 0, got {max_queue_delay_ns}")
        if max_batch_size > 0:
            for size in preferred_batch_sizes:
                if not 1 <= size <= max_batch_size:
                    raise ValueError(
                        f"preferred batch size {size} is outside 1..max_batch_size ({max_batch_size})"
                    )
        if not 0 <= pipeline_rows <= max_batch_size:
            raise ValueError(f"pipeline_rows {pipeline_rows} is outside 0..max_batch_size ({max_batch_size})")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ns = max_queue_delay_ns
        self.pipeline_rows = pipeline_rows
        # largest first: the first hit is the one to send
        self.preferred_batch_sizes: tuple[int, ...] = (
            tuple(sorted(set(preferred_batch_sizes), reverse=True)) if max_batch_size > 0 else ()
        )
        self._groups: dict[Hashable, _Group] = {}
        #: (head arrival, head seq, group key); dead when the group's head moved on
        self._heads: list[tuple[int, int, Hashable]] = []
        #: (deadline, seq, entry); dead when the entry is done
        self._deadlines: list[tuple[int, int, _Entry]] = []
        self._live_deadlines = 0
        #: groups ready by size (full, or a prefix hits a preferred size)
        self._ready: set[Hashable] = set()
        self._expired: list[T] = []
        self._seq = 0
        self._items = 0
        self._rows = 0

    def __len__(self) -> int:
        """Items held: queued, plus expired ones not yet taken by `pop_expired`."""
        return self._items + len(self._expired)

    @property
    def rows_queued(self) -> int:
        """Rows of the items still queued (expired ones excluded)."""
        return self._rows

    def add(self, item: T) -> None:
        """Queue one request.

        Raises:
            ValueError: ``item.rows`` is negative or larger than ``max_batch_size`` (a batching model
                can never send it; the caller must refuse such a request before queueing it).
        """
        rows = item.rows
        if rows < 0 or (self.max_batch_size > 0 and rows > self.max_batch_size):
            raise ValueError(
                f"request of {rows} rows cannot be batched (max_batch_size {self.max_batch_size})"
            )
        key = item.group
        entry = _Entry(item, key, self._seq, rows, item.arrival_ns, item.deadline_ns)
        self._seq += 1
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        group.push(entry)
        self._items += 1
        self._rows += rows
        if entry.deadline:
            heapq.heappush(self._deadlines, (entry.deadline, entry.seq, entry))
            self._live_deadlines += 1
        self._after_change(group)

    def pop_expired(self, now_ns: int) -> list[T]:
        """Remove and return the items whose deadline passed (``deadline_ns <= now_ns``), oldest
        deadline first. The worker answers them DEADLINE_EXCEEDED without computing them."""
        self._expire(now_ns)
        expired, self._expired = self._expired, []
        return expired

    def next_batch(self, now_ns: int) -> list[T] | None:
        """The next batch to compute now, or None when every group should keep waiting.

        Items whose deadline passed are moved aside for `pop_expired` first, so a returned batch never
        holds an expired item.
        """
        self._expire(now_ns)
        group = self._oldest()
        if group is None:
            return None
        if self.max_batch_size == 0:
            return self._take(group, 1)
        if now_ns - group.entries[0].arrival >= self.max_queue_delay_ns:
            return self._take(group, self.max_batch_size)
        if not self._ready:
            return None
        # the oldest group is not ready by delay, so pick the oldest of those ready by size
        best = min((self._groups[k] for k in self._ready), key=_head_key)
        return self._take(best, self._size_target(best))

    def flush_one(self, now_ns: int) -> list[T] | None:
        """Like `next_batch`, but when nothing is due, the oldest group's batch at once (up to
        ``max_batch_size`` rows). For a worker whose device would otherwise idle. None when empty."""
        batch = self.next_batch(now_ns)
        if batch is not None:
            return batch
        group = self._oldest()
        if group is None:
            return None
        return self._take(group, self.max_batch_size or 1)

    def next_wakeup_ns(self) -> int | None:
        """Earliest time at which `next_batch` may return a batch by the delay rule or an item expires;
        a time in the past means "now". None when nothing is queued."""
        times: list[int] = []
        if self._expired:
            times.append(min(item.deadline_ns for item in self._expired))
        group = self._oldest()
        if group is not None:
            head = group.entries[0]
            delay = self.max_queue_delay_ns if self.max_batch_size else 0
            times.append(head.arrival + delay)
        for key in self._ready:
            times.append(self._groups[key].entries[0].arrival)
        while self._deadlines and self._deadlines[0][2].done:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    # -- internals ---------------------------------------------------------------------------

    def _oldest(self) -> _Group | None:
        """The group whose head is the oldest queued item (dropping dead heap entries on the way)."""
        heads = self._heads
        while heads:
            _, seq, key = heads[0]
            group = self._groups.get(key)
            if group is not None and group.heap_seq == seq:
                return group
            heapq.heappop(heads)
        return None

    def _size_target(self, group: _Group) -> int:
        """Rows to send for a group that is ready by size: max when full, all queued at
        ``pipeline_rows`` or more, else the largest preferred size a FIFO prefix hits exactly (0
        when none)."""
        if group.rows >= self.max_batch_size:
            return self.max_batch_size
        if self.pipeline_rows and group.rows >= self.pipeline_rows:
            return group.rows
        for size in self.preferred_batch_sizes:
            if size <= group.rows and group.base + size in group.ends:
                return size
        return 0

    def _after_change(self, group: _Group) -> None:
        """Refresh a group's place in the head heap and the ready set after its queue changed."""
        key = group.key
        if not group.entries:
            del self._groups[key]
            self._ready.discard(key)
            return
        head = group.entries[0]
        if group.heap_seq != head.seq:
            group.heap_seq = head.seq
            heapq.heappush(self._heads, (head.arrival, head.seq, key))
            if len(self._heads) > 2 * len(self._groups) + _COMPACT_SLACK:
                self._heads = [(g.entries[0].arrival, g.heap_seq, k) for k, g in self._groups.items()]
                heapq.heapify(self._heads)
        if self.max_batch_size and self._size_target(group):
            self._ready.add(key)
        else:
            self._ready.discard(key)

    def _take(self, group: _Group, max_rows: int) -> list[T]:
        """Pop the longest FIFO prefix of whole items of at most ``max_rows`` rows (at least one)."""
        batch: list[T] = []
        rows = 0
        entries = group.entries
        # "not batch": the first item always goes, so a batch is never empty
        while entries and (not batch or rows + entries[0].rows <= max_rows):
            entry = group.pop()
            rows += entry.rows
            entry.done = True
            if entry.deadline:
                self._live_deadlines -= 1
            batch.append(entry.item)  # type: ignore[arg-type]
        self._items -= len(batch)
        self._rows -= rows
        self._after_change(group)
        self._compact_deadlines()
        return batch

    def _expire(self, now_ns: int) -> None:
        """Move every queued item whose deadline is ``<= now_ns`` to the expired list."""
        deadlines = self._deadlines
        touched: dict[Hashable, _Group] = {}
        while deadlines and deadlines[0][0] <= now_ns:
            _, _, entry = heapq.heappop(deadlines)
            if entry.done:
                continue
            entry.done = True
            self._live_deadlines -= 1
            item: T = entry.item  # type: ignore[assignment]
            self._expired.append(item)
            self._items -= 1
            self._rows -= entry.rows
            touched[entry.group] = self._groups[entry.group]
        for group in touched.values():
            group.rebuild()
            self._after_change(group)

    def _compact_deadlines(self) -> None:
        """Batched items leave dead entries in the deadline heap; rebuild it before they dominate."""
        if len(self._deadlines) > 2 * self._live_deadlines + _COMPACT_SLACK:
            self._deadlines = [d for d in self._deadlines if not d[2].done]
            heapq.heapify(self._deadlines)
