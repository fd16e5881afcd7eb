"""The supervisor: owns the config and every shared-memory segment, starts and watches the processes.

It creates the control segment (board + rings), one arena per process incarnation and one eventfd
per front-end slot, starts one worker per device and the front-ends with the spawn start method,
restarts a child that dies (with backoff and a budget), and on stop turns readiness off, lets
in-flight requests drain, stops the children and unlinks every segment it created.

`Supervisor` is steppable and thread-agnostic: `engine.launch` drives it from the main thread with
signal handlers, `engine.Engine` from a background thread for tests and embedding.

Its parts: `engine.supervisor_children` (the process slots and what each child is started with),
`engine.supervisor_shm` (arena names and sizes, the /dev/shm check, the stale sweep),
`engine.supervisor_status` (the status document).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import signal
import time
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, resolve_devices
from engine.errors import EngineError
from engine.logs import resolve_format
from engine.models.repository import load_repository
from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_HEARTBEAT,
    F_INFLIGHT,
    F_PORT,
    F_REQUESTS,
    F_STARTED,
    F_STATE,
    MAX_MODELS,
    PROC_DOWN,
    PROC_STARTING,
    PROC_UP,
    SERVER_DRAINING,
    SERVER_READY,
    SERVER_STARTING,
    SERVER_STOPPING,
    BoardLayout,
)
from engine.supervisor_children import Child, process_entry
from engine.supervisor_shm import (
    arena_name,
    arena_segment_size,
    next_pow2,
    shm_shortage,
    sweep_stale_segments_in,
)
from engine.supervisor_status import (
    arena_bytes_in_use,
    model_stats,
    process_status,
    server_state_name,
)
from engine.telemetry import Telemetry
from ext.notify import eventfd_open
from ext.ring import Ring
from ext.segment import KIND_ARENA, KIND_CONTROL, NAME_PREFIX, Segment, unlink_segment
from servers.gateway import GatewayHandles

log = logging.getLogger("engine.supervisor")

#: Where the segments live; read at each use, so a test may point it at a small tmpfs.
SHM_DIR = Path("/dev/shm")
#: Once nothing is in flight, how long a drain still lets the front-ends refuse late arrivals.
DRAIN_LINGER_S = 0.25


class StartupError(EngineError):
    """The engine could not start (bad repository, short /dev/shm, a child that never got ready)."""


class ShmTooSmall(StartupError):
    """/dev/shm cannot hold the configured arenas (Docker gives containers 64 MB by default)."""


def sweep_stale_segments() -> list[str]:
    """Unlink segments left by engine processes that are gone (a supervisor killed with SIGKILL)."""
    return sweep_stale_segments_in(SHM_DIR)


class Supervisor:
    """Starts, watches and stops every engine process for one config."""

    def __init__(self, config: EngineConfig, *, embedded_frontends: int = 0) -> None:
        self.config = config
        self.embedded_frontends = embedded_frontends
        self.ctx = mp.get_context("spawn")
        self.base = f"{NAME_PREFIX}{secrets.token_hex(16)}"
        self.control: Segment | None = None
        self.layout: BoardLayout | None = None
        self.specs: tuple[ModelSpec, ...] = ()
        self.repository_errors: dict[str, str] = {}
        self.devices: list[str] = []
        self.children: list[Child] = []
        self.eventfds: list[int] = []
        self.segments: dict[str, Segment] = {}
        self.started_ns = time.monotonic_ns()
        self.stopping = False
        self.failed: str | None = None
        self.telemetry = Telemetry(config, resolve_format(config.log_format))
        max_msg = config.max_message_mb << 20
        self.arena_max_block = next_pow2(max_msg + (1 << 20))

    # ---- start ----------------------------------------------------------------------------------

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Create shared memory, start every child and wait until all are ready."""
        cfg = self.config
        sweep_stale_segments()
        repo = load_repository(cfg.model_repository)
        self.repository_errors = dict(repo.errors)
        for name, reason in repo.errors.items():
            log.error("model %s failed to load: %s", name, reason)
        specs = sorted(repo.specs.values(), key=lambda s: s.name)
        if len(specs) > MAX_MODELS:
            raise StartupError(f"{len(specs)} models; at most {MAX_MODELS} are supported")
        self.specs = tuple(specs)
        self.devices = resolve_devices(cfg)
        workers = [Child("worker", w, f"worker {d}", device=d) for w, d in enumerate(self.devices)]
        frontends: list[Child] = []
        for proto in cfg.protocols:
            for i in range(self.frontend_count(proto)):
                frontends.append(Child("frontend", 0, f"frontend {proto}#{i}", protocol=proto, instance=i))
        for i in range(self.embedded_frontends):
            frontends.append(
                Child("frontend", 0, f"embedded#{i}", protocol="embedded", instance=i, embedded=True)
            )
        for f, child in enumerate(frontends):
            child.index = f
        self.children = workers + frontends
        self.layout = BoardLayout(len(workers), len(frontends), cfg.ring_capacity)
        self._check_shm_space(len(workers), len(frontends))
        self.control = Segment.create(self.layout.total, KIND_CONTROL, name=self.base)
        self.segments[self.base] = self.control
        for f in range(len(frontends)):
            for w in range(len(workers)):
                Ring.create(self.control, self.layout.request_ring(f, w), cfg.ring_capacity)
                Ring.create(self.control, self.layout.response_ring(f, w), cfg.ring_capacity)
        self.eventfds = [eventfd_open() for _ in frontends]
        self._set_server_state(SERVER_STARTING)
        log.info(
            "starting: %d models (%s), workers on %s, front-ends %s",
            len(specs),
            ", ".join(s.name for s in specs),
            ", ".join(self.devices),
            ", ".join(c.name for c in frontends) or "none",
            extra={"event": "start"},
        )
        for child in workers:
            self._spawn(child)
        self._wait_up([c for c in workers], ready_timeout_s)
        for child in frontends:
            if child.embedded:
                self._new_generation(child)
                continue
            shared = self.frontend_count(child.protocol) > 1
            if shared and child.instance > 0:
                # the instances share the port the first one bound (SO_REUSEPORT)
                child.port = frontends[[c.name for c in frontends].index(f"frontend {child.protocol}#0")].port
            self._spawn(child)
            if shared and child.instance == 0:
                self._wait_up([child], ready_timeout_s)
        self._wait_up([c for c in frontends if not c.embedded], ready_timeout_s)
        self._set_server_state(SERVER_READY)
        self.telemetry.serve(self)

    def _check_shm_space(self, n_workers: int, n_frontends: int) -> None:
        assert self.layout is not None
        shortage = shm_shortage(
            SHM_DIR, self.config, self.layout.total, n_workers, n_frontends, self.arena_max_block
        )
        if shortage is not None:
            raise ShmTooSmall(shortage)

    def _new_generation(self, child: Child) -> None:
        """Bump the slot's generation, give it a fresh arena and announce it on the board."""
        assert self.control is not None and self.layout is not None
        old = child.gen
        child.gen += 1
        name = arena_name(self.base, child.role, child.index, child.gen)
        size = arena_segment_size(self.config, child.role, self.arena_max_block)
        slot = self.slot(child)
        if old:
            # peers that still map it keep their mapping until they let go
            self._unlink(arena_name(self.base, child.role, child.index, old))
        self.segments[name] = Segment.create(size, KIND_ARENA, name=name)
        self.control.store_u64(slot + F_STATE, PROC_STARTING)
        self.control.store_u64(slot + F_STARTED, time.monotonic_ns())
        self.control.store_u64(slot + F_HEARTBEAT, time.monotonic_ns())
        self._clear_inflight(child)
        self.control.store_u64(slot + F_GEN, child.gen)

    def _clear_inflight(self, child: Child) -> None:
        """A front-end incarnation that is gone holds nothing: its in-flight counts are its own to
        publish, and a dead one's would stand until the next incarnation's first request (in
        `engine status`, in the drain's wait and in the workers' batching rules)."""
        if child.role == "frontend":
            assert self.control is not None
            slot = self.slot(child)
            self.control.store_u64(slot + F_INFLIGHT, 0)
            self.control.store_u64(slot + F_REQUESTS, 0)

    def _spawn(self, child: Child) -> None:
        assert self.layout is not None
        self._new_generation(child)
        target, args = process_entry(self, child)
        proc = self.ctx.Process(target=target, args=(args,), name=child.name, daemon=False)
        proc.start()
        child.process = proc
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %s, generation %d)", child.name, proc.pid, child.gen)

    def handles(self, f: int) -> GatewayHandles:
        """What front-end slot ``f`` needs to attach its gateway."""
        assert self.layout is not None
        return GatewayHandles(
            base=self.base,
            layout=self.layout,
            f=f,
            gen=self.children_by_role("frontend")[f].gen,
            specs=self.specs,
            repository_errors=tuple(sorted(self.repository_errors.items())),
            notifier_fd=self.eventfds[f],
            arena_max_block=self.arena_max_block,
            max_inflight_per_model=self.config.max_inflight_per_model,
            max_inflight_per_frontend=self.config.max_inflight_per_frontend,
            worker_devices=tuple(self.devices),
        )

    def children_by_role(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role]

    def slot(self, child: Child) -> int:
        """Offset of ``child``'s slot (state, pid, port...) in the control segment."""
        assert self.layout is not None
        if child.role == "worker":
            return self.layout.worker(child.index)
        return self.layout.frontend(child.index)

    def _wait_up(self, children: list[Child], timeout_s: float) -> None:
        assert self.control is not None
        end = time.monotonic() + timeout_s
        for child in children:
            while self.control.load_u64(self.slot(child) + F_STATE) != PROC_UP:
                proc = child.process
                if proc is not None and not proc.is_alive():
                    raise StartupError(f"{child.name} exited with code {proc.exitcode} before it was ready")
                if time.monotonic() > end:
                    raise StartupError(
                        f"{child.name} was not ready after {timeout_s:.0f} s (model loading too slow? "
                        "raise the start-up timeout)"
                    )
                if proc is not None:
                    wait_sentinels([proc.sentinel], timeout=0.02)
            if child.role == "frontend":
                child.port = self.control.load_u64(self.slot(child) + F_PORT)

    # ---- watch ----------------------------------------------------------------------------------

    def frontend_count(self, protocol: str) -> int:
        """Front-end processes configured for ``protocol``; more than one share its port."""
        cfg = self.config
        return {"grpc": cfg.grpc_frontends, "rest": cfg.rest_frontends, "zmq": cfg.zmq_frontends}[protocol]

    def endpoints(self) -> dict[str, int]:
        """Bound port per protocol."""
        out = {}
        for c in self.children_by_role("frontend"):
            if not c.embedded and c.instance == 0:
                out[c.protocol] = c.port
        return out

    def poll(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a child to exit; handle exits and due restarts."""
        sentinels = [c.process.sentinel for c in self.children if c.process is not None]
        if sentinels:
            wait_sentinels(sentinels, timeout=timeout_s)
        else:
            time.sleep(timeout_s)
        now = time.monotonic()
        for child in self.children:
            proc = child.process
            if proc is not None and not proc.is_alive() and not self.stopping:
                self.telemetry.process_exited(proc.pid)
                self._on_exit(child, proc.exitcode)
            due = child.process is None and child.restart_at is not None and now >= child.restart_at
            if due and not self.stopping and self.failed is None:
                self._spawn(child)
        for child in self.children:
            if child.role == "frontend" and child.process is not None and self.control is not None:
                port = self.control.load_u64(self.slot(child) + F_PORT)
                if port:
                    child.port = port
        if not self.stopping:
            self._kill_hung()

    def _kill_hung(self) -> None:
        """SIGKILL a child whose heartbeat is older than hang_timeout_s; its exit restarts it."""
        control = self.control
        if control is None:
            return
        now = time.monotonic_ns()
        limit = int(self.config.hang_timeout_s * 1e9)
        for child in self.children:
            proc = child.process
            if proc is None or proc.pid is None or proc.pid == child.killed_pid or not proc.is_alive():
                continue
            slot = self.slot(child)
            if control.load_u64(slot + F_STATE) != PROC_UP:
                continue  # still loading models: it has not started beating yet
            age = now - control.load_u64(slot + F_HEARTBEAT)
            if age > limit:
                log.error(
                    "%s (pid %d) missed its heartbeat for %.1f s (hang_timeout_s %.1f): killing it",
                    child.name,
                    proc.pid,
                    age / 1e9,
                    self.config.hang_timeout_s,
                )
                child.killed_pid = proc.pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    def _on_exit(self, child: Child, code: int | None) -> None:
        assert self.control is not None
        child.process = None
        log.error(
            "%s exited unexpectedly (code %s); restarting", child.name, code, extra={"event": "restart"}
        )
        now = time.monotonic()
        window = self.config.restart_window_s
        child.restarts = [t for t in child.restarts if now - t < window]
        if len(child.restarts) >= self.config.restart_budget:
            self.failed = (
                f"{child.name} crashed {len(child.restarts) + 1} times within {window:.0f} s "
                f"(restart_budget {self.config.restart_budget}); giving up"
            )
            log.critical("%s", self.failed)
            self._retire(child)
            return
        child.restarts.append(now)
        # A new generation right away: peers fail what the dead one held and reset their rings now,
        # not after the backoff.
        self._new_generation(child)
        child.gen -= 1  # _spawn bumps it again, with a fresh arena
        self._unlink(arena_name(self.base, child.role, child.index, child.gen + 1))
        self._wake_frontends()
        backoff = self.config.restart_backoff_s * (2 ** (len(child.restarts) - 1))
        child.restart_at = now + backoff

    def _retire(self, child: Child) -> None:
        """Announce a dead incarnation that will not be replaced.

        Without a new generation on the board its peers would never learn it is gone: requests it
        held would wait forever and new ones would still be sent to its slot, which looks up.
        """
        assert self.control is not None
        slot = self.slot(child)
        self._unlink(arena_name(self.base, child.role, child.index, child.gen))
        child.gen += 1
        self.control.store_u64(slot + F_STATE, PROC_DOWN)
        self._clear_inflight(child)
        self.control.store_u64(slot + F_GEN, child.gen)  # peers fail what the dead one held
        self._wake_frontends()

    def _wake_frontends(self) -> None:
        for fd in self.eventfds:
            with contextlib.suppress(OSError):
                os.write(fd, (1).to_bytes(8, "little"))

    def _set_server_state(self, state: int) -> None:
        if self.control is not None:
            self.control.store_u64(0, state)
        self._wake_frontends()

    # ---- stop -----------------------------------------------------------------------------------

    def drain(self, grace_s: float | None = None) -> None:
        """Readiness off, stop admitting, wait (bounded) until no request is in flight."""
        assert self.control is not None and self.layout is not None
        self._set_server_state(SERVER_DRAINING)
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        if grace <= 0:
            return  # a failed start or an impatient caller: nothing to wait for
        end = time.monotonic() + grace
        while time.monotonic() < end:
            inflight = sum(
                self.control.load_u64(self.layout.frontend(c.index, F_REQUESTS))
                for c in self.children_by_role("frontend")
            )
            if inflight == 0:
                # Requests already on the wire reach a front-end after this: keep the front-ends up a
                # moment longer (still inside the grace) so they are refused, not dropped unanswered.
                time.sleep(max(0.0, min(DRAIN_LINGER_S, end - time.monotonic())))
                return
            time.sleep(0.01)
        log.warning("drain grace period over with requests still in flight")

    def stop(self, grace_s: float | None = None) -> None:
        """Drain, stop front-ends, then workers, then unlink every segment. Safe to call twice."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        try:
            if self.control is not None and self.layout is not None:
                self.drain(grace)
                self._set_server_state(SERVER_STOPPING)
            self._terminate(self.children_by_role("frontend"), grace)
            self._terminate(self.children_by_role("worker"), grace)
        finally:
            for fd in self.eventfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.eventfds = []
            self.telemetry.close()
            for name in list(self.segments):
                self._unlink(name)
            log.info("stopped; shared memory released")

    def _terminate(self, children: list[Child], grace_s: float) -> None:
        procs = [c.process for c in children if c.process is not None]
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, 15)
        end = time.monotonic() + grace_s + 2.0
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                log.warning("%s did not stop in time; killing it", proc.name)
                proc.kill()
                proc.join(5)
        for child in children:
            if child.process is not None and self.control is not None:
                self.control.store_u64(self.slot(child) + F_STATE, PROC_DOWN)
            child.process = None

    def _unlink(self, name: str) -> None:
        seg = self.segments.pop(name, None)
        if seg is not None:
            seg.close()
        unlink_segment(name)

    # ---- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per process: pid, state, uptime, restarts; per model: counters from the workers."""
        control = self.control
        now = time.monotonic_ns()
        procs = [
            process_status(
                c,
                control,
                self.slot(c),
                now,
                arena_bytes_in_use(self.segments.get(arena_name(self.base, c.role, c.index, c.gen))),
            )
            for c in self.children
        ]
        return {
            "server": {
                "state": server_state_name(control),
                "uptime_s": round((now - self.started_ns) / 1e9, 3),
                "failed": self.failed,
            },
            "processes": procs,
            "models": self.model_stats(),
            "repository_errors": dict(self.repository_errors),
        }

    def model_stats(self) -> dict[str, dict[str, int]]:
        """Per model, the worker counters of the board combined over workers."""
        return model_stats(self.control, self.layout, self.specs)
