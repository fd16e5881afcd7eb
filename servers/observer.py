"""What a front-end records about each inference request: metrics, the access log, the request id.

Every protocol server calls `RequestObserver.begin` when an inference request arrives and
`RequestObserver.end` when it is answered (or `record` for a request refused before it started).
``begin`` puts the request id into `engine.logs.request_id`, so every line logged while the request is
handled carries it; ``end`` counts the answer by model, protocol and status code (the gRPC code name on
every protocol) in `engine.metrics.RequestMetrics` and, when the access log is on, logs one ``access``
line for a sample of the requests.

`install` builds this process's observer (and, for ``/metrics`` and ``/v2/status``, its
`servers.metrics_http.Exposition`) from the supervisor's `engine.telemetry.TelemetrySettings`;
protocol servers fetch them with `current` / `current_exposition`, which answer metrics-less
stand-ins when nothing was installed (protocol unit tests over a fake gateway).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.logs import request_id
from engine.metrics import FLUSH_INTERVAL_S, OK, UNKNOWN_MODEL, RequestMetrics, enable_multiprocess
from engine.telemetry import TelemetrySettings

if TYPE_CHECKING:
    from servers.gateway import ShmGateway
    from servers.metrics_http import Exposition

access_log = logging.getLogger("servers.access")
log = logging.getLogger("servers.observer")


def status_code(error: BaseException | None) -> str:
    """The ``code`` label of an answer: ``OK``, the engine error's gRPC code, CANCELLED or INTERNAL."""
    if error is None:
        return OK
    if isinstance(error, EngineError):
        return error.grpc_code
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class RequestObserver:
    """Counts, times and (optionally) logs the inference requests of one protocol in this process.

    Args:
        protocol: ``grpc``, ``rest`` or ``zmq``.
        models: the repository's model names (any other name is counted as `UNKNOWN_MODEL`, so
            clients cannot grow the label set).
        metrics: where counts go; None counts nothing.
        access_log: log one ``access`` line per (sampled) request.
        sample: the fraction of requests the access log keeps, in (0, 1].
        rng: uniform [0, 1) numbers for the sampling (tests pass a seeded one).
    """

    def __init__(
        self,
        protocol: str,
        models: Iterable[str] = (),
        metrics: RequestMetrics | None = None,
        *,
        access_log: bool = False,
        sample: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.protocol = protocol
        self.models = frozenset(models)
        self.metrics = metrics
        self.access_log = access_log
        self.sample = sample
        self._rng = rng
        self._timer: asyncio.TimerHandle | None = None

    def label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN_MODEL

    def begin(self, model: str, rid: str = "") -> float:
        """An inference request for ``model`` arrived; returns its start time for `end`."""
        if rid:
            request_id.set(rid)
        if self.metrics is not None:
            self.metrics.begin(self.label(model))
        return time.perf_counter()

    def end(self, model: str, started: float, error: BaseException | None = None) -> None:
        """The request `begin` announced was answered (``error`` None) or failed with ``error``."""
        seconds = time.perf_counter() - started
        code = status_code(error)
        if self.metrics is not None:
            self.metrics.end(self.label(model), code, seconds)
        if self.access_log:
            self._access(model, code, seconds, "")

    def record(self, model: str, error: BaseException | None, rid: str = "") -> None:
        """Count a request answered without `begin` (refused before it started)."""
        code = status_code(error)
        if self.metrics is not None:
            self.metrics.record(self.label(model), code)
        if self.access_log:
            self._access(model, code, None, rid)

    def _access(self, model: str, code: str, seconds: float | None, rid: str) -> None:
        if self.sample < 1.0 and self._rng() >= self.sample:
            return
        ms = None if seconds is None else round(seconds * 1e3, 3)
        extra: dict[str, object] = {
            "event": "access",
            "protocol": self.protocol,
            "model": model,
            "code": code,
            "duration_ms": ms,
        }
        if rid:
            extra["request_id"] = rid
        rid = rid or request_id.get()
        access_log.info("%s %s %s %s ms id=%s", self.protocol, model, code, ms, rid, extra=extra)

    # ---- flushing ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the counts to prometheus_client now (the process serving /metrics does before a scrape)."""
        if self.metrics is not None:
            self.metrics.flush()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Flush every `engine.metrics.FLUSH_INTERVAL_S` from ``loop`` (default: the running loop)."""
        if self.metrics is None or self._timer is not None:
            return
        loop = loop or asyncio.get_running_loop()

        def tick() -> None:
            try:
                self.flush()
            except Exception:  # a full disk must not stop the front-end; try again next time
                log.exception("flushing metrics failed")
            self._timer = loop.call_later(FLUSH_INTERVAL_S, tick)

        self._timer = loop.call_later(FLUSH_INTERVAL_S, tick)

    def close(self) -> None:
        """Stop the periodic flush and flush what is left. Safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


_observer: RequestObserver | None = None
_exposition: Exposition | None = None


def install(settings: TelemetrySettings, protocol: str, gateway: ShmGateway) -> RequestObserver:
    """Set up this front-end process's observer and exposition (once, after the gateway started)."""
    global _observer, _exposition
    from engine.stats import BoardReader
    from servers.metrics_http import Exposition

    metrics = None
    if settings.metrics:
        enable_multiprocess(settings.metrics_dir)
        metrics = RequestMetrics(protocol)
    _observer = RequestObserver(
        protocol,
        gateway.model_names(),
        metrics,
        access_log=settings.access_log,
        sample=settings.access_log_sample,
    )
    h = gateway.h
    names = settings.workers, settings.frontends
    reader = BoardReader(gateway.control, gateway.layout, h.base, h.specs, *names)
    _exposition = Exposition(reader, settings.metrics_dir or None, flush=_observer.flush)
    return _observer


def current(protocol: str, models: Iterable[str] = ()) -> RequestObserver:
    """This process's observer when `install` made one for ``protocol``, else a metrics-less one."""
    if _observer is not None and _observer.protocol == protocol:
        return _observer
    return RequestObserver(protocol, models)


def current_exposition() -> Exposition | None:
    """This process's exposition (None before `install`: no board to read)."""
    return _exposition
