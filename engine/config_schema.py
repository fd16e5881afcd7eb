"""`EngineConfig`: every config field with its default and meaning, the cross-field checks, and `KEYS`.

Each default lives here and only here; the per-field checks are in `engine.config_keys`, and the
sources that fill the fields (YAML, env, flags) in `engine.config_sources`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config_error import SECRET_KEYS, ConfigError
from engine.config_keys import CHECKS, PROTOCOLS
from engine.models import builtin_repository

LOCAL_HOST = "127.0.0.1"
CONTAINER_HOST = "0.0.0.0"


def _default_grpc_frontends() -> int:
    # gRPC parsing is the most CPU-hungry front-end; spread it when there are cores to spare.
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus // 2)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the supervisor, workers and front-ends are configured with.

    Attributes:
        host: address the front-ends bind; empty (the default) means 127.0.0.1, or 0.0.0.0 when
            ``in_container`` is set.
        in_container: running inside a container (env ENGINE_IN_CONTAINER=1): bind every interface.
        grpc_port: gRPC (KServe v2) port; 0 picks a free port, reported back at start.
        zmq_port: ZMQ ROUTER port; 0 picks a free port.
        rest_port: REST (KServe v2 HTTP) port; 0 picks a free port.
        protocols: front-end protocols to serve, any of ``grpc``, ``rest``, ``zmq``; empty serves
            none (embedding: workers only).
        grpc_frontends: gRPC front-end processes sharing the port (SO_REUSEPORT); default 1 on
            machines with <= 2 CPUs, else min(4, cpus // 2).
        grpc_transport: ``h2`` (default: HTTP/2 parsed on the front-end's event loop by
            `servers.grpc_h2` with the server's own HTTP/2 layer, no grpc core threads) or
            ``grpcio`` (grpc.aio, grpc core's HTTP/2).
        rest_frontends: REST front-end processes (more than one share the port, SO_REUSEPORT).
        zmq_frontends: ZMQ front-end processes (more than one share the port, SO_REUSEPORT).
        devices: ``"auto"`` (every CUDA device, else the CPU; see `resolve_devices`) or a tuple of
            device names (``cpu``, ``cuda:0``...); one worker process per device.
        model_repository: folder with one subfolder per model; default the built-in demo models.
        frontend_arena_mb: shared-memory tensor arena per front-end, for request payloads (MiB).
        worker_arena_mb: shared-memory tensor arena per worker, for outputs (MiB).
        ring_capacity: descriptor slots of each shared-memory ring; a power of two.
        max_message_mb: largest request accepted on any protocol (MiB); at most ``frontend_arena_mb``.
        max_inflight_per_model: admission bound per model and front-end; beyond it requests are
            refused at once with RESOURCE_EXHAUSTED.
        max_inflight_per_frontend: admission bound per front-end process over all models; 0 (the
            default) means half of ``ring_capacity``, the most allowed (the other half of each ring
            carries region releases).
        drain_grace_s: on SIGTERM, how long in-flight requests may finish before children are killed.
        heartbeat_interval_s: how often each child stamps its heartbeat in shared memory.
        hang_timeout_s: a child whose heartbeat is older than this is deemed hung and restarted;
            must exceed ``heartbeat_interval_s``.
        restart_backoff_s: first delay before restarting a crashed child (doubles per restart).
        restart_budget: restarts allowed per child within ``restart_window_s`` before the supervisor
            gives up on it.
        restart_window_s: the sliding window of ``restart_budget``.
        log_level: DEBUG, INFO, WARNING, ERROR or CRITICAL.
        log_format: ``json`` (one JSON object per line), ``text``, or ``auto`` (default): text when
            stderr is a terminal, else JSON (see `engine.logs`).
        access_log: log one ``access`` line per inference request (protocol, model, status code,
            duration, request id).
        access_log_sample: the fraction of requests the access log keeps, in (0, 1].
        metrics: count and time every request for Prometheus (``/metrics``); off saves the few
            microseconds per request this costs. Board gauges (processes, arenas, rings, worker
            counters) are served either way.
        metrics_port: also serve ``/metrics`` on this port from the supervisor; -1 (default) does
            not, 0 picks a free port (reported on stdout as ``metrics listening on host:port``).
        worker_threads: torch intra-op threads per CPU worker; 0 (default) means the CPUs left
            after one per front-end process, at least 1: torch's threads spin between parallel
            regions and would take the cores the front-ends need.
        breaker_failures: consecutive failed batches of a model that open its circuit breaker
            (requests then fail fast with UNAVAILABLE); 0 disables the breaker.
        breaker_cooldown_s: how long an open breaker refuses before one probe batch is let through.
        worker_spin_us: how long a worker with light traffic (a request or two in flight) spins on
            its rings before it sleeps on the futex (an idle worker, or a loaded one, does not
            spin: the front-ends need the CPU); -1 (default) means 300
            (``engine.config.DEFAULT_SPIN_US``).
        auth_tokens: accepted bearer tokens; empty disables authentication. Never logged.
        auth_health_open: health endpoints (gRPC ``grpc.health.v1``, REST ``/v2/health/*``, ZMQ PING)
            answer without a token, so orchestrator probes need no secret; false makes them need one.
    """

    host: str = ""
    in_container: bool = False
    grpc_port: int = 7212
    zmq_port: int = 7211
    rest_port: int = 8008
    protocols: tuple[str, ...] = PROTOCOLS
    grpc_frontends: int = field(default_factory=_default_grpc_frontends)
    grpc_transport: str = "h2"
    rest_frontends: int = 1
    zmq_frontends: int = 1
    devices: str | tuple[str, ...] = "auto"
    model_repository: Path = field(default_factory=builtin_repository)
    frontend_arena_mb: int = 256
    worker_arena_mb: int = 256
    ring_capacity: int = 4096
    max_message_mb: int = 64
    max_inflight_per_model: int = 2048
    max_inflight_per_frontend: int = 0
    drain_grace_s: float = 10.0
    heartbeat_interval_s: float = 0.5
    hang_timeout_s: float = 10.0
    restart_backoff_s: float = 0.5
    restart_budget: int = 5
    restart_window_s: float = 60.0
    log_level: str = "INFO"
    log_format: str = "auto"
    access_log: bool = False
    access_log_sample: float = 1.0
    metrics: bool = True
    metrics_port: int = -1
    worker_threads: int = 0
    worker_spin_us: int = -1
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    auth_tokens: tuple[str, ...] = ()
    auth_health_open: bool = True

    def __post_init__(self) -> None:
        for name, check in CHECKS.items():
            # Frozen: normalised values (list -> tuple, str -> Path...) go in through object.__setattr__.
            object.__setattr__(self, name, check(name, getattr(self, name)))
        if not self.host:
            object.__setattr__(self, "host", CONTAINER_HOST if self.in_container else LOCAL_HOST)
        if self.max_message_mb > self.frontend_arena_mb:
            raise ConfigError(
                "max_message_mb",
                self.max_message_mb,
                f"a message must fit the front-end arena; set it <= frontend_arena_mb "
                f"({self.frontend_arena_mb}) or raise frontend_arena_mb",
            )
        if self.max_inflight_per_frontend == 0:
            object.__setattr__(self, "max_inflight_per_frontend", self.ring_capacity // 2)
        if self.max_inflight_per_frontend > self.ring_capacity // 2:
            raise ConfigError(
                "max_inflight_per_frontend",
                self.max_inflight_per_frontend,
                f"must be at most half of ring_capacity ({self.ring_capacity}); raise ring_capacity "
                "or lower this bound",
            )
        if self.hang_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "hang_timeout_s",
                self.hang_timeout_s,
                f"must exceed heartbeat_interval_s ({self.heartbeat_interval_s}), or every child "
                "looks hung; use a few heartbeats' worth",
            )

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON-able values (for logs and the status command); secrets redacted."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_KEYS:
                value = f"<{len(value)} redacted>"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


#: Every config key, in field order (the order help and error messages list them in).
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineConfig))
if set(KEYS) != set(CHECKS):  # a new field without a check would go unvalidated
    raise RuntimeError(f"config fields without a check: {set(KEYS) ^ set(CHECKS)}")
