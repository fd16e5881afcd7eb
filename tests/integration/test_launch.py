"""`python -m engine.launch` as a real process: exit codes, titles, SIGTERM under load, /dev/shm hygiene.

- a bad config value exits 2 with one line naming the key;
- while serving, the processes carry their role in their title (setproctitle);
- SIGTERM under ZMQ load drains: every request gets an answer (correct, or Unavailable once the drain
  began), the server exits 0 and /dev/shm holds none of its segments;
- a worker that crash-loops past its restart budget makes the server exit 1;
- segments of dead engine processes are swept at start-up;
- a /dev/shm too small for the arenas fails start-up with a message naming --ipc=host and --shm-size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import engine.supervisor as supervisor_module
from engine.config import EngineConfig
from engine.errors import DeadlineExceeded, Unavailable
from engine.supervisor import ShmTooSmall, Supervisor, sweep_stale_segments
from ext.segment import segment_info

SHM_DIR = Path("/dev/shm")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Flags that keep a launched server small: CPU worker, small arenas.
SMALL = (
    "--devices", "cpu",
    "--set", "frontend_arena_mb=16",
    "--set", "worker_arena_mb=16",
    "--set", "max_message_mb=8",
)  # fmt: skip
#: Bound on any exit we wait for (a stop drains for at most a few seconds).
EXIT_S = 60.0


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def segments_of(pid: int) -> set[str]:
    """Engine segments in /dev/shm created by ``pid``."""
    names = set()
    for name in os.listdir(SHM_DIR):
        if name.startswith("sie-"):
            with contextlib.suppress(Exception):
                if segment_info(name)["creator_pid"] == pid:
                    names.add(name)
    return names


# ---- config errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "ring_capacity=1000"], "ring_capacity"),
        (["--grpc-port", "http"], "grpc_port"),
        (["--set", "max_message_mb=64", "--set", "frontend_arena_mb=16"], "max_message_mb"),
        (["--set", "no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_config_exits_2_naming_the_key(launcher: Any, args: list[str], key: str) -> None:
    server = launcher(*args)
    assert server.wait(EXIT_S) == 2
    lines = server.stderr_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0]
    assert not server.stdout


# ---- a serving server ----------------------------------------------------------------------------


def test_titles_and_graceful_sigterm_under_load(launcher: Any, repo: Any) -> None:
    from servers.client.zmq_client import AsyncZmqClient

    repo.builtin("identity")
    server = launcher(
        *SMALL,
        "--model-repository", str(repo.path),
        "--grpc-port", "0",
        "--zmq-port", "0",
        "--set", "protocols=grpc,zmq",
        "--set", "grpc_frontends=1",
        "--set", "drain_grace_s=5",
    )  # fmt: skip
    server.wait_ready()
    assert set(server.endpoints) == {"grpc", "zmq"}, server.stdout
    assert all(port > 0 for _, port in server.endpoints.values())

    # process titles: the supervisor and each child say what they are
    pid = server.proc.pid
    assert "engine: supervisor" in cmdline(pid)
    titles = [cmdline(child) for child in children_of(pid)]
    for role in ("engine: worker cpu", "engine: frontend grpc#0", "engine: frontend zmq#0"):
        assert any(role in title for title in titles), (role, titles)
    held = segments_of(pid)
    assert held, "the supervisor holds no segment while serving"

    host, port = server.endpoints["zmq"]
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "lost": 0}
    wrong: list[int] = []

    async def load() -> None:
        client = AsyncZmqClient(f"tcp://{host}:{port}", timeout_s=10.0)
        enough = asyncio.Event()
        counter = iter(range(1, 1 << 30))

        async def user() -> None:
            # one request at a time until the server refuses: each reply is checked
            while True:
                n = next(counter)
                x = np.full((1, 256), float(n), dtype=np.float32)
                try:
                    out = await client.infer("identity", {"INPUT0": x})
                except Unavailable as exc:
                    # the client's own verdict on a connection that closed first is a lost answer
                    outcomes["lost" if "closed before the reply" in str(exc) else "unavailable"] += 1
                    return
                except DeadlineExceeded:
                    outcomes["lost"] += 1
                    return
                if not np.array_equal(out["OUTPUT0"], x):
                    wrong.append(n)
                outcomes["ok"] += 1
                if outcomes["ok"] >= 200:
                    enough.set()

        try:
            users = [asyncio.create_task(user()) for _ in range(8)]
            await asyncio.wait_for(enough.wait(), 60.0)
            os.kill(pid, signal.SIGTERM)
            # every user ends: its last request was refused (or, at worst, its client timed out)
            await asyncio.wait_for(asyncio.gather(*users), 30.0)
        finally:
            await client.close()

    asyncio.run(load())
    code = server.wait(EXIT_S)
    log = server.stderr_text()
    assert code == 0, server.stderr_tail()
    assert not wrong, f"wrong answers for requests {wrong[:10]}"
    assert outcomes["ok"] >= 200 and outcomes["unavailable"] >= 1, outcomes
    assert outcomes["lost"] == 0, f"requests never answered: {outcomes}\n{server.stderr_tail()}"
    # nothing admitted was dropped by the drain
    assert "cancelled" not in log and "drain grace period over" not in log, server.stderr_tail()
    assert not [name for name in held if (SHM_DIR / name).exists()]
    assert not segments_of(pid)


def test_crash_loop_past_budget_exits_1(launcher: Any, repo: Any) -> None:
    repo.doomed("doomed", delay_s=2.0)  # every worker incarnation dies 2 s after loading it
    server = launcher(
        *SMALL,
        "--model-repository", str(repo.path),
        "--set", "protocols=",
        "--set", "restart_budget=0",
    )  # fmt: skip
    server.wait_ready()
    assert server.wait(EXIT_S) == 1
    assert "restart_budget" in server.stderr_text()


# ---- /dev/shm ------------------------------------------------------------------------------------


def test_startup_sweep_removes_segments_of_dead_processes(segment_factory: Any) -> None:
    from ext.segment import KIND_TEST

    make = "from ext.segment import Segment, KIND_TEST as K; print(Segment.create(4096, K).name)"
    done = subprocess.run(
        [sys.executable, "-c", make],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_S,
        check=True,
    )
    stale = done.stdout.strip()  # its creator exited without unlinking it
    assert stale.startswith("sie-") and (SHM_DIR / stale).exists()
    live = segment_factory(4096, KIND_TEST)  # this process is alive: its segment stays
    removed = sweep_stale_segments()
    assert stale in removed
    assert not (SHM_DIR / stale).exists()
    assert live.name not in removed and (SHM_DIR / live.name).exists()


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MiB tmpfs mounted for the test (unmounted after), or None where mounting is not allowed."""
    mount_point = tmp_path / "shm"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        yield None
        return
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30)


def _assert_names_the_docker_fix(message: str) -> None:
    assert "--ipc=host" in message and "--shm-size" in message, message


def test_shm_too_small_raises(small_shm: Path | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if small_shm is not None:
        monkeypatch.setattr(supervisor_module, "SHM_DIR", small_shm)
    else:
        real = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda path: _full_statvfs(real, path))
    config = EngineConfig(
        protocols=(), devices=("cpu",), frontend_arena_mb=16, worker_arena_mb=64, max_message_mb=8
    )
    supervisor = Supervisor(config, embedded_frontends=1)
    try:
        with pytest.raises(ShmTooSmall) as info:
            supervisor.start()
    finally:
        supervisor.stop(grace_s=0)
    _assert_names_the_docker_fix(info.value.message)
    assert all(p["pid"] is None for p in supervisor.status()["processes"] if p["role"] == "worker")


def _full_statvfs(real: Any, path: Any) -> os.statvfs_result:
    """What ``real(path)`` says, with no free blocks (where no small tmpfs can be mounted)."""
    st = real(path)
    return os.statvfs_result(
        (
            st.f_bsize,
            st.f_frsize,
            st.f_blocks,
            0,
            0,
            st.f_files,
            st.f_ffree,
            st.f_favail,
            st.f_flag,
            st.f_namemax,
        )
    )


#: Runs `engine.launch.main` with /dev/shm replaced by a small folder ("dir PATH") or reported full.
_SMALL_SHM_LAUNCH = """
import os, pathlib, sys
import engine.supervisor as supervisor
mode, where = sys.argv[1], sys.argv[2]
if mode == "dir":
    supervisor.SHM_DIR = pathlib.Path(where)
else:
    real = os.statvfs
    def full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))
    os.statvfs = full
from engine.launch import main
sys.exit(main(sys.argv[3:]))
"""


def test_shm_too_small_launch_exits_1(launcher: Any, small_shm: Path | None) -> None:
    mode, where = ("dir", str(small_shm)) if small_shm is not None else ("full", "-")
    server = launcher(
        mode,
        where,
        *SMALL,
        "--set", "worker_arena_mb=64",
        "--set", "protocols=",
        entry=("-c", _SMALL_SHM_LAUNCH),
    )  # fmt: skip
    assert server.wait(EXIT_S) == 1
    _assert_names_the_docker_fix(server.stderr_text())
    assert "ready" not in server.stdout
