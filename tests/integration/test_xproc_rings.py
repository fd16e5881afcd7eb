"""Rings, arenas and wake-ups across real processes: 3 producers x 1 consumer, a killed producer, forgeries.

The test process plays the supervisor: it creates every segment (so the conftest leak check covers them),
starts the children with the spawn method, and reads their reports (tuples of ints) from a queue.

Control segment:

    0                   consumer WakeWord
    64                  u64 reset command per slot (the generation the consumer must reset to)
    SLOT0 + i*STRIDE    producer i: WakeWord (64 B), request ring, return ring

Descriptors: REQUEST (req_id = per-producer sequence number, offset/length = payload in the producer's
arena, aux = crc32 of the payload, gen = producer incarnation), END (req_id = how many were sent) and
RELEASE (the consumer hands a region back). A payload starts with its sequence number (u64 LE).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from ext.arena import Arena, segment_size_for
from ext.notify import WakeWord, wait_rings
from ext.ring import DESC_DTYPE, Ring, ring_footprint
from ext.segment import KIND_ARENA, KIND_CONTROL, Segment

MakeSegment = Callable[..., Segment]

REQUEST, END, RELEASE = 1, 2, 3
REQ_CAP, RET_CAP, BURST = 4096, 8192, 128
CMD_AT, SLOT0 = 64, 4096
STRIDE = 64 + ring_footprint(REQ_CAP) + ring_footprint(RET_CAP)
ARENA_PAYLOAD, MAX_BLOCK = 16 << 20, 1 << 20
POOL_BYTES, LARGE_MAX = 1 << 20, 192 << 10
SPIN_S, WAIT_S = 50e-6, 0.05
JOIN_S = 120.0

# report tags on the result queue
PRODUCED, CONSUMED, RESET_DONE, FORGED_SEEN = 1, 2, 3, 4


def control_size(n_slots: int) -> int:
    return SLOT0 + n_slots * STRIDE


def payload_length(seq: int) -> int:
    """64-512 bytes, and every 1009th a large one (64-192 KiB)."""
    if seq % 1009 == 1008:
        return (64 << 10) + (seq % 9) * (16 << 10)
    return 64 + (seq * 37) % 449


@dataclass
class Slot:
    """One producer's side of the control segment, as seen from either process."""

    word: WakeWord
    requests: Ring
    returns: Ring

    @classmethod
    def at(cls, ctrl: Segment, slot: int, create: bool = False) -> Slot:
        base = SLOT0 + slot * STRIDE
        req_at, ret_at = base + 64, base + 64 + ring_footprint(REQ_CAP)
        if create:
            Ring.create(ctrl, req_at, REQ_CAP)
            Ring.create(ctrl, ret_at, RET_CAP)
        return cls(WakeWord(ctrl, base), Ring.attach(ctrl, req_at), Ring.attach(ctrl, ret_at))


# ---- child processes ---------------------------------------------------------------------------------


def producer_main(
    ctrl_name: str, arena_name: str, slot: int, gen: int, count: int, results: Any, progress: Any = None
) -> None:
    """Send ``count`` payloads (or until killed), free them as they come back, report bytes_in_use."""
    ctrl = Segment.attach(ctrl_name, KIND_CONTROL)
    arena = Arena.format(Segment.attach(arena_name, KIND_ARENA), 256, MAX_BLOCK)
    mine = Slot.at(ctrl, slot)
    consumer = WakeWord(ctrl, 0)
    pool = memoryview(np.random.default_rng(slot).bytes(POOL_BYTES))
    burst = np.zeros(BURST, DESC_DTYPE)
    burst["kind"], burst["model"], burst["gen"] = REQUEST, slot, gen
    back = np.zeros(RET_CAP, DESC_DTYPE)

    def reclaim() -> int:
        n = mine.returns.pop_into(back)
        for offset in back["offset"][:n].tolist():
            arena.free(offset)
        if n:
            consumer.notify()  # the consumer may be waiting for room on the return ring
        return n

    seq = 0
    while seq < count:
        reclaim()
        offsets: list[int] = []
        lengths: list[int] = []
        crcs: list[int] = []
        while len(offsets) < BURST and seq < count:
            length = payload_length(seq)
            offset = arena.try_alloc(length)
            if offset < 0:
                break
            head = seq.to_bytes(8, "little")
            start = (seq * 131) % (POOL_BYTES - LARGE_MAX)
            body = pool[start : start + length - 8]
            arena.write(offset, head)
            arena.write(offset + 8, body)
            offsets.append(offset)
            lengths.append(length)
            crcs.append(zlib.crc32(body, zlib.crc32(head)))
            seq += 1
        k = len(offsets)
        if k == 0:  # arena full: wait for releases
            wait_rings(mine.word, [mine.returns], SPIN_S, WAIT_S)
            continue
        burst["req_id"][:k] = np.arange(seq - k, seq, dtype=np.uint64)
        burst["offset"][:k], burst["length"][:k], burst["aux"][:k] = offsets, lengths, crcs
        pushed = 0
        while pushed < k:
            pushed += mine.requests.push_burst(burst[pushed:k])
            consumer.notify()
            if pushed < k and reclaim() == 0:
                wait_rings(mine.word, [mine.returns], SPIN_S, WAIT_S)
        if progress is not None and seq >= 10_000:
            progress.set()
            progress = None
    while not mine.requests.push(END, slot, seq, gen=gen):
        reclaim()
        wait_rings(mine.word, [mine.returns], SPIN_S, WAIT_S)
    consumer.notify()
    while arena.bytes_in_use:
        if reclaim() == 0:
            wait_rings(mine.word, [mine.returns], SPIN_S, WAIT_S)
    _, used = arena.check_consistency()
    results.put((PRODUCED, slot, gen, seq, arena.bytes_in_use, used))


def consumer_main(ctrl_name: str, arena_names: list[str], expected_ends: int, results: Any) -> None:
    """Serve every slot until ``expected_ends`` END descriptors arrived; check order and payloads."""
    ctrl = Segment.attach(ctrl_name, KIND_CONTROL)
    word = WakeWord(ctrl, 0)
    slots = [Slot.at(ctrl, i) for i in range(len(arena_names))]
    # attached on first traffic: a producer formats its arena before it pushes anything
    arenas: list[Arena | None] = [None] * len(slots)
    n = len(slots)
    expected, gens, applied = [0] * n, [0] * n, [0] * n
    seq_errors, payload_errors = [0] * n, [0] * n
    pending: list[np.ndarray | None] = [None] * n
    buf = np.zeros(BURST * 2, DESC_DTYPE)
    request_rings = [s.requests for s in slots]
    ends = 0
    while ends < expected_ends or any(held is not None for held in pending):
        for i in range(n):
            cmd = ctrl.load_u64(CMD_AT + 8 * i)
            if cmd != applied[i]:  # the supervisor says producer i died: drop its traffic
                slots[i].requests.reset()
                slots[i].returns.reset()
                expected[i], gens[i], applied[i], pending[i] = 0, cmd, cmd, None
                results.put((RESET_DONE, i, slots[i].requests.epoch, slots[i].returns.epoch))
        busy = False
        for i, slot in enumerate(slots):
            held = pending[i]
            if held is not None:
                pushed = slot.returns.push_burst(held)
                slot.word.notify()
                pending[i] = held[pushed:] if pushed < len(held) else None
                if pending[i] is not None:
                    continue
            got_n = slot.requests.pop_into(buf)
            if got_n == 0:
                continue
            busy = True
            got = buf[:got_n]
            seq_errors[i] += int(np.count_nonzero(got["gen"] != gens[i]))
            reqs = got[got["kind"] == REQUEST]
            ids = reqs["req_id"]
            if not np.array_equal(ids, np.arange(expected[i], expected[i] + len(ids), dtype=np.uint64)):
                seq_errors[i] += 1
            if len(ids):
                expected[i] = int(ids[-1]) + 1
            arena = arenas[i]
            if arena is None:
                arena = arenas[i] = Arena.attach(Segment.attach(arena_names[i], KIND_ARENA, writable=False))
            for offset, length, crc, seq in zip(
                reqs["offset"].tolist(),
                reqs["length"].tolist(),
                reqs["aux"].tolist(),
                ids.tolist(),
                strict=True,
            ):
                data = arena.view(offset, length)
                if zlib.crc32(data.data) != crc or int.from_bytes(data[:8].tobytes(), "little") != seq:
                    payload_errors[i] += 1
            for end in got[got["kind"] == END].tolist():
                ends += 1
                results.put(
                    (CONSUMED, i, gens[i], expected[i], int(end[0]), seq_errors[i], payload_errors[i])
                )
            if len(reqs):
                back = reqs.copy()
                back["kind"] = RELEASE
                pending[i] = back
        if not busy:
            wait_rings(word, request_rings, SPIN_S, WAIT_S)


def forger_main(ctrl_name: str, arena_name: str, results: Any) -> None:
    """Push good payloads interleaved with descriptors that point outside the arena, then END."""
    ctrl = Segment.attach(ctrl_name, KIND_CONTROL)
    arena = Arena.format(Segment.attach(arena_name, KIND_ARENA), 256, MAX_BLOCK)
    ring = Slot.at(ctrl, 0).requests
    size = arena.payload_size
    forged = [(size, 1), (0, size + 1), (size - 8, 16), (1 << 63, 1 << 63), (8, (1 << 64) - 8)]
    forged.append(((1 << 64) - 1, 1))
    good = 0
    for i, (offset, length) in enumerate(forged * 10):
        payload = os.urandom(100)
        ok = arena.alloc(len(payload))
        arena.write(ok, payload)
        assert ring.push(REQUEST, 0, i, ok, len(payload), aux=zlib.crc32(payload))
        assert ring.push(REQUEST, 0, i, offset, length, aux=0)
        good += 1
    assert ring.push(END, 0, good)
    WakeWord(ctrl, 0).notify()
    results.put((FORGED_SEEN, good, len(forged) * 10))


# ---- harness -----------------------------------------------------------------------------------------


@contextmanager
def children() -> Iterator[Callable[..., BaseProcess]]:
    """Start spawn-method children; any still alive on the way out is killed and reaped."""
    ctx = mp.get_context("spawn")
    started: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.is_alive():
                proc.kill()
            proc.join(JOIN_S)


def collect(results: Any, n: int, watch: list[BaseProcess]) -> list[tuple[int, ...]]:
    """``n`` reports from the queue; fails at once when a watched child dies with an error."""
    out: list[tuple[int, ...]] = []
    deadline = time.monotonic() + JOIN_S
    while len(out) < n:
        try:
            out.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        dead = [f"{p.name}: exit {p.exitcode}" for p in watch if p.exitcode not in (None, 0)]
        assert not dead, f"a child failed: {dead}"
        assert time.monotonic() < deadline, f"only {len(out)} of {n} reports within {JOIN_S} s: {out}"
    return out


def join_ok(*procs: BaseProcess) -> None:
    for proc in procs:
        proc.join(JOIN_S)
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


def make_world(segment_factory: MakeSegment, n_slots: int) -> tuple[Segment, list[str]]:
    ctrl = segment_factory(control_size(n_slots), KIND_CONTROL)
    for i in range(n_slots):
        Slot.at(ctrl, i, create=True)
    arenas = [segment_factory(segment_size_for(ARENA_PAYLOAD, MAX_BLOCK), KIND_ARENA) for _ in range(n_slots)]
    return ctrl, [seg.name for seg in arenas]


# ---- tests -------------------------------------------------------------------------------------------


def test_three_producers_one_consumer(segment_factory: MakeSegment) -> None:
    per_producer = 340_000
    ctrl, arena_names = make_world(segment_factory, 3)
    results = mp.get_context("spawn").Queue()
    with children() as start:
        consumer = start(consumer_main, ctrl.name, arena_names, 3, results)
        producers = [
            start(producer_main, ctrl.name, arena_names[i], i, 0, per_producer, results) for i in range(3)
        ]
        reports = collect(results, 6, [consumer, *producers])
        join_ok(consumer, *producers)
    produced = sorted(r for r in reports if r[0] == PRODUCED)
    consumed = sorted(r for r in reports if r[0] == CONSUMED)
    # (tag, slot, gen, sent, bytes_in_use, used by the block map)
    assert produced == [(PRODUCED, i, 0, per_producer, 0, 0) for i in range(3)]
    # (tag, slot, gen, next expected seq, count in END, sequence errors, payload errors)
    assert consumed == [(CONSUMED, i, 0, per_producer, per_producer, 0, 0) for i in range(3)]
    assert sum(r[3] for r in produced) >= 1_000_000


def test_killed_producer_is_reset_and_replaced(segment_factory: MakeSegment) -> None:
    steady = 100_000
    ctrl, arena_names = make_world(segment_factory, 3)
    ctx = mp.get_context("spawn")
    results, progress = ctx.Queue(), ctx.Event()
    with children() as start:
        consumer = start(consumer_main, ctrl.name, arena_names, 3, results)
        others = [start(producer_main, ctrl.name, arena_names[i], i, 0, steady, results) for i in (0, 1)]
        victim = start(producer_main, ctrl.name, arena_names[2], 2, 0, 1 << 40, results, progress)
        assert progress.wait(JOIN_S), "the victim never got going"
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        victim.join(JOIN_S)
        assert victim.exitcode == -signal.SIGKILL

        ctrl.store_u64(CMD_AT + 8 * 2, 1)  # supervisor: slot 2 now belongs to generation 1
        WakeWord(ctrl, 0).wake()
        watch = [consumer, *others]
        reports = collect(results, 1, watch)
        while reports[-1][0] != RESET_DONE:
            reports += collect(results, 1, watch)
        assert reports[-1] == (RESET_DONE, 2, 1, 1)  # both rings of the slot: epoch 0 -> 1
        replacement = start(producer_main, ctrl.name, arena_names[2], 2, 1, steady, results)
        reports += collect(results, 7 - len(reports), [*watch, replacement])  # 3 + 3 + the reset
        join_ok(consumer, replacement, *others)
    produced = sorted(r for r in reports if r[0] == PRODUCED)
    consumed = sorted(r for r in reports if r[0] == CONSUMED)
    assert produced == [
        (PRODUCED, 0, 0, steady, 0, 0),
        (PRODUCED, 1, 0, steady, 0, 0),
        (PRODUCED, 2, 1, steady, 0, 0),
    ]
    assert consumed == [
        (CONSUMED, 0, 0, steady, steady, 0, 0),
        (CONSUMED, 1, 0, steady, steady, 0, 0),
        (CONSUMED, 2, 1, steady, steady, 0, 0),
    ]


def test_forged_descriptors_are_refused(segment_factory: MakeSegment) -> None:
    ctrl, (arena_name,) = make_world(segment_factory, 1)
    results = mp.get_context("spawn").Queue()
    word = WakeWord(ctrl, 0)
    ring = Slot.at(ctrl, 0).requests
    reader_seg = Segment.attach(arena_name, KIND_ARENA, writable=False)
    try:
        with children() as start:
            forger = start(forger_main, ctrl.name, arena_name, results)
            refused = verified = 0
            arena: Arena | None = None
            while True:
                assert wait_rings(word, [ring], SPIN_S, JOIN_S), "the forger went quiet"
                desc = ring.pop()
                assert desc is not None
                kind, _, _, offset, length, _, crc, *_ = desc
                if kind == END:
                    break
                arena = arena or Arena.attach(reader_seg)
                try:
                    data = arena.view(offset, length)
                except IndexError:
                    refused += 1
                    continue
                assert zlib.crc32(data.data) == crc
                verified += 1
            (report,) = collect(results, 1, [forger])
            join_ok(forger)
    finally:
        reader_seg.close()
    assert report == (FORGED_SEEN, verified, refused) == (FORGED_SEEN, 60, 60)
