/* Acquire/release atomics, futex and eventfd wrappers for the Cython hot path.
 *
 * GCC __atomic builtins (also understood by clang) keep the ordering explicit at each call site; the
 * ring protocol needs only acquire loads and release stores, the wake-up protocol one seq_cst fence.
 */
#ifndef ENGINE_ATOMIC_H
#define ENGINE_ATOMIC_H

#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

static inline uint64_t eng_load_acquire_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint64_t eng_load_relaxed_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void eng_store_release_u64(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t eng_fetch_add_u64(volatile uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static inline int eng_cas_u64(volatile uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint32_t eng_load_acquire_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void eng_store_release_u32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void eng_store_seqcst_u32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t eng_load_seqcst_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline uint32_t eng_fetch_add_u32(volatile uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static inline uint32_t eng_exchange_u32(volatile uint32_t *p, uint32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}
static inline void eng_fence_seqcst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void eng_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Shared (not FUTEX_PRIVATE) futex ops: the word lives in a mapping shared between processes. */
static inline int eng_futex_wait(volatile uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == -1) return errno;
    return 0;
}
static inline int eng_futex_wake(volatile uint32_t *addr, int n) {
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline uint64_t eng_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
#endif
