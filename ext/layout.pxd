# cython: language_level=3
"""C declarations of the shared-memory layout (drawn in engine_layout.h) and the atomics."""

from libc.stdint cimport uint32_t, uint64_t, int64_t, uint8_t

cdef extern from "engine_layout.h" nogil:
    uint64_t ENG_SEG_MAGIC
    uint32_t ENG_LAYOUT_VERSION
    uint32_t ENG_SEG_HEADER_SIZE
    uint32_t ENG_CACHE_LINE
    uint64_t ENG_RING_MAGIC
    uint64_t ENG_ARENA_MAGIC
    uint32_t ENG_ARENA_PAYLOAD

    ctypedef struct eng_seg_header_t:
        uint64_t magic
        uint32_t version
        uint32_t kind
        uint64_t size
        uint64_t creator_pid
        uint64_t created_ns

    ctypedef struct eng_desc_t:
        uint64_t req_id
        uint64_t offset
        uint64_t length
        uint64_t deadline_ns
        uint64_t aux
        uint64_t aux2
        uint32_t kind
        uint32_t model
        uint32_t status
        uint32_t gen

    ctypedef struct eng_ring_header_t:
        uint64_t magic
        uint32_t capacity
        uint32_t slot_size
        uint64_t epoch
        uint64_t head
        uint64_t tail

    ctypedef struct eng_arena_header_t:
        uint64_t magic
        uint64_t payload_size
        uint32_t min_block
        uint32_t max_order
        uint64_t bytes_in_use
        uint64_t allocations
        uint64_t high_water

cdef extern from "engine_atomic.h" nogil:
    uint64_t eng_load_acquire_u64(const uint64_t *p)
    uint64_t eng_load_relaxed_u64(const uint64_t *p)
    void eng_store_release_u64(uint64_t *p, uint64_t v)
    uint64_t eng_fetch_add_u64(uint64_t *p, uint64_t v)
    int eng_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired)
    uint32_t eng_load_acquire_u32(const uint32_t *p)
    void eng_store_release_u32(uint32_t *p, uint32_t v)
    void eng_store_seqcst_u32(uint32_t *p, uint32_t v)
    uint32_t eng_load_seqcst_u32(const uint32_t *p)
    uint32_t eng_fetch_add_u32(uint32_t *p, uint32_t v)
    uint32_t eng_exchange_u32(uint32_t *p, uint32_t v)
    void eng_fence_seqcst()
    void eng_cpu_relax()
    int eng_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
    int eng_futex_wake(uint32_t *addr, int n)
    uint64_t eng_monotonic_ns()
