"""Overload: gRPC at five times the sustainable rate; what is admitted, what is refused, what memory does.

`run` launches ``python -m engine.launch`` on ephemeral ports (one CPU worker, defaults otherwise) and:

1. measures the sustainable rate of ``mlp`` (one FP32 [1, 256] row per request) over gRPC with a closed
   loop of 64 users for a few seconds;
2. reads the resident set size (VmRSS, /proc) of every server process;
3. runs an open loop at ``factor`` (5) times that rate for 60 s (10 s with ``--quick``): request ``i``
   is due at ``start + i / rate`` whatever happened before, and its latency counts from that instant
   (a server that stalls is charged for the stall; no coordinated omission);
4. reads every RSS again once the last answer is in, and checks that the server still answers.

It reports the offered and achieved rates, the admitted (OK) requests' p50/p99, the refused share by
status code (see `REFUSALS`), other errors, and each process's RSS before and after:
``python -m bench overload [--quick] [--json FILE] [--factor 5] [--seconds 60]``.

The load comes from one uvloop loop in this process over several gRPC channels (one HTTP/2
connection can only carry so many concurrent streams). The client shares the machine's CPUs with the
server; when it cannot keep the schedule, the report says so (``client lag``), and the figures then
describe the rate it did reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.load_server import Endpoints, launched_server, process_title, process_tree
from bench.output import write_json

MODEL = "mlp"
SHAPE = (1, 256)
CLOSED_USERS = 64
CLOSED_S = 5.0
QUICK_CLOSED_S = 3.0
WARMUP_S = 1.0
OVERLOAD_S = 60.0
QUICK_OVERLOAD_S = 10.0
FACTOR = 5.0
CHANNELS = 8
#: A request not answered within this is counted as hung (the server must answer or refuse).
HANG_S = 30.0
#: Requests the client keeps outstanding at most; beyond it, due requests are skipped and counted
#: (a safety net for the client's own memory: the server's admission bound should refuse well before).
MAX_OUTSTANDING = 20_000
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"
#: Answers that are refusals, not failures: the engine's admission bounds (RESOURCE_EXHAUSTED), a model
#: or server that cannot take work now (UNAVAILABLE), and CANCELLED, which gRPC core itself sends when
#: its queue of calls not yet taken by the front-end's Python code grows past its backlog limits
#: (``grpc.server.max_pending_requests``): the front-end process, not the worker, is then the bottleneck.
REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"})


# ---- memory of the server's processes -------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_table(root: int) -> dict[int, tuple[str, int | None]]:
    """pid -> (title, RSS kB) for ``root`` and all its descendants."""
    return {pid: (process_title(pid), rss_kb(pid)) for pid in process_tree(root)}


# ---- gRPC client -------------------------------------------------------------------------------------------


class GrpcPool:
    """ModelInfer of one fixed request over ``channels`` grpc.aio channels, round robin."""

    def __init__(self, endpoints: Endpoints, channels: int = CHANNELS) -> None:
        import grpc.aio

        from protos import grpc_service_pb2 as pb
        from protos import grpc_service_pb2_grpc as pb_grpc

        address = f"{endpoints.host}:{endpoints.ports['grpc']}"
        self._channels = [grpc.aio.insecure_channel(address) for _ in range(channels)]
        self._stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self._channels]
        data = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
        self._request = pb.ModelInferRequest(model_name=MODEL)
        self._request.inputs.add(name="INPUT0", datatype="FP32", shape=SHAPE)
        self._request.raw_input_contents.append(data.tobytes())
        self._next = 0

    async def call(self) -> str:
        """One request: ``"OK"`` or the gRPC status code name it failed with."""
        import grpc

        stub = self._stubs[self._next]
        self._next = (self._next + 1) % len(self._stubs)
        try:
            response = await stub.ModelInfer(self._request, timeout=HANG_S)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            return "HUNG" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
        return "OK" if len(response.raw_output_contents) == 1 else "BAD_RESPONSE"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def closed_loop(pool: GrpcPool, users: int, seconds: float) -> tuple[float, Counter[str]]:
    """``users`` back-to-back callers for ``seconds``; (OK answers per second, outcomes)."""
    outcomes: Counter[str] = Counter()
    end = time.perf_counter() + seconds

    async def user() -> None:
        while time.perf_counter() < end:
            outcomes[await pool.call()] += 1

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(users)))
    return outcomes["OK"] / (time.perf_counter() - start), outcomes


async def open_loop(pool: GrpcPool, rate: float, seconds: float) -> dict[str, Any]:
    """Requests due at ``start + i / rate`` for ``seconds``; latency from the due time."""
    latencies: list[int] = []
    service: list[int] = []
    outcomes: Counter[str] = Counter()
    lags: list[int] = []
    outstanding = 0
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter_ns()
    total = int(rate * seconds)

    async def one(due: int) -> None:
        nonlocal outstanding
        sent_at = time.perf_counter_ns()
        try:
            outcome = await pool.call()
        finally:
            outstanding -= 1
        outcomes[outcome] += 1
        if outcome == "OK":
            done = time.perf_counter_ns()
            latencies.append(done - due)
            service.append(done - sent_at)

    sent = 0
    while sent < total:
        now = time.perf_counter_ns()
        due_count = min(total, int((now - start) * rate / 1e9) + 1)
        while sent < due_count:
            due = start + int(sent * 1e9 / rate)
            lags.append(now - due)
            sent += 1
            if outstanding >= MAX_OUTSTANDING:
                skipped += 1
                continue
            outstanding += 1
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.0005)
    send_end = time.perf_counter_ns()
    if tasks:
        await asyncio.wait(set(tasks), timeout=HANG_S + 5.0)
    elapsed_s = (send_end - start) / 1e9
    ms = np.asarray(latencies, dtype=np.float64) / 1e6
    sent_ms = np.asarray(service, dtype=np.float64) / 1e6
    answered = sum(outcomes.values())
    refused = {code: n for code, n in outcomes.items() if code in REFUSALS}
    errors = {code: n for code, n in outcomes.items() if code != "OK" and code not in refused}
    lag_ms = np.asarray(lags, dtype=np.float64) / 1e6
    return {
        "target_rate": round(rate, 1),
        "seconds": round(elapsed_s, 2),
        "offered": sent - skipped,
        "offered_rate": round((sent - skipped) / elapsed_s, 1),
        "skipped_by_client": skipped,
        "answered": answered,
        "ok": outcomes["OK"],
        "ok_rate": round(outcomes["OK"] / elapsed_s, 1),
        "refused": refused,
        "refused_share": round(sum(refused.values()) / answered, 4) if answered else None,
        "errors": errors,
        "hung": outcomes["HUNG"] + len(tasks),
        "p50_ms": _pct(ms, 50),
        "p99_ms": _pct(ms, 99),
        "max_ms": _pct(ms, 100),
        "from_send_p50_ms": _pct(sent_ms, 50),
        "from_send_p99_ms": _pct(sent_ms, 99),
        "client_lag_p99_ms": round(float(np.percentile(lag_ms, 99)), 2) if len(lag_ms) else None,
    }


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def model_queue(endpoints: Endpoints) -> tuple[int, int] | None:
    """The worker's queue counters of `MODEL` (requests, total ns) from the KServe statistics route."""
    import http.client

    import orjson

    conn = http.client.HTTPConnection(endpoints.host, endpoints.ports["rest"], timeout=10)
    try:
        conn.request("GET", f"/v2/models/{MODEL}/stats")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        queue = orjson.loads(body)["model_stats"][0]["inference_stats"]["queue"]
        return int(queue["count"]), int(queue["ns"])
    except (OSError, KeyError, IndexError, ValueError, TypeError):
        return None
    finally:
        conn.close()


# ---- the run -----------------------------------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _measure(endpoints: Endpoints, factor: float, closed_s: float, overload_s: float) -> dict[str, Any]:
    pool = GrpcPool(endpoints)
    try:
        await closed_loop(pool, CLOSED_USERS, WARMUP_S)
        sustainable, closed_outcomes = await closed_loop(pool, CLOSED_USERS, closed_s)
        rss_before = rss_table(endpoints.pid)
        queue_before = model_queue(endpoints)
        overload = await open_loop(pool, sustainable * factor, overload_s)
        queue_after = model_queue(endpoints)
        if queue_before and queue_after and queue_after[0] > queue_before[0]:
            # the admitted requests' mean wait in the worker's queue (the admission bound's depth)
            waited = (queue_after[1] - queue_before[1]) / (queue_after[0] - queue_before[0])
            overload["worker_queue_mean_ms"] = round(waited / 1e6, 2)
        # the last answers are in: what each process holds now
        rss_after = rss_table(endpoints.pid)
        healthy = await pool.call()
    finally:
        await pool.close()
    processes = []
    for pid, (title, before) in rss_before.items():
        after = rss_after.get(pid, (title, None))[1]
        processes.append(
            {
                "pid": pid,
                "process": title,
                "rss_before_mb": round(before / 1024, 1) if before is not None else None,
                "rss_after_mb": round(after / 1024, 1) if after is not None else None,
                "growth_mb": round((after - before) / 1024, 1) if before and after else None,
            }
        )
    return {
        "sustainable_rps": round(sustainable, 1),
        "closed_loop": {"users": CLOSED_USERS, "seconds": closed_s, "outcomes": dict(closed_outcomes)},
        "overload": overload,
        "processes": processes,
        "answers_after": healthy,
    }


def run(
    json_path: str | Path | None = None,
    *,
    quick: bool = False,
    factor: float = FACTOR,
    seconds: float | None = None,
    server_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Launch a server, measure, print the table, write JSON to ``json_path`` (unless None).

    Args:
        json_path: where to write the JSON (folders are created); None writes nothing.
        quick: a 10 s overload instead of 60 s, and a shorter closed loop.
        factor: the overload rate as a multiple of the sustainable rate.
        seconds: overrides the overload duration.
        server_args: extra ``engine.launch`` flags (e.g. ``--set max_inflight_per_model=256``).

    Returns:
        The figures (also what the JSON holds).
    """
    closed_s = QUICK_CLOSED_S if quick else CLOSED_S
    overload_s = seconds if seconds is not None else (QUICK_OVERLOAD_S if quick else OVERLOAD_S)
    loop = _new_loop()
    try:
        with launched_server(server_args) as endpoints:
            figures = loop.run_until_complete(_measure(endpoints, factor, closed_s, overload_s))
    finally:
        loop.close()
    result: dict[str, Any] = {
        "benchmark": "overload",
        "protocol": "grpc",
        "model": MODEL,
        "input": f"FP32{list(SHAPE)}",
        "factor": factor,
        "quick": quick,
        "server_args": list(server_args),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **figures,
    }
    print(format_table(result))
    if json_path is not None:
        print(f"wrote {write_json(result, json_path)}")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as text tables."""
    o = result["overload"]

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    lines = [
        f"overload: gRPC {result['model']} {result['input']}, "
        f"{result['cpus']} CPUs shared by client and server",
        f"  sustainable (closed loop, {result['closed_loop']['users']} users): "
        f"{result['sustainable_rps']:.0f} req/s",
        f"  open loop at {result['factor']:g}x = {o['target_rate']:.0f} req/s for {o['seconds']:.0f} s: "
        f"offered {o['offered']} ({o['offered_rate']:.0f} req/s, client lag p99 {o['client_lag_p99_ms']} ms)",
        f"  admitted OK {o['ok']} ({o['ok_rate']:.0f} req/s): from due time p50 {o['p50_ms']} ms, "
        f"p99 {o['p99_ms']} ms, max {o['max_ms']} ms; from send p50 {o['from_send_p50_ms']} ms, "
        f"p99 {o['from_send_p99_ms']} ms; mean wait in the worker queue {o.get('worker_queue_mean_ms')} ms",
        f"  refused {counts(o['refused'])} (share {o['refused_share']:.1%}); errors {counts(o['errors'])}; "
        f"hung {o['hung']}; skipped by client {o['skipped_by_client']}",
        f"  after the run the server answers: {result['answers_after']}",
        f"  {'process':<32} {'pid':>7} {'RSS before MB':>14} {'after MB':>9} {'growth MB':>10}",
    ]
    for p in result["processes"]:
        lines.append(
            f"  {p['process'][:32]:<32} {p['pid']:>7} {_mb(p['rss_before_mb']):>14} "
            f"{_mb(p['rss_after_mb']):>9} {_mb(p['growth_mb']):>10}"
        )
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench overload``."""
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_OVERLOAD_S:.0f} s of overload")
    parser.add_argument("--factor", type=float, default=FACTOR, help="overload rate / sustainable rate")
    parser.add_argument("--seconds", type=float, help="overload duration (default 60, quick 10)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra engine.launch argument (repeat; e.g. --server-arg=--set --server-arg=KEY=VALUE)",
    )


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench overload``."""
    result = run(
        args.json,
        quick=args.quick or os.environ.get(BENCH_QUICK_ENV) == "1",
        factor=args.factor,
        seconds=args.seconds,
        server_args=tuple(args.server_arg),
    )
    return 0 if result["overload"]["hung"] == 0 and result["answers_after"] == "OK" else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    configure(_parser)
    raise SystemExit(main(_parser.parse_args()))
