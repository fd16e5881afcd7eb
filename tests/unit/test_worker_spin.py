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
from engine.shm import F_INFLIGHT, F_REQUESTS, BoardLayout
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


class NeverEmpty:
    def is_empty(self) -> bool:
        return False


def run_steps(
    core: WorkerCore, monkeypatch: pytest.MonkeyPatch, steps: list[tuple[int, int]], board: bool = False
) -> list[float]:
    """Step ``core`` once per ``(descriptors its rings yield, submissions the front-ends hold in
    flight)`` and return the spin each step's wait was given. With ``board``, the in-flight counts
    are left to what the board holds."""
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
    # the step drains only a ring that is not empty: this one never is, and the script says what
    # each drain takes
    monkeypatch.setattr(core.peers[0], "request", NeverEmpty())
    # the front-end's side of the handshake is not here: make its pair active
    monkeypatch.setattr(core, "sync_peers", lambda: core.set_active(core.peers[:1]))
    monkeypatch.setattr(core, "_drain", drain)
    if not board:
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


def test_a_group_counts_once_and_its_requests_do_not_stop_the_spin(
    core: WorkerCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The board's submissions in flight (F_INFLIGHT) decide, not its client requests (F_REQUESTS):
    # one coalesced ZMQ group of 64 requests is one descriptor to wait for. Spinning there was worth
    # 4-20% of ZMQ's req/s at concurrency 8 and 64 (see SPIN_INFLIGHT_AT_MOST).
    layout = core.layout
    core.control.store_u64(layout.frontend(0, F_INFLIGHT), 1)
    core.control.store_u64(layout.frontend(0, F_REQUESTS), 64)
    spins = run_steps(core, monkeypatch, [(1, -1), (1, -1)], board=True)
    assert spins == [0.0, SPIN_S]
    core.control.store_u64(layout.frontend(0, F_INFLIGHT), SPIN_INFLIGHT_AT_MOST + 1)
    core.control.store_u64(layout.frontend(0, F_REQUESTS), 1)
    # the first of these waits follows the step above, which spun
    assert run_steps(core, monkeypatch, [(1, -1), (1, -1)], board=True) == [SPIN_S, 0.0]
