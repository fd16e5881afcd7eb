"""The supervisor's process slots (`Child`) and what each child process is started with.

A worker runs `engine.worker.main.run` with a `engine.worker.main.WorkerArgs`, a front-end
`servers.frontend.run` with a `servers.frontend.FrontendArgs`. multiprocessing pickles them to the
spawned child over its own pipe; file descriptors travel as `engine.fdpass.PassFd`, so the child
gets its own copy. The entry modules are imported only when a child is started: the supervisor
itself never needs torch, grpc or uvicorn.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig, resolve_spin_s
from engine.fdpass import PassFd
from servers.gateway_api import FrontendSettings

if TYPE_CHECKING:
    from engine.supervisor import Supervisor


@dataclass
class Child:
    """One process slot (a worker or a front-end) across its incarnations."""

    role: str  # "worker" | "frontend"
    index: int  # w or f
    name: str  # e.g. "worker cpu:0", "frontend grpc#0"
    protocol: str = ""
    device: str = ""
    instance: int = 0
    gen: int = 0
    process: BaseProcess | None = None
    started_at: float = 0.0
    restarts: list[float] = field(default_factory=list)
    restart_at: float | None = None
    port: int = 0
    embedded: bool = False
    #: the pid SIGKILLed as hung: until its exit is seen, it is not killed (nor logged) again
    killed_pid: int | None = None


def process_entry(supervisor: Supervisor, child: Child) -> tuple[Callable[[Any], None], Any]:
    """The function ``child``'s process runs and its one argument, for its current generation."""
    assert supervisor.layout is not None
    cfg = supervisor.config
    if child.role == "worker":
        from engine.worker.main import WorkerArgs, run

        args: Any = WorkerArgs(
            w=child.index,
            gen=child.gen,
            device=child.device,
            base=supervisor.base,
            layout=supervisor.layout,
            specs=supervisor.specs,
            notifier_fds=tuple(PassFd(fd) for fd in supervisor.eventfds),  # type: ignore[misc]
            arena_max_block=supervisor.arena_max_block,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            drain_grace_s=cfg.drain_grace_s,
            threads=cfg.worker_threads or auto_worker_threads(len(supervisor.children_by_role("frontend"))),
            log_level=cfg.log_level,
            spin_s=resolve_spin_s(cfg),
            breaker_failures=cfg.breaker_failures,
            breaker_cooldown_s=cfg.breaker_cooldown_s,
            telemetry=supervisor.telemetry.settings(supervisor),
        )
        return run, args
    from servers.frontend import FrontendArgs
    from servers.frontend import run as frun

    handles = supervisor.handles(child.index)
    args = FrontendArgs(
        protocol=child.protocol,
        handles=replace(handles, notifier_fd=PassFd(supervisor.eventfds[child.index])),  # type: ignore[arg-type]
        settings=FrontendSettings(
            host=cfg.host,
            port=child.port or configured_port(cfg, child.protocol),
            max_message_bytes=cfg.max_message_mb << 20,
            reuse_port=supervisor.frontend_count(child.protocol) > 1,
            auth_tokens=cfg.auth_tokens,
            instance=child.instance,
            # what the gateway admits, plus room for the requests it refuses itself
            max_inflight=2 * cfg.max_inflight_per_frontend,
            auth_health_open=cfg.auth_health_open,
            grpc_transport=cfg.grpc_transport,
        ),
        heartbeat_interval_s=cfg.heartbeat_interval_s,
        log_level=cfg.log_level,
        telemetry=supervisor.telemetry.settings(supervisor),
    )
    return frun, args


def auto_worker_threads(n_frontends: int) -> int:
    """Torch threads of a worker when ``worker_threads`` is 0: the cores the front-ends leave."""
    # Measured on 2 cores (gRPC + REST + ZMQ front-ends): 1 thread instead of torch's 2 doubled
    # ZMQ mlp req/s at concurrency 64 (680 -> 1570).
    # An embedded front-end (Engine.connect) runs in the caller's process and needs a core too.
    return max(1, (os.cpu_count() or 1) - n_frontends)


def configured_port(config: EngineConfig, protocol: str) -> int:
    """The port the config names for ``protocol`` (0: let the system choose)."""
    return {"grpc": config.grpc_port, "rest": config.rest_port, "zmq": config.zmq_port}[protocol]
