# cython: language_level=3
"""POSIX shared-memory segments with a versioned header: create (0600, unguessable name), attach, close, unlink.

The mapping is a Python `mmap.mmap`, so numpy views handed out over it keep it alive: `close()` never
unmaps memory that a live array still points into, it only drops this object's hold on it.
Attaching does not register with multiprocessing's resource tracker: only the creator unlinks.
"""

import mmap
import os
import secrets
import time

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset

from ext.layout cimport (
    ENG_SEG_MAGIC, ENG_LAYOUT_VERSION, ENG_SEG_HEADER_SIZE, eng_seg_header_t,
    eng_load_acquire_u64, eng_store_release_u64, eng_fetch_add_u64, eng_load_acquire_u32,
    eng_store_release_u32,
)

cdef extern from "errno.h":
    int errno

cdef inline int _errno() noexcept:
    return errno

cdef extern from "sys/mman.h" nogil:
    int shm_open(const char *name, int oflag, int mode)
    int shm_unlink(const char *name)

SEGMENT_HEADER_SIZE = ENG_SEG_HEADER_SIZE
LAYOUT_VERSION = ENG_LAYOUT_VERSION

KIND_ANY = 0
KIND_CONTROL = 1
KIND_ARENA = 2
KIND_RINGS = 3
KIND_TEST = 99

#: Every segment this engine creates starts with this, so a start-up sweep can find leftovers.
NAME_PREFIX = "sie-"


class SegmentError(Exception):
    """A segment could not be created or attached (missing, wrong layout, wrong size)."""


class LayoutMismatch(SegmentError):
    """The segment exists but was written with another layout version or holds another kind."""


def _shm_path(name):
    return name if name.startswith("/") else "/" + name


cdef class Segment:
    """One mapped shared-memory segment. Use `Segment.create` or `Segment.attach`."""

    def __cinit__(self):
        self._has_view = False
        self.base = NULL
        self.data = NULL

    @staticmethod
    def create(Py_ssize_t size, unsigned int kind=KIND_ANY, str prefix=NAME_PREFIX, str name=None):
        """Create a new segment with a data area of ``size`` bytes, mode 0600.

        The name is ``prefix`` + 32 random hex digits, unless ``name`` is given (callers derive such
        names from a random base so that they stay unguessable); an existing name is an error.
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        cdef Segment seg = Segment.__new__(Segment)
        cdef bytes path
        cdef int fd = -1
        cdef Py_ssize_t total = size + ENG_SEG_HEADER_SIZE
        fixed = name is not None
        for _ in range(8):
            if not fixed:
                name = f"{prefix}{secrets.token_hex(16)}"
            path = _shm_path(name).encode()
            fd = shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            if fd >= 0:
                break
            e = _errno()
            if e != 17 or fixed:  # EEXIST with a random name: draw another one
                raise SegmentError(f"shm_open({name!r}) failed: {os.strerror(e)}")
        else:
            raise SegmentError("could not find a free segment name")
        try:
            # umask can only clear bits, but be explicit: no one else may attach.
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            shm_unlink(path)
            raise
        os.close(fd)
        seg.name = name
        seg.owner = True
        seg.kind = kind
        try:
            seg._map(mm, True)
        except BaseException:
            shm_unlink(path)
            raise
        cdef eng_seg_header_t *hdr = <eng_seg_header_t *> seg.base
        memset(seg.base, 0, ENG_SEG_HEADER_SIZE)
        hdr.version = ENG_LAYOUT_VERSION
        hdr.kind = kind
        hdr.size = total
        hdr.creator_pid = os.getpid()
        hdr.created_ns = time.time_ns()
        # magic last: an attacher that sees it sees a complete header
        eng_store_release_u64(&hdr.magic, ENG_SEG_MAGIC)
        return seg

    @staticmethod
    def attach(str name, unsigned int kind=KIND_ANY, bint writable=True):
        """Map an existing segment by name; refuses another layout version or another kind."""
        cdef Segment seg = Segment.__new__(Segment)
        cdef bytes path = _shm_path(name).encode()
        cdef int fd = shm_open(path, os.O_RDWR if writable else os.O_RDONLY, 0)
        if fd < 0:
            e = _errno()
            raise SegmentError(f"cannot attach segment {name!r}: {os.strerror(e)}")
        try:
            total = os.fstat(fd).st_size
            if total < ENG_SEG_HEADER_SIZE:
                raise LayoutMismatch(f"segment {name!r} is too small ({total} bytes) to be ours")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        seg.name = name
        seg.owner = False
        seg._map(mm, writable)
        cdef eng_seg_header_t *hdr = <eng_seg_header_t *> seg.base
        magic = eng_load_acquire_u64(&hdr.magic)
        if magic != ENG_SEG_MAGIC:
            seg.close()
            raise LayoutMismatch(f"segment {name!r} has no engine header (magic {magic:#x})")
        if hdr.version != ENG_LAYOUT_VERSION:
            v = hdr.version
            seg.close()
            raise LayoutMismatch(
                f"segment {name!r} has layout version {v}, this build reads {ENG_LAYOUT_VERSION}"
            )
        if hdr.size != <uint64_t> total:
            seg.close()
            raise LayoutMismatch(f"segment {name!r} header says {hdr.size} bytes, mapping has {total}")
        if kind != KIND_ANY and hdr.kind != kind:
            k = hdr.kind
            seg.close()
            raise LayoutMismatch(f"segment {name!r} holds kind {k}, expected {kind}")
        seg.kind = hdr.kind
        return seg

    cdef _map(self, object mm, bint writable):
        self._mm = mm
        PyObject_GetBuffer(mm, &self._view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        self._has_view = True
        self.writable = writable
        self.base = <uint8_t *> self._view.buf
        self.data = self.base + ENG_SEG_HEADER_SIZE
        self.size = self._view.len - ENG_SEG_HEADER_SIZE

    cdef int check_range(self, Py_ssize_t offset, Py_ssize_t length, Py_ssize_t align) except -1:
        if self.data == NULL:
            raise ValueError(f"segment {self.name!r} is closed")
        if offset < 0 or length < 0 or offset > self.size or length > self.size - offset:
            raise IndexError(
                f"range [{offset}, {offset}+{length}) is outside segment {self.name!r} of {self.size} bytes"
            )
        if align > 1 and offset % align:
            raise ValueError(f"offset {offset} is not {align}-byte aligned")
        return 0

    @property
    def closed(self):
        return self.data == NULL

    @property
    def creator_pid(self):
        self.check_range(0, 0, 1)
        return (<eng_seg_header_t *> self.base).creator_pid

    @property
    def mmap(self):
        """The underlying mmap (data area starts at SEGMENT_HEADER_SIZE)."""
        return self._mm

    @property
    def address(self):
        """Address of the data area in this process (for diagnostics)."""
        return <size_t> self.data

    def buffer(self):
        """A memoryview of the data area (keeps the mapping alive while it lives)."""
        self.check_range(0, 0, 1)
        return memoryview(self._mm)[ENG_SEG_HEADER_SIZE:]

    def load_u64(self, Py_ssize_t offset):
        self.check_range(offset, 8, 8)
        return eng_load_acquire_u64(<uint64_t *> (self.data + offset))

    def store_u64(self, Py_ssize_t offset, uint64_t value):
        self.check_range(offset, 8, 8)
        if not self.writable:
            raise PermissionError(f"segment {self.name!r} is mapped read-only")
        eng_store_release_u64(<uint64_t *> (self.data + offset), value)

    def fetch_add_u64(self, Py_ssize_t offset, uint64_t value):
        self.check_range(offset, 8, 8)
        if not self.writable:
            raise PermissionError(f"segment {self.name!r} is mapped read-only")
        return eng_fetch_add_u64(<uint64_t *> (self.data + offset), value)

    def load_u32(self, Py_ssize_t offset):
        self.check_range(offset, 4, 4)
        return eng_load_acquire_u32(<uint32_t *> (self.data + offset))

    def store_u32(self, Py_ssize_t offset, uint32_t value):
        self.check_range(offset, 4, 4)
        if not self.writable:
            raise PermissionError(f"segment {self.name!r} is mapped read-only")
        eng_store_release_u32(<uint32_t *> (self.data + offset), value)

    def close(self):
        """Drop this object's mapping. Safe to call twice. Arrays still viewing it stay valid."""
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
        self.base = NULL
        self.data = NULL
        mm = self._mm
        self._mm = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still export it: it unmaps when the last one goes

    def unlink(self):
        """Remove the name (creator only); mappings stay valid until closed. Safe to call twice."""
        unlink_segment(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self.owner:
            self.unlink()

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False

    def __repr__(self):
        state = "closed" if self.data == NULL else f"{self.size} bytes"
        return f"<Segment {self.name} kind={self.kind} {state}{' owner' if self.owner else ''}>"


def unlink_segment(str name):
    """Unlink a segment by name; returns False when it was already gone."""
    cdef bytes path = _shm_path(name).encode()
    if shm_unlink(path) == 0:
        return True
    e = _errno()
    if e == 2:  # ENOENT
        return False
    raise SegmentError(f"shm_unlink({name!r}) failed: {os.strerror(e)}")


def segment_info(str name):
    """Header fields of a segment (creator pid, kind, size, version) without keeping it mapped."""
    seg = Segment.attach(name, KIND_ANY, False)
    try:
        hdr = <eng_seg_header_t *> (<Segment> seg).base
        return {
            "name": name,
            "kind": hdr.kind,
            "size": hdr.size,
            "version": hdr.version,
            "creator_pid": hdr.creator_pid,
            "created_ns": hdr.created_ns,
        }
    finally:
        seg.close()

