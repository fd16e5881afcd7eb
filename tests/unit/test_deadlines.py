"""`servers.deadlines.DeadlineHeap`: many deadlines on one loop timer."""

from __future__ import annotations

import asyncio
import time

from servers.deadlines import COMPACT_SLACK, DeadlineHeap


def _ms(n: float) -> int:
    return time.monotonic_ns() + int(n * 1e6)


def test_live_keys_expire_in_deadline_order_and_ended_ones_do_not() -> None:
    async def scenario() -> list[str]:
        live = {"a", "b", "c"}
        expired: list[str] = []
        heap: DeadlineHeap[str] = DeadlineHeap(
            asyncio.get_running_loop(), expired.append, live.__contains__, live.__len__
        )
        heap.watch(_ms(60), "a")
        heap.watch(_ms(20), "b")  # earlier than the timer armed for "a": re-arms it
        heap.watch(_ms(40), "c")
        live.discard("c")  # ends before its deadline
        await asyncio.sleep(0.03)
        assert expired == ["b"]
        await asyncio.sleep(0.06)
        return expired

    assert asyncio.run(scenario()) == ["b", "a"]


def test_keys_need_not_compare_and_equal_deadlines_all_expire() -> None:
    class Item:  # no ordering
        pass

    async def scenario() -> int:
        items = [Item() for _ in range(5)]
        expired: list[Item] = []
        heap: DeadlineHeap[Item] = DeadlineHeap(
            asyncio.get_running_loop(), expired.append, lambda i: True, lambda: 5
        )
        due = _ms(10)
        for item in items:
            heap.watch(due, item)
        await asyncio.sleep(0.05)
        assert expired == items
        return len(heap)

    assert asyncio.run(scenario()) == 0


def test_entries_of_ended_keys_are_compacted_away() -> None:
    async def scenario() -> int:
        live: set[int] = set()
        heap: DeadlineHeap[int] = DeadlineHeap(
            asyncio.get_running_loop(), lambda k: None, live.__contains__, live.__len__
        )
        for key in range(20_000):  # each ends at once, long before its deadline
            live.add(key)
            heap.watch(_ms(60_000), key)
            live.discard(key)
        size = len(heap)
        heap.close()
        return size

    assert asyncio.run(scenario()) <= COMPACT_SLACK + 1


def test_nothing_expires_after_close() -> None:
    async def scenario() -> list[int]:
        expired: list[int] = []
        heap: DeadlineHeap[int] = DeadlineHeap(
            asyncio.get_running_loop(), expired.append, lambda k: True, lambda: 1
        )
        heap.watch(_ms(10), 1)
        heap.close()
        heap.watch(_ms(10), 2)  # ignored once closed
        await asyncio.sleep(0.05)
        return expired

    assert asyncio.run(scenario()) == []
