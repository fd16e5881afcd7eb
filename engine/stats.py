"""Reading the board: per-model worker counters, KServe statistics, processes, arenas, rings, quantiles.

Everything here only loads words from the control segment (and arena headers), so any process that
maps the board can call it at any time: the gateway for KServe statistics, the exposition for
``/metrics``, the REST front-end for ``/v2/status``. Counters of several workers are summed, states
(`engine.shm.STAT_STATES`) take the maximum.

KServe statistics (`kserve_statistics`) come from the worker counters of `engine.shm.STAT_NAMES`:
success = requests answered by a computed batch, fail = requests failed by the worker (model errors,
open breaker) or expired in its queue; queue = time from the worker taking a request off its ring to
its batch's start; compute_infer = its batch's compute time; success duration = queue + compute
(time inside the worker; parsing and copying in the front-end are not part of it). Batch statistics
count executions per batch size rounded up to a power of two (``4`` holds batches of 3 and 4 rows).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_HEARTBEAT,
    F_MODELS,
    F_PID,
    F_REQUESTS,
    F_STARTED,
    F_STATE,
    PROC_DOWN,
    PROC_STARTING,
    PROC_UP,
    SERVER_DRAINING,
    SERVER_READY,
    SERVER_STARTING,
    SERVER_STOPPING,
    STAT_NAMES,
    STAT_STATES,
    BoardLayout,
    frontend_arena_name,
    worker_arena_name,
)
from ext.arena import Arena
from ext.ring import Ring
from ext.segment import KIND_ARENA, Segment

SERVER_STATES = {
    SERVER_STARTING: "starting",
    SERVER_READY: "ready",
    SERVER_DRAINING: "draining",
    SERVER_STOPPING: "stopping",
}
PROCESS_STATES = {PROC_DOWN: "down", PROC_STARTING: "starting", PROC_UP: "up"}
#: engine.worker.breaker's CLOSED / OPEN / HALF_OPEN as the board stores them
BREAKER_STATES = {0: "closed", 1: "open", 2: "half_open"}
BATCH_SIZES = tuple(1 << i for i in range(10))


def model_counters(control: Segment, layout: BoardLayout, m: int) -> dict[str, int]:
    """The worker counters of model index ``m`` (`engine.shm.STAT_NAMES`), combined over workers."""
    totals = dict.fromkeys(STAT_NAMES, 0)
    for w in range(layout.n_workers):
        for name in STAT_NAMES:
            value = control.load_u64(layout.stat(w, m, name))
            totals[name] = max(totals[name], value) if name in STAT_STATES else totals[name] + value
    return totals


def kserve_statistics(spec: ModelSpec, c: Mapping[str, int]) -> dict[str, Any]:
    """One model's statistics in the shape of `servers.gateway_api.Gateway.statistics` (durations in ns).

    `servers.grpc_messages.statistics_message` turns it into a ``ModelStatistics`` message and
    `kserve_json` into the KServe/Triton HTTP document, so both protocols answer the same numbers.
    """
    return {
        "name": spec.name,
        "version": spec.version,
        "last_inference_ms": c["last_ns"] // 1_000_000,
        "inference_count": c["rows"],
        "execution_count": c["batches"],
        "success_count": c["success"],
        "success_ns": c["queue_ns"] + c["compute_req_ns"],
        "fail_count": c["failure"] + c["expired"],
        "fail_ns": 0,
        "queue_ns": c["queue_ns"],
        "compute_ns": c["compute_req_ns"],
        "batch_stats": {
            str(n): {"count": c[f"batch_le_{n}"], "compute_ns": c[f"batch_ns_le_{n}"]}
            for n in BATCH_SIZES
            if c[f"batch_le_{n}"]
        },
        "breaker": BREAKER_STATES.get(c["breaker_state"], "closed"),
        "breaker_trips": c["breaker_trips"],
    }


def _duration(count: Any, ns: Any) -> dict[str, int]:
    return {"count": int(count or 0), "ns": int(ns or 0)}


def kserve_json(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The KServe v2 / Triton HTTP statistics document of one model, from `kserve_statistics`' shape.

    Field for field what `servers.grpc_messages.statistics_message` puts in the gRPC message (absent
    keys read as zero), plus the breaker state, which the protobuf message has no field for.
    """
    success = stats.get("success_count", 0)
    inference: dict[str, Any] = {
        "success": _duration(success, stats.get("success_ns")),
        "fail": _duration(stats.get("fail_count"), stats.get("fail_ns")),
        "queue": _duration(success, stats.get("queue_ns")),
        "compute_infer": _duration(success, stats.get("compute_ns")),
    }
    for key, field in (("compute_input_ns", "compute_input"), ("compute_output_ns", "compute_output")):
        if key in stats:
            inference[field] = _duration(success, stats[key])
    batches = []
    for size, entry in sorted((stats.get("batch_stats") or {}).items(), key=lambda kv: int(kv[0])):
        if isinstance(entry, Mapping):
            count, ns = entry.get("count", 0), entry.get("compute_ns", entry.get("ns", 0))
        else:
            count, ns = entry, 0
        batches.append({"batch_size": int(size), "compute_infer": _duration(count, ns)})
    doc: dict[str, Any] = {
        "name": str(stats.get("name", "")),
        "version": str(stats.get("version", "")),
        "last_inference": int(stats.get("last_inference_ms", 0) or 0),
        "inference_count": int(stats.get("inference_count", 0) or 0),
        "execution_count": int(stats.get("execution_count", 0) or 0),
        "inference_stats": inference,
        "batch_stats": batches,
    }
    for extra in ("breaker", "breaker_trips"):
        if extra in stats:
            doc[extra] = stats[extra]
    return doc


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Estimate the ``q`` quantile from cumulative histogram buckets ``[(upper bound, count), ...]``.

    Linear interpolation inside the bucket that holds the rank, as PromQL's ``histogram_quantile``;
    a rank in the ``+Inf`` bucket answers the highest finite bound. None when nothing was observed.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class ProcessInfo:
    """One process slot as the board shows it."""

    name: str
    role: str
    pid: int
    state: str
    generation: int
    restarts: int
    uptime_s: float
    heartbeat_age_s: float
    inflight: int | None


class BoardReader:
    """Reads one engine's board from any process that maps its control segment.

    Args:
        control: the control segment.
        layout: its layout.
        base: the segments' base name (arena names derive from it).
        specs: the models, in board order.
        workers: a label per worker slot (its device: ``cpu``, ``cuda:0``).
        frontends: a label per front-end slot (``grpc#0``, ``rest#0``, ``embedded#0``).
    """

    def __init__(
        self,
        control: Segment,
        layout: BoardLayout,
        base: str,
        specs: Sequence[ModelSpec],
        workers: Sequence[str],
        frontends: Sequence[str],
    ) -> None:
        self.control = control
        self.layout = layout
        self.base = base
        self.specs = tuple(specs)
        self.workers = tuple(workers) or tuple(f"w{w}" for w in range(layout.n_workers))
        self.frontends = tuple(frontends) or tuple(f"f{f}" for f in range(layout.n_frontends))
        self._arenas: dict[str, Arena] = {}
        self._rings: dict[int, Ring] = {}
        # the metrics port answers scrapes from several threads at once
        self._lock = threading.Lock()

    def server_state(self) -> str:
        return SERVER_STATES.get(self.control.load_u64(0) & 0xFFFFFFFF, "unknown")

    def counters(self, m: int) -> dict[str, int]:
        return model_counters(self.control, self.layout, m)

    def model_ready(self, m: int) -> bool:
        """Whether a worker that is up has model ``m`` loaded."""
        load = self.control.load_u64
        return any(
            load(self.layout.worker(w, F_STATE)) == PROC_UP and load(self.layout.worker(w, F_MODELS)) >> m & 1
            for w in range(self.layout.n_workers)
        )

    def worker_counter(self, w: int, m: int, name: str) -> int:
        return self.control.load_u64(self.layout.stat(w, m, name))

    def statistics(self, m: int) -> dict[str, Any]:
        return kserve_statistics(self.specs[m], self.counters(m))

    def slots(self) -> list[tuple[str, str, int]]:
        """(process name, role, slot offset) of every worker and front-end slot."""
        n_workers = self.layout.n_workers
        out = [(f"worker {self.workers[w]}", "worker", self.layout.worker(w)) for w in range(n_workers)]
        out += [
            (f"frontend {self.frontends[f]}", "frontend", self.layout.frontend(f))
            for f in range(self.layout.n_frontends)
        ]
        return out

    def processes(self) -> list[ProcessInfo]:
        now = time.monotonic_ns()
        load = self.control.load_u64
        out = []
        for name, role, slot in self.slots():
            gen = load(slot + F_GEN)
            started, beat = load(slot + F_STARTED), load(slot + F_HEARTBEAT)
            out.append(
                ProcessInfo(
                    name=name,
                    role=role,
                    pid=load(slot + F_PID),
                    state=PROCESS_STATES.get(load(slot + F_STATE), "unknown"),
                    generation=gen,
                    # every incarnation after the first is a restart (or, past the budget, a retirement)
                    restarts=max(0, gen - 1),
                    uptime_s=round(max(0, now - started) / 1e9, 3) if started else 0.0,
                    heartbeat_age_s=round(max(0, now - beat) / 1e9, 3) if beat else 0.0,
                    inflight=load(slot + F_REQUESTS) if role == "frontend" else None,
                )
            )
        return out

    def arenas(self) -> list[tuple[str, int, int]]:
        """(process name, bytes in use, payload capacity) of each current incarnation's arena.

        An arena that is gone (its process died) or not yet formatted (its process is starting) is
        left out.
        """
        out = []
        load = self.control.load_u64
        names = [
            (f"worker {self.workers[w]}", worker_arena_name(self.base, w, load(self.layout.worker(w, F_GEN))))
            for w in range(self.layout.n_workers)
        ]
        names += [
            (
                f"frontend {self.frontends[f]}",
                frontend_arena_name(self.base, f, load(self.layout.frontend(f, F_GEN))),
            )
            for f in range(self.layout.n_frontends)
        ]
        wanted = {seg for _, seg in names}
        with self._lock:
            for stale in set(self._arenas) - wanted:
                old = self._arenas.pop(stale)
                old.close()
                old.segment.close()
            for process, seg_name in names:
                arena = self._arena(seg_name)
                if arena is not None:
                    out.append((process, int(arena.bytes_in_use), int(arena.payload_size)))
        return out

    def _arena(self, name: str) -> Arena | None:
        arena = self._arenas.get(name)
        if arena is None:
            try:
                seg = Segment.attach(name, KIND_ARENA, writable=False)
            except Exception:  # unlinked (a dead incarnation) or never created (retired slot)
                return None
            try:
                arena = Arena.attach(seg)
            except ValueError:  # created, not formatted yet: look again next time
                seg.close()
                return None
            self._arenas[name] = arena
        return arena

    def rings(self) -> list[tuple[str, str, str, int]]:
        """(front-end, worker, direction, descriptors queued) of every ring; direction is
        ``request`` (front-end to worker) or ``response``."""
        out = []
        with self._lock:
            for f in range(self.layout.n_frontends):
                for w in range(self.layout.n_workers):
                    for direction, offset in (
                        ("request", self.layout.request_ring(f, w)),
                        ("response", self.layout.response_ring(f, w)),
                    ):
                        ring = self._rings.get(offset)
                        if ring is None:
                            ring = self._rings[offset] = Ring.attach(self.control, offset)
                        out.append((self.frontends[f], self.workers[w], direction, len(ring)))
        return out

    def ring_capacity(self) -> int:
        return self.layout.ring_capacity

    def breaker_states(self) -> list[tuple[str, str, int]]:
        """(model, worker, state) per model and worker; state as `BREAKER_STATES` numbers it."""
        return [
            (spec.name, self.workers[w], self.worker_counter(w, m, "breaker_state"))
            for m, spec in enumerate(self.specs)
            for w in range(self.layout.n_workers)
        ]

    def close(self) -> None:
        """Drop the arena mappings this reader holds. Safe to call twice."""
        with self._lock:
            for arena in self._arenas.values():
                with contextlib.suppress(Exception):
                    arena.close()
                    arena.segment.close()
            self._arenas.clear()
            self._rings.clear()
