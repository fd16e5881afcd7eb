"""Python's cyclic garbage collector, set for a long-lived serving process.

Measured on a gRPC front-end at 64 calls in flight (`gc.callbacks` timing every collection): ~37
young collections a second and, every few seconds, a full one that walked all ~44,000 objects left
by startup (modules, protobuf descriptors, the server) and stopped the event loop for ~30 ms, with
every call in flight waiting. Those objects are never garbage. `settle_heap` collects once, then
moves what is left to the permanent generation (`gc.freeze`), so later full collections walk only
what serving created; and it raises the young generation's threshold, so that the requests in
flight are not walked again every few hundred allocations. Cycles are still collected, a little
later.
"""

from __future__ import annotations

import gc

#: allocations (net of deallocations) between two young collections; Python's default is 700
YOUNG_THRESHOLD = 20_000


def settle_heap(young_threshold: int = YOUNG_THRESHOLD) -> int:
    """Call once startup is over (everything imported, models loaded, servers bound). Returns the
    number of objects frozen."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
    return gc.get_freeze_count()
