"""pytest-benchmark of the CPU worker's own work per batch, in this process: one step of `WorkerCore`.

Each round is what a ZMQ front-end's coalesced group makes the worker do at concurrency 64: take one
request descriptor of 32 rows of the built-in ``mlp``'s shape (a region written into a real front-end
arena, as the gateway writes it) and the release of the previous round's output region, batch it,
run it, write the output region and push the answer. ``run_batch`` returns the inputs (identity),
so what is measured is the worker's Python and shared memory around the model: median ~30 µs per
round on the 2-core VM (~39 before the batch's counters, output headers and step were trimmed).
The same rounds with the real ``mlp`` forward in ``run_batch`` cost ~70 µs outside it (~82
before): the forward streams 4 MiB of weights through a 2 MiB L2 and the Python after it runs
cold (BENCHMARKS.md §7). Every round's answer is checked (request id, rows, output bytes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from engine.dtypes import DTYPE_CODES
from engine.models import builtin_repository
from engine.models.repository import load_repository
from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_INFLIGHT,
    HEADER_BYTES,
    KIND_RELEASE,
    KIND_REQUEST,
    KIND_RESPONSE,
    REQ_MAGIC,
    TENSOR_DESC,
    BoardLayout,
    frontend_arena_name,
    pack_region_head,
    region_layout,
)
from engine.worker.core import WorkerCore
from ext.arena import Arena
from ext.notify import eventfd_open
from ext.ring import Ring
from ext.segment import KIND_ARENA, KIND_TEST, Segment

ROWS = 32
FRONTEND_GEN = 1
WORKER_GEN = 1


def _identity(spec: ModelSpec, m: int, inputs: Sequence[Sequence[np.ndarray]], rows: int) -> list[np.ndarray]:
    parts = inputs[0]
    return [np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)]


def request_head(x: np.ndarray) -> tuple[int, int, bytes]:
    """A one-input FP32 request region for ``x``: its size, its data offset and its header bytes."""
    total, offs = region_layout([x.nbytes])
    head = bytearray(HEADER_BYTES + TENSOR_DESC.size)
    pack_region_head(memoryview(head), REQ_MAGIC, 0, 0, [(DTYPE_CODES["FP32"], x.shape, offs[0], x.nbytes)])
    return total, offs[0], bytes(head)


class Rig:
    """A board with one worker and one front-end, the front-end's arena, and the worker's core."""

    def __init__(self) -> None:
        specs = load_repository(builtin_repository()).specs
        self.names = sorted(specs)
        self.m = self.names.index("mlp")
        self.layout = BoardLayout(n_workers=1, n_frontends=1, ring_capacity=64)
        self.segments: list[Segment] = []
        self.core: WorkerCore  # set by `_build`
        self.fd = eventfd_open()
        try:
            self._build(specs)
        except BaseException:
            self.close()  # what was made so far: a failed set-up must not leave shared memory
            raise

    def _build(self, specs: dict[str, ModelSpec]) -> None:
        layout = self.layout
        self.control = Segment.create(layout.total, KIND_TEST)
        self.segments.append(self.control)
        base = self.control.name
        self.frontend_seg = Segment.create(
            1 << 22, KIND_ARENA, name=frontend_arena_name(base, 0, FRONTEND_GEN)
        )
        self.segments.append(self.frontend_seg)
        self.out_seg = Segment.create(1 << 22, KIND_TEST)
        self.segments.append(self.out_seg)
        self.request = Ring.create(self.control, layout.request_ring(0, 0), 64)
        self.response = Ring.create(self.control, layout.response_ring(0, 0), 64)
        self.arena = Arena.format(self.frontend_seg, max_block=1 << 20)
        # the handshake both sides would have done: each has taken the other's incarnation
        self.control.store_u64(layout.frontend(0, F_GEN), FRONTEND_GEN)
        self.control.store_u64(layout.ack_f(0, 0), WORKER_GEN)
        self.control.store_u64(layout.frontend(0, F_INFLIGHT), 1)
        self.core = WorkerCore(
            self.control,
            layout,
            0,
            WORKER_GEN,
            base,
            [specs[n] for n in self.names],
            Arena.format(self.out_seg, max_block=1 << 20),
            [self.fd],
            _identity,
            spin_s=0.0,
        )
        self.core.loaded = {self.m}
        self.core.sync_peers()
        assert self.core._active, "the front-end's pair is active"
        x = np.random.default_rng(0).standard_normal((ROWS, 256), dtype=np.float32)
        self.rows = x
        # an answer's region has the same layout: one tensor of the same bytes
        self.total, self.data_at, self.head = request_head(x)
        self.req_id = 0
        self.last_output = -1

    def round(self) -> tuple[int, int, bytes]:
        """One group in (and the last output released), one step, its answer out."""
        region = self.arena.try_alloc(self.total)
        self.arena.write(region, self.head)
        self.arena.write(region + self.data_at, self.rows)
        self.req_id += 1
        if self.last_output >= 0:
            self.request.push(KIND_RELEASE, 0, 0, self.last_output, 0, 0, 0, 0, 0, WORKER_GEN)
        self.request.push(KIND_REQUEST, self.m, self.req_id, region, self.total, 0, ROWS, 0, 0, FRONTEND_GEN)
        self.core.step(0.0)
        answer = self.response.pop()
        assert answer is not None, "the step answered the group"
        kind, _, req_id, offset, length, _, row, rows, _, _ = answer
        assert (kind, row, rows) == (KIND_RESPONSE, 0, ROWS)
        self.arena.free(region)
        self.last_output = offset
        data = bytes(self.core.arena.view(offset + self.data_at, self.rows.nbytes).data)
        return req_id, length, data

    def submit(self, req_id: int, x: np.ndarray, requests: int) -> None:
        """Write ``x`` as one request region and push its descriptor, standing for ``requests``
        client requests (a coalesced group), as the gateway does."""
        total, data_at, head = request_head(x)
        region = self.arena.try_alloc(total)
        self.arena.write(region, head)
        self.arena.write(region + data_at, x)
        self.request.push(KIND_REQUEST, self.m, req_id, region, total, 0, requests, 0, 0, FRONTEND_GEN)

    def close(self) -> None:
        os.close(self.fd)
        core: WorkerCore | None = getattr(self, "core", None)
        if core is not None:
            for peer in core.peers:
                peer.drop_arena()
        for seg in self.segments:
            seg.close()
            seg.unlink()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_worker_step_of_one_32_row_group(benchmark: Any, bench_quick_mode: bool, rig: Rig) -> None:
    if bench_quick_mode:
        req_id, length, data = benchmark.pedantic(rig.round, rounds=5, iterations=1, warmup_rounds=2)
    else:
        req_id, length, data = benchmark(rig.round)
    assert req_id == rig.req_id
    assert data == rig.rows.tobytes()
    assert length >= rig.rows.nbytes
