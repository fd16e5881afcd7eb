"""What metrics cost: requests/s with ``metrics=true`` against ``metrics=false``, same load, same machine.

`run` launches two servers side by side (one CPU worker each; an idle engine uses no CPU, so the one
not being measured does not disturb the other), one with per-request metrics and one without, and
measures them in turns (on, off, off, on, ...) so that drift of a shared machine falls on both alike:
each turn keeps ``concurrency`` requests in flight for a fixed time with `bench.protocols.measure`
(gRPC by default, the issue's figure; ZMQ and REST on request). It reports, per protocol and mode, the
median requests/s and the median server CPU time per request (user + system of the supervisor and all
its children, from /proc), and the cost of metrics in percent of each. On a machine shared with other
work the requests/s of a turn swing with the neighbours' load; CPU time per request barely does, so
it is the steadier measure of what metrics cost. Where even that is too noisy (a 2-CPU machine shared
with other work), `instrumentation_cost` times exactly the code metrics add to a request (the
front-end's begin/end, the worker's per-batch observation, the periodic flush), best of several runs,
and the report gives it as a share of the server's CPU time per request with metrics off::

    python -m bench metrics [--quick] [--protocols grpc,zmq,rest-binary] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.load_server import Endpoints, cpu_seconds, launched_server, process_tree
from bench.output import write_json
from bench.protocols import WARMUP_S, measure

MODEL = "identity"
CONCURRENCY = 64
ROUNDS = 4
SECONDS = 5.0
QUICK_ROUNDS = 2
QUICK_SECONDS = 2.0
#: Set to 1 for quick runs (as for the rest of the bench suite).
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"
MODES = {"on": ("--set", "metrics=true"), "off": ("--set", "metrics=false")}


def _loop() -> Any:
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(
    protocols: tuple[str, ...] = ("grpc",),
    rounds: int = ROUNDS,
    seconds: float = SECONDS,
    concurrency: int = CONCURRENCY,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Measure both modes ``rounds`` times per protocol; print a table, write JSON when asked.

    Returns:
        Per protocol: every turn's requests/s by mode, the medians and the cost in percent.
    """
    loop = _loop()
    figures: dict[str, dict[str, list[float]]] = {p: {"on": [], "off": []} for p in protocols}
    cpu: dict[str, dict[str, list[float]]] = {p: {"on": [], "off": []} for p in protocols}
    try:
        with ExitStack() as stack:
            servers = {mode: stack.enter_context(launched_server(args)) for mode, args in MODES.items()}
            for protocol in protocols:
                for mode in ("on", "off"):  # warm both up: first connections, first batches
                    loop.run_until_complete(measure(servers[mode], protocol, MODEL, concurrency, 0.5))
                for r in range(rounds):
                    order = ("on", "off") if r % 2 == 0 else ("off", "on")
                    for mode in order:
                        used = _server_cpu(servers[mode])
                        cell = loop.run_until_complete(
                            measure(servers[mode], protocol, MODEL, concurrency, seconds)
                        )
                        used = _server_cpu(servers[mode]) - used
                        figures[protocol][mode].append(float(cell["requests_per_s"]))
                        # the warm-up inside measure() is counted in the CPU but not in the requests:
                        # add its requests at the turn's rate
                        requests = cell["requests"] * (1 + WARMUP_S / seconds)
                        cpu[protocol][mode].append(round(1e6 * used / requests, 1) if requests else 0.0)
    finally:
        loop.close()
    results: list[dict[str, Any]] = []
    for protocol, by_mode in figures.items():
        on, off = statistics.median(by_mode["on"]), statistics.median(by_mode["off"])
        cpu_on, cpu_off = statistics.median(cpu[protocol]["on"]), statistics.median(cpu[protocol]["off"])
        results.append(
            {
                "protocol": protocol,
                "model": MODEL,
                "concurrency": concurrency,
                "requests_per_s_on": by_mode["on"],
                "requests_per_s_off": by_mode["off"],
                "median_on": round(on, 1),
                "median_off": round(off, 1),
                "cost_percent": round(100.0 * (off - on) / off, 2) if off else None,
                "cpu_us_per_request_on": cpu[protocol]["on"],
                "cpu_us_per_request_off": cpu[protocol]["off"],
                "median_cpu_us_on": cpu_on,
                "median_cpu_us_off": cpu_off,
                "cpu_cost_percent": round(100.0 * (cpu_on - cpu_off) / cpu_off, 2) if cpu_off else None,
            }
        )
    added = instrumentation_cost()
    for cell in results:
        off_cpu = cell["median_cpu_us_off"]
        cell["instrumentation_percent_of_cpu"] = (
            round(100.0 * added["total_us"] / off_cpu, 3) if off_cpu else None
        )
    result = {
        "benchmark": "metrics_overhead",
        "instrumentation_us_per_request": added,
        "rounds": rounds,
        "seconds_per_turn": seconds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
    }
    print(format_table(result))
    if json_path is not None:
        print(f"wrote {write_json(result, json_path)}")
    return result


def instrumentation_cost(n: int = 100_000, repeats: int = 5) -> dict[str, float]:
    """Microseconds of CPU metrics add per request, timed in this process (best of ``repeats``).

    ``frontend``: `servers.observer.RequestObserver` begin + end with metrics against without (the
    request-id context variable is set either way); ``worker``: `engine.metrics.WorkerMetrics.batch`
    for one request per batch (the worst case: no batching to share the per-batch part);
    ``flush``: one flush of a busy process, spread over the requests of one flush interval at 1000 req/s.
    """
    import time
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from engine.metrics import FLUSH_INTERVAL_S, RequestMetrics, WorkerMetrics
    from servers.observer import RequestObserver

    def best(step: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                step()
            times.append((time.perf_counter() - start) / n)
        return min(times) * 1e6

    metrics = RequestMetrics("grpc", CollectorRegistry())
    on = RequestObserver("grpc", [MODEL], metrics)
    off = RequestObserver("grpc", [MODEL])
    frontend = best(lambda: on.end(MODEL, on.begin(MODEL, "rid"))) - best(
        lambda: off.end(MODEL, off.begin(MODEL, "rid"))
    )
    worker_metrics = WorkerMetrics([MODEL], CollectorRegistry())
    one = [SimpleNamespace(arrival_ns=0)]
    worker = best(lambda: worker_metrics.batch(0, one, 1000, 2000))
    flush_start = time.perf_counter()
    for _ in range(100):
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
            metrics.record(MODEL, code, 0.001)
        metrics.flush()
        worker_metrics.batch(0, one, 1000, 2000)
        worker_metrics.flush([0])
    flush = (time.perf_counter() - flush_start) / 100 * 1e6 / (1000 * FLUSH_INTERVAL_S)
    return {
        "frontend_us": round(max(frontend, 0.0), 3),
        "worker_us": round(worker, 3),
        "flush_us": round(flush, 3),
        "total_us": round(max(frontend, 0.0) + worker + flush, 3),
    }


def _server_cpu(endpoints: Endpoints) -> float:
    return sum(cpu_seconds(pid) for pid in process_tree(endpoints.pid))


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"metrics on vs off, {result['rounds']} turns of {result['seconds_per_turn']} s each, "
        f"{result['cpus']} CPUs",
        f"{'protocol':12s} {'c':>4s} {'req/s on':>10s} {'req/s off':>10s} {'cost %':>7s} "
        f"{'CPU us/req on':>14s} {'off':>6s} {'cost %':>7s}   req/s turns on | off",
    ]
    for r in result["results"]:
        turns = " ".join(f"{v:.0f}" for v in r["requests_per_s_on"])
        turns_off = " ".join(f"{v:.0f}" for v in r["requests_per_s_off"])
        lines.append(
            f"{r['protocol']:12s} {r['concurrency']:4d} {r['median_on']:10.1f} {r['median_off']:10.1f} "
            f"{r['cost_percent']:7.2f} {r['median_cpu_us_on']:14.1f} {r['median_cpu_us_off']:6.1f} "
            f"{r['cpu_cost_percent']:7.2f}   {turns} | {turns_off}"
        )
    added = result.get("instrumentation_us_per_request")
    if added:
        lines.append(
            f"instrumentation per request: {added['total_us']:.2f} us CPU "
            f"(front-end {added['frontend_us']:.2f}, worker {added['worker_us']:.2f}, "
            f"flush {added['flush_us']:.3f}) = "
            + ", ".join(
                f"{r['protocol']} {r['instrumentation_percent_of_cpu']:.2f}%" for r in result["results"]
            )
            + " of the server's CPU per request with metrics off"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocols", default="grpc", help="comma-separated: grpc, zmq, rest-binary")
    parser.add_argument("--rounds", type=int, help=f"turns per mode (default {ROUNDS}, quick {QUICK_ROUNDS})")
    parser.add_argument("--seconds", type=float, help=f"seconds per turn (default {SECONDS:.0f})")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="requests in flight")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} turns of {QUICK_SECONDS:.0f} s")
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")


def main(args: argparse.Namespace) -> int:
    quick = args.quick or os.environ.get(BENCH_QUICK_ENV) == "1"
    run(
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()),
        rounds=args.rounds or (QUICK_ROUNDS if quick else ROUNDS),
        seconds=args.seconds or (QUICK_SECONDS if quick else SECONDS),
        concurrency=args.concurrency,
        json_path=args.json,
    )
    return 0
