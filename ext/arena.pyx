# cython: language_level=3
"""Tensor arena: a binary-buddy allocator over a shared-memory segment, and zero-copy views into it.

Exactly one process allocates and frees in an arena (`Arena.format`); any number of others read it
(`Arena.attach`). Allocation is O(max_order) = O(1) (at most ~20 levels), sizes are rounded up to a
power of two (internal waste under 2x) and free buddies always coalesce, so mixed sizes cannot
fragment the arena without bound. Free-list links live inside the free blocks; block states live in a
process-local byte map (one byte per minimum block), so a reader can never corrupt the allocator.

Every offset and length that arrives from another process is checked against the arena before it is
dereferenced: a bad one raises IndexError, never a read outside the mapping.
"""

import numpy as np
cimport numpy as cnp

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, Py_buffer
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from ext.layout cimport (
    ENG_ARENA_MAGIC, ENG_ARENA_PAYLOAD, eng_arena_header_t, eng_load_acquire_u64, eng_store_release_u64,
)
from ext.segment cimport Segment

cnp.import_array()

cdef enum:
    FREE_FLAG = 0x80
    ALLOC_FLAG = 0x40
    ORDER_MASK = 0x3F
    ITEM_REFCOUNT = 0x01    # NPY_ITEM_REFCOUNT: the dtype holds Python object references
    MAX_NDIM = 32

cdef extern from "numpy/arrayobject.h":
    object PyArray_NewFromDescr(
        void *subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims, cnp.npy_intp *strides, void *data,
        int flags, object obj
    )

ARENA_HEADER_SIZE = ENG_ARENA_PAYLOAD
# the default dtypes of view()/tensor(), converted once
_UINT8 = np.dtype(np.uint8)
_FLOAT32 = np.dtype(np.float32)


class ArenaFull(MemoryError):
    """No free block is large enough for the request right now."""


cdef inline uint32_t ceil_log2(uint64_t v) noexcept nogil:
    if v <= 1:
        return 0
    return 64 - __builtin_clzll(v - 1)


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


def arena_payload_size(segment_size, max_block=64 << 20):
    """Payload bytes an arena gets from a segment data area of ``segment_size`` bytes."""
    usable = segment_size - ENG_ARENA_PAYLOAD
    return (usable // max_block) * max_block if usable > 0 else 0


def segment_size_for(payload_bytes, max_block=64 << 20):
    """Data-area size to create so that the arena holds at least ``payload_bytes``."""
    blocks = max(1, -(-payload_bytes // max_block))
    return ENG_ARENA_PAYLOAD + blocks * max_block


cdef class Arena:
    """Allocator (one process) or reader (others) of the tensor arena in ``segment``."""

    def __cinit__(self):
        self.state = NULL
        for i in range(40):
            self.free_head[i] = -1

    def __dealloc__(self):
        if self.state != NULL:
            free(self.state)
            self.state = NULL

    @staticmethod
    def format(Segment segment, uint32_t min_block=256, uint64_t max_block=64 << 20):
        """Take ownership of ``segment`` as an empty arena; this process becomes its allocator.

        The payload is the largest whole number of ``max_block`` blocks that fits; ``min_block`` and
        ``max_block`` must be powers of two with min_block >= 64.
        """
        if min_block < 64 or (min_block & (min_block - 1)) or max_block < min_block or (max_block & (max_block - 1)):
            raise ValueError(f"bad block sizes min={min_block} max={max_block}: powers of two, min >= 64")
        if not segment.writable:
            raise PermissionError("the allocator needs a writable mapping")
        payload = arena_payload_size(segment.size, max_block)
        if payload == 0:
            raise ValueError(f"segment of {segment.size} bytes is too small for one {max_block}-byte block")
        cdef eng_arena_header_t *hdr = <eng_arena_header_t *> segment.data
        memset(hdr, 0, sizeof(eng_arena_header_t))
        hdr.payload_size = payload
        hdr.min_block = min_block
        hdr.max_order = ceil_log2(max_block // min_block)
        eng_store_release_u64(&hdr.magic, ENG_ARENA_MAGIC)
        cdef Arena arena = Arena._open(segment, True)
        arena._init_allocator()
        return arena

    @staticmethod
    def attach(Segment segment):
        """A reader of an arena formatted by another process: views only, read-only arrays."""
        return Arena._open(segment, False)

    @staticmethod
    def _open(Segment segment, bint allocator):
        segment.check_range(0, ENG_ARENA_PAYLOAD, 64)
        cdef eng_arena_header_t *hdr = <eng_arena_header_t *> segment.data
        if eng_load_acquire_u64(&hdr.magic) != ENG_ARENA_MAGIC:
            raise ValueError(f"segment {segment.name!r} holds no formatted arena")
        if hdr.max_order >= 40 or hdr.min_block < 64 or hdr.payload_size == 0:
            raise ValueError(f"corrupt arena header in {segment.name!r}")
        segment.check_range(ENG_ARENA_PAYLOAD, hdr.payload_size, 64)
        cdef Arena arena = Arena.__new__(Arena)
        arena.segment = segment
        arena.allocator = allocator
        arena.hdr = hdr
        arena.payload_size = hdr.payload_size
        arena.min_block = hdr.min_block
        arena.max_order = hdr.max_order
        arena.min_shift = ceil_log2(hdr.min_block)
        arena.payload = segment.data + ENG_ARENA_PAYLOAD
        arena._mv = segment.buffer()
        arena._readonly = not segment.writable
        return arena

    cdef _init_allocator(self):
        self.n_min = self.payload_size >> self.min_shift
        self.state = <uint8_t *> calloc(self.n_min, 1)
        if self.state == NULL:
            raise MemoryError("cannot allocate the arena state map")
        cdef uint64_t top = (<uint64_t> self.min_block) << self.max_order
        cdef uint64_t off = self.payload_size
        # push top blocks in reverse so the lowest offsets are handed out first
        while off > 0:
            off -= top
            self._push_free(off, self.max_order)

    # ---- allocator internals ---------------------------------------------------------------------

    cdef link_t *_link(self, uint64_t off) noexcept:
        return <link_t *> (self.payload + off)

    cdef void _push_free(self, uint64_t off, uint32_t order) noexcept:
        cdef link_t *ln = self._link(off)
        ln.prev = -1
        ln.next = self.free_head[order]
        if ln.next >= 0:
            self._link(<uint64_t> ln.next).prev = <int64_t> off
        self.free_head[order] = <int64_t> off
        self.state[off >> self.min_shift] = FREE_FLAG | order

    cdef void _remove_free(self, uint64_t off, uint32_t order) noexcept:
        cdef link_t *ln = self._link(off)
        if ln.prev >= 0:
            self._link(<uint64_t> ln.prev).next = ln.next
        else:
            self.free_head[order] = ln.next
        if ln.next >= 0:
            self._link(<uint64_t> ln.next).prev = ln.prev
        self.state[off >> self.min_shift] = 0

    cdef int64_t c_alloc(self, uint64_t nbytes) noexcept:
        if nbytes == 0:
            nbytes = 1
        cdef uint32_t order = 0
        if nbytes > self.min_block:
            order = ceil_log2(nbytes) - self.min_shift
        if order > self.max_order:
            return -2
        cdef uint32_t o = order
        while o <= self.max_order and self.free_head[o] < 0:
            o += 1
        if o > self.max_order:
            return -1
        cdef uint64_t off = <uint64_t> self.free_head[o]
        self._remove_free(off, o)
        while o > order:
            o -= 1
            self._push_free(off + ((<uint64_t> self.min_block) << o), o)
        self.state[off >> self.min_shift] = ALLOC_FLAG | order
        cdef uint64_t size = (<uint64_t> self.min_block) << order
        cdef uint64_t used = self.hdr.bytes_in_use + size
        eng_store_release_u64(&self.hdr.bytes_in_use, used)
        eng_store_release_u64(&self.hdr.allocations, self.hdr.allocations + 1)
        if used > self.hdr.high_water:
            eng_store_release_u64(&self.hdr.high_water, used)
        return <int64_t> off

    cdef int c_free(self, uint64_t off) noexcept:
        if off >= self.payload_size or (off & (self.min_block - 1)):
            return -1
        cdef uint8_t st = self.state[off >> self.min_shift]
        if not (st & ALLOC_FLAG):
            return -1
        cdef uint32_t order = st & ORDER_MASK
        cdef uint64_t size = (<uint64_t> self.min_block) << order
        self.state[off >> self.min_shift] = 0
        eng_store_release_u64(&self.hdr.bytes_in_use, self.hdr.bytes_in_use - size)
        eng_store_release_u64(&self.hdr.allocations, self.hdr.allocations - 1)
        cdef uint64_t buddy
        while order < self.max_order:
            buddy = off ^ ((<uint64_t> self.min_block) << order)
            if self.state[buddy >> self.min_shift] != (FREE_FLAG | order):
                break
            self._remove_free(buddy, order)
            if buddy < off:
                off = buddy
            order += 1
        self._push_free(off, order)
        return 0

    cdef int _require_open(self) except -1:
        # hdr and payload point into the mapping, which only _mv keeps alive once the segment closes
        if self._mv is None:
            raise ValueError(f"arena {self.segment.name!r} is closed")
        return 0

    cdef int check(self, uint64_t offset, uint64_t nbytes) except -1:
        if self._mv is None or self.segment.data == NULL:
            raise ValueError("arena is closed")
        if offset > self.payload_size or nbytes > self.payload_size - offset:
            raise IndexError(
                f"region [{offset}, +{nbytes}) lies outside the arena of {self.payload_size} bytes"
            )
        return 0

    cdef object c_view(self, uint64_t offset, object dtype, object shape):
        # a C type check: np.dtype(x) costs ~150-250 ns even when x already is one
        cdef cnp.dtype descr = <cnp.dtype> dtype if isinstance(dtype, cnp.dtype) else np.dtype(dtype)
        if descr.flags & ITEM_REFCOUNT:
            # raw shared bytes reinterpreted as PyObject pointers would crash the reader
            raise TypeError(f"dtype {descr} holds Python objects: it cannot live in shared memory")
        cdef cnp.npy_intp dims[MAX_NDIM]
        cdef int ndim = 0
        cdef uint64_t count = 1
        cdef Py_ssize_t d
        if isinstance(shape, (int, np.integer)):
            shape = (shape,)
        for dim in shape:
            if ndim >= MAX_NDIM:
                raise ValueError(f"at most {MAX_NDIM} dimensions")
            try:
                d = dim
            except OverflowError:
                # a u64 length from a forged descriptor: out of range, like any other bad length
                raise IndexError(f"dimension {dim} of shape {tuple(shape)} is out of range") from None
            if d < 0:
                raise ValueError(f"negative dimension in shape {tuple(shape)}")
            # overflow-safe: stop as soon as the element count exceeds the arena
            if d != 0 and count > self.payload_size // <uint64_t> d:
                raise IndexError(f"shape {tuple(shape)} is larger than the arena")
            count *= <uint64_t> d
            dims[ndim] = d
            ndim += 1
        cdef uint64_t itemsize = descr.itemsize
        if itemsize and count > self.payload_size // itemsize:
            raise IndexError(f"shape {tuple(shape)} is larger than the arena")
        self.check(offset, count * itemsize)
        if offset % descr.alignment:
            raise ValueError(f"offset {offset} is not aligned for {descr}")
        cdef int flags = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
        if not self._readonly:
            flags |= cnp.NPY_ARRAY_WRITEABLE
        Py_INCREF(descr)  # PyArray_NewFromDescr steals a reference
        arr = PyArray_NewFromDescr(
            <void *> np.ndarray, descr, ndim, dims, NULL, <void *> (self.payload + offset), flags, None
        )
        Py_INCREF(self._mv)
        cnp.PyArray_SetBaseObject(arr, self._mv)
        return arr

    # ---- Python API --------------------------------------------------------------------------------

    def try_alloc(self, uint64_t nbytes):
        """Offset of a new region of at least ``nbytes``, or -1 when the arena is full now."""
        if not self.allocator:
            raise PermissionError("only the allocating process may alloc in this arena")
        self._require_open()
        cdef int64_t off = self.c_alloc(nbytes)
        if off == -2:
            raise ValueError(f"{nbytes} bytes exceeds the largest block ({self.max_block} bytes)")
        return off

    def alloc(self, uint64_t nbytes):
        """Offset of a new region of at least ``nbytes``; ArenaFull when no block is free."""
        off = self.try_alloc(nbytes)
        if off < 0:
            raise ArenaFull(f"arena full: no free block for {nbytes} bytes ({self.bytes_in_use} in use)")
        return off

    def free(self, uint64_t offset):
        """Return a region. A bad or already-free offset raises ValueError and changes nothing."""
        if not self.allocator:
            raise PermissionError("only the allocating process may free in this arena")
        self._require_open()
        if self.c_free(offset) != 0:
            raise ValueError(f"offset {offset} is not an allocated region of this arena")

    def block_size(self, uint64_t offset):
        """Size of the allocated block at ``offset`` (allocator only)."""
        if not self.allocator:
            raise PermissionError("allocator only")
        self._require_open()
        if offset >= self.payload_size or (offset & (self.min_block - 1)):
            raise ValueError(f"offset {offset} is not a block start")
        st = self.state[offset >> self.min_shift]
        if not (st & ALLOC_FLAG):
            raise ValueError(f"offset {offset} is not allocated")
        return (<uint64_t> self.min_block) << (st & ORDER_MASK)

    def write(self, uint64_t offset, src):
        """Copy the bytes of ``src`` (any C-contiguous buffer) to ``offset``; returns bytes written."""
        if self._readonly:
            raise PermissionError("arena is mapped read-only here")
        cdef Py_buffer view
        PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
        try:
            self.check(offset, <uint64_t> view.len)
            with nogil:
                memcpy(self.payload + offset, view.buf, view.len)
            return view.len
        finally:
            PyBuffer_Release(&view)

    def put(self, uint64_t offset, cnp.ndarray src not None):
        """Write a numpy array at ``offset`` and return the zero-copy view of the written copy
        (same dtype and shape): the one copy a request payload needs, plus a free view."""
        if self._readonly:
            raise PermissionError("arena is mapped read-only here")
        if not cnp.PyArray_IS_C_CONTIGUOUS(src):
            src = np.ascontiguousarray(src)
        cdef uint64_t nbytes = cnp.PyArray_NBYTES(src)
        self.check(offset, nbytes)
        cdef void *s = cnp.PyArray_DATA(src)
        with nogil:
            memcpy(self.payload + offset, s, nbytes)
        return self.c_view(offset, src.dtype, (<object> src).shape)

    def view(self, uint64_t offset, object shape, object dtype=_UINT8):
        """Zero-copy numpy array of ``shape``/``dtype`` over the region at ``offset`` (bounds-checked;
        read-only in reader processes). The array keeps the mapping alive."""
        return self.c_view(offset, dtype, shape)

    def tensor(self, uint64_t offset, object shape, object dtype=_FLOAT32):
        """Zero-copy torch tensor over the region (imports torch lazily: front-ends never do)."""
        import torch

        return torch.from_numpy(self.c_view(offset, dtype, shape))

    def reset(self):
        """Free every region at once (allocator only), e.g. after the readers' peer restarted."""
        if not self.allocator:
            raise PermissionError("allocator only")
        self._require_open()
        memset(self.state, 0, self.n_min)
        for i in range(40):
            self.free_head[i] = -1
        eng_store_release_u64(&self.hdr.bytes_in_use, 0)
        eng_store_release_u64(&self.hdr.allocations, 0)
        self._init_state_only()

    cdef _init_state_only(self):
        cdef uint64_t top = (<uint64_t> self.min_block) << self.max_order
        cdef uint64_t off = self.payload_size
        while off > 0:
            off -= top
            self._push_free(off, self.max_order)

    def check_consistency(self):
        """Walk the whole allocator (tests): every byte is in exactly one free or allocated block,
        free lists match the state map, and bytes_in_use matches. Returns (free_bytes, used_bytes)."""
        if not self.allocator:
            raise PermissionError("allocator only")
        self._require_open()
        cdef uint64_t off = 0, free_b = 0, used_b = 0, size
        cdef uint8_t st
        while off < self.payload_size:
            st = self.state[off >> self.min_shift]
            if st == 0:
                raise AssertionError(f"offset {off} is not covered by any block")
            size = (<uint64_t> self.min_block) << (st & ORDER_MASK)
            if off & (size - 1):
                raise AssertionError(f"block at {off} of {size} bytes is misaligned")
            if st & FREE_FLAG:
                free_b += size
            else:
                used_b += size
            off += size
        listed = 0
        for o in range(self.max_order + 1):
            cur = self.free_head[o]
            while cur >= 0:
                if self.state[cur >> self.min_shift] != (FREE_FLAG | o):
                    raise AssertionError(f"free list {o} holds {cur} whose state disagrees")
                listed += (<uint64_t> self.min_block) << o
                cur = self._link(cur).next
        if listed != free_b:
            raise AssertionError(f"free lists hold {listed} bytes, the map says {free_b}")
        if used_b != self.hdr.bytes_in_use:
            raise AssertionError(f"bytes_in_use says {self.hdr.bytes_in_use}, blocks hold {used_b}")
        return free_b, used_b

    @property
    def max_block(self):
        return (<uint64_t> self.min_block) << self.max_order

    @property
    def bytes_in_use(self):
        self._require_open()
        return eng_load_acquire_u64(&self.hdr.bytes_in_use)

    @property
    def allocations(self):
        self._require_open()
        return eng_load_acquire_u64(&self.hdr.allocations)

    @property
    def high_water(self):
        self._require_open()
        return eng_load_acquire_u64(&self.hdr.high_water)

    def close(self):
        """Drop this object's hold on the mapping (views handed out stay valid). Safe twice."""
        self._mv = None

    def __repr__(self):
        role = "allocator" if self.allocator else "reader"
        if self._mv is None:
            return f"<Arena {self.segment.name} {role} closed>"
        return f"<Arena {self.segment.name} {role} {self.bytes_in_use}/{self.payload_size} bytes in use>"
