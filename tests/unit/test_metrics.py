"""Metrics, statistics and status without a server: counting, flushing, the board collector, rendering.

The multiprocess path runs a real second process that writes with prometheus_client in multiprocess
mode, so the counts this process reads back went through the same files a front-end writes.
"""

from __future__ import annotations

import contextvars
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import ConfigError, EngineConfig
from engine.errors import InvalidArgument, NotFound, ResourceExhausted
from engine.metrics import LATENCY_BUCKETS, LocalHistogram, RequestMetrics, WorkerMetrics
from engine.models.spec import ModelSpec, TensorSpec
from engine.shm import (
    F_GEN,
    F_HEARTBEAT,
    F_INFLIGHT,
    F_MODELS,
    F_REQUESTS,
    F_STATE,
    PROC_UP,
    SERVER_READY,
    STAT_NAMES,
    BoardLayout,
    frontend_arena_name,
    worker_arena_name,
)
from engine.stats import BoardReader, histogram_quantile, kserve_json, kserve_statistics
from engine.status import format_status, table
from engine.telemetry import DIR_PREFIX, Telemetry, sweep_stale_dirs
from ext.arena import Arena, segment_size_for
from ext.ring import Ring
from ext.segment import KIND_ARENA, KIND_CONTROL, NAME_PREFIX, Segment
from servers.grpc_messages import statistics_message
from servers.metrics_http import build_registry, status_document
from servers.observer import RequestObserver, status_code

REPO_ROOT = Path(__file__).resolve().parents[2]


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a registry's exposition, parsed back with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


# ---- in-process counting -------------------------------------------------------------------------


def test_local_histogram_flush_equals_observe(rng: np.random.Generator) -> None:
    # LocalHistogram writes prometheus_client's per-bucket values directly: prove it matches observe()
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["m"], buckets=LATENCY_BUCKETS, registry=registry)
    batched = Histogram("batched_seconds", "b", ["m"], buckets=LATENCY_BUCKETS, registry=registry)
    local = LocalHistogram(LATENCY_BUCKETS)
    values = np.concatenate([rng.exponential(0.01, 500), list(LATENCY_BUCKETS), [0.0, 100.0]])
    for i, v in enumerate(values):
        direct.labels("x").observe(float(v))
        local.observe(float(v))
        if i % 97 == 0:
            local.flush_into(batched.labels("x"))  # several flushes add up
    local.flush_into(batched.labels("x"))
    local.flush_into(batched.labels("x"))  # nothing new: no change
    found = samples(registry)
    for (name, labels), v in found.items():
        if name.startswith("direct_seconds") and not name.endswith("_created"):
            twin = found[(name.replace("direct", "batched", 1), labels)]
            assert twin == pytest.approx(v), (name, labels)


def test_request_metrics_count_by_model_protocol_and_code() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics("rest", registry=registry)
    for _ in range(3):
        metrics.begin("a")
        metrics.end("a", "OK", 0.002)
    metrics.begin("a")
    metrics.end("a", "INVALID_ARGUMENT", 0.001)
    metrics.record("a", "RESOURCE_EXHAUSTED")
    metrics.begin("b")  # still in flight
    metrics.flush()
    found = samples(registry)
    assert value(found, "engine_requests_total", model="a", protocol="rest", code="OK") == 3
    assert value(found, "engine_requests_total", model="a", protocol="rest", code="INVALID_ARGUMENT") == 1
    assert value(found, "engine_requests_total", model="a", protocol="rest", code="RESOURCE_EXHAUSTED") == 1
    assert value(found, "engine_requests_refused_total", model="a", protocol="rest") == 1
    # latency of the answered-OK requests only
    assert value(found, "engine_request_duration_seconds_count", model="a", protocol="rest") == 3
    assert value(found, "engine_request_duration_seconds_sum", model="a", protocol="rest") == pytest.approx(
        0.006
    )
    assert value(found, "engine_inflight_requests", model="a", protocol="rest") == 0
    assert value(found, "engine_inflight_requests", model="b", protocol="rest") == 1
    metrics.end("b", "OK", 0.5)
    metrics.flush()
    found = samples(registry)
    assert value(found, "engine_inflight_requests", model="b", protocol="rest") == 0
    assert value(found, "engine_requests_total", model="a", protocol="rest", code="OK") == 3  # not re-added


def test_worker_metrics_per_request_queue_and_per_batch_compute() -> None:
    registry = CollectorRegistry()
    now = [0.0]
    metrics = WorkerMetrics(["m0", "m1"], registry=registry, clock=lambda: now[0])
    batch = [
        SimpleNamespace(arrival_ns=1_000_000, requests=1),
        SimpleNamespace(arrival_ns=2_000_000, requests=1),
        SimpleNamespace(arrival_ns=2_500_000, requests=3),  # a coalesced group: one per request
    ]
    metrics.batch(1, batch, 3_000_000, 8_000_000)
    metrics.maybe_flush(lambda: [0, 4])  # not due yet
    assert value(samples(registry), "engine_queue_duration_seconds_count", model="m1") == 0
    now[0] = 10.0
    metrics.maybe_flush(lambda: [0, 4])
    found = samples(registry)
    assert value(found, "engine_queue_duration_seconds_count", model="m1") == 5
    assert value(found, "engine_queue_duration_seconds_sum", model="m1") == pytest.approx(0.0045)
    assert value(found, "engine_compute_duration_seconds_count", model="m1") == 1
    assert value(found, "engine_compute_duration_seconds_sum", model="m1") == pytest.approx(0.005)
    assert value(found, "engine_queue_duration_seconds_count", model="m0") == 0
    assert value(found, "engine_queue_depth", model="m1") == 4


def test_observer_codes_models_and_sampled_access_log(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    draws = iter([0.9, 0.1, 0.6, 0.2])
    observer = RequestObserver(
        "grpc", ["m"], RequestMetrics("grpc", registry), access_log=True, sample=0.5, rng=lambda: next(draws)
    )

    def handle(model: str, error: Exception | None) -> None:
        observer.end(model, observer.begin(model, "rid-1"), error)

    with caplog.at_level("INFO", logger="servers.access"):
        for error in (None, InvalidArgument("x"), None, NotFound("y")):
            model = "m" if not isinstance(error, NotFound) else "attacker-chosen-name"
            # in a context of its own, as each request's task has: the id must not leak into other tests
            contextvars.copy_context().run(handle, model, error)
    observer.flush()
    found = samples(registry)
    assert value(found, "engine_requests_total", model="m", protocol="grpc", code="OK") == 2
    assert value(found, "engine_requests_total", model="_unknown_", protocol="grpc", code="NOT_FOUND") == 1
    # draws 0.1 and 0.2 are below the 0.5 sample: the 2nd and 4th requests are logged
    assert [r.code for r in caplog.records] == ["INVALID_ARGUMENT", "NOT_FOUND"]  # type: ignore[attr-defined]
    assert all(r.event == "access" for r in caplog.records)  # type: ignore[attr-defined]
    assert status_code(ResourceExhausted("z")) == "RESOURCE_EXHAUSTED"
    assert status_code(RuntimeError()) == "INTERNAL"


# ---- multiprocess mode ---------------------------------------------------------------------------

_WRITER = """
import sys
from engine.metrics import RequestMetrics, WorkerMetrics, enable_multiprocess
from types import SimpleNamespace
enable_multiprocess(sys.argv[1])
m = RequestMetrics("zmq")
for _ in range(5):
    m.begin("identity"); m.end("identity", "OK", 0.001)
m.record("identity", "RESOURCE_EXHAUSTED")
m.begin("identity")  # left in flight: a live gauge of this process
m.flush()
w = WorkerMetrics(["identity"])
w.batch(0, [SimpleNamespace(arrival_ns=0, requests=1)] * 3, 1000, 2000)
w.flush([7])
"""


def _write_from_another_process(directory: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(directory)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return int(next(f.stem.rsplit("_", 1)[1] for f in directory.glob("counter_*.db")))


def test_multiprocess_files_merge_and_dead_process_gauges_go(tmp_path: Path) -> None:
    from prometheus_client import multiprocess

    pid = _write_from_another_process(tmp_path)
    _write_from_another_process(tmp_path)  # a second process: counters add up
    found = samples(build_registry(None, str(tmp_path)))
    assert value(found, "engine_up") == 1
    assert value(found, "engine_requests_total", model="identity", protocol="zmq", code="OK") == 10
    assert value(found, "engine_requests_refused_total", model="identity", protocol="zmq") == 2
    assert value(found, "engine_request_duration_seconds_count", model="identity", protocol="zmq") == 10
    assert value(found, "engine_queue_duration_seconds_count", model="identity") == 6
    assert value(found, "engine_compute_duration_seconds_count", model="identity") == 2
    assert value(found, "engine_inflight_requests", model="identity", protocol="zmq") == 2
    assert value(found, "engine_queue_depth", model="identity") == 14
    multiprocess.mark_process_dead(pid, str(tmp_path))
    found = samples(build_registry(None, str(tmp_path)))
    assert value(found, "engine_inflight_requests", model="identity", protocol="zmq") == 1
    assert value(found, "engine_queue_depth", model="identity") == 7
    # counters of the dead process stay: totals never go backwards
    assert value(found, "engine_requests_total", model="identity", protocol="zmq", code="OK") == 10


# ---- the board -----------------------------------------------------------------------------------

SPECS = (
    ModelSpec(
        name="a",
        backend="python",
        inputs=(TensorSpec("INPUT0", "FP32", (4,)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (4,)),),
        max_batch_size=8,
    ),
    ModelSpec(
        name="b",
        backend="python",
        inputs=(TensorSpec("INPUT0", "FP32", (4,)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (4,)),),
    ),
)


class Board:
    """A control segment with two workers and two front-ends, plus their arenas."""

    def __init__(self) -> None:
        self.base = f"{NAME_PREFIX}{os.urandom(8).hex()}test"
        self.layout = BoardLayout(2, 2, 8)
        self.segments: list[Segment] = []
        self.control = self._segment(self.base, self.layout.total, KIND_CONTROL)
        for f in range(2):
            for w in range(2):
                Ring.create(self.control, self.layout.request_ring(f, w), 8)
                Ring.create(self.control, self.layout.response_ring(f, w), 8)
        self.arenas: dict[str, Arena] = {}

    def _segment(self, name: str, size: int, kind: int) -> Segment:
        seg = Segment.create(size, kind, name=name)
        self.segments.append(seg)
        return seg

    def arena(self, name: str) -> Arena:
        arena = Arena.format(
            self._segment(name, segment_size_for(1 << 20, 1 << 16), KIND_ARENA), max_block=1 << 16
        )
        self.arenas[name] = arena
        return arena

    def stat(self, w: int, m: int, name: str, v: int) -> None:
        self.control.store_u64(self.layout.stat(w, m, name), v)

    def close(self) -> None:
        for seg in reversed(self.segments):
            seg.close()
            seg.unlink()


@pytest.fixture
def board() -> Iterator[Board]:
    b = Board()
    try:
        yield b
    finally:
        b.close()


def test_board_collector_reads_counters_processes_arenas_and_rings(board: Board) -> None:
    layout, control = board.layout, board.control
    control.store_u64(0, SERVER_READY)
    # worker 0 up with both models, generation 3 (two restarts); worker 1 down
    control.store_u64(layout.worker(0, F_STATE), PROC_UP)
    control.store_u64(layout.worker(0, F_MODELS), 0b11)
    control.store_u64(layout.worker(0, F_GEN), 3)
    control.store_u64(layout.worker(1, F_GEN), 1)
    control.store_u64(layout.frontend(0, F_STATE), PROC_UP)
    control.store_u64(layout.frontend(0, F_GEN), 1)
    # 5 client requests in flight, in 2 submissions (a coalesced group counts once in F_INFLIGHT)
    control.store_u64(layout.frontend(0, F_REQUESTS), 5)
    control.store_u64(layout.frontend(0, F_INFLIGHT), 2)
    import time

    control.store_u64(layout.worker(0, F_HEARTBEAT), time.monotonic_ns())
    # model a: 3 batches of 1, 2 of 4 rows (4 = 3..4 rows) and one of 1000 rows, split over both workers
    for w, (le1, le4, le512) in enumerate(((2, 2, 1), (1, 0, 0))):
        board.stat(w, 0, "batch_le_1", le1)
        board.stat(w, 0, "batch_le_4", le4)
        board.stat(w, 0, "batch_le_512", le512)
        board.stat(w, 0, "batches", le1 + le4 + le512)
        board.stat(w, 0, "success", 10)
    board.stat(0, 0, "rows", 1011)
    board.stat(0, 0, "failure", 2)
    board.stat(1, 0, "expired", 1)
    board.stat(1, 1, "breaker_state", 1)  # model b's breaker open on worker 1
    board.stat(1, 1, "breaker_trips", 3)
    arena = board.arena(worker_arena_name(board.base, 0, 3))
    arena.alloc(1000)
    board.arena(frontend_arena_name(board.base, 0, 1))
    Ring.attach(control, layout.request_ring(0, 1)).push(1, 0, 7)
    reader = BoardReader(control, layout, board.base, SPECS, ("cpu", "cuda:0"), ("grpc#0", "rest#0"))
    try:
        found = samples(build_registry(reader, None))
        assert value(found, "engine_server_ready") == 1
        assert value(found, "engine_model_ready", model="a") == 1
        assert value(found, "engine_worker_requests_total", model="a", outcome="success") == 20
        assert value(found, "engine_worker_requests_total", model="a", outcome="failure") == 2
        assert value(found, "engine_worker_requests_total", model="a", outcome="expired") == 1
        buckets = {
            le: value(found, "engine_batch_size_bucket", model="a", le=le)
            for le in ("1.0", "2.0", "4.0", "256.0", "+Inf")
        }
        assert buckets == {"1.0": 3, "2.0": 3, "4.0": 5, "256.0": 5, "+Inf": 6}
        assert value(found, "engine_batch_size_count", model="a") == 6
        assert value(found, "engine_batch_size_sum", model="a") == 1011
        assert value(found, "engine_circuit_breaker_state", model="b", worker="cuda:0") == 1
        assert value(found, "engine_circuit_breaker_state", model="b", worker="cpu") == 0
        assert value(found, "engine_circuit_breaker_trips_total", model="b") == 3
        assert value(found, "engine_process_up", process="worker cpu", role="worker") == 1
        assert value(found, "engine_process_up", process="worker cuda:0", role="worker") == 0
        assert value(found, "engine_process_restarts_total", process="worker cpu", role="worker") == 2
        assert value(found, "engine_frontend_inflight_requests", process="frontend grpc#0") == 5
        assert value(found, "engine_arena_bytes_in_use", process="worker cpu") == arena.bytes_in_use > 0
        assert value(found, "engine_arena_bytes_in_use", process="frontend grpc#0") == 0
        # not created (worker 1) or not current: left out, not an error
        assert value(found, "engine_arena_bytes_in_use", process="worker cuda:0") is None
        assert (
            value(found, "engine_ring_occupancy", frontend="grpc#0", worker="cuda:0", direction="request")
            == 1
        )
        assert (
            value(found, "engine_ring_occupancy", frontend="rest#0", worker="cpu", direction="response") == 0
        )
        assert value(found, "engine_ring_capacity") == 8
        doc = status_document(reader, None)
        assert doc["server"]["state"] == "ready" and doc["metrics"] is False
        (a,) = [m for m in doc["models"] if m["name"] == "a"]
        assert (a["success"], a["batches"], a["latency_ms"], a["breaker"]) == (20, 6, None, "closed")
        assert format_status(doc).count("\n") > 10
    finally:
        reader.close()


# ---- statistics ----------------------------------------------------------------------------------


def _normalized(doc: Any) -> Any:
    """JSON with integers for the int64 strings MessageToDict writes and zero leaves left out."""
    if isinstance(doc, dict):
        out = {k: _normalized(v) for k, v in doc.items()}
        return {k: v for k, v in out.items() if v not in (0, "0", {}, [], None)}
    if isinstance(doc, list):
        return [_normalized(v) for v in doc]
    if isinstance(doc, str) and doc.isdigit():
        return int(doc)
    return doc


def test_kserve_statistics_render_the_same_over_rest_and_grpc() -> None:
    counters = dict.fromkeys(STAT_NAMES, 0)
    counters.update(
        success=7, failure=1, expired=2, batches=4, rows=9, queue_ns=700, compute_ns=400, compute_req_ns=900,
        last_ns=5_000_000_123, batch_le_1=2, batch_ns_le_1=100, batch_le_4=2, batch_ns_le_4=300,
    )  # fmt: skip
    stats = kserve_statistics(SPECS[0], counters)
    rest = kserve_json(stats)
    assert rest["inference_stats"]["success"] == {"count": 7, "ns": 1600}
    assert rest["inference_stats"]["fail"] == {"count": 3, "ns": 0}
    assert rest["inference_stats"]["queue"] == {"count": 7, "ns": 700}
    assert rest["inference_stats"]["compute_infer"] == {"count": 7, "ns": 900}
    assert rest["batch_stats"] == [
        {"batch_size": 1, "compute_infer": {"count": 2, "ns": 100}},
        {"batch_size": 4, "compute_infer": {"count": 2, "ns": 300}},
    ]
    assert (rest["last_inference"], rest["inference_count"], rest["execution_count"]) == (5000, 9, 4)
    grpc = MessageToDict(statistics_message(stats), preserving_proto_field_name=True)
    kserve_only = {k: v for k, v in rest.items() if k not in ("breaker", "breaker_trips")}
    assert _normalized(grpc) == _normalized(kserve_only)


def test_histogram_quantile() -> None:
    buckets = [(0.001, 10.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.0005)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001 + 0.009 * 40 / 80)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # past the last bound


def test_status_table_pads_columns_and_shows_missing_as_dash() -> None:
    text = table(("A", "LONGER"), [("x", None), ("yyyy", 1.23456)])
    assert text.splitlines() == ["A     LONGER", "x     -", "yyyy  1.23"]


# ---- the supervisor side -------------------------------------------------------------------------


def test_telemetry_folder_is_private_and_removed(tmp_path: Path) -> None:
    config = EngineConfig(protocols=(), devices=("cpu",))
    telemetry = Telemetry(config, "json")
    supervisor = SimpleNamespace(
        devices=["cpu"], children_by_role=lambda role: [SimpleNamespace(name="frontend rest#0")]
    )
    settings = telemetry.settings(supervisor)
    folder = Path(settings.metrics_dir)
    try:
        assert settings.metrics and folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert (settings.workers, settings.frontends, settings.log_format) == (("cpu",), ("rest#0",), "json")
        assert telemetry.settings(supervisor).metrics_dir == str(folder)  # one folder per supervisor
    finally:
        telemetry.close()
        telemetry.close()
    assert not folder.exists()
    off = Telemetry(EngineConfig(protocols=(), devices=("cpu",), metrics=False))
    assert not off.settings(supervisor).metrics


def test_stale_folders_of_dead_supervisors_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{DIR_PREFIX}{dead.pid}-abc").mkdir()
    (tmp_path / f"{DIR_PREFIX}{os.getpid()}-abc").mkdir()
    (tmp_path / "unrelated").mkdir()
    assert sweep_stale_dirs(str(tmp_path)) == [f"{DIR_PREFIX}{dead.pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{DIR_PREFIX}{os.getpid()}-abc", "unrelated"]


@pytest.mark.parametrize(
    ("key", "bad"),
    [("access_log_sample", 0.0), ("access_log_sample", 1.5), ("metrics_port", -2), ("log_format", "xml")],
)
def test_config_keys_are_validated(key: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        EngineConfig(**{key: bad})
    defaults = EngineConfig()
    assert (defaults.metrics, defaults.metrics_port, defaults.access_log, defaults.log_format) == (
        True,
        -1,
        False,
        "auto",
    )
