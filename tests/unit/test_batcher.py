"""Tests of the dynamic batcher with a fake clock: delay, sizes, preferred sizes, groups, deadlines."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.worker.batcher import Batcher

_ids = itertools.count()


@dataclass
class Item:
    rows: int = 1
    group: Hashable = "g"
    deadline_ns: int = 0
    arrival_ns: int = 0
    id: int = field(default_factory=lambda: next(_ids))


def ids(batch: list[Item] | None) -> list[int] | None:
    return None if batch is None else [item.id for item in batch]


def test_waits_for_the_delay_then_sends() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=100)
    a = Item(arrival_ns=0)
    b.add(a)
    assert b.next_wakeup_ns() == 100
    assert b.next_batch(50) is None
    assert b.next_batch(99) is None
    assert ids(b.next_batch(100)) == [a.id]
    assert len(b) == 0 and b.rows_queued == 0
    assert b.next_wakeup_ns() is None
    assert b.next_batch(1000) is None


def test_full_batch_goes_before_the_delay() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=4, max_queue_delay_ns=1_000)
    items = [Item() for _ in range(5)]
    for item in items[:3]:
        b.add(item)
    assert b.next_batch(0) is None
    b.add(items[3])
    b.add(items[4])
    assert len(b) == 5 and b.rows_queued == 5
    assert ids(b.next_batch(1)) == [i.id for i in items[:4]]
    assert b.next_batch(2) is None
    assert ids(b.next_batch(1_000)) == [items[4].id]


def test_pipeline_rows_sends_all_queued_once_that_many_are_queued() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000, pipeline_rows=3)
    items = [Item() for _ in range(2)] + [Item(rows=2)] + [Item(rows=3) for _ in range(3)]
    b.add(items[0])
    b.add(items[1])
    assert b.next_batch(0) is None  # 2 rows: waits for companions
    assert b.next_wakeup_ns() == 1_000
    b.add(items[2])
    assert b.next_wakeup_ns() == 0  # ready now
    assert ids(b.next_batch(1)) == [i.id for i in items[:3]]  # all 4 rows, not just 3
    for item in items[3:]:
        b.add(item)
    assert ids(b.next_batch(2)) == [i.id for i in items[3:5]]  # 9 rows queued: at most max (8)
    assert ids(b.next_batch(3)) == [items[5].id]


def test_pipeline_rows_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline_rows"):
        Batcher(max_batch_size=8, max_queue_delay_ns=0, pipeline_rows=9)
    with pytest.raises(ValueError, match="pipeline_rows"):
        Batcher(max_batch_size=8, max_queue_delay_ns=0, pipeline_rows=-1)


def test_never_exceeds_max_and_never_splits() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=4, max_queue_delay_ns=10)
    first, second = Item(rows=3), Item(rows=3)
    b.add(first)
    b.add(second)
    # 6 rows queued: full, but only the first whole item fits
    assert ids(b.next_batch(0)) == [first.id]
    assert b.rows_queued == 3
    assert ids(b.next_batch(10)) == [second.id]


def test_delay_sends_everything_queued() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=10)
    items = [Item(rows=2, arrival_ns=0), Item(rows=1, arrival_ns=5), Item(rows=2, arrival_ns=9)]
    for item in items:
        b.add(item)
    assert b.next_batch(9) is None
    assert ids(b.next_batch(10)) == [i.id for i in items]


def test_rows_above_max_are_refused() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=4, max_queue_delay_ns=10)
    with pytest.raises(ValueError, match="5 rows"):
        b.add(Item(rows=5))
    with pytest.raises(ValueError):
        b.add(Item(rows=-1))
    assert len(b) == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, 0, ()), "max_batch_size"), ((4, -1, ()), "max_queue_delay_ns"), ((4, 0, (5,)), "preferred")],
)
def test_bad_settings(args: tuple[int, int, tuple[int, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Batcher(*args)


def test_preferred_sizes_send_the_largest_reachable() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000, preferred_batch_sizes=(2, 4))
    items = [Item() for _ in range(5)]
    b.add(items[0])
    assert b.next_batch(0) is None
    for item in items[1:]:
        b.add(item)
    # 5 rows queued: 4 is the largest preferred size a prefix reaches
    assert ids(b.next_batch(0)) == [i.id for i in items[:4]]
    assert b.next_batch(0) is None


def test_preferred_size_needs_an_exact_prefix() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000, preferred_batch_sizes=(4,))
    a, c = Item(rows=3), Item(rows=2)
    b.add(a)
    b.add(c)
    # prefixes are 3 and 5: neither is 4
    assert b.next_batch(0) is None
    d = Item(rows=1)
    b.add(d)
    assert b.next_batch(0) is None
    assert ids(b.next_batch(1_000)) == [a.id, c.id, d.id]


def test_preferred_sizes_after_a_partial_take() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=4, max_queue_delay_ns=100, preferred_batch_sizes=(2,))
    items = [Item(rows=3, arrival_ns=0), Item(rows=1, arrival_ns=50), Item(rows=1, arrival_ns=60)]
    b.add(items[0])
    b.add(items[1])
    # 4 rows: full
    assert ids(b.next_batch(60)) == [items[0].id, items[1].id]
    b.add(items[2])
    assert b.next_batch(61) is None
    b.add(Item(rows=1, arrival_ns=70))
    assert len(b.next_batch(70) or []) == 2


def test_groups_never_mix() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=2, max_queue_delay_ns=100)
    a1, b1, a2, b2 = Item(group="a"), Item(group="b"), Item(group="a"), Item(group="b")
    for item in (a1, b1, a2, b2):
        b.add(item)
    first, second = b.next_batch(0), b.next_batch(0)
    assert ids(first) == [a1.id, a2.id]
    assert ids(second) == [b1.id, b2.id]


def test_oldest_ready_group_goes_first() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=10)
    new, old = Item(group="new", arrival_ns=5), Item(group="old", arrival_ns=1)
    b.add(new)
    b.add(old)
    assert b.next_wakeup_ns() == 11
    assert ids(b.next_batch(20)) == [old.id]
    assert ids(b.next_batch(20)) == [new.id]


def test_oldest_of_size_ready_groups_goes_first() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=2, max_queue_delay_ns=1_000)
    lone = Item(group="lone", arrival_ns=0)
    y1, x1, x2, y2 = (Item(group=g, arrival_ns=t) for g, t in (("y", 1), ("x", 2), ("x", 3), ("y", 4)))
    for item in (lone, y1, x1, x2, y2):
        b.add(item)
    assert ids(b.next_batch(10)) == [y1.id, y2.id]
    assert ids(b.next_batch(10)) == [x1.id, x2.id]
    assert b.next_batch(10) is None


def test_expired_items_are_never_batched() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=4, max_queue_delay_ns=100)
    keep, late = Item(arrival_ns=0), Item(arrival_ns=0, deadline_ns=50)
    b.add(late)
    b.add(keep)
    assert b.next_wakeup_ns() == 50
    # next_batch moves the expired item aside even if the caller did not pop first
    assert ids(b.next_batch(100)) == [keep.id]
    assert ids(b.pop_expired(100)) == [late.id]
    assert len(b) == 0


def test_expiry_in_the_middle_keeps_the_rest_consistent() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000, preferred_batch_sizes=(3,))
    first, middle, last = Item(rows=1), Item(rows=2, deadline_ns=10), Item(rows=2)
    for item in (first, middle, last):
        b.add(item)
    assert ids(b.next_batch(0)) == [first.id, middle.id]  # 1 + 2 = 3
    b2: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000, preferred_batch_sizes=(3,))
    for item in (first, middle, last):
        b2.add(item)
    assert ids(b2.pop_expired(10)) == [middle.id]
    assert b2.rows_queued == 3
    assert ids(b2.next_batch(10)) == [first.id, last.id]  # 1 + 2 = 3 once the middle is gone


def test_max_batch_size_zero_sends_each_item_alone_at_once() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=0, max_queue_delay_ns=1_000, preferred_batch_sizes=(4,))
    x, y, z = Item(group="a", arrival_ns=3), Item(group="b", arrival_ns=1), Item(group="a", arrival_ns=4)
    for item in (x, y, z):
        b.add(item)
    assert b.next_wakeup_ns() == 1
    assert [ids(b.next_batch(5)) for _ in range(3)] == [[y.id], [x.id], [z.id]]
    assert b.next_batch(5) is None


def test_flush_one_sends_early() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=8, max_queue_delay_ns=1_000)
    assert b.flush_one(0) is None
    a, c = Item(group="a", arrival_ns=0), Item(group="c", arrival_ns=1)
    b.add(c)
    b.add(a)
    assert b.next_batch(2) is None
    assert ids(b.flush_one(2)) == [a.id]
    assert ids(b.flush_one(2)) == [c.id]


def test_fifo_within_a_group() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=3, max_queue_delay_ns=5)
    items = [Item(arrival_ns=t) for t in range(10)]
    out: list[int] = []
    for t, item in enumerate(items):
        b.add(item)
        while (batch := b.next_batch(t)) is not None:
            out.extend(ids(batch) or [])
    while (batch := b.next_batch(100)) is not None:
        out.extend(ids(batch) or [])
    assert out == [i.id for i in items]


def test_many_batched_deadlines_do_not_pile_up() -> None:
    b: Batcher[Item] = Batcher(max_batch_size=1, max_queue_delay_ns=0)
    for t in range(10_000):
        b.add(Item(arrival_ns=t, deadline_ns=10**12))
        assert b.next_batch(t) is not None
    assert len(b._deadlines) < 200  # dead heap entries are compacted away


# -- property test -----------------------------------------------------------------------------

_add = st.tuples(
    st.just("add"),
    st.integers(0, 8),  # rows (clipped to max below)
    st.sampled_from(["a", "b", "c"]),
    st.one_of(st.just(0), st.integers(1, 300)),  # deadline offset, 0 = none
)
_tick = st.tuples(st.just("tick"), st.integers(0, 200), st.just(""), st.just(0))
_flush = st.tuples(st.just("flush"), st.just(0), st.just(""), st.just(0))


@settings(max_examples=300, deadline=None)
@given(
    max_batch_size=st.sampled_from([0, 1, 4, 8]),
    delay=st.integers(0, 150),
    preferred=st.lists(st.integers(1, 8), max_size=3),
    pipeline=st.integers(0, 8),
    ops=st.lists(st.one_of(_add, _tick, _flush), max_size=80),
)
def test_every_item_comes_out_exactly_once(
    max_batch_size: int,
    delay: int,
    preferred: list[int],
    pipeline: int,
    ops: list[tuple[str, int, str, int]],
) -> None:
    preferred = [p for p in preferred if p <= max_batch_size]
    b: Batcher[Item] = Batcher(max_batch_size, delay, preferred, min(pipeline, max_batch_size))
    now = 0
    added: dict[int, Item] = {}
    seen: list[int] = []
    last_in_group: dict[Hashable, int] = {}

    def check(batch: list[Item]) -> None:
        assert batch
        assert len({item.group for item in batch}) == 1
        assert sum(item.rows for item in batch) <= max(max_batch_size, 1)
        if max_batch_size == 0:
            assert len(batch) == 1
        for item in batch:
            assert item.deadline_ns == 0 or item.deadline_ns > now
            # FIFO within the group: ids only grow
            assert item.id > last_in_group.get(item.group, -1)
            last_in_group[item.group] = item.id
        seen.extend(item.id for item in batch)

    def drain() -> None:
        seen.extend(item.id for item in b.pop_expired(now))
        while (batch := b.next_batch(now)) is not None:
            check(batch)
        # nothing due is left behind
        wake = b.next_wakeup_ns()
        assert wake is None or wake > now

    for op, n, group, deadline in ops:
        if op == "add":
            rows = min(n, max_batch_size) if max_batch_size else 1
            item = Item(rows=rows, group=group, arrival_ns=now, deadline_ns=now + deadline if deadline else 0)
            added[item.id] = item
            b.add(item)
        elif op == "tick":
            now += n
        elif (batch := b.flush_one(now)) is not None:
            check(batch)
        drain()
        assert b.rows_queued == sum(added[i].rows for i in added.keys() - set(seen))
    now += 10_000
    drain()
    assert len(b) == 0
    assert sorted(seen) == sorted(added)
