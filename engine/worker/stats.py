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
    add_stat(control, base, "success", requests)
    add_stat(control, base, "batches", 1)
    add_stat(control, base, "rows", rows)
    add_stat(control, base, "queue_ns", queue_ns)
    add_stat(control, base, "compute_ns", compute_ns)
    add_stat(control, base, "compute_req_ns", compute_ns * requests)
    add_stat(control, base, f"batch_le_{batch_bucket(rows)}", 1)
    add_stat(control, base, f"batch_ns_le_{batch_bucket(rows)}", compute_ns)


def batch_bucket(rows: int) -> int:
    """The smallest power of two (at most 512) that holds ``rows``: the batch size histogram's bucket."""
    b = 1
    while b < rows and b < 512:
        b <<= 1
    return min(b, 512)
