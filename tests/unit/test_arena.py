"""Tests of ext.arena: buddy allocator properties (hypothesis), view/put bounds, reader and tensor views."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ext.arena import ARENA_HEADER_SIZE, Arena, ArenaFull, arena_payload_size, segment_size_for
from ext.segment import KIND_ARENA, Segment

MakeSegment = Callable[..., Segment]
MiB = 1 << 20
ARENA_BYTES = 64 * MiB
MAX_BLOCK = 16 * MiB
MIN_BLOCK = 256


def make_arena(segment_factory: MakeSegment, payload: int = 4 * MiB, max_block: int = MiB) -> Arena:
    seg = segment_factory(segment_size_for(payload, max_block), KIND_ARENA)
    return Arena.format(seg, MIN_BLOCK, max_block)


def block_for(nbytes: int) -> int:
    return max(MIN_BLOCK, 1 << (max(nbytes, 1) - 1).bit_length())


# sizes from 64 B to 16 MiB, spread evenly over the powers of two in between, with extra large ones so
# that the arena runs full (and fragmented) often
sizes = st.one_of(
    st.integers(6, 24).flatmap(lambda k: st.integers(max(64, (1 << (k - 1)) + 1), 1 << k)),
    st.integers(2 * MiB, MAX_BLOCK),
)


class BuddyMachine(RuleBasedStateMachine):
    """Random alloc/free sequences on a 64 MiB arena, checked against a model of the live regions."""

    def __init__(self) -> None:
        super().__init__()
        self.seg = Segment.create(segment_size_for(ARENA_BYTES, MAX_BLOCK), KIND_ARENA)
        self.arena = Arena.format(self.seg, MIN_BLOCK, MAX_BLOCK)
        self.starts: list[int] = []  # sorted offsets of live regions
        self.live: dict[int, tuple[int, int]] = {}  # offset -> (requested bytes, block bytes)
        self.freed: list[int] = []

    def teardown(self) -> None:
        self.arena.close()
        self.seg.close()
        self.seg.unlink()

    def _fits_somewhere(self, block: int) -> bool:
        """Whether an aligned ``block``-sized range lies entirely in free space (the model's view)."""
        prev_end = 0
        for start in [*self.starts, self.arena.payload_size]:
            aligned = -(-prev_end // block) * block
            if aligned + block <= start:
                return True
            if start < self.arena.payload_size:
                prev_end = start + self.live[start][1]
        return False

    def _tag(self, offset: int) -> np.ndarray:
        return np.frombuffer(offset.to_bytes(8, "little") * 2, np.uint8)

    @rule(nbytes=sizes)
    def alloc(self, nbytes: int) -> None:
        block = block_for(nbytes)
        offset = self.arena.try_alloc(nbytes)
        event("alloc: full" if offset < 0 else "alloc: ok")
        if offset < 0:
            # with full coalescing, a buddy allocator fails only when no aligned free block exists
            assert not self._fits_somewhere(block), f"alloc({nbytes}) failed with room left"
            return
        assert offset % block == 0 and offset + nbytes <= self.arena.payload_size
        assert self.arena.block_size(offset) == block
        i = bisect.bisect(self.starts, offset)
        if i > 0:
            left = self.starts[i - 1]
            assert left + self.live[left][1] <= offset, "overlaps the region before it"
        if i < len(self.starts):
            assert offset + block <= self.starts[i], "overlaps the region after it"
        self.starts.insert(i, offset)
        self.live[offset] = (nbytes, block)
        # tag both ends: a free-list link written into a live block would show up at free time
        self.arena.write(offset, self._tag(offset))
        self.arena.write(offset + nbytes - 16, self._tag(offset))

    @precondition(lambda self: bool(self.starts))
    @rule(pick=st.integers(0, 1 << 30))
    def free(self, pick: int) -> None:
        offset = self.starts.pop(pick % len(self.starts))
        nbytes, _ = self.live.pop(offset)
        tag = self._tag(offset)
        assert np.array_equal(self.arena.view(offset, 16), tag)
        assert np.array_equal(self.arena.view(offset + nbytes - 16, 16), tag)
        self.arena.free(offset)
        self.freed.append(offset)

    @precondition(lambda self: bool(self.freed))
    @rule(pick=st.integers(0, 1 << 30))
    def double_free_is_refused(self, pick: int) -> None:
        offset = self.freed[pick % len(self.freed)]
        if offset in self.live:  # handed out again since: not a double free
            return
        with pytest.raises(ValueError):
            self.arena.free(offset)

    @rule(offset=st.integers(0, ARENA_BYTES + MiB))
    def bad_offsets_are_refused(self, offset: int) -> None:
        if offset in self.live:
            return
        with pytest.raises(ValueError):
            self.arena.free(offset)

    @precondition(lambda self: len(self.starts) >= 4)
    @rule()
    def free_everything_coalesces(self) -> None:
        event(f"drain with {len(self.starts) // 10 * 10}+ live regions")
        for offset in list(self.starts):
            self.arena.free(offset)
        self.starts.clear()
        self.live.clear()
        assert self.arena.bytes_in_use == 0 and self.arena.allocations == 0
        # no leak and full coalescing: the whole arena is max-sized blocks again
        tops = [self.arena.alloc(MAX_BLOCK) for _ in range(ARENA_BYTES // MAX_BLOCK)]
        assert sorted(tops) == list(range(0, ARENA_BYTES, MAX_BLOCK))
        assert self.arena.try_alloc(MIN_BLOCK) == -1
        for offset in tops:
            self.arena.free(offset)
        assert self.arena.bytes_in_use == 0

    @invariant()
    def consistent(self) -> None:
        free_b, used_b = self.arena.check_consistency()
        expected = sum(block for _, block in self.live.values())
        assert used_b == expected == self.arena.bytes_in_use
        assert free_b + used_b == self.arena.payload_size
        assert self.arena.allocations == len(self.live)
        assert self.arena.high_water >= used_b


BuddyMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=80, deadline=None)
TestBuddyMachine = BuddyMachine.TestCase


# ---- allocator edge cases -------------------------------------------------------------------------


def test_format_geometry(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory, 4 * MiB, MiB)
    assert arena.allocator and arena.payload_size == 4 * MiB and arena.max_block == MiB
    assert arena.min_block == MIN_BLOCK and arena.bytes_in_use == 0
    assert arena_payload_size(ARENA_HEADER_SIZE + 4 * MiB + 100, MiB) == 4 * MiB
    assert arena.check_consistency() == (4 * MiB, 0)


@pytest.mark.parametrize(("min_block", "max_block"), [(32, MiB), (300, MiB), (256, 3 * MiB), (MiB, 256)])
def test_format_rejects_bad_block_sizes(segment_factory: MakeSegment, min_block: int, max_block: int) -> None:
    seg = segment_factory(segment_size_for(4 * MiB, 4 * MiB), KIND_ARENA)
    with pytest.raises(ValueError):
        Arena.format(seg, min_block, max_block)


def test_attach_needs_a_formatted_arena(segment_factory: MakeSegment) -> None:
    seg = segment_factory(segment_size_for(MiB, MiB), KIND_ARENA)
    with pytest.raises(ValueError, match="no formatted arena"):
        Arena.attach(seg)


def test_full_arena_and_oversized_requests(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory, 2 * MiB, MiB)
    with pytest.raises(ValueError, match="largest block"):
        arena.try_alloc(MiB + 1)
    a, b = arena.alloc(MiB), arena.alloc(MiB)
    assert arena.try_alloc(1) == -1
    with pytest.raises(ArenaFull):
        arena.alloc(1)
    arena.free(a)
    arena.free(b)
    off = arena.alloc(0)  # a zero-byte request still gets a (minimum) block
    assert arena.block_size(off) == MIN_BLOCK and arena.bytes_in_use == MIN_BLOCK


def test_double_free_and_bad_offsets_raise(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    off = arena.alloc(1000)
    other = arena.alloc(1000)
    for bad in (off + 1, off + MIN_BLOCK, arena.payload_size, (1 << 64) - 1):
        with pytest.raises(ValueError):
            arena.free(bad)
    with pytest.raises(ValueError):
        arena.block_size(off + 8)
    arena.free(off)
    with pytest.raises(ValueError):
        arena.free(off)
    assert arena.check_consistency() == (arena.payload_size - 1024, 1024)
    arena.free(other)
    assert arena.bytes_in_use == 0


def test_reset_frees_everything(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    for n in (100, 5000, 70_000, MiB):
        arena.alloc(n)
    arena.reset()
    assert arena.bytes_in_use == 0 and arena.allocations == 0
    assert arena.check_consistency() == (arena.payload_size, 0)
    assert arena.alloc(MiB) == 0


# ---- views, bounds ----------------------------------------------------------------------------------


def test_view_bounds(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    size = arena.payload_size
    assert arena.view(size - 16, 16).shape == (16,)
    assert arena.view(size, 0).shape == (0,)
    forged: list[tuple[int, int | tuple[int, ...]]] = [
        (size, 1),
        (size - 15, 16),
        (0, size + 1),
        (1 << 62, 1),
        ((1 << 64) - 1, 1),
        ((1 << 64) - 8, 16),  # offset + length wraps around 2**64
        (0, (1 << 62, 1 << 62)),  # element count overflows 64 bits
        (0, (1 << 21, 1 << 21, 1 << 21)),
        (8, ((1 << 63) - 1,)),
    ]
    for offset, shape in forged:
        with pytest.raises(IndexError):
            arena.view(offset, shape)
    with pytest.raises(IndexError):
        arena.view(0, (size // 8 + 1,), np.float64)  # fits in elements, not in bytes
    with pytest.raises(ValueError, match="negative"):
        arena.view(0, (4, -1))
    with pytest.raises(ValueError, match="aligned"):
        arena.view(4, 2, np.float64)
    with pytest.raises(ValueError, match="dimensions"):
        arena.view(0, (1,) * 33)
    for shape in ((1 << 63,), ((1 << 64) - 1,), (1 << 64,), (2, -(1 << 70))):  # beyond a C dimension
        with pytest.raises(IndexError):
            arena.view(0, shape)
    # descriptor fields popped into a DESC_DTYPE array arrive as numpy scalars
    assert arena.view(np.uint64(64), np.uint64(8)).shape == (8,)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        arena.view(-1, 1)
    with pytest.raises(TypeError):
        arena.view(0, 4, object)  # object pointers can never come from shared memory
    with pytest.raises(TypeError):
        arena.view(0, 1, np.dtype([("a", np.int64), ("b", object)]))
    # and the arena is still fine afterwards
    assert arena.view(64, (2, 3), np.int32).shape == (2, 3)


def test_zero_dims_with_huge_siblings_do_not_crash(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    for shape in ((0, 1 << 62), (0, (1 << 63) - 1, 4)):
        try:
            view = arena.view(0, shape)
        except (IndexError, ValueError):
            continue  # numpy may refuse the shape: either way nothing is read
        assert view.size == 0


def test_put_returns_an_equal_view_and_checks_bounds(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    src = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    off = arena.alloc(src.nbytes)
    view = arena.put(off, src)
    assert view.dtype == src.dtype and view.shape == src.shape and np.array_equal(view, src)
    assert not np.shares_memory(view, src)
    assert np.shares_memory(view, arena.view(off, src.nbytes))
    strided = np.arange(20, dtype=np.int64)[::2]  # not contiguous: packed on the way in
    assert np.array_equal(arena.put(off, strided), strided)
    assert arena.write(off, b"abc") == 3 and bytes(arena.view(off, 3)) == b"abc"

    size = arena.payload_size
    tail = arena.view(size - 64, 64)
    tail[:] = 7
    for offset in (size - 8, size, (1 << 64) - 8):
        with pytest.raises(IndexError):
            arena.put(offset, np.ones(16, np.uint8))
        with pytest.raises(IndexError):
            arena.write(offset, b"x" * 16)
    assert (tail == 7).all()  # a refused put wrote nothing
    with pytest.raises(TypeError):
        arena.put(off, np.array([object()]))


def test_reader_views_are_read_only_and_shared(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    off = arena.alloc(64)
    arena.put(off, np.arange(16, dtype=np.int32))
    seg = Segment.attach(arena.segment.name, KIND_ARENA, writable=False)
    try:
        reader = Arena.attach(seg)
        assert not reader.allocator and reader.payload_size == arena.payload_size
        view = reader.view(off, 16, np.int32)
        assert view.tolist() == list(range(16)) and not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1
        arena.view(off, 16, np.int32)[0] = 99  # the allocator's write shows through
        assert view[0] == 99
        assert reader.bytes_in_use == arena.bytes_in_use
        for call in (
            lambda: reader.alloc(64),
            lambda: reader.free(off),
            lambda: reader.write(off, b"x"),
            lambda: reader.put(off, np.zeros(1)),
            reader.check_consistency,
        ):
            with pytest.raises(PermissionError):
                call()
        with pytest.raises(IndexError):
            reader.view(reader.payload_size, 1)
    finally:
        seg.close()


def test_tensor_shares_memory(segment_factory: MakeSegment) -> None:
    torch = pytest.importorskip("torch")
    arena = make_arena(segment_factory)
    off = arena.alloc(64)
    tensor = arena.tensor(off, (4, 4), np.float32)
    array = arena.view(off, (4, 4), np.float32)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (4, 4)
    array[1, 2] = 7.5
    assert tensor[1, 2].item() == 7.5
    tensor[3, 3] = -1.0
    assert array[3, 3] == -1.0
    with pytest.raises(IndexError):
        arena.tensor(arena.payload_size - 32, (4, 4), np.float32)


def test_views_outlive_close(segment_factory: MakeSegment) -> None:
    arena = make_arena(segment_factory)
    off = arena.alloc(64)
    view = arena.put(off, np.arange(8, dtype=np.int64))
    arena.close()
    arena.close()
    arena.segment.close()
    assert view.tolist() == list(range(8))  # still mapped: the view holds it
    for call in (lambda: arena.view(off, 8), lambda: arena.alloc(64), lambda: arena.bytes_in_use):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert "closed" in repr(arena)
