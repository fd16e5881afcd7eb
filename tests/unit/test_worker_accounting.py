"""What the worker counts for a batch built from submissions that arrived at different times."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

import engine.worker.core as core_module
from engine.shm import F_INFLIGHT
from tests.bench.test_worker_bench import Rig


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def submit(rig: Rig, req_id: int, rows: int, requests: int) -> None:
    rig.submit(req_id, np.full((rows, 256), req_id, dtype=np.float32), requests)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[list[Any], int]] = []

    def batch(self, model: int, requests: Sequence[Any], start_ns: int, end_ns: int) -> None:
        self.batches.append((list(requests), start_ns))


def test_a_batch_counts_each_request_queued_from_its_own_arrival(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = itertools.count(1_000_000, 250_000)  # each reading of the clock 0.25 ms later
    rig.core.clock = lambda: next(ticks)
    recorder = Recorder()
    rig.core.observer = recorder
    counted: list[tuple[int, int, int]] = []

    def count_batch(
        control: Any, base: int, requests: int, rows: int, queue_ns: int, compute_ns: int
    ) -> None:
        counted.append((requests, rows, queue_ns))

    monkeypatch.setattr(core_module, "count_batch", count_batch)
    # three submissions in flight, arriving a step apart: the batch waits for the last
    rig.control.store_u64(rig.layout.frontend(0, F_INFLIGHT), 3)
    for req_id, rows, requests in [(1, 4, 4), (2, 1, 1), (3, 6, 3)]:
        submit(rig, req_id, rows, requests)
        rig.core.step(0.0)
    assert len(recorder.batches) == len(counted) == 1
    live, start = recorder.batches[0]
    assert [p.req_id for p in live] == [1, 2, 3]
    arrivals = [p.arrival_ns for p in live]
    assert len(set(arrivals)) == 3, "each submission arrived at its own time"
    queued = (4 * (start - arrivals[0])) + (start - arrivals[1]) + (3 * (start - arrivals[2]))
    assert counted == [(8, 11, queued)]
    answers = [rig.response.pop() for _ in range(3)]
    assert [(a[2], a[6], a[7]) for a in answers if a] == [(1, 0, 4), (2, 4, 1), (3, 5, 6)]
