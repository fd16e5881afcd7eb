"""The supervisor's view of /dev/shm: arena names and sizes, the free-space check, the stale sweep.

The supervisor creates and unlinks the segments itself (`engine.supervisor`); this module holds
what it decides with: which arena a process incarnation gets, whether /dev/shm can hold them all,
and which leftover segments belong to engine processes that are gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.config import EngineConfig
from engine.shm import frontend_arena_name, worker_arena_name
from ext.arena import segment_size_for
from ext.segment import NAME_PREFIX, segment_info, unlink_segment

log = logging.getLogger("engine.supervisor")


def next_pow2(n: int) -> int:
    """The smallest power of two that is at least ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def arena_name(base: str, role: str, index: int, gen: int) -> str:
    """The arena segment of incarnation ``gen`` of worker or front-end slot ``index``.

    Args:
        base: the engine's segment name base.
        role: ``"worker"`` or ``"frontend"``.
    """
    if role == "worker":
        return worker_arena_name(base, index, gen)
    return frontend_arena_name(base, index, gen)


def arena_segment_size(config: EngineConfig, role: str, arena_max_block: int) -> int:
    """Bytes of the segment that holds one worker's (``role`` "worker") or front-end's arena."""
    arena_mb = config.worker_arena_mb if role == "worker" else config.frontend_arena_mb
    return segment_size_for(arena_mb << 20, arena_max_block)


def shm_shortage(
    shm_dir: Path,
    config: EngineConfig,
    control_bytes: int,
    n_workers: int,
    n_frontends: int,
    arena_max_block: int,
) -> str | None:
    """Why ``shm_dir`` cannot hold the control segment and every arena, or None when it can.

    Counts free space, not size (someone else's segments use it too). None as well when
    ``shm_dir`` cannot be measured: creating the segments then tells.

    Returns:
        The message of `engine.supervisor.ShmTooSmall`: what is free, what is needed, and the
        Docker flags or settings that fix it.
    """
    need = (
        control_bytes
        + n_workers * arena_segment_size(config, "worker", arena_max_block)
        + n_frontends * arena_segment_size(config, "frontend", arena_max_block)
    )
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= need:
        return None
    return (
        f"/dev/shm has {free >> 20} MiB free but the engine needs {need >> 20} MiB for its arenas "
        f"({n_workers} workers x {config.worker_arena_mb} MiB, {n_frontends} front-ends x "
        f"{config.frontend_arena_mb} MiB). In Docker run with --ipc=host or "
        f"--shm-size={(need >> 20) + 64}m, or lower worker_arena_mb / frontend_arena_mb"
    )


def sweep_stale_segments_in(shm_dir: Path) -> list[str]:
    """Unlink the segments in ``shm_dir`` whose creating engine process is gone; their names.

    A segment that is not the engine's, or whose header cannot be read, is left alone.
    """
    removed: list[str] = []
    if not shm_dir.is_dir():
        return removed
    for path in shm_dir.glob(f"{NAME_PREFIX}*"):
        try:
            pid = segment_info(path.name)["creator_pid"]
        except Exception:
            continue  # not ours, or not readable: leave it
        if pid and not _alive(pid) and unlink_segment(path.name):
            removed.append(path.name)
    if removed:
        log.warning("removed %d stale segments of dead engine processes", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
