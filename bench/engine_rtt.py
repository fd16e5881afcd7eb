"""Engine-only round trip: gateway -> worker -> gateway over shared memory, no network front-end.

`run` starts an in-process `Engine` (one CPU worker process, one embedded front-end slot) and measures
the built-in ``identity`` model with one FP32 [1, 256] input:

- latency at concurrency 1: median and p99 of sequential requests;
- throughput at concurrency 64 and 512: requests/s, with the batch sizes the worker formed (deltas of
  the worker's ``batch_le_*`` counters: ``batch_le_8`` counts batches of 5..8 rows).

It prints a table and writes the figures as JSON: ``python -m bench engine [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import write_json
from engine.config import EngineConfig
from engine.engine import Engine
from servers.gateway import ShmGateway
from servers.gateway_api import InferInput

MODEL = "identity"
SHAPE = (1, 256)
CONCURRENCIES = (64, 512)
#: Set to 1 for quick runs (as for the rest of the bench suite).
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"


@dataclass(frozen=True)
class Plan:
    """How many requests each measurement makes."""

    warmup: int
    latency_requests: int
    throughput_requests: int


QUICK = Plan(warmup=50, latency_requests=300, throughput_requests=3_000)
FULL = Plan(warmup=500, latency_requests=5_000, throughput_requests=50_000)


def bench_config() -> EngineConfig:
    """The engine the benchmark runs: built-in models, one CPU worker, no network front-end."""
    return EngineConfig(
        protocols=(),
        devices=("cpu",),
        frontend_arena_mb=64,
        worker_arena_mb=64,
        max_message_mb=8,
        drain_grace_s=1.0,
        log_level="WARNING",
    )


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when available (what the front-ends run on), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def identity_input(seed: int = 0) -> list[InferInput]:
    """The request every measurement sends: FP32 [1, 256]."""
    x = np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)
    return [InferInput("INPUT0", "FP32", SHAPE, x)]


async def round_trip(gateway: ShmGateway, inputs: Sequence[InferInput]) -> None:
    """One request through shared memory, its output region handed back."""
    result = await gateway.infer(MODEL, inputs)
    result.release()


async def _latency(gateway: ShmGateway, plan: Plan) -> dict[str, Any]:
    inputs = identity_input()
    for _ in range(plan.warmup):
        await round_trip(gateway, inputs)
    samples = np.empty(plan.latency_requests, dtype=np.int64)
    for i in range(plan.latency_requests):
        start = time.perf_counter_ns()
        await round_trip(gateway, inputs)
        samples[i] = time.perf_counter_ns() - start
    us = samples / 1e3
    return {
        "concurrency": 1,
        "requests": int(plan.latency_requests),
        "median_us": round(float(np.median(us)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "mean_us": round(float(us.mean()), 1),
        "min_us": round(float(us.min()), 1),
    }


async def _throughput(engine: Engine, gateway: ShmGateway, concurrency: int, total: int) -> dict[str, Any]:
    inputs = identity_input()
    per_user = max(1, total // concurrency)

    async def user() -> None:
        for _ in range(per_user):
            await round_trip(gateway, inputs)

    await asyncio.gather(*(round_trip(gateway, inputs) for _ in range(concurrency)))  # warm-up burst
    before = engine.status()["models"][MODEL]
    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    after = engine.status()["models"][MODEL]
    d = {k: after[k] - before[k] for k in after}
    sizes = {k.removeprefix("batch_le_"): d[k] for k in after if k.startswith("batch_le_") and d[k]}
    requests = per_user * concurrency
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 1),
        "batches": d["batches"],
        "mean_batch": round(d["rows"] / d["batches"], 2) if d["batches"] else 0.0,
        "batch_sizes": sizes,
    }


def run(json_path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Measure, print a table, write JSON to ``json_path`` (unless None); returns the figures.

    Args:
        json_path: where to write the JSON (folders are created); None writes nothing.
        quick: a few thousand requests per measurement instead of tens of thousands.
    """
    plan = QUICK if quick else FULL
    loop = new_loop()
    try:
        with Engine(bench_config(), embedded_frontends=1) as engine:
            gateway = engine.connect(loop)
            latency = loop.run_until_complete(_latency(gateway, plan))
            throughput = [
                loop.run_until_complete(_throughput(engine, gateway, c, plan.throughput_requests))
                for c in CONCURRENCIES
            ]
    finally:
        loop.close()
    result = {
        "benchmark": "engine_rtt",
        "model": MODEL,
        "input": f"FP32{list(SHAPE)}",
        "path": "embedded gateway -> shm ring -> worker cpu -> shm ring -> gateway",
        "quick": quick,
        "loop": type(loop).__module__.split(".")[0],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "latency": latency,
        "throughput": throughput,
    }
    print(format_table(result))
    if json_path is not None:
        print(f"wrote {write_json(result, json_path)}")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as a small text table."""
    lat = result["latency"]
    lines = [
        f"engine round trip: {result['model']} {result['input']}, {result['path']}",
        f"  concurrency 1: median {lat['median_us']:.1f} us, p99 {lat['p99_us']:.1f} us "
        f"({lat['requests']} requests)",
        f"  {'concurrency':>11}  {'requests/s':>10}  {'mean batch':>10}  batch sizes (rows <= n: batches)",
    ]
    for t in result["throughput"]:
        sizes = " ".join(f"{k}:{v}" for k, v in t["batch_sizes"].items())
        lines.append(
            f"  {t['concurrency']:>11}  {t['requests_per_s']:>10.0f}  {t['mean_batch']:>10.2f}  {sizes}"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench engine``."""
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    parser.add_argument("--quick", action="store_true", help="few requests (a smoke run, numbers are rough)")


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench engine``."""
    run(args.json, quick=args.quick or os.environ.get(BENCH_QUICK_ENV) == "1")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.engine_rtt", description=__doc__.splitlines()[0])
    configure(_parser)
    raise SystemExit(main(_parser.parse_args()))
