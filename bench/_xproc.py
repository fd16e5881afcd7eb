"""The peer process of the cross-process micro-benchmarks: `python -m bench._xproc ROLE ARGS...`.

The benchmark process creates one control segment (layout below), starts this module in a fresh
interpreter (no fork, no inherited state) and talks to it through the rings; results come back as one
JSON line on stdout.

    0       WakeWord of the benchmark process ("parent")
    64      WakeWord of this process ("child")
    4096    ring parent -> child
    ...     ring child -> parent

Roles: ``pong NAME SPIN_S`` echoes every descriptor back; ``sink NAME SPIN_S TOTAL`` pops TOTAL
descriptors and prints when the last arrived; ``idle NAME SPIN_S SECONDS WINDOWS`` waits on an empty
ring and prints the CPU share it used in each window; ``eventfd-pong FD_IN FD_OUT`` echoes eventfd writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ext.notify import WakeWord, wait_rings
from ext.ring import DESC_DTYPE, Ring, ring_footprint
from ext.segment import KIND_TEST, Segment

RING_CAPACITY = 4096
RING_AT = 4096
SEGMENT_SIZE = RING_AT + 2 * ring_footprint(RING_CAPACITY)
PING, READY, STOP = 1, 2, 3
#: how long one wait may block before the child checks that its parent still lives
POLL_S = 0.5


@dataclass
class Pair:
    """Both directions of the benchmark channel, as seen from either process."""

    parent_word: WakeWord
    child_word: WakeWord
    to_child: Ring
    to_parent: Ring

    @classmethod
    def create(cls, seg: Segment) -> Pair:
        Ring.create(seg, RING_AT, RING_CAPACITY)
        Ring.create(seg, RING_AT + ring_footprint(RING_CAPACITY), RING_CAPACITY)
        return cls.attach(seg)

    @classmethod
    def attach(cls, seg: Segment) -> Pair:
        return cls(
            WakeWord(seg, 0),
            WakeWord(seg, 64),
            Ring.attach(seg, RING_AT),
            Ring.attach(seg, RING_AT + ring_footprint(RING_CAPACITY)),
        )


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _ready(pair: Pair) -> None:
    if not pair.to_parent.push(READY, 0, 0):
        raise RuntimeError("the ring to the parent is full before the benchmark started")
    pair.parent_word.notify()


def pong(name: str, spin_s: float) -> None:
    """Echo each descriptor back until STOP; wait with wait_rings(spin_s) between them."""
    parent = os.getppid()
    pair = Pair.attach(Segment.attach(name, KIND_TEST))
    inbox, outbox, word, peer = pair.to_child, pair.to_parent, pair.child_word, pair.parent_word
    _ready(pair)
    while True:
        if not wait_rings(word, [inbox], spin_s, POLL_S):
            if _orphaned(parent):
                return
            continue
        while (d := inbox.pop()) is not None:
            if d[0] == STOP:
                return
            outbox.push(d[0], d[1], d[2])
            peer.notify()


def sink(name: str, spin_s: float, total: int) -> None:
    """Pop ``total`` descriptors in bursts; print the CLOCK_MONOTONIC time the last one arrived."""
    parent = os.getppid()
    pair = Pair.attach(Segment.attach(name, KIND_TEST))
    inbox, word = pair.to_child, pair.child_word
    buf = np.empty(1024, DESC_DTYPE)
    _ready(pair)
    received = 0
    while received < total:
        n = inbox.pop_into(buf)
        if n:
            received += n
        elif not wait_rings(word, [inbox], spin_s, POLL_S) and _orphaned(parent):
            return
    print(json.dumps({"t_end_ns": time.monotonic_ns(), "received": received}), flush=True)


def idle(name: str, spin_s: float, seconds: float, windows: int) -> None:
    """Wait on an empty ring (0.2 s timeouts) for ``windows`` windows of ``seconds``; print the CPU
    percentage of each.

    CPU time is this process's user + system time from CLOCK_PROCESS_CPUTIME_ID: os.times() counts
    in 10 ms clock ticks, too coarse for a fraction of a percent of a few seconds.
    """
    pair = Pair.attach(Segment.attach(name, KIND_TEST))
    _ready(pair)
    percents = []
    for _ in range(windows):
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            wait_rings(pair.child_word, [pair.to_child], spin_s, 0.2)
        percents.append(100.0 * (time.process_time() - cpu0) / (time.monotonic() - t0))
    print(json.dumps({"cpu_percent": percents}), flush=True)


def eventfd_pong(fd_in: int, fd_out: int) -> None:
    """Echo eventfd writes (blocking reads) until a value >= 2 arrives."""
    os.eventfd_write(fd_out, 1)  # ready
    while os.eventfd_read(fd_in) < 2:
        os.eventfd_write(fd_out, 1)


def main(argv: Sequence[str]) -> int:
    """Run one role; arguments as in the module docstring."""
    role, *args = argv
    if role == "pong":
        pong(args[0], float(args[1]))
    elif role == "sink":
        sink(args[0], float(args[1]), int(args[2]))
    elif role == "idle":
        idle(args[0], float(args[1]), float(args[2]), int(args[3]))
    elif role == "eventfd-pong":
        eventfd_pong(int(args[0]), int(args[1]))
    else:
        print(f"bench._xproc: unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
