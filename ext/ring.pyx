# cython: language_level=3
"""Single-producer/single-consumer ring of 64-byte descriptors in shared memory.

Layout and ordering rules are drawn in engine_layout.h. One process pushes, one pops; neither ever
blocks here (full and empty are reported, waiting is ext.notify's job).
"""

import numpy as np
cimport numpy as cnp

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from ext.layout cimport (
    ENG_RING_MAGIC, ENG_CACHE_LINE, eng_ring_header_t, eng_desc_t,
    eng_load_acquire_u64, eng_load_relaxed_u64, eng_store_release_u64, eng_fetch_add_u64,
)
from ext.segment cimport Segment

cnp.import_array()

#: numpy mirror of eng_desc_t, for bursts.
DESC_DTYPE = np.dtype(
    [
        ("req_id", "<u8"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("deadline_ns", "<u8"),
        ("aux", "<u8"),
        ("aux2", "<u8"),
        ("kind", "<u4"),
        ("model", "<u4"),
        ("status", "<u4"),
        ("gen", "<u4"),
    ]
)
assert DESC_DTYPE.itemsize == sizeof(eng_desc_t) == 64

DESC_SIZE = sizeof(eng_desc_t)
HEADER_SIZE = sizeof(eng_ring_header_t)
MAX_CAPACITY = 1 << 24


def ring_footprint(uint32_t capacity):
    """Bytes a ring of ``capacity`` slots occupies in a segment."""
    return sizeof(eng_ring_header_t) + <Py_ssize_t> capacity * sizeof(eng_desc_t)


cdef class Ring:
    """A view of one ring inside a segment. Build with `Ring.create` or `Ring.attach`."""

    @staticmethod
    def create(Segment segment, Py_ssize_t offset, uint32_t capacity):
        """Initialise a ring at ``offset`` (64-byte aligned) of ``segment``; capacity a power of two."""
        if capacity < 2 or capacity > MAX_CAPACITY or (capacity & (capacity - 1)) != 0:
            raise ValueError(f"ring capacity must be a power of two in [2, {MAX_CAPACITY}], got {capacity}")
        segment.check_range(offset, ring_footprint(capacity), ENG_CACHE_LINE)
        if not segment.writable:
            raise PermissionError("a ring needs a writable mapping")
        cdef eng_ring_header_t *hdr = <eng_ring_header_t *> (segment.data + offset)
        memset(hdr, 0, sizeof(eng_ring_header_t))
        hdr.capacity = capacity
        hdr.slot_size = sizeof(eng_desc_t)
        eng_store_release_u64(&hdr.magic, ENG_RING_MAGIC)
        return Ring.attach(segment, offset)

    @staticmethod
    def attach(Segment segment, Py_ssize_t offset):
        """A view of the ring initialised at ``offset``; validates magic, capacity and bounds."""
        segment.check_range(offset, sizeof(eng_ring_header_t), ENG_CACHE_LINE)
        if not segment.writable:
            raise PermissionError("a ring needs a writable mapping")
        cdef eng_ring_header_t *hdr = <eng_ring_header_t *> (segment.data + offset)
        if eng_load_acquire_u64(&hdr.magic) != ENG_RING_MAGIC:
            raise ValueError(f"no ring at offset {offset} of segment {segment.name!r}")
        cdef uint32_t cap = hdr.capacity
        if cap < 2 or cap > MAX_CAPACITY or (cap & (cap - 1)) != 0 or hdr.slot_size != sizeof(eng_desc_t):
            raise ValueError(f"corrupt ring header at offset {offset}: capacity {cap}")
        segment.check_range(offset, ring_footprint(cap), ENG_CACHE_LINE)
        cdef Ring ring = Ring.__new__(Ring)
        ring.segment = segment
        ring._hold = segment.buffer()  # hdr/slots point into the mapping: keep it mapped
        ring.offset = offset
        ring.capacity = cap
        ring.mask = cap - 1
        ring.hdr = hdr
        ring.slots = <eng_desc_t *> (segment.data + offset + sizeof(eng_ring_header_t))
        ring.cached_tail = eng_load_acquire_u64(&hdr.tail)
        return ring

    # ---- C level -------------------------------------------------------------------------------

    cdef int c_push(self, const eng_desc_t *d) noexcept nogil:
        cdef uint64_t head = eng_load_relaxed_u64(&self.hdr.head)
        if head - self.cached_tail >= self.capacity:
            self.cached_tail = eng_load_acquire_u64(&self.hdr.tail)
            if head - self.cached_tail >= self.capacity:
                return 0
        memcpy(&self.slots[head & self.mask], d, sizeof(eng_desc_t))
        # order matters: the slot is written before head publishes it
        eng_store_release_u64(&self.hdr.head, head + 1)
        return 1

    cdef int c_pop(self, eng_desc_t *out) noexcept nogil:
        cdef uint64_t tail = eng_load_relaxed_u64(&self.hdr.tail)
        cdef uint64_t head = eng_load_acquire_u64(&self.hdr.head)
        if head == tail:
            return 0
        memcpy(out, &self.slots[tail & self.mask], sizeof(eng_desc_t))
        # order matters: the slot is copied out before tail hands it back to the producer
        eng_store_release_u64(&self.hdr.tail, tail + 1)
        return 1

    cdef Py_ssize_t c_push_burst(self, const eng_desc_t *src, Py_ssize_t n) noexcept nogil:
        cdef uint64_t head = eng_load_relaxed_u64(&self.hdr.head)
        cdef uint64_t free_slots = self.capacity - (head - self.cached_tail)
        if <uint64_t> n > free_slots:
            self.cached_tail = eng_load_acquire_u64(&self.hdr.tail)
            free_slots = self.capacity - (head - self.cached_tail)
        if <uint64_t> n > free_slots:
            n = <Py_ssize_t> free_slots
        if n <= 0:
            return 0
        cdef uint64_t start = head & self.mask
        cdef uint64_t first = self.capacity - start
        if <uint64_t> n <= first:
            memcpy(&self.slots[start], src, n * sizeof(eng_desc_t))
        else:
            memcpy(&self.slots[start], src, first * sizeof(eng_desc_t))
            memcpy(&self.slots[0], src + first, (n - first) * sizeof(eng_desc_t))
        eng_store_release_u64(&self.hdr.head, head + n)
        return n

    cdef Py_ssize_t c_pop_burst(self, eng_desc_t *dst, Py_ssize_t n) noexcept nogil:
        cdef uint64_t tail = eng_load_relaxed_u64(&self.hdr.tail)
        cdef uint64_t head = eng_load_acquire_u64(&self.hdr.head)
        cdef uint64_t avail = head - tail
        if <uint64_t> n > avail:
            n = <Py_ssize_t> avail
        if n <= 0:
            return 0
        cdef uint64_t start = tail & self.mask
        cdef uint64_t first = self.capacity - start
        if <uint64_t> n <= first:
            memcpy(dst, &self.slots[start], n * sizeof(eng_desc_t))
        else:
            memcpy(dst, &self.slots[start], first * sizeof(eng_desc_t))
            memcpy(dst + first, &self.slots[0], (n - first) * sizeof(eng_desc_t))
        eng_store_release_u64(&self.hdr.tail, tail + n)
        return n

    # ---- Python level --------------------------------------------------------------------------

    def push(self, uint32_t kind, uint32_t model, uint64_t req_id, uint64_t offset=0, uint64_t length=0,
             uint64_t deadline_ns=0, uint64_t aux=0, uint64_t aux2=0, uint32_t status=0, uint32_t gen=0):
        """Push one descriptor; False when the ring is full (nothing written)."""
        cdef eng_desc_t d
        d.req_id = req_id
        d.offset = offset
        d.length = length
        d.deadline_ns = deadline_ns
        d.aux = aux
        d.aux2 = aux2
        d.kind = kind
        d.model = model
        d.status = status
        d.gen = gen
        return self.c_push(&d) == 1

    def pop(self):
        """Pop one descriptor as a tuple (kind, model, req_id, offset, length, deadline_ns, aux, aux2,
        status, gen), or None when empty."""
        cdef eng_desc_t d
        if self.c_pop(&d) == 0:
            return None
        return (d.kind, d.model, d.req_id, d.offset, d.length, d.deadline_ns, d.aux, d.aux2, d.status, d.gen)

    def push_burst(self, cnp.ndarray descs not None):
        """Push as many descriptors of a DESC_DTYPE array as fit; returns how many were pushed."""
        if descs.dtype != DESC_DTYPE or not descs.flags.c_contiguous or descs.ndim != 1:
            raise TypeError("push_burst needs a 1-d C-contiguous array of DESC_DTYPE")
        cdef Py_ssize_t n = descs.shape[0]
        cdef const eng_desc_t *src = <const eng_desc_t *> cnp.PyArray_DATA(descs)
        with nogil:
            n = self.c_push_burst(src, n)
        return n

    def pop_into(self, cnp.ndarray out not None):
        """Pop up to len(out) descriptors into a DESC_DTYPE array; returns how many."""
        if out.dtype != DESC_DTYPE or not out.flags.c_contiguous or out.ndim != 1 or not out.flags.writeable:
            raise TypeError("pop_into needs a writable 1-d C-contiguous array of DESC_DTYPE")
        cdef Py_ssize_t n = out.shape[0]
        cdef eng_desc_t *dst = <eng_desc_t *> cnp.PyArray_DATA(out)
        with nogil:
            n = self.c_pop_burst(dst, n)
        return n

    def pop_burst(self, Py_ssize_t max_n):
        """Pop up to ``max_n`` descriptors; returns a (possibly empty) DESC_DTYPE array."""
        if max_n < 0:
            raise ValueError("max_n must be >= 0")
        cdef Py_ssize_t avail = len(self)
        if avail < max_n:
            max_n = avail
        out = np.empty(max_n, dtype=DESC_DTYPE)
        n = self.pop_into(out)
        return out[:n] if n != max_n else out

    def reset(self):
        """Discard what is queued and bump the epoch. Call only while the peer process is dead:
        indices stay monotonic (tail jumps to head), so a side that keeps running never sees them
        move backwards."""
        cdef uint64_t head = eng_load_acquire_u64(&self.hdr.head)
        eng_store_release_u64(&self.hdr.tail, head)
        self.cached_tail = head
        eng_fetch_add_u64(&self.hdr.epoch, 1)

    @property
    def epoch(self):
        return eng_load_acquire_u64(&self.hdr.epoch)

    @property
    def head(self):
        return eng_load_acquire_u64(&self.hdr.head)

    @property
    def tail(self):
        return eng_load_acquire_u64(&self.hdr.tail)

    def __len__(self):
        return eng_load_acquire_u64(&self.hdr.head) - eng_load_acquire_u64(&self.hdr.tail)

    def is_empty(self):
        return eng_load_acquire_u64(&self.hdr.head) == eng_load_acquire_u64(&self.hdr.tail)

    def is_full(self):
        return eng_load_acquire_u64(&self.hdr.head) - eng_load_acquire_u64(&self.hdr.tail) >= self.capacity

    def __repr__(self):
        return f"<Ring {self.segment.name}+{self.offset} {len(self)}/{self.capacity} epoch={self.epoch}>"
