"""pytest-benchmark suite of the compiled hot path: ring push/pop, bursts, arena write + view.

Skipped unless --benchmark-enable / --benchmark-only is given or ENGINE_BENCH_QUICK=1 (see conftest);
in quick mode each benchmark runs a few rounds only, so CI proves the suite still works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from ext.arena import Arena, segment_size_for
from ext.ring import DESC_DTYPE, Ring, ring_footprint
from ext.segment import KIND_ARENA, Segment

MakeSegment = Callable[..., Segment]
MiB = 1 << 20


def measure(benchmark: Any, quick: bool, fn: Callable[[], object], iterations: int) -> None:
    """Full runs let pytest-benchmark calibrate; quick runs do 3 rounds of a few iterations."""
    if quick:
        benchmark.pedantic(fn, rounds=3, iterations=max(1, iterations // 100), warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.fixture
def ring(segment_factory: MakeSegment) -> Ring:
    return Ring.create(segment_factory(ring_footprint(1024)), 0, 1024)


@pytest.fixture
def arena(segment_factory: MakeSegment) -> Iterator[Arena]:
    arena = Arena.format(segment_factory(segment_size_for(4 * MiB, 4 * MiB), KIND_ARENA), 256, 4 * MiB)
    yield arena
    arena.close()


def test_ring_push_pop(benchmark: Any, bench_quick_mode: bool, ring: Ring) -> None:
    def push_pop() -> object:
        ring.push(1, 0, 7, 64, 128)
        return ring.pop()

    measure(benchmark, bench_quick_mode, push_pop, 10_000)
    assert ring.is_empty()


def test_ring_burst_256(benchmark: Any, bench_quick_mode: bool, ring: Ring) -> None:
    burst, out = np.zeros(256, DESC_DTYPE), np.zeros(256, DESC_DTYPE)
    burst["req_id"] = np.arange(256)

    def push_pop_burst() -> int:
        ring.push_burst(burst)
        return ring.pop_into(out)

    measure(benchmark, bench_quick_mode, push_pop_burst, 1_000)
    assert np.array_equal(out, burst)


@pytest.mark.parametrize("nbytes", [4096, MiB], ids=["4k", "1m"])
def test_arena_write_and_view(benchmark: Any, bench_quick_mode: bool, arena: Arena, nbytes: int) -> None:
    src = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
    offset = arena.alloc(nbytes)

    def write_and_view() -> np.ndarray:
        return arena.put(offset, src)

    measure(benchmark, bench_quick_mode, write_and_view, 1_000 if nbytes == 4096 else 20)
    assert np.array_equal(arena.view(offset, nbytes), src)


def test_micro_cli_quick(tmp_path: Any) -> None:
    """`python -m bench micro --quick --json FILE` runs end to end and writes every key."""
    from bench.__main__ import main
    from bench.micro import TARGETS

    out = tmp_path / "micro.json"
    assert main(["micro", "--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for target in TARGETS:
        assert isinstance(results[target.key], float), target.key
    assert results["meta"]["quick"] is True
