"""The worker's per-model counters: what one computed batch adds to each of them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from engine.shm import STAT_INDEX, STAT_NAMES, STAT_SLOTS
from engine.worker.stats import add_stat, batch_bucket, count_batch
from ext.segment import KIND_TEST, Segment

#: a model's counters start here: not at 0, so an offset missing the base would show
BASE = 8 * STAT_SLOTS


@pytest.fixture
def control() -> Iterator[Segment]:
    seg = Segment.create(3 * 8 * STAT_SLOTS, KIND_TEST)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


def counters(control: Segment, base: int = BASE) -> dict[str, int]:
    return {name: control.load_u64(base + 8 * i) for i, name in enumerate(STAT_NAMES)}


@pytest.mark.parametrize(
    "batches",
    [
        [(3, 5, 100, 2_000)],
        [(32, 32, 0, 0)],
        [(0, 0, 0, 0)],
        [(1, 600, 7, 9)],  # past the last bucket: counted in it
        [(1, 1, 10, 20), (4, 2, 30, 40), (8, 64, 50, 60), (2, 64, 0, 80)],
    ],
)
def test_a_batch_adds_to_each_counter(control: Segment, batches: list[tuple[int, int, int, int]]) -> None:
    want: Counter[str] = Counter()
    before = time.time_ns()
    for requests, rows, queue_ns, compute_ns in batches:
        count_batch(control, BASE, requests, rows, queue_ns, compute_ns)
        bucket = batch_bucket(rows)
        want.update(
            {
                "success": requests,
                "batches": 1,
                "rows": rows,
                "queue_ns": queue_ns,
                "compute_ns": compute_ns,
                "compute_req_ns": compute_ns * requests,
                f"batch_le_{bucket}": 1,
                f"batch_ns_le_{bucket}": compute_ns,
            }
        )
    got = counters(control)
    assert before <= got.pop("last_ns") <= time.time_ns()
    assert got == {name: want[name] for name in STAT_NAMES if name != "last_ns"}
    # the model's neighbours are untouched
    assert set(counters(control, 0).values()) == {0}
    assert set(counters(control, 2 * BASE).values()) == {0}


def test_batch_buckets() -> None:
    assert [batch_bucket(r) for r in (0, 1, 2, 3, 4, 5, 64, 65, 511, 512, 513, 10_000)] == [
        1, 1, 2, 4, 4, 8, 64, 128, 512, 512, 512, 512,
    ]  # fmt: skip


def test_add_stat_adds_and_stamps_batches(control: Segment) -> None:
    add_stat(control, BASE, "expired", 3)
    add_stat(control, BASE, "expired", 0)
    add_stat(control, BASE, "failure", 2)
    got = counters(control)
    assert (got["expired"], got["failure"], got["last_ns"]) == (3, 2, 0)
    add_stat(control, BASE, "batches", 1)
    assert counters(control)["last_ns"] > 0
    assert STAT_INDEX["batches"] < STAT_SLOTS
