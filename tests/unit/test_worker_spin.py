"""`WorkerCore.step`'s wait: a worker spins on its rings only after a step that took a few descriptors.

The spin keeps a worker with light traffic awake between requests (at concurrency 1 on the 2-core
VM it took 0.1-0.4 ms off the p50). An idle worker wakes every ``max_wait_s`` for its deadlines and
must not spin each time, and one fed at full speed must leave the CPU to the front-end feeding it
(`engine.worker.core.SPIN_AFTER_AT_MOST`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import engine.worker.core as core_module
from engine.shm import BoardLayout
from engine.worker.core import SPIN_AFTER_AT_MOST, WorkerCore
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


def run_steps(core: WorkerCore, monkeypatch: pytest.MonkeyPatch, taken: list[int]) -> list[float]:
    """Step ``core`` once per entry of ``taken`` (the descriptors its rings yield that step) and
    return the spin each step's wait was given."""
    spins: list[float] = []

    def wait_rings(word: object, rings: list[Ring], spin_s: float, timeout_s: float) -> bool:
        assert rings, "the front-end's request ring is waited on"
        spins.append(spin_s)
        return False

    script = iter(taken)
    monkeypatch.setattr(core_module, "wait_rings", wait_rings)
    # the front-end's side of the handshake is not here: make its pair active
    monkeypatch.setattr(core, "sync_peers", lambda: setattr(core, "_active", core.peers[:1]))
    monkeypatch.setattr(core, "_drain", lambda peer: next(script))
    for _ in taken:
        core.step(0.001)
    return spins


def test_only_a_step_after_a_few_descriptors_spins(core: WorkerCore, monkeypatch: pytest.MonkeyPatch) -> None:
    most = SPIN_AFTER_AT_MOST
    spins = run_steps(core, monkeypatch, [0, 3, 1, 0, 0, most + 1, 0, most, 0])
    # the first wait follows no step; then each wait spins when the step before took 1..most
    assert spins == [0.0, 0.0, SPIN_S, SPIN_S, 0.0, 0.0, 0.0, 0.0, SPIN_S]


def test_a_zero_spin_never_spins(core: WorkerCore, monkeypatch: pytest.MonkeyPatch) -> None:
    core.spin_s = 0.0
    assert run_steps(core, monkeypatch, [5, 5, 5]) == [0.0, 0.0, 0.0]
