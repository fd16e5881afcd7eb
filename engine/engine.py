"""`Engine`: the supervisor run in-process, for tests and embedding.

    with Engine(config, embedded_frontends=1) as engine:
        gateway = engine.connect()          # inside a running asyncio loop
        result = await gateway.infer("identity", [...])

The supervisor's watch loop runs in a background thread; children are real processes.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from engine.config import EngineConfig
from engine.supervisor import Supervisor
from servers.gateway import ShmGateway


class Engine:
    """Starts every engine process on enter, stops them and unlinks all shared memory on exit."""

    def __init__(self, config: EngineConfig, *, embedded_frontends: int = 1) -> None:
        self.supervisor = Supervisor(config, embedded_frontends=embedded_frontends)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_embedded = 0
        self._gateways: list[ShmGateway] = []

    def __enter__(self) -> Engine:
        try:
            self.supervisor.start()
        except BaseException:
            self.supervisor.stop(grace_s=0)
            raise
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.supervisor.poll(0.05)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, grace_s: float | None = None) -> None:
        """Drain and stop everything. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for gw in self._gateways:
            gw.close()
        self.supervisor.stop(grace_s)

    def connect(self, loop: asyncio.AbstractEventLoop | None = None) -> ShmGateway:
        """A gateway on the next embedded front-end slot, listening in ``loop`` (default: running)."""
        slots = [c for c in self.supervisor.children_by_role("frontend") if c.embedded]
        if self._next_embedded >= len(slots):
            raise RuntimeError("no embedded front-end slot left; raise embedded_frontends")
        child = slots[self._next_embedded]
        self._next_embedded += 1
        gateway = ShmGateway(self.supervisor.handles(child.index))
        gateway.start(loop)
        from engine.shm import F_PORT, F_STATE, PROC_UP

        control = self.supervisor.control
        assert control is not None
        slot = self.supervisor.slot(child)
        control.store_u64(slot + F_PORT, 0)
        control.store_u64(slot + F_STATE, PROC_UP)
        self._gateways.append(gateway)
        return gateway

    def status(self) -> dict[str, Any]:
        """Processes (pid, state, uptime, restarts) and per-model counters."""
        return self.supervisor.status()

    def endpoints(self) -> dict[str, int]:
        return self.supervisor.endpoints()
