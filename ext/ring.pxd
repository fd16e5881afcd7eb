# cython: language_level=3
from libc.stdint cimport uint32_t, uint64_t
from ext.layout cimport eng_ring_header_t, eng_desc_t, eng_load_acquire_u64
from ext.segment cimport Segment

cdef class Ring:
    cdef readonly Segment segment
    cdef readonly Py_ssize_t offset
    cdef readonly uint32_t capacity
    cdef uint64_t mask
    cdef eng_ring_header_t *hdr
    cdef eng_desc_t *slots
    cdef uint64_t cached_tail     # producer's last view of tail (only refreshed when it looks full)
    cdef object _hold             # a buffer export: the mapping outlives Segment.close() while we live

    cdef int c_push(self, const eng_desc_t *d) noexcept nogil
    cdef int c_pop(self, eng_desc_t *out) noexcept nogil
    cdef Py_ssize_t c_push_burst(self, const eng_desc_t *src, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t c_pop_burst(self, eng_desc_t *dst, Py_ssize_t n) noexcept nogil

cdef inline bint ring_nonempty(eng_ring_header_t *hdr) noexcept nogil:
    return eng_load_acquire_u64(&hdr.head) != eng_load_acquire_u64(&hdr.tail)
