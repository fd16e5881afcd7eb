"""The control segment's board and the bytes every request and response carries through shared memory.

One control segment (created by the supervisor) holds the board and all rings:

    offset 0        BoardHeader         64 B    n_workers, n_frontends, ring capacity, server state
    WORKERS         WorkerSlot[W]      256 B each: gen, state, heartbeat, pid, + WakeWord at +64
    FRONTENDS       FrontendSlot[F]    256 B each: gen, state, heartbeat, pid, port, + notifier flag at +64
    ACKS            u64 ack_w[W][F]      worker w has taken front-end f's incarnation fgen
                    u64 ack_f[F][W]      front-end f has taken worker w's incarnation wgen
    STATS           u64[W][MAX_MODELS][STAT_SLOTS]   per worker and model counters (worker writes)
    TEXT            W x 8 KiB: u32 length + orjson {model: load error} written by each worker
    RINGS           for f, for w: request ring f->w, then response ring w->f

A pair (f, w) carries traffic only once both have acknowledged each other's current generation;
whoever sees a new peer generation resets the pair's rings before acknowledging, so a request of a
dead incarnation never reaches a new one (see `servers.gateway` and `engine.worker.core`).

Segment names derive from one random base (`sie-<32 hex>`): ``base`` (control), ``base-f<i>g<gen>``
(front-end input arenas) and ``base-w<i>g<gen>`` (worker output arenas), so a restarted process gets
a fresh arena and peers still reading the old one keep their mapping until they let go.

Request region (front-end arena, written by the front-end):

    +0   u32 magic 'SIRQ'  u16 n_inputs  u16 flags  u32 output_mask (bit j = output j; 0 = all)  u32 pad
    +16  InputDesc[n]: u8 dtype code, u8 ndim, u16 pad, u32 pad, u64 data offset (from region start),
         u64 nbytes, i64 dims[8]                                                    (88 B each)
    ...  tensor bytes, each 64-byte aligned

Batch output region (worker arena, one per computed batch, shared by the batch's requests):

    +0   u32 magic 'SIRS'  u16 n_outputs  u16 flags(1 = batched)  u64 pad
    +16  OutputDesc[n] (same layout as InputDesc; dims are the whole batch's)
    ...  tensor bytes, each 64-byte aligned

A request descriptor's aux counts the client requests it stands for (a ZMQ front-end's coalesced
group; 0 or 1: one), for the model's statistics.
A response descriptor names the region (offset, length) and its rows (aux = first row, aux2 = rows);
the front-end sends a RELEASE descriptor with the region offset when done and the worker frees the
region when the last request of the batch has released it. An error response carries the error's
wire code in ``status`` and, when ``length`` > 0, a UTF-8 message region.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ext.notify import WORD_SIZE
from ext.ring import ring_footprint

# ---- descriptor kinds -------------------------------------------------------------------------
KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_ERROR = 3
KIND_RELEASE = 4
KIND_CANCEL = 5

#: descriptor.offset when a response carries no region
NO_REGION = (1 << 64) - 1

# ---- board ------------------------------------------------------------------------------------
SERVER_STARTING = 0
SERVER_READY = 1
SERVER_DRAINING = 2
SERVER_STOPPING = 3

PROC_DOWN = 0
PROC_STARTING = 1
PROC_UP = 2

SLOT_SIZE = 256
TEXT_BYTES = 8192
MAX_MODELS = 64
MAX_RANK = 8

#: per (worker, model) counters, in this order
STAT_NAMES = (
    "success",
    "failure",
    "batches",
    "rows",
    "queue_ns",
    "compute_ns",
    "expired",
    "last_ns",
    *(f"batch_le_{1 << i}" for i in range(10)),
    "breaker_state",  # stored, not added: engine.worker.breaker CLOSED / OPEN / HALF_OPEN
    "breaker_trips",
    "compute_req_ns",  # per request: its batch's compute time (KServe compute_infer)
    *(f"batch_ns_le_{1 << i}" for i in range(10)),  # compute time of the batches of batch_le_<n>
)
#: counters that hold a state rather than a count: combine across workers with max, not sum
STAT_STATES = frozenset({"breaker_state"})
STAT_SLOTS = 32
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
assert len(STAT_NAMES) <= STAT_SLOTS

# slot fields (byte offsets inside a WorkerSlot / FrontendSlot)
F_GEN = 0
F_STATE = 8
F_HEARTBEAT = 16
F_PID = 24
F_PORT = 32
F_MODELS = 40  # worker: bitmap of the models it has loaded (bit = model index)
#: front-end: submissions to the workers not yet answered; a coalesced group (several client
#: requests in one submission) counts once, as the worker's queue holds it (its batching rules
#: compare the two)
F_INFLIGHT = 48
F_STARTED = 56  # CLOCK_MONOTONIC ns when the incarnation started
F_WAKE = 64  # WakeWord (worker) / notifier armed flag (front-end)
#: front-end: client requests admitted and not yet answered (a group counts its requests), for
#: `engine status` and the supervisor's drain; after the WakeWord's 64 bytes
F_REQUESTS = 128


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class BoardLayout:
    """Byte offsets inside the control segment for W workers, F front-ends and a ring capacity."""

    n_workers: int
    n_frontends: int
    ring_capacity: int

    @property
    def workers_at(self) -> int:
        return 64

    @property
    def frontends_at(self) -> int:
        return self.workers_at + self.n_workers * SLOT_SIZE

    @property
    def acks_at(self) -> int:
        return self.frontends_at + self.n_frontends * SLOT_SIZE

    @property
    def stats_at(self) -> int:
        return _align(self.acks_at + 2 * 8 * self.n_workers * self.n_frontends)

    @property
    def text_at(self) -> int:
        return _align(self.stats_at + 8 * self.n_workers * MAX_MODELS * STAT_SLOTS)

    def text(self, w: int) -> int:
        return self.text_at + w * TEXT_BYTES

    @property
    def rings_at(self) -> int:
        return _align(self.text_at + self.n_workers * TEXT_BYTES)

    @property
    def ring_bytes(self) -> int:
        return _align(ring_footprint(self.ring_capacity))

    @property
    def total(self) -> int:
        return self.rings_at + 2 * self.n_workers * self.n_frontends * self.ring_bytes

    def worker(self, w: int, field: int = 0) -> int:
        return self.workers_at + w * SLOT_SIZE + field

    def frontend(self, f: int, field: int = 0) -> int:
        return self.frontends_at + f * SLOT_SIZE + field

    def ack_w(self, w: int, f: int) -> int:
        """Where worker w records the front-end generation it has taken."""
        return self.acks_at + 8 * (w * self.n_frontends + f)

    def ack_f(self, f: int, w: int) -> int:
        """Where front-end f records the worker generation it has taken."""
        return self.acks_at + 8 * (self.n_workers * self.n_frontends + f * self.n_workers + w)

    def stat(self, w: int, model: int, name: str) -> int:
        return self.stats_at + 8 * ((w * MAX_MODELS + model) * STAT_SLOTS + STAT_INDEX[name])

    def stats_block(self, w: int) -> tuple[int, int]:
        """(offset, count of u64) of worker w's whole stats block."""
        return self.stats_at + 8 * w * MAX_MODELS * STAT_SLOTS, MAX_MODELS * STAT_SLOTS

    def request_ring(self, f: int, w: int) -> int:
        return self.rings_at + (2 * (f * self.n_workers + w)) * self.ring_bytes

    def response_ring(self, f: int, w: int) -> int:
        return self.request_ring(f, w) + self.ring_bytes


assert WORD_SIZE <= F_REQUESTS - F_WAKE and F_REQUESTS + 8 <= SLOT_SIZE


def frontend_arena_name(base: str, f: int, gen: int) -> str:
    return f"{base}-f{f}g{gen}"


def worker_arena_name(base: str, w: int, gen: int) -> str:
    return f"{base}-w{w}g{gen}"


# ---- request / response regions ----------------------------------------------------------------
REQ_MAGIC = 0x51524953  # 'SIRQ'
RES_MAGIC = 0x53524953  # 'SIRS'
REGION_HEADER = struct.Struct("<IHHII")  # magic, n, flags, output_mask, pad
TENSOR_DESC_DTYPE = np.dtype(
    [
        ("dtype", "u1"),
        ("ndim", "u1"),
        ("pad0", "u2"),
        ("pad1", "u4"),
        ("offset", "<u8"),
        ("nbytes", "<u8"),
        ("dims", "<i8", (MAX_RANK,)),
    ]
)
assert TENSOR_DESC_DTYPE.itemsize == 88
#: The same descriptor as a struct: packing one is ~2x cheaper than assigning a structured element.
TENSOR_DESC = struct.Struct(f"<BBHIQQ{MAX_RANK}q")
assert TENSOR_DESC.size == TENSOR_DESC_DTYPE.itemsize
HEADER_BYTES = REGION_HEADER.size  # 16
FLAG_BATCHED = 1
_NO_DIMS = (0,) * MAX_RANK


def pack_region_head(
    buf: memoryview, magic: int, flags: int, mask: int, tensors: list[tuple[int, tuple[int, ...], int, int]]
) -> None:
    """Write a region's header and tensor descriptors into ``buf`` (the region's first
    ``HEADER_BYTES + TENSOR_DESC.size * len(tensors)`` bytes).

    Args:
        tensors: per tensor, (dtype code, shape of at most MAX_RANK dims, data offset, nbytes).
    """
    REGION_HEADER.pack_into(buf, 0, magic, len(tensors), flags, mask, 0)
    at = HEADER_BYTES
    for code, shape, offset, nbytes in tensors:
        rank = len(shape)
        TENSOR_DESC.pack_into(buf, at, code, rank, 0, 0, offset, nbytes, *shape, *_NO_DIMS[rank:])
        at += TENSOR_DESC.size


def region_layout(nbytes: list[int]) -> tuple[int, list[int]]:
    """Total region size and the data offset of each tensor for a region holding ``nbytes``."""
    pos = _align(HEADER_BYTES + TENSOR_DESC_DTYPE.itemsize * len(nbytes))
    offsets = []
    for n in nbytes:
        offsets.append(pos)
        pos = _align(pos + n)
    return pos, offsets
