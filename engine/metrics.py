"""The engine's Prometheus metrics: their names, and the cheap in-process counting that feeds them.

Every metric starts with `PREFIX`. Three sources feed ``/metrics`` (`servers.metrics_http` merges them):

Front-end processes (`RequestMetrics`, one per process, fed by `servers.observer`):

    engine_requests_total{model,protocol,code}        counter    every answered inference request; code is
                                                                 the gRPC status name on every protocol
    engine_requests_refused_total{model,protocol}     counter    admission refusals (RESOURCE_EXHAUSTED)
    engine_request_duration_seconds{model,protocol}   histogram  arrival to answer, requests answered OK
    engine_inflight_requests{model,protocol}          gauge      requests being handled (sum over processes)

Workers (`WorkerMetrics`, fed by `engine.worker.core.WorkerCore`):

    engine_queue_duration_seconds{model}              histogram  per request: off its ring -> batch start
    engine_compute_duration_seconds{model}            histogram  per batch: the model call and output write
    engine_queue_depth{model}                         gauge      requests waiting in the batchers

The board, read at scrape time (`servers.metrics_http.BoardCollector`, no cost on the request path):
server readiness, per-model worker counters and the batch size histogram, process state, restarts and
heartbeat age, front-end in-flight, arena bytes, ring occupancy and circuit-breaker state.

Hot-path cost: prometheus_client's multiprocess values take a lock and write an mmap per update
(2-5 us each here), so the request path only bumps plain Python ints (`LocalHistogram`, dicts) and
`flush` hands the deltas to prometheus_client every `FLUSH_INTERVAL_S` (and before every scrape in
the process serving it). Numbers of the other processes are therefore at most that old.

Multiprocess mode: `enable_multiprocess` points prometheus_client at the supervisor's private folder
in a child process before any metric exists; each process writes its own ``*_<pid>.db`` files and the
exposition merges them (`prometheus_client.multiprocess.MultiProcessCollector`).
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "engine_"
#: Seconds, for request latency and queue time: 100 us .. 30 s.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Rows per batch (the board's power-of-two buckets, see `engine.shm.STAT_NAMES`).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: How often a process hands its counts to prometheus_client.
FLUSH_INTERVAL_S = 0.5
#: Model label of requests naming no model of the repository (bounded cardinality: clients choose names).
UNKNOWN_MODEL = "_unknown_"
#: Code label of requests answered successfully.
OK = "OK"
REFUSED_CODE = "RESOURCE_EXHAUSTED"

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: str) -> None:
    """Make prometheus_client in this process write to ``directory`` (multiprocess mode).

    Call it in a child process before creating any metric. prometheus_client picks its value class
    when first imported, from the environment; the supervisor hands the folder over explicitly (so an
    embedding program's environment is left alone), hence the switch here.
    """
    from prometheus_client import values

    os.environ[MULTIPROC_ENV] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


class LocalHistogram:
    """Bucket counts and a sum kept in plain Python numbers, handed to a prometheus Histogram by `flush_into`.

    Buckets follow prometheus_client's rule: a value goes to the first bound it is <= to.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = (*(float(b) for b in bounds), math.inf)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.total += value * count

    def flush_into(self, child: Any) -> None:
        """Add what was observed since the last flush to a labelled prometheus Histogram, then reset.

        Uses the child's per-bucket values (non-cumulative in prometheus_client, as ``observe`` writes
        them); `tests/unit/test_metrics.py` proves the result equals calling ``observe`` per value.
        """
        if not any(self.counts):
            return
        child._sum.inc(self.total)
        for i, count in enumerate(self.counts):
            if count:
                child._buckets[i].inc(count)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0


def _histogram(
    name: str, doc: str, labels: Sequence[str], buckets: Sequence[float], registry: Any
) -> Histogram:
    return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)


class RequestMetrics:
    """Request counts, refusals, latency and in-flight of one protocol in this (front-end) process.

    Args:
        protocol: ``grpc``, ``rest`` or ``zmq`` (the ``protocol`` label).
        registry: where the metrics register; None (production, multiprocess mode) registers them
            nowhere, the exposition reads the files. Tests pass a private registry.
    """

    def __init__(self, protocol: str, registry: CollectorRegistry | None = None) -> None:
        self.protocol = protocol
        self.requests = Counter(
            PREFIX + "requests", "Inference requests answered, by status code.",
            ["model", "protocol", "code"], registry=registry,
        )  # fmt: skip
        self.refused = Counter(
            PREFIX + "requests_refused",
            "Inference requests refused by admission control (RESOURCE_EXHAUSTED).",
            ["model", "protocol"],
            registry=registry,
        )
        self.latency = _histogram(
            "request_duration_seconds",
            "Time from a request's arrival at a front-end to its answer (requests answered OK).",
            ["model", "protocol"],
            LATENCY_BUCKETS,
            registry,
        )
        self.inflight = Gauge(
            PREFIX + "inflight_requests", "Inference requests being handled by the front-ends.",
            ["model", "protocol"], registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self._models: dict[str, _ModelCounts] = {}
        self._children: dict[Any, Any] = {}

    def _counts(self, model: str) -> _ModelCounts:
        counts = self._models.get(model)
        if counts is None:
            counts = self._models[model] = _ModelCounts()
        return counts

    def begin(self, model: str) -> None:
        """A request for ``model`` arrived (in flight until `end`)."""
        self._counts(model).active += 1

    def end(self, model: str, code: str, seconds: float) -> None:
        """A request that `begin` counted was answered with ``code`` after ``seconds``."""
        counts = self._models[model]
        counts.active -= 1
        counts.codes[code] = counts.codes.get(code, 0) + 1
        if code == OK:
            counts.latency.observe(seconds)

    def record(self, model: str, code: str, seconds: float | None = None) -> None:
        """Count an answered request (one never counted by `begin`, such as an early refusal)."""
        counts = self._counts(model)
        counts.codes[code] = counts.codes.get(code, 0) + 1
        if code == OK and seconds is not None:
            counts.latency.observe(seconds)

    def flush(self) -> None:
        """Hand everything counted since the last flush to prometheus_client."""
        protocol = self.protocol
        for model, counts in self._models.items():
            codes, counts.codes = counts.codes, {}
            for code, n in codes.items():
                self._child(self.requests, model, protocol, code).inc(n)
                if code == REFUSED_CODE:
                    self._child(self.refused, model, protocol).inc(n)
            if any(counts.latency.counts):  # no empty histogram for a model that never answered OK
                counts.latency.flush_into(self._child(self.latency, model, protocol))
            if counts.published != counts.active:
                self._child(self.inflight, model, protocol).set(counts.active)
                counts.published = counts.active

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


class _ModelCounts:
    """What `RequestMetrics` keeps of one model between flushes."""

    __slots__ = ("active", "codes", "latency", "published")

    def __init__(self) -> None:
        self.active = 0
        self.published: int | None = None
        self.codes: dict[str, int] = {}
        self.latency = LocalHistogram(LATENCY_BUCKETS)


class _Queued(Protocol):
    arrival_ns: int
    #: client requests it stands for (a ZMQ front-end's coalesced group)
    requests: int


class BatchObserver(Protocol):
    """What `engine.worker.core.WorkerCore` tells about each computed batch."""

    def batch(self, model: int, requests: Sequence[_Queued], start_ns: int, end_ns: int) -> None: ...


class NoBatchMetrics:
    """A `BatchObserver` that keeps nothing (metrics off, unit tests)."""

    def batch(self, model: int, requests: Sequence[_Queued], start_ns: int, end_ns: int) -> None:
        pass


NO_BATCH_METRICS = NoBatchMetrics()


class WorkerMetrics:
    """Queue time, compute time and queue depth per model in a worker process.

    Args:
        models: model names by model index (the board's order).
        registry: as for `RequestMetrics`.
        clock: monotonic seconds, for the flush interval.
    """

    def __init__(
        self,
        models: Sequence[str],
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = list(models)
        self.queue = _histogram(
            "queue_duration_seconds",
            "Time a request waited in a worker, from leaving its ring to the start of its batch.",
            ["model"],
            LATENCY_BUCKETS,
            registry,
        )
        self.compute = _histogram(
            "compute_duration_seconds",
            "Time a worker spent computing one batch (model call and output write).",
            ["model"],
            LATENCY_BUCKETS,
            registry,
        )
        self.depth = Gauge(
            PREFIX + "queue_depth", "Requests waiting in the workers' batchers.",
            ["model"], registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self._queue = [LocalHistogram(LATENCY_BUCKETS) for _ in self.models]
        self._compute = [LocalHistogram(LATENCY_BUCKETS) for _ in self.models]
        self._queue_children = [self.queue.labels(m) for m in self.models]
        self._compute_children = [self.compute.labels(m) for m in self.models]
        self._depth_children = [self.depth.labels(m) for m in self.models]
        self._depths: list[int | None] = [None] * len(self.models)
        self._clock = clock
        self._next_flush = clock() + FLUSH_INTERVAL_S

    def batch(self, model: int, requests: Sequence[_Queued], start_ns: int, end_ns: int) -> None:
        """One batch of ``requests`` ran from ``start_ns`` to ``end_ns``."""
        queue = self._queue[model]
        for r in requests:
            queue.observe((start_ns - r.arrival_ns) / 1e9, r.requests)
        self._compute[model].observe((end_ns - start_ns) / 1e9)

    def maybe_flush(self, depths: Callable[[], Iterable[int]]) -> None:
        """`flush` when `FLUSH_INTERVAL_S` has passed since the last one (call it every loop turn)."""
        now = self._clock()
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_INTERVAL_S
            self.flush(depths())

    def flush(self, depths: Iterable[int] = ()) -> None:
        """Hand the histograms and the current queue depth per model to prometheus_client."""
        for m in range(len(self.models)):
            self._queue[m].flush_into(self._queue_children[m])
            self._compute[m].flush_into(self._compute_children[m])
        for m, depth in enumerate(depths):
            if self._depths[m] != depth:
                self._depth_children[m].set(depth)
                self._depths[m] = depth
