"""``/metrics`` and ``/v2/status`` of a running engine: the Prometheus exposition and the status document.

`build_registry` merges the three sources of `engine.metrics` into one prometheus_client registry: the
multiprocess files every process writes (``MultiProcessCollector``), `BoardCollector` (read from the
board at scrape time) and ``engine_up``. `Exposition` renders it for the REST front-end (and
`engine.telemetry.Telemetry` serves the same registry on ``metrics_port``); `status_document` builds
the JSON that `python -m engine.status` prints.

Board metrics (no cost on the request path; labels ``process`` = ``worker cpu`` / ``frontend grpc#0``):

    engine_up                                              gauge      always 1 (the exposition answers)
    engine_server_ready                                    gauge      1 while the server admits requests
    engine_model_ready{model}                              gauge      1 when a worker that is up serves it
    engine_worker_requests_total{model,outcome}            counter    success / failure / expired, in workers
    engine_batch_size{model}                               histogram  rows per computed batch
    engine_circuit_breaker_state{model,worker}             gauge      0 closed, 1 open, 2 half-open
    engine_circuit_breaker_trips_total{model}              counter    times a breaker opened
    engine_process_up{process,role}                        gauge      1 while the slot's process is up
    engine_process_restarts_total{process,role}            counter    incarnations after the first
    engine_process_heartbeat_age_seconds{process,role}     gauge      since the last heartbeat
    engine_frontend_inflight_requests{process}             gauge      requests a front-end holds in shm
    engine_arena_bytes_in_use{process}                     gauge      allocated bytes of its tensor arena
    engine_arena_capacity_bytes{process}                   gauge      payload size of that arena
    engine_ring_occupancy{frontend,worker,direction}       gauge      descriptors queued in a ring
    engine_ring_capacity                                   gauge      descriptor slots of every ring
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from engine.metrics import BATCH_BUCKETS, PREFIX
from engine.stats import BATCH_SIZES, BREAKER_STATES, BoardReader, histogram_quantile

#: Content type of the text exposition format that `Exposition.metrics` renders.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Latency percentiles in the status document.
PERCENTILES = (0.5, 0.9, 0.99)


class _Up:
    """``engine_up 1``: the exposition answers (also without a board, as in protocol unit tests)."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(PREFIX + "up", "Whether the engine is up.", value=1)


class BoardCollector:
    """A prometheus_client collector reading the board at every scrape (see the module docstring)."""

    def __init__(self, reader: BoardReader) -> None:
        self.reader = reader

    def describe(self) -> list[Metric]:
        # registering must not read the board: collect() runs at scrape time only
        return []

    def collect(self) -> Iterator[Metric]:
        r = self.reader
        yield GaugeMetricFamily(
            PREFIX + "server_ready",
            "1 while the server admits requests (0 starting, draining or stopping).",
            value=int(r.server_state() == "ready"),
        )
        yield from self._models()
        yield from self._processes()
        yield from self._memory()

    def _models(self) -> Iterator[Metric]:
        r = self.reader
        ready = GaugeMetricFamily(
            PREFIX + "model_ready", "1 when a worker that is up serves the model.", labels=["model"]
        )
        outcomes = CounterMetricFamily(
            PREFIX + "worker_requests",
            "Requests the workers finished: computed (success), failed by the model or an open breaker "
            "(failure), or expired in the queue.",
            labels=["model", "outcome"],
        )
        batch = HistogramMetricFamily(PREFIX + "batch_size", "Rows per computed batch.", labels=["model"])
        trips = CounterMetricFamily(
            PREFIX + "circuit_breaker_trips", "Times a model's circuit breaker opened.", labels=["model"]
        )
        for m, spec in enumerate(r.specs):
            c = r.counters(m)
            ready.add_metric([spec.name], int(r.model_ready(m)))
            for outcome in ("success", "failure", "expired"):
                outcomes.add_metric([spec.name, outcome], c[outcome])
            buckets, total = [], 0
            for n in BATCH_SIZES:
                total += c[f"batch_le_{n}"]
                if n in BATCH_BUCKETS:
                    buckets.append((floatToGoString(n), total))
            # the board's last bucket holds every larger batch: it is the +Inf bucket
            buckets.append(("+Inf", total))
            batch.add_metric([spec.name], buckets, c["rows"])
            trips.add_metric([spec.name], c["breaker_trips"])
        breaker = GaugeMetricFamily(
            PREFIX + "circuit_breaker_state",
            "Circuit breaker of a model on a worker: 0 closed, 1 open, 2 half-open.",
            labels=["model", "worker"],
        )
        for model, worker, state in r.breaker_states():
            breaker.add_metric([model, worker], state)
        yield from (ready, outcomes, batch, breaker, trips)

    def _processes(self) -> Iterator[Metric]:
        labels = ["process", "role"]
        up = GaugeMetricFamily(PREFIX + "process_up", "1 while the slot's process is up.", labels=labels)
        restarts = CounterMetricFamily(
            PREFIX + "process_restarts",
            "Incarnations of a process slot after the first (restarts; a retired slot counts one more).",
            labels=labels,
        )
        age = GaugeMetricFamily(
            PREFIX + "process_heartbeat_age_seconds",
            "Time since the process's last heartbeat.",
            labels=labels,
        )
        inflight = GaugeMetricFamily(
            PREFIX + "frontend_inflight_requests",
            "Requests a front-end has sent to the workers and not yet answered.",
            labels=["process"],
        )
        for p in self.reader.processes():
            up.add_metric([p.name, p.role], int(p.state == "up"))
            restarts.add_metric([p.name, p.role], p.restarts)
            age.add_metric([p.name, p.role], p.heartbeat_age_s)
            if p.inflight is not None:
                inflight.add_metric([p.name], p.inflight)
        yield from (up, restarts, age, inflight)

    def _memory(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            PREFIX + "arena_bytes_in_use", "Bytes allocated in a process's tensor arena.", labels=["process"]
        )
        capacity = GaugeMetricFamily(
            PREFIX + "arena_capacity_bytes", "Payload bytes of a process's tensor arena.", labels=["process"]
        )
        for process, in_use, size in self.reader.arenas():
            used.add_metric([process], in_use)
            capacity.add_metric([process], size)
        rings = GaugeMetricFamily(
            PREFIX + "ring_occupancy",
            "Descriptors queued in a shared-memory ring (request: front-end to worker; response: back).",
            labels=["frontend", "worker", "direction"],
        )
        for frontend, worker, direction, n in self.reader.rings():
            rings.add_metric([frontend, worker, direction], n)
        yield from (used, capacity, rings)
        yield GaugeMetricFamily(
            PREFIX + "ring_capacity", "Descriptor slots of every ring.", value=self.reader.ring_capacity()
        )


def build_registry(reader: BoardReader | None, metrics_dir: str | None) -> CollectorRegistry:
    """A registry holding ``engine_up``, the multiprocess files of ``metrics_dir`` and the board."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Up())
    if metrics_dir:
        MultiProcessCollector(registry, path=metrics_dir)
    if reader is not None:
        registry.register(BoardCollector(reader))
    return registry


class Exposition:
    """``/metrics`` and ``/v2/status`` of one front-end process.

    Args:
        reader: the board (None without one: only ``engine_up`` and the multiprocess files).
        metrics_dir: prometheus_client's multiprocess folder (None when metrics are off).
        flush: hands this process's own counts over first, so a scrape sees them all.
    """

    def __init__(
        self,
        reader: BoardReader | None,
        metrics_dir: str | None,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self.reader = reader
        self.metrics_dir = metrics_dir
        self.registry = build_registry(reader, metrics_dir)
        self._flush = flush

    def metrics(self) -> bytes:
        """The text exposition (`CONTENT_TYPE`)."""
        self._flush()
        return generate_latest(self.registry)

    def status(self) -> dict[str, Any]:
        """The status document (see `status_document`)."""
        self._flush()
        return status_document(self.reader, self.metrics_dir)


def _multiprocess_samples(metrics_dir: str | None) -> dict[str, list[Any]]:
    """Samples of the multiprocess files by sample name (empty when metrics are off)."""
    out: dict[str, list[Any]] = defaultdict(list)
    if not metrics_dir:
        return out
    for family in MultiProcessCollector(None, path=metrics_dir).collect():
        for sample in family.samples:
            out[sample.name].append(sample)
    return out


def status_document(reader: BoardReader | None, metrics_dir: str | None) -> dict[str, Any]:
    """What ``GET /v2/status`` answers: server state, processes, models, arenas and rings.

    Per model: worker counters and averages from the board; in-flight, queue depth, request count and
    latency percentiles (ms, estimated from ``engine_request_duration_seconds``) from the metrics
    files, None when metrics are off.
    """
    if reader is None:
        return {"server": {"state": "unknown"}, "metrics": bool(metrics_dir), "processes": [], "models": []}
    samples = _multiprocess_samples(metrics_dir)
    by_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"buckets": defaultdict(float)})
    for s in samples.get(PREFIX + "request_duration_seconds_bucket", ()):
        by_model[s.labels["model"]]["buckets"][float(s.labels["le"])] += s.value
    for name, key in (
        (PREFIX + "requests_total", "requests"),
        (PREFIX + "inflight_requests", "inflight"),
        (PREFIX + "queue_depth", "queue_depth"),
    ):
        for s in samples.get(name, ()):
            entry = by_model[s.labels["model"]]
            entry[key] = entry.get(key, 0) + int(s.value)
    models = []
    metrics_on = bool(metrics_dir)
    for m, spec in enumerate(reader.specs):
        c = reader.counters(m)
        mp = by_model.get(spec.name, {"buckets": {}})
        latency = None
        if metrics_on:
            buckets = sorted(mp["buckets"].items())
            latency = {f"p{round(q * 100)}": _ms(histogram_quantile(q, buckets)) for q in PERCENTILES}
        models.append(
            {
                "name": spec.name,
                "version": spec.version,
                "ready": reader.model_ready(m),
                "requests": mp.get("requests", 0) if metrics_on else None,
                "inflight": mp.get("inflight", 0) if metrics_on else None,
                "queue_depth": mp.get("queue_depth", 0) if metrics_on else None,
                "success": c["success"],
                "failure": c["failure"],
                "expired": c["expired"],
                "batches": c["batches"],
                "rows": c["rows"],
                "avg_batch_size": round(c["rows"] / c["batches"], 2) if c["batches"] else None,
                "avg_queue_ms": _ms(c["queue_ns"] / 1e9 / c["success"]) if c["success"] else None,
                "avg_compute_ms": _ms(c["compute_ns"] / 1e9 / c["batches"]) if c["batches"] else None,
                "latency_ms": latency,
                "breaker": BREAKER_STATES.get(c["breaker_state"], "unknown"),
            }
        )
    return {
        "server": {"state": reader.server_state()},
        "metrics": metrics_on,
        "processes": [dataclasses.asdict(p) for p in reader.processes()],
        "models": models,
        "arenas": [{"process": p, "bytes_in_use": used, "capacity": cap} for p, used, cap in reader.arenas()],
        "rings": [
            {"frontend": f, "worker": w, "direction": d, "occupancy": n} for f, w, d, n in reader.rings()
        ],
        "ring_capacity": reader.ring_capacity(),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
