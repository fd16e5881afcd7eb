"""Tests of ext.ring: FIFO order, wrap-around, full/empty, bursts, epoch reset, attach validation."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from ext.ring import DESC_DTYPE, HEADER_SIZE, MAX_CAPACITY, Ring, ring_footprint
from ext.segment import KIND_TEST, Segment

MakeSegment = Callable[..., Segment]
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


def make_ring(segment_factory: MakeSegment, capacity: int, offset: int = 0) -> Ring:
    seg = segment_factory(offset + ring_footprint(capacity))
    return Ring.create(seg, offset, capacity)


def descs(start: int, n: int) -> np.ndarray:
    """A burst whose req_id counts up from ``start`` (and other fields derive from it)."""
    out = np.zeros(n, DESC_DTYPE)
    ids = np.arange(start, start + n, dtype=np.uint64)
    out["req_id"] = ids
    out["offset"] = ids * 64
    out["aux"] = ids ^ 0xA5A5
    out["kind"] = 1
    out["gen"] = 3
    return out


def test_footprint_and_fresh_state(segment_factory: MakeSegment) -> None:
    assert ring_footprint(8) == HEADER_SIZE + 8 * 64 == 192 + 512
    ring = make_ring(segment_factory, 8)
    assert ring.capacity == 8 and len(ring) == 0 and ring.is_empty() and not ring.is_full()
    assert ring.head == ring.tail == ring.epoch == 0
    assert ring.pop() is None
    assert ring.pop_into(np.zeros(4, DESC_DTYPE)) == 0
    assert len(ring.pop_burst(4)) == 0


def test_every_field_round_trips(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 4)
    values = dict(
        kind=U32_MAX, model=7, req_id=U64_MAX, offset=1 << 40, length=U64_MAX - 1, deadline_ns=123,
        aux=1 << 63, aux2=5, status=U32_MAX - 1, gen=9,
    )  # fmt: skip
    assert ring.push(**values)
    assert ring.pop() == tuple(values.values())
    assert ring.push(**values)
    (row,) = ring.pop_burst(1).tolist()
    assert dict(zip(DESC_DTYPE.names or (), row, strict=True)) == values
    with pytest.raises(OverflowError):
        ring.push(kind=U32_MAX + 1, model=0, req_id=0)


def test_fifo_full_and_empty(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 8)
    for i in range(8):
        assert ring.push(1, 0, i)
    assert ring.is_full() and len(ring) == 8
    assert not ring.push(1, 0, 99)  # full: nothing written
    assert len(ring) == 8
    popped = [ring.pop() for _ in range(8)]
    assert [d[2] for d in popped if d is not None] == list(range(8))
    assert ring.is_empty() and ring.pop() is None


def test_wraps_around_many_times(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 8)
    sent = received = 0
    for round_ in range(2_000):
        for _ in range(1 + round_ % 8):  # vary the fill so every slot boundary gets crossed
            assert ring.push(2, 0, sent, aux=sent * 3)
            sent += 1
        while (d := ring.pop()) is not None:
            assert d[2] == received and d[6] == received * 3
            received += 1
    assert sent == received > 8 * 1_000
    assert ring.head == ring.tail == sent  # indices count up forever


def test_burst_wraps_in_the_middle(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 16)
    for i in range(12):  # move head and tail to slot 12
        ring.push(1, 0, i)
    assert ring.pop_into(np.zeros(12, DESC_DTYPE)) == 12
    burst = descs(100, 10)  # slots 12..15 then 0..5
    assert ring.push_burst(burst) == 10
    out = np.zeros(10, DESC_DTYPE)
    assert ring.pop_into(out) == 10
    assert np.array_equal(out, burst)


def test_partial_bursts_when_nearly_full(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 16)
    assert ring.push_burst(descs(0, 13)) == 13
    assert ring.push_burst(descs(13, 10)) == 3  # only what fits
    assert ring.is_full()
    assert ring.push_burst(descs(16, 4)) == 0
    out = np.zeros(5, DESC_DTYPE)
    assert ring.pop_into(out) == 5
    assert out["req_id"].tolist() == list(range(5))
    assert ring.push_burst(descs(16, 10)) == 5  # the freed slots, across the wrap
    rest = ring.pop_burst(100)
    assert rest["req_id"].tolist() == list(range(5, 21))
    assert ring.pop_into(out) == 0


def test_burst_argument_checks(segment_factory: MakeSegment) -> None:
    ring = make_ring(segment_factory, 8)
    with pytest.raises(TypeError):
        ring.push_burst(np.zeros(4, np.uint64))
    with pytest.raises(TypeError):
        ring.push_burst(descs(0, 8)[::2])
    with pytest.raises(TypeError):
        ring.push_burst(np.zeros((2, 2), DESC_DTYPE))
    frozen = np.zeros(4, DESC_DTYPE)
    frozen.flags.writeable = False
    with pytest.raises(TypeError):
        ring.pop_into(frozen)
    with pytest.raises(ValueError):
        ring.pop_burst(-1)
    assert ring.push_burst(np.zeros(0, DESC_DTYPE)) == 0


def test_producer_and_consumer_views_agree(segment_factory: MakeSegment) -> None:
    seg = segment_factory(ring_footprint(8))
    producer = Ring.create(seg, 0, 8)
    consumer = Ring.attach(seg, 0)
    for i in range(40):
        assert producer.push(1, 0, i)
        assert len(consumer) == 1
        assert consumer.pop() == (1, 0, i, 0, 0, 0, 0, 0, 0, 0)
    assert producer.push_burst(descs(0, 8)) == 8
    assert not producer.push(1, 0, 8)  # the producer's cached tail refreshes only when it looks full
    assert consumer.pop_into(np.zeros(3, DESC_DTYPE)) == 3
    assert producer.push_burst(descs(8, 8)) == 3


def test_matches_a_deque_oracle(segment_factory: MakeSegment, rng: np.random.Generator) -> None:
    ring = make_ring(segment_factory, 32)
    oracle: deque[int] = deque()
    next_id = 0
    for _ in range(5_000):
        op = rng.integers(4)
        if op == 0:
            ok = ring.push(1, 0, next_id)
            assert ok == (len(oracle) < 32)
            if ok:
                oracle.append(next_id)
                next_id += 1
        elif op == 1:
            n = int(rng.integers(0, 40))
            pushed = ring.push_burst(descs(next_id, n))
            assert pushed == min(n, 32 - len(oracle))
            oracle.extend(range(next_id, next_id + pushed))
            next_id += pushed
        elif op == 2:
            d = ring.pop()
            assert (d[2] if d else None) == (oracle.popleft() if oracle else None)
        else:
            out = np.zeros(int(rng.integers(0, 40)), DESC_DTYPE)
            n = ring.pop_into(out)
            assert out["req_id"][:n].tolist() == [oracle.popleft() for _ in range(n)]
        assert len(ring) == len(oracle)
        assert ring.is_full() == (len(oracle) == 32) and ring.is_empty() == (not oracle)


def test_reset_discards_and_bumps_the_epoch(segment_factory: MakeSegment) -> None:
    seg = segment_factory(ring_footprint(8))
    producer = Ring.create(seg, 0, 8)
    consumer = Ring.attach(seg, 0)
    assert producer.push_burst(descs(0, 8)) == 8
    consumer.pop()
    head = consumer.head
    consumer.reset()  # the producer "died" with 7 queued
    assert consumer.epoch == producer.epoch == 1
    assert consumer.tail == consumer.head == head == 8  # tail jumps to head: never backwards
    assert consumer.is_empty() and consumer.pop() is None
    # a new producer incarnation attaches and the ring works as before
    fresh = Ring.attach(seg, 0)
    assert fresh.push_burst(descs(100, 8)) == 8
    assert consumer.pop_burst(8)["req_id"].tolist() == list(range(100, 108))
    # the old producer object also recovers: its cached tail refreshes when the ring looks full
    assert producer.push(1, 0, 200)
    assert consumer.pop() == (1, 0, 200, 0, 0, 0, 0, 0, 0, 0)
    consumer.reset()
    assert consumer.epoch == 2


@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 100, MAX_CAPACITY * 2])
def test_capacity_must_be_a_power_of_two(segment_factory: MakeSegment, capacity: int) -> None:
    seg = segment_factory(1 << 16)
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(seg, 0, capacity)


def test_create_checks_room_and_alignment(segment_factory: MakeSegment) -> None:
    seg = segment_factory(ring_footprint(8))
    with pytest.raises(IndexError):
        Ring.create(seg, 0, 16)  # does not fit
    with pytest.raises(IndexError):
        Ring.create(seg, 64, 8)
    with pytest.raises(ValueError, match="aligned"):
        Ring.create(seg, 8, 2)
    with pytest.raises(IndexError):
        Ring.create(seg, -64, 2)


def test_attach_rejects_bad_offsets_without_crashing(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    Ring.create(seg, 0, 8)
    with pytest.raises(ValueError, match="no ring"):
        Ring.attach(seg, 1024)  # zeroed memory: no ring was created there
    with pytest.raises(ValueError, match="no ring"):
        Ring.attach(seg, 64)  # inside the ring, not at its start
    with pytest.raises(ValueError, match="aligned"):
        Ring.attach(seg, 32)
    for offset in (-64, 4096, 4096 - 64, 1 << 40, (1 << 63) - 64):
        with pytest.raises(IndexError):
            Ring.attach(seg, offset)


def test_attach_rejects_forged_headers(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    Ring.create(seg, 0, 8)
    seg.store_u64(8, (64 << 32) | 7)  # capacity 7: not a power of two
    with pytest.raises(ValueError, match="corrupt"):
        Ring.attach(seg, 0)
    seg.store_u64(8, (64 << 32) | (1 << 20))  # a capacity whose slots run past the segment
    with pytest.raises(IndexError):
        Ring.attach(seg, 0)
    seg.store_u64(8, (32 << 32) | 8)  # wrong slot size
    with pytest.raises(ValueError, match="corrupt"):
        Ring.attach(seg, 0)


def test_a_ring_needs_a_writable_mapping(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    Ring.create(seg, 0, 8)
    reader = Segment.attach(seg.name, KIND_TEST, writable=False)
    try:
        with pytest.raises(PermissionError):
            Ring.attach(reader, 0)
    finally:
        reader.close()


def test_ring_keeps_its_mapping_after_segment_close() -> None:
    seg = Segment.create(ring_footprint(8), KIND_TEST)
    try:
        ring = Ring.create(seg, 0, 8)
        seg.close()
        assert ring.push(1, 0, 5)  # the ring still holds the mapping: no use after unmap
        assert ring.pop() == (1, 0, 5, 0, 0, 0, 0, 0, 0, 0)
    finally:
        seg.close()
        seg.unlink()
