"""The front-end process shell: name the process, run one protocol server on uvloop over a `ShmGateway`.

Started by the supervisor with the spawn start method. SIGTERM stops accepting, lets in-flight
requests finish (the protocol's graceful stop), then exits 0. Never imports torch.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
from dataclasses import dataclass, field

from engine.gc_tuning import settle_heap
from engine.logs import setup_logging
from engine.malloc_tuning import keep_freed_memory
from engine.shm import F_HEARTBEAT, F_PID, F_PORT, F_STATE, PROC_DOWN, PROC_UP
from engine.telemetry import TelemetrySettings
from servers.gateway import GatewayHandles, ShmGateway
from servers.gateway_api import FrontendSettings
from servers.observer import install as install_observer

log = logging.getLogger("servers.frontend")

PROTOCOL_MODULES = {
    "grpc": "servers.grpc_server",
    "rest": "servers.rest_server",
    "zmq": "servers.zmq_server",
}


@dataclass(frozen=True)
class FrontendArgs:
    """What the supervisor hands a front-end process."""

    protocol: str
    handles: GatewayHandles
    settings: FrontendSettings
    heartbeat_interval_s: float
    log_level: str
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


def run(args: FrontendArgs) -> None:
    """Process entry point."""
    role = f"frontend {args.protocol}#{args.settings.instance}"
    setup_logging(args.log_level, role, args.telemetry.log_format)
    try:
        from setproctitle import setproctitle

        setproctitle(f"engine: frontend {args.protocol}#{args.settings.instance}")
    except ImportError:  # pragma: no cover
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()  # large request buffers are reused, not faulted in afresh each time
    import uvloop

    uvloop.run(_main(args))


async def _main(args: FrontendArgs) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    gateway = ShmGateway(args.handles)
    gateway.start(loop)
    control = gateway.control
    slot = args.handles.layout.frontend(args.handles.f)
    control.store_u64(slot + F_PID, __import__("os").getpid())
    observer = install_observer(args.telemetry, args.protocol, gateway)
    observer.start(loop)

    def on_bound(port: int) -> None:
        settle_heap()  # everything is imported and the server built: see engine.gc_tuning
        control.store_u64(slot + F_PORT, port)
        control.store_u64(slot + F_STATE, PROC_UP)
        log.info("serving %s on %s:%d", args.protocol, args.settings.host, port, extra={"event": "ready"})

    async def heartbeat() -> None:
        while True:
            control.store_u64(slot + F_HEARTBEAT, time.monotonic_ns())
            await asyncio.sleep(args.heartbeat_interval_s)

    beat = loop.create_task(heartbeat())
    module = importlib.import_module(PROTOCOL_MODULES[args.protocol])
    try:
        await module.serve(gateway, args.settings, on_bound, stop)
    finally:
        beat.cancel()
        observer.close()
        control.store_u64(slot + F_STATE, PROC_DOWN)
        gateway.close()
        log.info("stopped")
