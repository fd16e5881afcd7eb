"""gRPC load from ``h2load`` (nghttp2's load generator, in C) instead of the Python client: what the
servers do when the client costs little CPU.

``python -m bench h2load [--streams 64,500] [--requests N] [--burst B --rounds R] [--servers engine,echo]
[--json F]``: for each server (this engine; the bare grpc.aio echo floor of `bench.baselines.echo_grpc`)
and each stream count, h2load sends N ModelInfer requests of the ``mlp`` payload over one HTTP/2
connection, that many in flight, after a warm-up of N/10; with ``--burst``, also R bursts of B calls
sent at once, each on a new connection (one h2load run of B requests, B in flight), after one
unmeasured burst. Reported: requests/s, request-time percentiles (from h2load's per-request log; for
bursts, over the requests of every round, with each round's p95 as well), and the CPU per request of
client and server. h2load sees only HTTP
statuses, not gRPC's, so the engine's answers are checked by its own counters: the OK count of
``engine_requests_total`` must grow by exactly the requests sent (anything else is reported as
errors). Needs ``h2load`` on PATH (Debian/Ubuntu: ``nghttp2-client``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.load_server import Endpoints, cpu_seconds, launched, launched_server, process_tree
from engine.metrics import FLUSH_INTERVAL_S

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVERS = ("engine", "echo")

_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout"
)
_TIMES = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_OK_COUNTER = re.compile(r"^engine_requests_total\{([^}]*)\} ([\d.e+]+)$", re.MULTILINE)


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_h2load(output: str) -> dict[str, Any]:
    """The figures of one h2load run's report. Raises ValueError when ``output`` is not one."""
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    times = _TIMES.search(output)
    if finished is None or requests is None or times is None:
        raise ValueError(f"not an h2load report:\n{output[-2000:]}")
    total, _started, done, succeeded = (int(x) for x in requests.groups()[:4])
    return {
        "duration_s": float(finished[1]) / (1e3 if finished[2] == "ms" else 1.0),
        "rps": float(finished[3]),
        "requests": total,
        "done": done,
        "succeeded": succeeded,
        "http_errors": total - succeeded,  # h2load's failed, errored and timed out overlap
        "min_ms": _ms(times[1]),
        "max_ms": _ms(times[2]),
        "mean_ms": _ms(times[3]),
        "sd_ms": _ms(times[4]),
    }


def engine_counts(metrics_text: str, protocol: str = "grpc") -> dict[str, float]:
    """``engine_requests_total`` by status code for ``protocol`` (summed over models)."""
    counts: dict[str, float] = {}
    for labels, value in _OK_COUNTER.findall(metrics_text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("protocol") == protocol:
            code = fields.get("code", "")
            counts[code] = counts.get(code, 0.0) + float(value)
    return counts


def grpc_frame() -> bytes:
    """One length-prefixed gRPC message: the ``mlp`` payload's ModelInferRequest."""
    from bench.load_payload import make_payload
    from bench.load_targets import grpc_request_bytes

    message = grpc_request_bytes(make_payload("mlp"))
    return b"\0" + len(message).to_bytes(4, "big") + message


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def request_times(log: str) -> list[float]:
    """The request times in ms of an h2load ``--log-file`` (start µs, status, µs per line)."""
    return [int(line.split("\t")[2]) / 1e3 for line in log.splitlines() if line.count("\t") >= 2]


def _percentiles(times: list[float]) -> dict[str, float]:
    if not times:
        return {}
    values = np.percentile(np.array(times, dtype=np.float64), [50, 95, 99])
    # the max from the same log as the percentiles: h2load's report rounds it to 10 µs, which can
    # put it below an interpolated p95 or p99 of the exact times
    return {
        "p50_ms": float(values[0]),
        "p95_ms": float(values[1]),
        "p99_ms": float(values[2]),
        "max_ms": max(times),
    }


def percentiles(log: str) -> dict[str, float]:
    """p50/p95/p99 in ms of the request times in an h2load ``--log-file`` (start µs, status, µs)."""
    return _percentiles(request_times(log))


def _h2load(url: str, streams: int, requests: int, body: Path) -> tuple[dict[str, Any], float]:
    """One h2load run; its report's figures (with percentiles from its per-request log, and the
    times themselves under ``times_ms``) and the CPU seconds h2load used."""
    log = body.with_suffix(".log")
    log.unlink(missing_ok=True)  # h2load appends to it
    argv = [
        "h2load", "-n", str(requests), "-c", "1", "-m", str(streams), "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log}", url,
    ]  # fmt: skip
    before = _children_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    cpu = _children_cpu() - before
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    figures = parse_h2load(done.stdout)
    times = request_times(log.read_text() if log.exists() else "")
    figures.update(_percentiles(times), times_ms=times)
    return figures, cpu


def _metrics(endpoints: Endpoints) -> dict[str, float]:
    url = f"http://{endpoints.host}:{endpoints.ports['rest']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return engine_counts(response.read().decode())


def _settled_metrics(endpoints: Endpoints, timeout_s: float = 10.0) -> dict[str, float]:
    """The counters once every front-end has published what it answered (two equal reads more than a
    flush interval apart)."""
    deadline = time.monotonic() + timeout_s
    last = _metrics(endpoints)
    while True:
        time.sleep(2 * FLUSH_INTERVAL_S)
        now = _metrics(endpoints)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def _server_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def measure(server: str, endpoints: Endpoints, streams: int, requests: int, body: Path) -> dict[str, Any]:
    """Warm up, then one measured h2load run against ``endpoints``, its answers checked (engine)."""
    url = f"http://{endpoints.host}:{endpoints.ports['grpc']}{MODEL_INFER}"
    _h2load(url, streams, max(requests // 10, streams), body)
    counts = _settled_metrics(endpoints) if server == "engine" else {}
    server_cpu = _server_cpu(endpoints.pid)
    result, client_cpu = _h2load(url, streams, requests, body)
    server_cpu = _server_cpu(endpoints.pid) - server_cpu
    del result["times_ms"]
    result.update(server=server, streams=streams)
    _account(result, server, endpoints, counts, client_cpu, server_cpu)
    return result


def measure_burst(server: str, endpoints: Endpoints, size: int, rounds: int, body: Path) -> dict[str, Any]:
    """One unmeasured burst, then ``rounds`` bursts of ``size`` calls sent at once (each one h2load
    run on a new connection), their answers checked (engine): one row, percentiles over every
    request of every round, each round's p95 under ``round_p95_ms``."""
    url = f"http://{endpoints.host}:{endpoints.ports['grpc']}{MODEL_INFER}"
    _h2load(url, size, size, body)
    counts = _settled_metrics(endpoints) if server == "engine" else {}
    server_cpu = _server_cpu(endpoints.pid)
    client_cpu = 0.0
    runs = []
    for _ in range(rounds):
        figures, cpu = _h2load(url, size, size, body)
        client_cpu += cpu
        runs.append(figures)
    server_cpu = _server_cpu(endpoints.pid) - server_cpu
    times = [t for r in runs for t in r["times_ms"]]
    result: dict[str, Any] = {
        "server": server,
        "streams": size,
        "burst": size,
        "rounds": rounds,
        "duration_s": sum(r["duration_s"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "done": sum(r["done"] for r in runs),
        "succeeded": sum(r["succeeded"] for r in runs),
        "http_errors": sum(r["http_errors"] for r in runs),
        "max_ms": max(r["max_ms"] for r in runs),
        "round_p95_ms": [round(r.get("p95_ms", 0.0), 2) for r in runs],
        **_percentiles(times),
    }
    result["rps"] = result["done"] / result["duration_s"] if result["duration_s"] else 0.0
    _account(result, server, endpoints, counts, client_cpu, server_cpu)
    return result


def _account(
    result: dict[str, Any],
    server: str,
    endpoints: Endpoints,
    counts: dict[str, float],
    client_cpu: float,
    server_cpu: float,
) -> None:
    """CPU per request of both sides, and for the engine what its counters say it answered."""
    answered = max(result["done"], 1)
    result["client_us_per_request"] = round(client_cpu / answered * 1e6, 1)
    result["server_us_per_request"] = round(server_cpu / answered * 1e6, 1)
    if server == "engine":
        after = _settled_metrics(endpoints)
        delta = {code: after.get(code, 0.0) - counts.get(code, 0.0) for code in after}
        result["grpc_ok"] = int(delta.get("OK", 0))
        result["grpc_errors"] = {code: int(n) for code, n in delta.items() if code != "OK" and n}


def _launch(server: str) -> Any:
    if server == "engine":
        return launched_server()
    argv = [sys.executable, "-m", "bench.baselines.echo_grpc", "--host", "127.0.0.1", "--port", "0"]
    return launched(argv)


def available() -> bool:
    """Whether ``h2load`` is on PATH."""
    return shutil.which("h2load") is not None


def run_report(
    servers: list[str], streams: list[int], requests: int, burst: int = 0, rounds: int = 5
) -> dict[str, Any]:
    """`run`, with what the JSON file keeps about it."""
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results = run(servers, streams, requests, burst, rounds)
    return {"tool": "h2load", "model": "mlp", "time": started, "requests": requests, "results": results}


def run(
    servers: list[str], streams: list[int], requests: int, burst: int = 0, rounds: int = 5
) -> list[dict[str, Any]]:
    """Every server at every stream count (then ``rounds`` bursts of ``burst`` calls when
    ``burst``), one server at a time."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "request.grpc"
        body.write_bytes(grpc_frame())
        for server in servers:
            with _launch(server) as endpoints:
                for m in streams:
                    results.append(measure(server, endpoints, m, requests, body))
                if burst:
                    results.append(measure_burst(server, endpoints, burst, rounds, body))
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| server | streams | req/s | p50 ms | p95 ms | p99 ms | max ms | client µs/req | server µs/req "
        "| checked |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        if r["server"] == "engine":
            bad = r["http_errors"] + sum(r["grpc_errors"].values())
            checked = f"{r['grpc_ok']} OK, {bad} errors {r['grpc_errors'] or ''}".strip()
        else:
            checked = f"HTTP only: {r['succeeded']} 2xx, {r['http_errors']} errors"
        streams = f"{r['rounds']} bursts of {r['burst']}" if r.get("burst") else str(r["streams"])
        lines.append(
            f"| {r['server']} | {streams} | {r['rps']:,.0f} | {r.get('p50_ms', 0):.2f} | "
            f"{r.get('p95_ms', 0):.2f} | {r.get('p99_ms', 0):.2f} | "
            f"{r['max_ms']:.1f} | {r['client_us_per_request']:.0f} | {r['server_us_per_request']:.0f} | "
            f"{checked} |"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--streams", default="64,500", help="calls in flight, comma-separated (default 64,500)"
    )
    parser.add_argument(
        "--requests", type=int, default=40_000, help="measured requests per run (default 40000)"
    )
    parser.add_argument(
        "--burst", type=int, default=0, help="also bursts of this many calls at once (default none)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="bursts measured (default 5)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="engine and/or echo (default both)")
    parser.add_argument("--json", type=Path, help="write the results here")


def main(args: argparse.Namespace) -> int:
    if not available():
        print("h2load is not on PATH (Debian/Ubuntu: apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(SERVERS)
    if unknown or not servers:
        print(f"--servers: choose from {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    streams = [int(m) for m in args.streams.split(",") if m]
    report = run_report(servers, streams, args.requests, args.burst, args.rounds)
    results = report["results"]
    print(format_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(_complete(r) for r in results) else 1


def _complete(result: dict[str, Any]) -> bool:
    """Every request answered (HTTP 200), and for the engine every one answered OK by its count."""
    answered = result["succeeded"] == result["requests"]
    return answered and (result["server"] != "engine" or result["grpc_ok"] == result["requests"])
