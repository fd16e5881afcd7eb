"""Shared test fixtures: folder markers, the /dev/shm leak check, segments, seeded randomness, bench gating.

Every test runs under `_no_shm_leaks`: a name starting with ``sie-`` that appears in /dev/shm during the
test and is still there afterwards fails the test (and is unlinked, so one failure does not cascade).
That is how "every test unlinks its segments, even when it fails" is proven.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from ext.segment import Segment

SHM_DIR = Path("/dev/shm")
#: Every segment the engine creates starts with this (ext.segment.NAME_PREFIX; not imported here so a
#: missing build fails the ext tests, not the collection of every test).
SHM_PREFIX = "sie-"
#: Set to 1 to run tests/bench in quick mode (few rounds) without --benchmark-enable; CI does.
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"
#: Set to replay a failing seeded test: each seeded test prints the seed it drew.
SEED_ENV = "ENGINE_TEST_SEED"

_TESTS_DIR = Path(__file__).resolve().parent
_FOLDER_MARKERS = {"unit": "unit", "integration": "integration", "bench": "bench"}


# ---- markers and bench gating ------------------------------------------------------------------------


def bench_quick() -> bool:
    """True when the bench suite runs in quick mode (few rounds, just proving it still works)."""
    return os.environ.get(BENCH_QUICK_ENV) == "1"


def _bench_requested(config: pytest.Config) -> bool:
    enabled = bool(config.getoption("benchmark_enable", False) or config.getoption("benchmark_only", False))
    return enabled or bench_quick()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder; skip tests/bench unless benchmarks were asked for."""
    run_bench = _bench_requested(config)
    skip_bench = pytest.mark.skip(
        reason=f"benchmarks: pass --benchmark-enable / --benchmark-only, or set {BENCH_QUICK_ENV}=1"
    )
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(_TESTS_DIR).parts[0]
        except (ValueError, IndexError):
            continue
        marker = _FOLDER_MARKERS.get(folder)
        if marker is None:
            continue
        item.add_marker(marker)
        if marker == "bench" and not run_bench:
            item.add_marker(skip_bench)


# ---- /dev/shm leak check -----------------------------------------------------------------------------


def shm_names() -> set[str]:
    """Names of the engine's segments now in /dev/shm."""
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _is_self_or_descendant(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            pid = _parent_pid(pid)
        except (OSError, ValueError, IndexError):
            return False
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ours(name: str) -> bool:
    """Whether a new segment was made by this test run rather than by someone else's on the same machine.

    Ours: created by this process, by a live descendant, or by a process that has died since (a killed
    child). A segment whose header cannot be read yet (another process is creating it) is not ours.
    """
    from ext.segment import SegmentError, segment_info

    try:
        pid = int(segment_info(name)["creator_pid"])
    except (SegmentError, OSError):
        return False
    return _is_self_or_descendant(pid) or not _pid_alive(pid)


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


@pytest.fixture(autouse=True)
def _no_shm_leaks() -> Iterator[None]:
    """Fail a test that leaves one of its ``sie-`` segments in /dev/shm, and clean up after it."""
    before = shm_names()
    yield
    leaked = sorted(name for name in shm_names() - before if _is_ours(name))
    for name in leaked:
        _unlink_quietly(name)
    assert not leaked, f"test left shared-memory segments behind (now unlinked): {leaked}"


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def segment_factory() -> Iterator[Callable[..., Segment]]:
    """``make(size, kind=KIND_TEST)`` creates a segment that is closed and unlinked at teardown."""
    from ext.segment import KIND_TEST, Segment

    made: list[Segment] = []

    def make(size: int, kind: int = KIND_TEST) -> Segment:
        seg = Segment.create(size, kind)
        made.append(seg)
        return seg

    yield make
    for seg in reversed(made):
        seg.close()
        seg.unlink()


@pytest.fixture
def bench_quick_mode() -> bool:
    """Whether benchmarks should do a few rounds only (ENGINE_BENCH_QUICK=1)."""
    return bench_quick()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A random seed, printed (shown with a failure) and replayable through ENGINE_TEST_SEED."""
    value = int(os.environ.get(SEED_ENV) or secrets.randbits(32))
    print(f"{request.node.nodeid}: seed {value} (replay with {SEED_ENV}={value})")
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """A numpy generator from the printed `seed`."""
    return np.random.default_rng(seed)
