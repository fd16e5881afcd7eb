"""The worker's per-model counters on the board: how a request or a computed batch adds to them.

Each (worker, model) owns `engine.shm.STAT_SLOTS` u64 counters in the control segment, named by
`engine.shm.STAT_NAMES`. Only that worker writes them (atomic adds, so readers never see a torn
value); the supervisor and the front-ends read them (`engine.stats`).
"""

from __future__ import annotations

import time

from engine.shm import STAT_INDEX
from ext.segment import Segment


def add_stat(control: Segment, base: int, name: str, value: int) -> None:
    """Add ``value`` to counter ``name`` of the model whose counters start at ``base``.

    Counting a batch (``"batches"``) also stamps ``last_ns`` with the wall-clock time.
    """
    if value:
        control.fetch_add_u64(base + 8 * STAT_INDEX[name], value)
    if name == "batches":
        control.store_u64(base + 8 * STAT_INDEX["last_ns"], time.time_ns())


def count_batch(
    control: Segment, base: int, requests: int, rows: int, queue_ns: int, compute_ns: int
) -> None:
    """Count one computed batch of ``requests`` requests and ``rows`` rows.

    Args:
        control: the control segment.
        base: where the model's counters start (`engine.shm.BoardLayout.stat` of the first name).
        requests: requests answered with the batch's outputs (counted as successes).
        rows: rows of the batch (its size bucket is ``batch_le_<n>``).
        queue_ns: the time its requests waited before it ran, summed.
        compute_ns: how long it ran.
    """
    # what add_stat does for each counter, from offsets worked out at import: this runs once per
    # batch, right after the forward, when every Python call costs twice its usual time
    add = control.fetch_add_u64
    if requests:
        add(base + _SUCCESS, requests)
    add(base + _BATCHES, 1)
    control.store_u64(base + _LAST_NS, time.time_ns())
    if rows:
        add(base + _ROWS, rows)
    if queue_ns:
        add(base + _QUEUE_NS, queue_ns)
    le, ns_le = _BUCKETS[min(rows, len(_BUCKETS) - 1)]
    add(base + le, 1)
    if compute_ns:
        add(base + _COMPUTE_NS, compute_ns)
        if requests:
            add(base + _COMPUTE_REQ_NS, compute_ns * requests)
        add(base + ns_le, compute_ns)


def batch_bucket(rows: int) -> int:
    """The smallest power of two (at most 512) that holds ``rows``: the batch size histogram's bucket."""
    b = 1
    while b < rows and b < 512:
        b <<= 1
    return min(b, 512)


def _at(name: str) -> int:
    return 8 * STAT_INDEX[name]


_SUCCESS, _BATCHES, _LAST_NS, _ROWS, _QUEUE_NS, _COMPUTE_NS, _COMPUTE_REQ_NS = map(
    _at, ("success", "batches", "last_ns", "rows", "queue_ns", "compute_ns", "compute_req_ns")
)
#: the offsets of (batch_le_<n>, batch_ns_le_<n>) by a batch's rows, up to the last bucket's
_BUCKETS = [
    (_at(f"batch_le_{batch_bucket(rows)}"), _at(f"batch_ns_le_{batch_bucket(rows)}")) for rows in range(513)
]
