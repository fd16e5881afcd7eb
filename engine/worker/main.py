"""The worker process shell: name the process, attach shared memory, load models, loop `WorkerCore`.

Runs in a process started by the supervisor with the spawn start method. Never imports grpc, zmq
or fastapi. SIGTERM asks for a graceful stop (finish what is queued, then exit 0); SIGINT is left to
the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from engine.gc_tuning import settle_heap
from engine.logs import setup_logging
from engine.models.spec import ModelSpec
from engine.shm import (
    F_HEARTBEAT,
    F_MODELS,
    F_PID,
    F_STATE,
    PROC_DOWN,
    PROC_UP,
    TEXT_BYTES,
    BoardLayout,
    worker_arena_name,
)
from engine.telemetry import TelemetrySettings
from engine.worker.core import WorkerCore
from ext.arena import Arena
from ext.segment import KIND_ARENA, KIND_CONTROL, Segment

if TYPE_CHECKING:
    from engine.metrics import WorkerMetrics

log = logging.getLogger("engine.worker")


@dataclass(frozen=True)
class WorkerArgs:
    """What the supervisor hands a worker process (pickled by multiprocessing over its own pipe)."""

    w: int
    gen: int
    device: str
    base: str
    layout: BoardLayout
    specs: tuple[ModelSpec, ...]
    notifier_fds: tuple[int, ...]
    arena_max_block: int
    heartbeat_interval_s: float
    drain_grace_s: float
    threads: int
    log_level: str
    spin_s: float = 50e-6
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


def run(args: WorkerArgs) -> None:
    """Process entry point."""
    role = f"worker {args.device}"
    setup_logging(args.log_level, role, args.telemetry.log_format)
    try:
        from setproctitle import setproctitle

        setproctitle(f"engine: worker {args.device} #{args.w}")
    except ImportError:  # pragma: no cover - optional nicety
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    import torch

    from engine.models.backends import load_model
    from engine.worker.executor import Executor

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    control = Segment.attach(args.base, KIND_CONTROL)
    layout = args.layout
    slot = layout.worker(args.w)
    control.store_u64(slot + F_PID, os.getpid())
    arena = Arena.format(
        Segment.attach(worker_arena_name(args.base, args.w, args.gen), KIND_ARENA),
        max_block=args.arena_max_block,
    )
    executor = Executor(args.device)
    models = {}
    errors: dict[str, str] = {}
    bitmap = 0
    for m, spec in enumerate(args.specs):
        if spec.devices and args.device not in spec.devices:
            continue
        try:
            models[m] = load_model(spec, args.device)
            bitmap |= 1 << m
            log.info(
                "loaded model %s on %s",
                spec.name,
                args.device,
                extra={"event": "model_load", "model": spec.name},
            )
        except Exception as exc:
            errors[spec.name] = f"{type(exc).__name__}: {exc}"
            log.error(
                "model %s failed to load on %s: %s",
                spec.name,
                args.device,
                errors[spec.name],
                extra={"event": "model_load_failed", "model": spec.name},
            )
    text = orjson.dumps(errors)[: TEXT_BYTES - 8]
    buf = control.buffer()
    buf[layout.text(args.w) + 8 : layout.text(args.w) + 8 + len(text)] = text
    control.store_u64(layout.text(args.w), len(text))

    def run_batch(spec: ModelSpec, m: int, inputs: Any, rows: int) -> Any:
        return executor.run(spec, models[m], inputs, rows)

    core = WorkerCore(
        control,
        layout,
        args.w,
        args.gen,
        args.base,
        args.specs,
        arena,
        args.notifier_fds,
        run_batch,
        spin_s=args.spin_s,
        breaker_failures=args.breaker_failures,
        breaker_cooldown_s=args.breaker_cooldown_s,
    )
    core.loaded = set(models)
    metrics = _metrics(args, core)
    heart = threading.Thread(
        target=_heartbeat,
        args=(control, slot, args.heartbeat_interval_s, stop),
        daemon=True,
        name="heartbeat",
    )
    heart.start()
    control.store_u64(slot + F_MODELS, bitmap)
    # Take the front-ends' incarnations (resetting each pair's rings) before looking up: a front-end
    # sends as soon as it sees PROC_UP, and a reset after that would drop its request unanswered.
    core.sync_peers()
    settle_heap()  # the models and torch's ~200,000 objects are never garbage: see engine.gc_tuning
    control.store_u64(slot + F_STATE, PROC_UP)
    log.info("ready: %d models", len(models), extra={"event": "ready"})

    def depths() -> list[int]:
        return [len(b) for b in core.batchers]

    try:
        # every batch computes in inference mode: entered once here instead of per batch
        # (`engine.models.backends.inference_mode`)
        with torch.inference_mode():
            while not stop.is_set():
                core.step(0.1)
                if metrics is not None:
                    metrics.maybe_flush(depths)
            core.drain_all(args.drain_grace_s)
    finally:
        if metrics is not None:
            metrics.flush(depths())
        control.store_u64(slot + F_STATE, PROC_DOWN)
        log.info("stopped")


def _metrics(args: WorkerArgs, core: WorkerCore) -> WorkerMetrics | None:
    """Queue and compute time histograms of this worker, when metrics are on."""
    if not args.telemetry.metrics:
        return None
    from engine.metrics import WorkerMetrics, enable_multiprocess

    enable_multiprocess(args.telemetry.metrics_dir)
    metrics = WorkerMetrics([spec.name for spec in args.specs])
    core.observer = metrics
    return metrics


def _heartbeat(control: Segment, slot: int, interval: float, stop: threading.Event) -> None:
    # A thread, not the loop: a long batch must not look like a hang, a stopped process must.
    while not stop.is_set():
        control.store_u64(slot + F_HEARTBEAT, time.monotonic_ns())
        stop.wait(interval)
