# cython: language_level=3
from libc.stdint cimport uint8_t, uint64_t
from cpython.buffer cimport Py_buffer

cdef class Segment:
    cdef readonly str name
    cdef readonly bint owner
    cdef readonly bint writable
    cdef readonly Py_ssize_t size        # bytes of the data area (after the header)
    cdef readonly unsigned int kind
    cdef object _mm
    cdef Py_buffer _view
    cdef bint _has_view
    cdef uint8_t *base                    # start of the mapping (the header)
    cdef uint8_t *data                    # start of the data area

    cdef _map(self, object mm, bint writable)
    cdef int check_range(self, Py_ssize_t offset, Py_ssize_t length, Py_ssize_t align) except -1
