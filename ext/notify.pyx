# cython: language_level=3
"""Wake-ups without busy idling: a futex event count for worker processes, an eventfd for asyncio.

WakeWord (64 bytes in a segment: u32 seq, u32 waiters) is an event count. A consumer that found its
rings empty spins briefly (cheap when the answer is microseconds away), then announces itself in
``waiters``, re-checks the rings and sleeps on ``seq``; a producer that pushed checks ``waiters``
after a full fence and only then pays for a syscall. The fence pair closes the store-buffer race: a
producer either sees the waiter, or the waiter's re-check sees the push.

EventNotifier is the same idea for an asyncio consumer: the flag ``armed`` lives in shared memory,
the eventfd is registered with ``loop.add_reader``; a producer writes the eventfd only when it flips
``armed`` from 1 to 0, so a burst of completions costs one write.
"""

import os

from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free

from ext.layout cimport (
    eng_ring_header_t, eng_load_acquire_u64, eng_load_acquire_u32, eng_store_seqcst_u32,
    eng_store_release_u32, eng_fetch_add_u32, eng_exchange_u32, eng_fence_seqcst, eng_cpu_relax,
    eng_futex_wait, eng_futex_wake, eng_monotonic_ns,
)
from ext.ring cimport Ring, ring_nonempty
from ext.segment cimport Segment

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "sched.h" nogil:
    int sched_yield()

cdef extern from "unistd.h" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t count)
    ssize_t c_read "read"(int fd, void *buf, size_t count)

WORD_SIZE = 64
cdef enum:
    INT_MAX = 2147483647


cdef class WakeWord:
    """Event count a worker sleeps on; producers call `notify()` after pushing."""

    cdef readonly Segment segment
    cdef readonly Py_ssize_t offset
    cdef uint32_t *seq
    cdef uint32_t *waiters
    cdef object _hold

    def __init__(self, Segment segment, Py_ssize_t offset):
        segment.check_range(offset, WORD_SIZE, 64)
        if not segment.writable:
            raise PermissionError("a wake word needs a writable mapping")
        self.segment = segment
        self._hold = segment.buffer()  # seq/waiters point into the mapping: keep it mapped
        self.offset = offset
        self.seq = <uint32_t *> (segment.data + offset)
        self.waiters = <uint32_t *> (segment.data + offset + 4)

    cdef inline void c_notify(self) noexcept nogil:
        eng_fence_seqcst()
        if eng_load_acquire_u32(self.waiters):
            eng_fetch_add_u32(self.seq, 1)
            eng_futex_wake(self.seq, INT_MAX)

    def notify(self):
        """Wake the consumer if it sleeps (one fence and one load when it does not)."""
        self.c_notify()

    def wake(self):
        """Wake unconditionally (shutdown, control messages)."""
        eng_fetch_add_u32(self.seq, 1)
        eng_futex_wake(self.seq, INT_MAX)

    @property
    def sleeping(self):
        return eng_load_acquire_u32(self.waiters) != 0

    def wait(self, double timeout_s):
        """Sleep until the next `wake()`/`notify()` or the timeout (no ring check)."""
        cdef uint32_t s = eng_load_acquire_u32(self.seq)
        eng_store_seqcst_u32(self.waiters, 1)
        eng_fence_seqcst()
        cdef int64_t tmo = <int64_t> (timeout_s * 1e9) if timeout_s >= 0 else -1
        with nogil:
            eng_futex_wait(self.seq, s, tmo)
        eng_store_release_u32(self.waiters, 0)

    def doze(self, double timeout_s):
        """Sleep up to ``timeout_s`` without announcing a waiter: producers' `notify()` does not wake
        the sleeper (and costs them no syscall), only `wake()` does. For a consumer that already
        holds work it chose to delay (a batch waiting for companions): arrivals join at the timeout."""
        cdef uint32_t s = eng_load_acquire_u32(self.seq)
        cdef int64_t tmo = <int64_t> (timeout_s * 1e9) if timeout_s > 0 else 0
        if tmo <= 0:
            return
        with nogil:
            eng_futex_wait(self.seq, s, tmo)


def wait_rings(WakeWord word, rings, double spin_s, double timeout_s):
    """Wait until any of ``rings`` is non-empty: spin for ``spin_s``, then sleep on ``word``.

    Returns True when a ring holds something, False on timeout. The GIL is released throughout, so
    other threads of the process (heartbeats) keep running.
    """
    cdef Py_ssize_t n = len(rings), i
    cdef eng_ring_header_t **hdrs = <eng_ring_header_t **> malloc((n if n > 0 else 1) * sizeof(void *))
    if hdrs == NULL:
        raise MemoryError()
    for i in range(n):
        hdrs[i] = (<Ring?> rings[i]).hdr
    cdef uint64_t now = eng_monotonic_ns()
    cdef uint64_t spin_end = now + <uint64_t> (spin_s * 1e9 if spin_s > 0 else 0)
    cdef uint64_t deadline = now + <uint64_t> (timeout_s * 1e9 if timeout_s > 0 else 0)
    cdef bint found = False
    cdef uint32_t s
    cdef int k
    cdef int64_t left
    try:
        with nogil:
            # phase 1 (skipped for spin_s <= 0: phase 2 checks the rings before it sleeps anyway):
            # spin, yielding the core each round. A peer that shares this core (an oversubscribed
            # machine) gets to run at once; with bare pauses it waited out the whole spin, and round
            # trips took 2 x spin_s (~120 us instead of ~5 us at 50 us spins). A yield with nothing
            # else to run returns at once: peers on separate cores still meet in ~2 us.
            while spin_s > 0:
                for i in range(n):
                    if ring_nonempty(hdrs[i]):
                        found = True
                        break
                if found:
                    break
                for k in range(8):
                    eng_cpu_relax()
                sched_yield()
                if eng_monotonic_ns() >= spin_end:
                    break
            # phase 2: block on the event count
            while not found:
                s = eng_load_acquire_u32(word.seq)
                eng_store_seqcst_u32(word.waiters, 1)
                eng_fence_seqcst()  # order matters: announce, then re-check (pairs with c_notify)
                for i in range(n):
                    if ring_nonempty(hdrs[i]):
                        found = True
                        break
                if found:
                    break
                now = eng_monotonic_ns()
                if now >= deadline:
                    break
                left = <int64_t> (deadline - now)
                eng_futex_wait(word.seq, s, left)
            eng_store_release_u32(word.waiters, 0)
    finally:
        free(hdrs)
    return found


def eventfd_open():
    """A new non-blocking, close-on-exec eventfd (the supervisor passes it to children explicitly)."""
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd < 0:
        e = errno
        raise OSError(e, f"eventfd failed: {os.strerror(e)}")
    return fd


cdef class EventNotifier:
    """An eventfd plus a shared ``armed`` flag: producer side `signal()`, consumer side `arm()`/`drain()`."""

    cdef readonly Segment segment
    cdef readonly Py_ssize_t offset
    cdef readonly int fd
    cdef uint32_t *armed
    cdef object _hold

    def __init__(self, Segment segment, Py_ssize_t offset, int fd):
        segment.check_range(offset, 4, 4)
        if not segment.writable:
            raise PermissionError("a notifier needs a writable mapping")
        self.segment = segment
        self._hold = segment.buffer()  # armed points into the mapping: keep it mapped
        self.offset = offset
        self.fd = fd
        self.armed = <uint32_t *> (segment.data + offset)

    cdef inline int c_signal(self) noexcept nogil:
        cdef uint64_t one = 1
        eng_fence_seqcst()
        if eng_load_acquire_u32(self.armed) and eng_exchange_u32(self.armed, 0):
            c_write(self.fd, &one, 8)
            return 1
        return 0

    def signal(self):
        """Producer: wake the consumer if it is armed; returns True when a write happened."""
        return self.c_signal() == 1

    def arm(self):
        """Consumer: ask for a wake-up at the next signal. Re-check the rings after arming."""
        eng_store_seqcst_u32(self.armed, 1)
        eng_fence_seqcst()

    def disarm(self):
        eng_store_release_u32(self.armed, 0)

    @property
    def is_armed(self):
        return eng_load_acquire_u32(self.armed) != 0

    def drain(self):
        """Consumer: reset the eventfd counter; returns the count read (0 when nothing was pending)."""
        cdef uint64_t value = 0
        cdef ssize_t rc
        with nogil:
            rc = c_read(self.fd, &value, 8)
        return value if rc == 8 else 0

    def fileno(self):
        return self.fd
