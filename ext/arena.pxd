# cython: language_level=3
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from ext.layout cimport eng_arena_header_t
from ext.segment cimport Segment

cdef struct link_t:
    int64_t next
    int64_t prev

cdef class Arena:
    cdef readonly Segment segment
    cdef readonly bint allocator           # True in the one process that allocates and frees
    cdef readonly uint64_t payload_size
    cdef readonly uint32_t min_block
    cdef readonly uint32_t max_order
    cdef uint32_t min_shift
    cdef eng_arena_header_t *hdr
    cdef uint8_t *payload
    cdef object _mv                         # memoryview export that every view keeps alive
    cdef bint _readonly
    # allocator state (process-local, allocator only)
    cdef uint8_t *state                     # per min-block: 0, or FREE/ALLOC flag | order
    cdef int64_t free_head[40]
    cdef uint64_t n_min

    cdef _init_allocator(self)
    cdef _init_state_only(self)
    cdef link_t *_link(self, uint64_t off) noexcept
    cdef void _push_free(self, uint64_t off, uint32_t order) noexcept
    cdef void _remove_free(self, uint64_t off, uint32_t order) noexcept
    cdef int64_t c_alloc(self, uint64_t nbytes) noexcept
    cdef int c_free(self, uint64_t offset) noexcept
    cdef int _require_open(self) except -1
    cdef int check(self, uint64_t offset, uint64_t nbytes) except -1
    cdef object c_view(self, uint64_t offset, object dtype, object shape)
