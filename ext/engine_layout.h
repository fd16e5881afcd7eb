/* The one binary layout of every shared-memory segment the engine creates. Bump ENG_LAYOUT_VERSION
 * whenever any struct below changes: attach refuses a segment of another version.
 *
 * Segment (created by the supervisor, POSIX shm, mode 0600, unguessable name):
 *
 *   0            64                                    4096                               size
 *   +------------+-------------------------------------+----------------------------------+
 *   | SegHeader  | (reserved, zero)                    | data area (rings / arena / board)|
 *   +------------+-------------------------------------+----------------------------------+
 *
 * Ring (SPSC, in a segment's data area at a 64-byte aligned offset):
 *
 *   +0    RingHeader.meta    (magic, capacity, slot size, epoch)   read-mostly line
 *   +64   RingHeader.head    next slot the producer writes         written by the producer only
 *   +128  RingHeader.tail    next slot the consumer reads          written by the consumer only
 *   +192  Desc[capacity]     64-byte descriptor slots
 *
 *   head and tail count up forever (u64); slot = index & (capacity - 1). Empty: head == tail;
 *   full: head - tail == capacity. The producer writes a slot, then publishes it with a release store
 *   of head; the consumer reads head with acquire, copies the slot, then frees it with a release
 *   store of tail. A reset (only while the peer is dead) sets tail = head and bumps the epoch, so
 *   indices stay monotonic and no side ever sees them move backwards.
 *
 * Arena (a segment's data area): ArenaHeader at data offset 0, payload blocks from ENG_ARENA_PAYLOAD.
 */
#ifndef ENGINE_LAYOUT_H
#define ENGINE_LAYOUT_H

#include <stdint.h>

#define ENG_SEG_MAGIC 0x314d485345495345ULL   /* "ESIESHM1" little-endian */
#define ENG_LAYOUT_VERSION 1u
#define ENG_SEG_HEADER_SIZE 4096u
#define ENG_CACHE_LINE 64u

#define ENG_RING_MAGIC 0x31474e4952454953ULL  /* "SIERING1" */
#define ENG_ARENA_MAGIC 0x314e455241454953ULL /* "SIEAREN1" */
#define ENG_ARENA_PAYLOAD 4096u

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t kind;          /* what the data area holds; see ext.segment.KIND_* */
    uint64_t size;          /* whole mapping, header included */
    uint64_t creator_pid;
    uint64_t created_ns;    /* CLOCK_REALTIME at creation */
    uint64_t reserved[3];
} eng_seg_header_t;

typedef struct {
    uint64_t req_id;
    uint64_t offset;        /* payload region, relative to the owning arena's payload */
    uint64_t length;
    uint64_t deadline_ns;   /* CLOCK_MONOTONIC, 0 = none */
    uint64_t aux;
    uint64_t aux2;
    uint32_t kind;
    uint32_t model;
    uint32_t status;
    uint32_t gen;           /* generation of the sender's incarnation */
} eng_desc_t;

typedef struct {
    uint64_t magic;
    uint32_t capacity;
    uint32_t slot_size;
    volatile uint64_t epoch;
    uint8_t _pad0[ENG_CACHE_LINE - 24];
    volatile uint64_t head;
    uint8_t _pad1[ENG_CACHE_LINE - 8];
    volatile uint64_t tail;
    uint8_t _pad2[ENG_CACHE_LINE - 8];
} eng_ring_header_t;

typedef struct {
    uint64_t magic;
    uint64_t payload_size;  /* bytes of payload, a multiple of max_block */
    uint32_t min_block;
    uint32_t max_order;     /* max_block = min_block << max_order */
    volatile uint64_t bytes_in_use;   /* written by the owner, read by anyone (metrics) */
    volatile uint64_t allocations;
    volatile uint64_t high_water;
} eng_arena_header_t;

#endif
