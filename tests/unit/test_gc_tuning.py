"""`engine.gc_tuning`: what startup leaves is never walked again, cycles made later are still
collected (each case in its own process: the settings last for the process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SETTLE = """
import gc, json, sys, weakref
from engine.gc_tuning import YOUNG_THRESHOLD, settle_heap

startup = [[i] for i in range(50_000)]  # a server's modules and objects: live, never garbage

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    return weakref.ref(a)

before_garbage = cycle()  # unreachable already: collected by the settling, not frozen
frozen = settle_heap()
walked = []
gc.callbacks.append(lambda phase, info: phase == "stop" and walked.append(info["generation"]))
gc.collect()
tracked_after = len(gc.get_objects())  # what a full collection walks after settling
walked.clear()
later = [cycle() for _ in range(3 * YOUNG_THRESHOLD)]  # garbage cycles made while serving
print(json.dumps({
    "frozen": frozen,
    "threshold": gc.get_threshold()[0],
    "young_threshold": YOUNG_THRESHOLD,
    "startup_garbage_gone": before_garbage() is None,
    "tracked_after": tracked_after,
    "later_collected": sum(ref() is None for ref in later),
    "later": len(later),
    "collections": len(walked),
}))
"""


def run_settle() -> dict[str, int | bool]:
    out = subprocess.run(
        [sys.executable, "-c", SETTLE], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


def test_settling_freezes_startup_and_still_collects_later_cycles() -> None:
    r = run_settle()
    assert r["startup_garbage_gone"], "garbage from startup was frozen instead of collected"
    assert r["frozen"] >= 50_000
    assert r["threshold"] == r["young_threshold"] > 700
    # the frozen objects are out of every generation a collection walks
    assert r["tracked_after"] < 5_000, r
    # cycles made after settling are still found, by the young collections the threshold allows
    assert r["collections"] >= 2, r
    assert r["later_collected"] >= r["later"] // 2, r
