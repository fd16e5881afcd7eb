"""`WorkerCore.step`'s wait: a worker spins on its rings only at light traffic.

The spin keeps a worker awake between requests when they come one or two at a time (at concurrency
1 on the 2-core VM it took 0.1-0.4 ms off the p50). An idle worker wakes every ``max_wait_s`` for
its deadlines and must not spin each time, and a loaded one must leave the CPU to the front-ends
and the client (`engine.worker.core.SPIN_INFLIGHT_AT_MOST`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import engine.worker.core as core_module
from engine.shm import BoardLayout
from engine.worker.core import SPIN_INFLIGHT_AT_MOST, WorkerCore
from ext.arena import Arena
from ext.notify import eventfd_open
from ext.ring import Ring
from ext.segment import KIND_TEST, Segment

SPIN_S = 300e-6


@pytest.fixture
def core() -> Iterator[WorkerCore]:
    layout = BoardLayout(n_workers=1, n_frontends=1, ring_capacity=64)
    control = Segment.create(layout.total, KIND_TEST)
    out = Segment.create(1 << 20, KIND_TEST)
    fd = eventfd_open()
    try:
        Ring.create(control, layout.request_ring(0, 0), 64)
        Ring.create(control, layout.response_ring(0, 0), 64)
        arena = Arena.format(out, max_block=1 << 16)
        yield WorkerCore(control, layout, 0, 1, control.name, [], arena, [fd], _no_batches, spin_s=SPIN_S)
    finally:
        os.close(fd)
        for seg in (control, out):
            seg.close()
            seg.unlink()


def _no_batches(*args: object) -> None:
    raise AssertionError("no model is loaded, so no batch can run")


def run_steps(core: WorkerCore, monkeypatch: pytest.MonkeyPatch, steps: list[tuple[int, int]]) -> list[float]:
    """Step ``core`` once per ``(descriptors its rings yield, requests the front-ends hold in flight)``
    and return the spin each step's wait was given."""
    spins: list[float] = []
    script = iter(steps)
    inflight = [0]

    def wait_rings(word: object, rings: list[Ring], spin_s: float, timeout_s: float) -> bool:
        assert rings, "the front-end's request ring is waited on"
        spins.append(spin_s)
        return False

    def drain(peer: object) -> int:
        taken, inflight[0] = next(script)
        return taken

    monkeypatch.setattr(core_module, "wait_rings", wait_rings)
    # the front-end's side of the handshake is not here: make its pair active
    monkeypatch.setattr(core, "sync_peers", lambda: setattr(core, "_active", core.peers[:1]))
    monkeypatch.setattr(core, "_drain", drain)
    monkeypatch.setattr(core, "_inflight_total", lambda: inflight[0])
    for _ in steps:
        core.step(0.001)
    return spins


def test_only_a_step_with_descriptors_at_light_traffic_spins(
    core: WorkerCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    most = SPIN_INFLIGHT_AT_MOST
    steps = [(0, 0), (1, 1), (2, most), (1, most + 1), (0, 0), (0, 0), (6, 0), (1, 0)]
    # the first wait follows no step; then each wait spins when the step before took descriptors
    # while at most `most` requests were in flight
    assert run_steps(core, monkeypatch, steps) == [0.0, 0.0, SPIN_S, SPIN_S, 0.0, 0.0, 0.0, SPIN_S]


def test_a_zero_spin_never_spins(core: WorkerCore, monkeypatch: pytest.MonkeyPatch) -> None:
    core.spin_s = 0.0
    assert run_steps(core, monkeypatch, [(5, 1), (5, 1), (5, 1)]) == [0.0, 0.0, 0.0]
