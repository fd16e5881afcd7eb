"""The supervisor's status document: the server, each process slot, the per-model counters.

`engine.supervisor.Supervisor.status` assembles it (the ``status`` command, ``Engine.status()``);
everything here only reads the board and arena headers, so it is safe while the children run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from engine.models.spec import ModelSpec
from engine.shm import (
    F_HEARTBEAT,
    F_REQUESTS,
    F_STARTED,
    F_STATE,
    PROC_DOWN,
    PROC_STARTING,
    PROC_UP,
    SERVER_DRAINING,
    SERVER_READY,
    SERVER_STARTING,
    SERVER_STOPPING,
    STAT_NAMES,
    BoardLayout,
)
from engine.supervisor_children import Child
from ext.arena import Arena
from ext.segment import Segment


def process_status(
    child: Child, control: Segment | None, slot: int, now: int, arena_bytes: int | None
) -> dict[str, Any]:
    """One process slot: pid, state, generation, uptime, restarts, heartbeat age, port, in flight.

    Args:
        child: the slot.
        control: the control segment; None before start or after stop (the slot reads as down).
        slot: the slot's offset on the board.
        now: CLOCK_MONOTONIC ns, the same for every slot of one document.
        arena_bytes: what `arena_bytes_in_use` says of its current arena.
    """
    state = control.load_u64(slot + F_STATE) if control is not None else PROC_DOWN
    started = control.load_u64(slot + F_STARTED) if control is not None else 0
    return {
        "name": child.name,
        "role": child.role,
        "pid": child.process.pid if child.process is not None else (os.getpid() if child.embedded else None),
        "state": {PROC_DOWN: "down", PROC_STARTING: "starting", PROC_UP: "up"}.get(state, "?"),
        "generation": child.gen,
        "uptime_s": round((now - started) / 1e9, 3) if started else 0.0,
        "restarts": len(child.restarts),
        "heartbeat_age_s": (
            round((now - control.load_u64(slot + F_HEARTBEAT)) / 1e9, 3) if control is not None else None
        ),
        "port": child.port or None,
        "inflight": control.load_u64(slot + F_REQUESTS) if control and child.role == "frontend" else None,
        "arena_bytes_in_use": arena_bytes,
    }


def arena_bytes_in_use(segment: Segment | None) -> int | None:
    """Bytes allocated in the arena of a child's current incarnation; None before it formatted it.

    Read from the arena header through the supervisor's own mapping: a killed child's regions
    must come back (its peers free them), and this is where a test or an operator sees that.

    Args:
        segment: the supervisor's mapping of the arena segment; None when it has none (any more).
    """
    if segment is None or segment.closed:
        return None
    try:
        arena = Arena.attach(segment)
    except ValueError:
        return None  # created, not yet formatted by its process
    try:
        return int(arena.bytes_in_use)
    finally:
        arena.close()


def server_state_name(control: Segment | None) -> str:
    """The server state on the board as a word; ``stopped`` without a control segment."""
    if control is None:
        return "stopped"
    return {
        SERVER_STARTING: "starting",
        SERVER_READY: "ready",
        SERVER_DRAINING: "draining",
        SERVER_STOPPING: "stopping",
    }.get(control.load_u64(0), "?")


def model_stats(
    control: Segment | None, layout: BoardLayout | None, specs: Sequence[ModelSpec]
) -> dict[str, dict[str, int]]:
    """Per model, the worker counters of the board combined over workers (zeros before start)."""
    from engine.stats import model_counters

    if control is None or layout is None:
        return {spec.name: dict.fromkeys(STAT_NAMES, 0) for spec in specs}
    return {spec.name: model_counters(control, layout, m) for m, spec in enumerate(specs)}
