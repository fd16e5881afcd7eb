"""The compiled hot path: shared-memory segments, SPSC descriptor rings, the tensor arena, wake-ups.

Each concern is its own Cython module (`segment`, `ring`, `arena`, `notify`) with a `.pyi` stub; this
façade re-exports the public names.
"""

from ext.arena import Arena, ArenaFull, arena_payload_size, segment_size_for
from ext.notify import EventNotifier, WakeWord, eventfd_open, wait_rings
from ext.ring import DESC_DTYPE, Ring, ring_footprint
from ext.segment import (
    KIND_ARENA,
    KIND_CONTROL,
    KIND_TEST,
    NAME_PREFIX,
    LayoutMismatch,
    Segment,
    SegmentError,
    segment_info,
    unlink_segment,
)

__all__ = [
    "DESC_DTYPE",
    "KIND_ARENA",
    "KIND_CONTROL",
    "KIND_TEST",
    "NAME_PREFIX",
    "Arena",
    "ArenaFull",
    "EventNotifier",
    "LayoutMismatch",
    "Ring",
    "Segment",
    "SegmentError",
    "WakeWord",
    "arena_payload_size",
    "eventfd_open",
    "ring_footprint",
    "segment_info",
    "segment_size_for",
    "unlink_segment",
    "wait_rings",
]
