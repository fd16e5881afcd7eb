"""Per-protocol throughput and latency against a launched server: gRPC, ZMQ and REST (binary tensors).

`run` starts ``python -m engine.launch`` on ephemeral ports (one CPU worker, one front-end per protocol)
and, for each protocol, model (``identity``, ``mlp``; one FP32 [1, 256] row per request) and concurrency
(1, 64), keeps that many requests in flight for a fixed time (2 s quick, 5 s otherwise) after a short
warm-up. It reports requests/s and the median and p99 latency of the completed requests, prints a
table and writes JSON: ``python -m bench protocols [--quick] [--json FILE]``.

The load comes from one asyncio loop (uvloop) in this process, with each protocol's natural client:
one gRPC channel (``grpc.aio``, requests multiplexed over HTTP/2), one `AsyncZmqClient` (one DEALER,
requests matched by id), and one keep-alive HTTP/1.1 connection per concurrent user for REST. The
client shares the machine's cores with the server, so on a small machine the figures measure the pair.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.load_server import Endpoints, launched_server
from bench.output import write_json

PROTOCOLS = ("grpc", "zmq", "rest-binary")
MODELS = ("identity", "mlp")
CONCURRENCIES = (1, 64)
SHAPE = (1, 256)
DURATION_S = 5.0
QUICK_DURATION_S = 2.0
WARMUP_S = 0.5
#: Set to 1 for quick runs (as for the rest of the bench suite).
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"
REQUEST_TIMEOUT_S = 30.0

#: One request: awaits it and raises on failure.
Call = Callable[[], Awaitable[None]]


# ---- one client per protocol -----------------------------------------------------------------------------


class _GrpcClient:
    """ModelInfer over one grpc.aio channel."""

    def __init__(self, endpoints: Endpoints, model: str, data: np.ndarray) -> None:
        import grpc.aio

        from protos import grpc_service_pb2 as pb
        from protos import grpc_service_pb2_grpc as pb_grpc

        self._channel = grpc.aio.insecure_channel(f"{endpoints.host}:{endpoints.ports['grpc']}")
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._request = pb.ModelInferRequest(model_name=model)
        self._request.inputs.add(name="INPUT0", datatype="FP32", shape=data.shape)
        self._request.raw_input_contents.append(data.tobytes())

    async def call(self) -> None:
        response = await self._stub.ModelInfer(self._request, timeout=REQUEST_TIMEOUT_S)
        if len(response.raw_output_contents) != 1:
            raise RuntimeError("gRPC response without its output")

    def user(self) -> Call:
        return self.call

    async def close(self) -> None:
        await self._channel.close()


class _ZmqClient:
    """`AsyncZmqClient.infer` over one DEALER socket."""

    def __init__(self, endpoints: Endpoints, model: str, data: np.ndarray) -> None:
        from servers.client.zmq_client import AsyncZmqClient

        self._client = AsyncZmqClient(f"tcp://{endpoints.host}:{endpoints.ports['zmq']}", REQUEST_TIMEOUT_S)
        self._model = model
        self._inputs = {"INPUT0": data}

    async def call(self) -> None:
        outputs = await self._client.infer(self._model, self._inputs)
        if "OUTPUT0" not in outputs:
            raise RuntimeError("ZMQ reply without its output")

    def user(self) -> Call:
        return self.call

    async def close(self) -> None:
        await self._client.close()


class _RestClient:
    """POST /infer with binary tensors; one keep-alive HTTP/1.1 connection per user (no pipelining)."""

    def __init__(self, endpoints: Endpoints, model: str, data: np.ndarray) -> None:
        self._host, self._port = endpoints.host, endpoints.ports["rest"]
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "FP32",
                        "shape": list(data.shape),
                        "parameters": {"binary_data_size": data.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        )
        body = header + data.tobytes()
        self._request = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self._writers: list[asyncio.StreamWriter] = []

    def user(self) -> Call:
        streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def call() -> None:
            if not streams:
                reader, writer = await asyncio.open_connection(self._host, self._port)
                self._writers.append(writer)
                streams.append((reader, writer))
            reader, writer = streams[0]
            writer.write(self._request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if length is None:
                raise RuntimeError(f"REST response without Content-Length: {head[:200]!r}")
            await reader.readexactly(int(length[1]))
            if head[9:12] != b"200":
                raise RuntimeError(f"REST status {head[9:12].decode()}")

        return call

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()


_CLIENTS: dict[str, Callable[[Endpoints, str, np.ndarray], Any]] = {
    "grpc": _GrpcClient,
    "zmq": _ZmqClient,
    "rest-binary": _RestClient,
}


# ---- measuring -------------------------------------------------------------------------------------------


async def _drive(calls: list[Call], seconds: float) -> tuple[list[int], int]:
    """Each call in a loop until ``seconds`` pass; latencies (ns) of the completed requests, errors."""
    latencies: list[int] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def user(call: Call) -> None:
        nonlocal errors
        while time.perf_counter() < end:
            start = time.perf_counter_ns()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - start)

    await asyncio.gather(*(user(c) for c in calls))
    return latencies, errors


async def measure(
    endpoints: Endpoints, protocol: str, model: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """One cell of the table: ``concurrency`` users sending ``model`` requests over ``protocol``."""
    data = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    client = _CLIENTS[protocol](endpoints, model, data)
    try:
        calls = [client.user() for _ in range(concurrency)]
        await _drive(calls, WARMUP_S)
        start = time.perf_counter()
        latencies, errors = await _drive(calls, seconds)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    us = np.asarray(latencies, dtype=np.float64) / 1e3
    return {
        "protocol": protocol,
        "model": model,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_us": round(float(np.percentile(us, 50)), 1) if len(us) else None,
        "p99_us": round(float(np.percentile(us, 99)), 1) if len(us) else None,
    }


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(json_path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Launch a server, measure every cell, print a table, write JSON to ``json_path`` (unless None).

    Args:
        json_path: where to write the JSON (folders are created); None writes nothing.
        quick: 2 s per cell instead of 5 s.

    Returns:
        The figures (also what the JSON holds).
    """
    seconds = QUICK_DURATION_S if quick else DURATION_S
    cells = []
    loop = _new_loop()
    try:
        with launched_server() as endpoints:
            for protocol in PROTOCOLS:
                for model in MODELS:
                    for concurrency in CONCURRENCIES:
                        cells.append(
                            loop.run_until_complete(measure(endpoints, protocol, model, concurrency, seconds))
                        )
    finally:
        loop.close()
    result: dict[str, Any] = {
        "benchmark": "protocols",
        "input": f"FP32{list(SHAPE)}",
        "seconds_per_cell": seconds,
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": cells,
        "zmq_over_grpc_rps_at_64": _ratios(cells, "zmq", "grpc", 64),
    }
    print(format_table(result))
    if json_path is not None:
        print(f"wrote {write_json(result, json_path)}")
    return result


def _ratios(cells: list[dict[str, Any]], top: str, bottom: str, concurrency: int) -> dict[str, float]:
    rps = {(c["protocol"], c["model"]): c["requests_per_s"] for c in cells if c["concurrency"] == concurrency}
    return {
        model: round(rps[(top, model)] / rps[(bottom, model)], 2)
        for model in MODELS
        if rps.get((bottom, model)) and (top, model) in rps
    }


def format_table(result: dict[str, Any]) -> str:
    """The figures as a text table."""
    lines = [
        f"protocols: {result['input']} per request, {result['seconds_per_cell']:.0f} s per cell, "
        f"{result['cpus']} CPUs shared by client and server",
        f"  {'protocol':<12} {'model':<9} {'conc':>4} {'req/s':>9} {'p50 us':>9} {'p99 us':>9} {'errors':>6}",
    ]
    for c in result["results"]:
        p50 = f"{c['p50_us']:.0f}" if c["p50_us"] is not None else "-"
        p99 = f"{c['p99_us']:.0f}" if c["p99_us"] is not None else "-"
        lines.append(
            f"  {c['protocol']:<12} {c['model']:<9} {c['concurrency']:>4} {c['requests_per_s']:>9.0f} "
            f"{p50:>9} {p99:>9} {c['errors']:>6}"
        )
    ratios = ", ".join(f"{m} {r:.2f}x" for m, r in result["zmq_over_grpc_rps_at_64"].items())
    lines.append(f"  ZMQ / gRPC requests/s at concurrency 64: {ratios}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench protocols``."""
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_DURATION_S:.0f} s per cell")


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench protocols``."""
    run(args.json, quick=args.quick or os.environ.get(BENCH_QUICK_ENV) == "1")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__.splitlines()[0])
    configure(_parser)
    raise SystemExit(main(_parser.parse_args()))
