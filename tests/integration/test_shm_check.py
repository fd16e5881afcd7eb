"""The engine's start-up check of /dev/shm against a real, small tmpfs: Docker's 64 MB in miniature.

A tmpfs is mounted for each test (we run as root; the tests skip where mounting is not allowed) and
`engine.supervisor.SHM_DIR` points at it:

- arenas that do not fit: `Supervisor.start` raises `ShmTooSmall` before any process or segment
  exists, and the message gives the free space, the need, and the fixes: ``--ipc=host``, a
  ``--shm-size`` and smaller arenas;
- the ``--shm-size`` the message suggests is enough: remounted at that size, the check passes;
- the check counts free space, not size: the same tmpfs, partly filled, fails again.

A check that passes is seen by the next step of the start-up (creating the control segment), which
the tests replace with one that raises `PastTheCheck`, so no engine process is ever started.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import engine.supervisor as supervisor_module
from engine.config import EngineConfig
from engine.supervisor import ShmTooSmall, StartupError, Supervisor

MOUNT_S = 30


class PastTheCheck(Exception):
    """Raised where start-up would create its first segment: the /dev/shm check has passed."""


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_S)


@pytest.fixture
def small_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 32 MiB tmpfs standing in for /dev/shm; unmounted at teardown."""
    mount_point = tmp_path / "shm"
    mount_point.mkdir()
    try:
        done = run("mount", "-t", "tmpfs", "-o", "size=32m,mode=1777", "tmpfs", str(mount_point))
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    monkeypatch.setattr(supervisor_module, "SHM_DIR", mount_point)
    try:
        yield mount_point
    finally:
        umount = run("umount", str(mount_point))
        assert umount.returncode == 0, umount.stderr


def config() -> EngineConfig:
    """One CPU worker (32 MiB arena) and one in-process front-end (8 MiB): ~40 MiB of arenas."""
    return EngineConfig(
        protocols=(), devices=("cpu",), frontend_arena_mb=8, worker_arena_mb=32, max_message_mb=4
    )


def start(monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    """`Supervisor.start` up to its first segment; returns the supervisor (stopped) when the check
    passed, raises what start-up raised otherwise."""

    class Segment:
        @staticmethod
        def create(*args: Any, **kwargs: Any) -> Any:
            raise PastTheCheck

    supervisor = Supervisor(config(), embedded_frontends=1)
    with monkeypatch.context() as patch:
        patch.setattr(supervisor_module, "Segment", Segment)
        try:
            supervisor.start()
        except PastTheCheck:
            return supervisor
        finally:
            supervisor.stop(grace_s=0)
    raise AssertionError("start() returned without creating a segment")


def test_too_small_fails_with_the_docker_fixes_and_starts_nothing(
    small_shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = Supervisor(config(), embedded_frontends=1)
    try:
        with pytest.raises(ShmTooSmall) as info:
            supervisor.start()
    finally:
        supervisor.stop(grace_s=0)
    message = info.value.message
    assert isinstance(info.value, StartupError)  # launch exits 1 with the message
    assert "/dev/shm has 32 MiB free" in message, message
    assert "--ipc=host" in message and "--shm-size=" in message, message
    assert "worker_arena_mb" in message and "frontend_arena_mb" in message, message
    need = re.search(r"needs (\d+) MiB", message)
    assert need and int(need[1]) > 32, message
    assert supervisor.control is None and not supervisor.segments  # nothing was created
    assert all(p["pid"] is None for p in supervisor.status()["processes"] if p["role"] == "worker")
    assert not list(small_shm.iterdir())


def test_the_suggested_shm_size_is_enough(small_shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ShmTooSmall) as info:
        start(monkeypatch)
    suggested = re.search(r"--shm-size=(\d+)m", info.value.message)
    assert suggested, info.value.message
    remount = run("mount", "-o", f"remount,size={suggested[1]}m", str(small_shm))
    assert remount.returncode == 0, remount.stderr
    start(monkeypatch)  # passes the check


def test_the_check_counts_free_space_not_size(small_shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ShmTooSmall) as info:
        start(monkeypatch)
    need = re.search(r"needs (\d+) MiB", info.value.message)
    assert need, info.value.message
    size_mb = int(need[1]) + 16
    assert run("mount", "-o", f"remount,size={size_mb}m", str(small_shm)).returncode == 0
    start(monkeypatch)  # fits while empty
    filler = small_shm / "someone-else"
    with filler.open("wb") as f:  # tmpfs pages are only used once written
        for _ in range(32):
            f.write(b"\1" * (1 << 20))
    with pytest.raises(ShmTooSmall) as info:
        start(monkeypatch)
    assert f"has {size_mb - 32} MiB free" in info.value.message, info.value.message
