"""`engine.malloc_tuning`: freed large buffers are reused instead of faulted in afresh (each case in
its own process: the settings last for the process)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A front-end's pattern: a few 4 MiB buffers alive at once, freed, allocated again.
CHURN = """
import resource, sys
from engine.malloc_tuning import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
def churn():
    buffers = [bytearray(4 << 20) for _ in range(4)]
    del buffers
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def churn(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_large_buffers_are_reused_without_page_faults() -> None:
    applied, tuned = churn("tuned")
    _, default = churn("default")
    assert applied == "True"
    # 80 buffers of 4 MiB are 81,920 pages: glibc's defaults fault most of them in again
    assert tuned * 10 < default, f"{tuned} page faults with the settings, {default} without"


def test_glibcs_own_variables_are_left_to_the_operator() -> None:
    applied, _ = churn("tuned", MALLOC_TRIM_THRESHOLD_="1048576")
    assert applied == "False"
