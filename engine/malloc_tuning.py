"""glibc malloc settings for the engine's long-lived processes.

glibc serves an allocation of 128 KiB or more with its own ``mmap`` and gives freed memory at the top
of its heap back to the kernel past a trim threshold; both thresholds then adapt, but only up to the
size of the last freed block. A front-end with a few large requests in flight (each request's
message, its tensors, its reply) keeps crossing them, so every large buffer starts as fresh pages,
faulted in one by one: a 4 MiB gRPC request cost ~1,200 page faults, a third of the front-end's CPU.
Keeping blocks up to `MMAP_THRESHOLD` in the heap and trimming only past `TRIM_THRESHOLD` lets freed
buffers be reused instead. The price is memory: a process keeps up to `TRIM_THRESHOLD` of freed heap
(its peak, bounded by the requests in flight) instead of returning it.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's ``mallopt`` parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: largest block served from the heap (glibc's maximum on 64-bit); larger ones still get their mmap
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for reuse
TRIM_THRESHOLD = 256 << 20
#: glibc's own variables: an operator who sets them has chosen, and is left alone
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Apply the thresholds to this process; False where they were not applied (another C library,
    or the operator set glibc's own variables)."""
    if any(name in os.environ for name in OPERATOR_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
