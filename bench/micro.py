"""Micro-benchmarks of the compiled hot path: rings, cross-process round trips, wake-ups and the arena.

`python -m bench micro [--json FILE] [--quick] [--spin-us 50]` prints a table against the targets and
writes one JSON object (the keys of TARGETS plus absolute timings and a ``meta`` record). Every number
is the median of several repeats after a warm-up, timed with `time.perf_counter_ns`; cross-process
numbers use a peer started by `bench._xproc` in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench._xproc import PING, READY, SEGMENT_SIZE, STOP, Pair
from ext.arena import Arena, segment_size_for
from ext.notify import wait_rings
from ext.ring import DESC_DTYPE, Ring, ring_footprint
from ext.segment import KIND_ARENA, KIND_TEST, Segment

log = logging.getLogger("bench.micro")

PEER_START_S = 60.0
BURST = 256
MiB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """How much work each benchmark does (full run or quick run)."""

    repeats: int
    push_pop: int  # pairs per repeat
    bursts: int  # bursts per repeat
    rtt: int  # round trips measured with spinning waits (after `warmup` more)
    rtt_block: int  # ... with blocking waits, and as many through a bare eventfd
    warmup: int
    stream: int  # descriptors per one-way run
    stream_runs: int
    arena_iters: tuple[int, int, int]  # for 4 KiB, 1 MiB, 16 MiB
    idle_s: float  # per window
    idle_windows: int


FULL = Plan(
    repeats=9,
    push_pop=200_000,
    bursts=20_000,
    rtt=21_000,
    rtt_block=14_000,
    warmup=2_000,
    stream=20_000_000,
    stream_runs=3,
    arena_iters=(20_000, 300, 20),
    idle_s=2.0,
    idle_windows=3,
)
QUICK = Plan(
    repeats=3,
    push_pop=20_000,
    bursts=2_000,
    rtt=1_500,
    rtt_block=600,
    warmup=200,
    stream=200_000,
    stream_runs=1,
    arena_iters=(2_000, 20, 3),
    idle_s=0.5,
    idle_windows=1,
)


@dataclass(frozen=True)
class Target:
    """A goal for one metric: ``ok(value)`` says whether it is met."""

    key: str
    label: str
    unit: str
    goal: str
    ok: Callable[[float], bool] | None


TARGETS = (
    Target("push_pop_ns", "push+pop, one descriptor", "ns", "< 500", lambda v: v < 500),
    Target("burst_ns_per_desc", "burst of 256, per descriptor", "ns", "< 100", lambda v: v < 100),
    Target("xproc_rtt_us_p50", "cross-process rtt p50 (spin)", "us", "< 30", lambda v: v < 30),
    Target("xproc_rtt_us_p99", "cross-process rtt p99 (spin)", "us", "< 150", lambda v: v < 150),
    Target("xproc_rtt_block_us_p50", "cross-process rtt p50 (block)", "us", "~ eventfd", None),
    Target("xproc_rtt_block_us_p99", "cross-process rtt p99 (block)", "us", "", None),
    Target("eventfd_rtt_us_p50", "bare eventfd rtt p50", "us", "reference", None),
    Target("xproc_desc_per_s", "one-way descriptors/s", "/s", ">= 1,000,000", lambda v: v >= 1e6),
    Target("arena_ratio_4k", "arena put+tensor / copyto, 4 KiB", "x", "<= 1.25", lambda v: v <= 1.25),
    Target("arena_ratio_1m", "arena put+tensor / copyto, 1 MiB", "x", "<= 1.25", lambda v: v <= 1.25),
    Target("arena_ratio_16m", "arena put+tensor / copyto, 16 MiB", "x", "<= 1.25", lambda v: v <= 1.25),
    Target("idle_cpu_percent", "idle consumer CPU", "%", "< 1", lambda v: v < 1),
)


# ---- in-process -----------------------------------------------------------------------------------


def _median_ns_per(loop: Callable[[int], int], n: int, repeats: int, per: int = 1) -> float:
    """Median over ``repeats`` of loop(n) nanoseconds divided by n * per (after one warm-up)."""
    loop(max(1, n // 10))
    return float(np.median([loop(n) / (n * per) for _ in range(repeats)]))


def bench_ring(plan: Plan) -> dict[str, float]:
    """Same-process push+pop of one descriptor, and push_burst+pop_into of 256."""
    with Segment.create(ring_footprint(1024), KIND_TEST) as seg:
        ring = Ring.create(seg, 0, 1024)

        def push_pop(n: int) -> int:
            push, pop = ring.push, ring.pop
            t0 = time.perf_counter_ns()
            for i in range(n):
                push(1, 0, i)
                pop()
            return time.perf_counter_ns() - t0

        burst, out = np.zeros(BURST, DESC_DTYPE), np.zeros(BURST, DESC_DTYPE)

        def bursts(n: int) -> int:
            push_burst, pop_into = ring.push_burst, ring.pop_into
            t0 = time.perf_counter_ns()
            for _ in range(n):
                push_burst(burst)
                pop_into(out)
            return time.perf_counter_ns() - t0

        return {
            "push_pop_ns": _median_ns_per(push_pop, plan.push_pop, plan.repeats),
            "burst_ns_per_desc": _median_ns_per(bursts, plan.bursts, plan.repeats, BURST),
        }


def _page_offset_array(nbytes: int, page_offset: int) -> np.ndarray:
    """A uint8 array whose address is ``page_offset`` past a 4 KiB boundary."""
    raw = np.empty(nbytes + 8192, np.uint8)
    skip = (page_offset - raw.ctypes.data) % 4096
    return raw[skip : skip + nbytes]


def bench_arena(plan: Plan) -> dict[str, float]:
    """arena.put() + a tensor over the written copy, against np.copyto into a preallocated array.

    Both destinations are page-aligned (arena blocks are) and the source sits half a page off: a
    source and destination a multiple of 4 KiB apart (as np.empty_like often places them) slow a
    copy down by up to 5x through 4K aliasing on x86, which would skew the baseline either way.
    """
    from torch import from_numpy  # here, not at the top: `python -m bench --help` stays fast

    results: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with Segment.create(segment_size_for(16 * MiB, 16 * MiB), KIND_ARENA) as seg:
        arena = Arena.format(seg, 256, 16 * MiB)
        offset = arena.alloc(16 * MiB)
        for label, nbytes, iters in zip(
            ("4k", "1m", "16m"), (4096, MiB, 16 * MiB), plan.arena_iters, strict=True
        ):
            src = _page_offset_array(nbytes, 2048)
            src[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
            dst = _page_offset_array(nbytes, 0)

            def put_only(n: int, src: np.ndarray = src) -> int:
                write = arena.put
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    write(offset, src)
                return time.perf_counter_ns() - t0

            def put(n: int, src: np.ndarray = src) -> int:
                write = arena.put
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    from_numpy(write(offset, src))
                return time.perf_counter_ns() - t0

            def copy(n: int, src: np.ndarray = src, dst: np.ndarray = dst) -> int:
                copyto = np.copyto
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    copyto(dst, src)
                return time.perf_counter_ns() - t0

            put(iters)  # warm-up: fault in every page on both sides
            copy(iters)
            put_ns, put_only_ns, copy_ns = [], [], []
            for _ in range(plan.repeats):  # interleaved, so drift hits all alike
                put_ns.append(put(iters) / iters)
                copy_ns.append(copy(iters) / iters)
                put_only_ns.append(put_only(iters) / iters)
            results[f"arena_put_tensor_ns_{label}"] = float(np.median(put_ns))
            results[f"arena_put_ns_{label}"] = float(np.median(put_only_ns))
            results[f"copyto_ns_{label}"] = float(np.median(copy_ns))
            results[f"arena_ratio_{label}"] = (
                results[f"arena_put_tensor_ns_{label}"] / results[f"copyto_ns_{label}"]
            )
        arena.close()
    return results


# ---- cross-process --------------------------------------------------------------------------------


@contextmanager
def peer(role: str, *args: object) -> Iterator[tuple[Pair, subprocess.Popen[str]]]:
    """A `bench._xproc` child on a fresh control segment; ready (it said so) when this yields."""
    seg = Segment.create(SEGMENT_SIZE, KIND_TEST)
    proc: subprocess.Popen[str] | None = None
    try:
        pair = Pair.create(seg)
        argv = [sys.executable, "-m", "bench._xproc", role, seg.name, *map(str, args)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + PEER_START_S
        while (d := pair.to_parent.pop()) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"bench peer {role!r} exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench peer {role!r} not ready within {PEER_START_S} s")
            wait_rings(pair.parent_word, [pair.to_parent], 0.0, 0.2)
        assert d[0] == READY
        yield pair, proc
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(PEER_START_S)
            if proc.stdout is not None:
                proc.stdout.close()
        seg.close()
        seg.unlink()


def _stop(pair: Pair, proc: subprocess.Popen[str]) -> str:
    pair.to_child.push(STOP, 0, 0)
    pair.child_word.notify()
    out, _ = proc.communicate(timeout=PEER_START_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bench peer exited with {proc.returncode}")
    return out


def _percentiles_us(samples_ns: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(samples_ns, [50, 99]) / 1000.0
    return float(p50), float(p99)


@contextmanager
def ring_pinger(spin_s: float) -> Iterator[Callable[[int], np.ndarray]]:
    """``round_trips(n)`` -> n round-trip times (ns) through two rings to a `pong` peer; both sides
    wait with wait_rings(spin_s)."""
    with peer("pong", spin_s) as (pair, proc):
        push, pop, notify = pair.to_child.push, pair.to_parent.pop, pair.child_word.notify
        word, inbox = pair.parent_word, [pair.to_parent]

        def round_trips(n: int) -> np.ndarray:
            samples = np.empty(n, np.int64)
            for i in range(n):
                t0 = time.perf_counter_ns()
                push(PING, 0, i)
                notify()
                while not wait_rings(word, inbox, spin_s, 1.0):
                    if proc.poll() is not None:
                        raise RuntimeError("bench peer died during the round trips")
                pop()
                samples[i] = time.perf_counter_ns() - t0
            return samples

        yield round_trips
        _stop(pair, proc)


@contextmanager
def eventfd_pinger() -> Iterator[Callable[[int], np.ndarray]]:
    """The reference: ``round_trips(n)`` through a bare eventfd pair to a Python peer (blocking reads)."""
    ping, pong = os.eventfd(0), os.eventfd(0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._xproc", "eventfd-pong", str(ping), str(pong)], pass_fds=(ping, pong)
    )
    write, read = os.eventfd_write, os.eventfd_read

    def round_trips(n: int) -> np.ndarray:
        samples = np.empty(n, np.int64)
        for i in range(n):
            t0 = time.perf_counter_ns()
            write(ping, 1)
            read(pong)
            samples[i] = time.perf_counter_ns() - t0
        return samples

    try:
        if not select.select([pong], [], [], PEER_START_S)[0]:
            raise RuntimeError("eventfd peer not ready")
        read(pong)
        yield round_trips
        write(ping, 2)
        proc.wait(PEER_START_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PEER_START_S)
        os.close(ping)
        os.close(pong)


def bench_rtt(plan: Plan, spin_s: float) -> dict[str, float]:
    """Round trips with spinning waits; then blocking waits and the bare eventfd, interleaved in
    chunks so that both see the same machine load."""
    results: dict[str, float] = {}
    with ring_pinger(spin_s) as spin:
        spin(plan.warmup)
        samples = np.concatenate([spin(plan.rtt // plan.repeats) for _ in range(plan.repeats)])
    results["xproc_rtt_us_p50"], results["xproc_rtt_us_p99"] = _percentiles_us(samples)
    with ring_pinger(0.0) as block, eventfd_pinger() as bare:
        block(plan.warmup)
        bare(plan.warmup)
        chunk = plan.rtt_block // plan.repeats
        block_ns, bare_ns = [], []
        for _ in range(plan.repeats):
            block_ns.append(block(chunk))
            bare_ns.append(bare(chunk))
    block_p = _percentiles_us(np.concatenate(block_ns))
    results["xproc_rtt_block_us_p50"], results["xproc_rtt_block_us_p99"] = block_p
    results["eventfd_rtt_us_p50"], results["eventfd_rtt_us_p99"] = _percentiles_us(np.concatenate(bare_ns))
    return results


def bench_stream(plan: Plan, spin_s: float) -> float:
    """One-way descriptors per second: bursts of 256 from this process to a consumer process."""
    rates = []
    for _ in range(plan.stream_runs):
        total = plan.stream
        with peer("sink", spin_s, total) as (pair, proc):
            burst = np.zeros(BURST, DESC_DTYPE)
            burst["kind"] = PING
            push_burst, notify = pair.to_child.push_burst, pair.child_word.notify
            sent = 0
            t0 = time.monotonic_ns()  # CLOCK_MONOTONIC: the peer's clock too
            while sent < total:
                n = push_burst(burst if total - sent >= BURST else burst[: total - sent])
                if n:
                    sent += n
                    notify()
                else:
                    os.sched_yield()  # full: the consumer is on it
            out, _ = proc.communicate(timeout=PEER_START_S)
            report = json.loads(out.strip().splitlines()[-1])
            rates.append(total / ((report["t_end_ns"] - t0) / 1e9))
    return float(np.median(rates))


def bench_idle(plan: Plan, spin_s: float) -> float:
    """CPU% of a consumer process waiting in wait_rings with no traffic (its own CPU time; the
    median of ``idle_windows`` windows: on a shared VM one window now and then catches noise)."""
    with peer("idle", spin_s, plan.idle_s, plan.idle_windows) as (_, proc):
        out, _ = proc.communicate(timeout=plan.idle_s * plan.idle_windows + PEER_START_S)
    return float(np.median(json.loads(out.strip().splitlines()[-1])["cpu_percent"]))


# ---- report ---------------------------------------------------------------------------------------


def verdict(target: Target, results: dict[str, Any]) -> str:
    value = results.get(target.key)
    if value is None:
        return "-"
    if target.ok is None:
        if target.key == "xproc_rtt_block_us_p50" and results.get("eventfd_rtt_us_p50"):
            return f"{value / results['eventfd_rtt_us_p50']:.2f}x eventfd"
        return ""
    return "ok" if target.ok(float(value)) else "MISS"


def format_table(results: dict[str, Any]) -> str:
    """The results against TARGETS, one line each, then the absolute arena timings."""
    lines = [f"{'metric':<36} {'value':>14} {'unit':<4} {'target':<14} verdict"]
    for t in TARGETS:
        value = results.get(t.key)
        shown = "-" if value is None else (f"{value:,.0f}" if value >= 1000 else f"{value:.3g}")
        lines.append(f"{t.label:<36} {shown:>14} {t.unit:<4} {t.goal:<14} {verdict(t, results)}")
    for label in ("4k", "1m", "16m"):
        put, copy = results.get(f"arena_put_tensor_ns_{label}"), results.get(f"copyto_ns_{label}")
        put_only = results.get(f"arena_put_ns_{label}")
        if put is not None and copy is not None and put_only is not None:
            lines.append(
                f"  arena {label:>3}: put+tensor {put:,.0f} ns (put alone {put_only:,.0f} ns), "
                f"np.copyto {copy:,.0f} ns"
            )
    return "\n".join(lines)


def run(json_path: str | None, quick: bool, spin_s: float = 50e-6) -> dict[str, Any]:
    """Run every micro-benchmark, print the table, write the JSON object to ``json_path``; return it."""
    plan = QUICK if quick else FULL
    results: dict[str, Any] = {}
    log.info("bench micro: ring push/pop and bursts")
    results.update(bench_ring(plan))
    log.info("bench micro: cross-process round trips (spin %.0f us, then blocking)", spin_s * 1e6)
    results.update(bench_rtt(plan, spin_s))
    log.info("bench micro: one-way stream")
    results["xproc_desc_per_s"] = bench_stream(plan, spin_s)
    log.info("bench micro: arena put + tensor vs np.copyto")
    results.update(bench_arena(plan))
    log.info("bench micro: idle consumer, %d x %s s", plan.idle_windows, plan.idle_s)
    results["idle_cpu_percent"] = bench_idle(plan, spin_s)
    results["misses"] = [t.key for t in TARGETS if verdict(t, results) == "MISS"]
    results["meta"] = {
        "quick": quick,
        "spin_s": spin_s,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(format_table(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return results


# ---- command line ---------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m bench micro`."""
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run, numbers are rough)")
    parser.add_argument("--spin-us", type=float, default=50.0, help="wait_rings spin before blocking (us)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")


def main(args: argparse.Namespace) -> int:
    """Entry of `python -m bench micro`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    quick = args.quick or os.environ.get("ENGINE_BENCH_QUICK") == "1"
    results = run(args.json, quick, args.spin_us * 1e-6)
    return 1 if args.strict and results["misses"] else 0
