"""`python -m bench load`: a load generator for the engine's gRPC, ZMQ and REST endpoints.

Closed loop (``--concurrency N`` in flight), open loop (``--rate R`` per second, latency from each
request's due time: no coordinated omission) or bursts (``--burst N`` released at once, ``--rounds K``
times), against a server it launches itself (default: ``python -m engine.launch`` on ephemeral ports)
or an existing one (``--url HOST:PORT``). Requests are serialised once; answers are spot-checked
against the model's expected output; errors are counted by code; percentiles come from an HDR
histogram. ``--procs P`` spreads the load over P client processes (histograms merged). ``--json F``
writes one object (`measure` documents its keys); ``--plot F.png`` draws its latency CDF;
``--profile DIR`` records py-spy profiles of every client and server process for the window.

Named scenarios (``--scenario latency|throughput|seed|burst``, see `bench.scenarios`) fill in the
load's shape; explicit options override them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.load_payload import Payload, make_payload
from bench.load_procs import make_driver
from bench.load_profile import CpuMeter, Profiler, batch_delta, engine_model_stats, server_processes
from bench.load_runner import LoadSpec, PhaseResult
from bench.load_server import Endpoints, launched_server
from bench.load_stats import Recorder, summary
from bench.load_targets import ENDPOINT_OF, GRPC_CLIENTS, PROTOCOLS, ZMQ_CLIENTS
from bench.output import write_json  # re-exported: callers use bench.load.write_json
from engine.gc_tuning import settle_heap

#: Pause between burst rounds, so that one round's tail never overlaps the next.
ROUND_GAP_S = 0.5


# ---- measuring -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(spec: LoadSpec, label: str, count: Any, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr: seconds of the window (and requests so far), or burst rounds."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    if spec.burst is not None:
        # disable=None: no bar when stderr is not a terminal
        with tqdm(total=spec.rounds, desc=label, unit="round", leave=False, disable=None) as bar:
            yield lambda: bar.update(1)
        return
    stop = threading.Event()
    total = round(spec.duration_s, 1)
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s {postfix}"
    with tqdm(total=total, desc=label, leave=False, disable=None, bar_format=bar_format) as bar:
        started = time.monotonic()

        def tick() -> None:  # a thread: the load loop never pays for the bar
            while not stop.wait(0.25):
                bar.n = min(total, round(time.monotonic() - started, 1))
                done = count()
                if done is not None:
                    bar.set_postfix_str(f"{done} requests", refresh=False)
                bar.refresh()

        thread = threading.Thread(target=tick, name="bench-progress", daemon=True)
        thread.start()
        try:
            yield lambda: None
        finally:
            stop.set()
            thread.join(2)


def measure(
    spec: LoadSpec,
    address: str,
    *,
    payload: Payload | None = None,
    procs: int = 1,
    label: str = "",
    server: dict[int, str] | None = None,
    profile_dir: str | Path | None = None,
    progress: bool = True,
    stats: Callable[[], dict[str, Any] | None] | None = None,
    settle: bool = False,
) -> dict[str, Any]:
    """Run ``spec`` against the endpoint at ``address`` and return its figures.

    Args:
        spec: the load.
        address: ``host:port`` of the endpoint speaking ``spec.protocol``.
        payload: the request and expected answer (default: `make_payload` of ``spec.model``).
        procs: client processes.
        label: names the server in the output (``engine``, ``echo``...).
        server: the server's processes (pid -> label) to account CPU for (and to profile).
        profile_dir: record py-spy profiles of the client and server processes there.
        progress: show a progress bar on stderr.
        stats: reads the engine's model statistics (`bench.load_profile.engine_model_stats`), to
            report the batches the worker formed during the window.
        settle: once connected, freeze this process's heap and raise its young GC threshold
            (`engine.gc_tuning.settle_heap`), as the command line does: a full collection walking
            the ~200,000 objects torch and the clients leave would stop the load for ~0.1 s and
            show as the server's latency. Off where the caller's process is not the client's own.

    Returns:
        ``protocol``, ``model``, ``mode``, ``concurrency``, ``rate``, ``burst``, ``procs``,
        ``target``, ``address``, then `bench.load_stats.summary`'s keys (``duration_s``,
        ``requests``, ``rps``, ``p50_ms``, ``p95_ms``, ``p99_ms``, ``max_ms``, ``errors``,
        ``errors_by_code``, ``checked``, ``cdf``, ``hdr``...), ``rounds`` (burst mode: one summary
        per round, each with its own ``cpu``), ``cpu`` (CPU seconds per process over the window),
        ``batches`` (with ``stats``)
        and ``profile`` when asked.
    """
    payload = payload if payload is not None else make_payload(spec.model)
    driver = make_driver(spec, address, payload, procs)
    processes: dict[int, str] = {}
    phases: list[PhaseResult] = []
    profiler: Profiler | None = None
    cpu: dict[str, Any] | None = None
    round_cpu: list[dict[str, Any]] = []
    batches: dict[str, Any] | None = None
    try:
        driver.start()
        if settle:
            settle_heap()
        processes = {**driver.pids(), **(server or {})}
        meter = CpuMeter(processes)
        if profile_dir is not None:
            window = spec.duration_s if spec.burst is None else spec.rounds * (1 + ROUND_GAP_S)
            profiler = Profiler(processes, profile_dir, window)
            profiler.start()
        name = f"{label or 'server'} {spec.protocol} {spec.model}"
        stats_before = stats() if stats is not None else None
        meter.start()
        started = time.monotonic()
        with _progress(spec, name, driver.count, progress) as advance:
            for index in range(spec.phases):
                if index:
                    time.sleep(ROUND_GAP_S)
                before, began = meter.reading(), time.monotonic()
                phase = driver.phase()
                if spec.burst is not None:
                    # each round's own CPU: in a burst, p95 is the round's total time, which the
                    # CPU all the processes need for it sets on a shared machine
                    window = time.monotonic() - began
                    round_cpu.append(meter.between(before, meter.reading(), window, phase.recorder.count))
                phases.append(phase)
                advance()
        total = Recorder()
        for phase in phases:
            total.merge(phase.recorder)
        cpu = meter.stop(time.monotonic() - started, total.count)
        batches = batch_delta(stats_before, stats()) if stats is not None else None
    finally:
        driver.stop()
    elapsed = sum(p.elapsed_s for p in phases) if spec.burst is not None else phases[0].elapsed_s
    result: dict[str, Any] = {
        "protocol": spec.protocol,
        "client": {"grpc": spec.grpc_client, "zmq": spec.zmq_client}.get(spec.protocol, spec.protocol),
        "model": spec.model,
        "mode": spec.mode,
        "concurrency": spec.slots,
        "rate": spec.rate,
        "burst": spec.burst,
        "procs": procs,
        "target": label,
        "address": address,
        **summary(total, elapsed),
    }
    if spec.burst is not None:
        result["rounds"] = [summary(p.recorder, p.elapsed_s, with_cdf=False) for p in phases]
        for one, used in zip(result["rounds"], round_cpu, strict=True):
            one["cpu"] = used
    result["cpu"] = cpu
    if batches is not None:
        result["batches"] = batches
    if profiler is not None:
        result["profile"] = profiler.finish()
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_average_1m": round(load[0], 2),
    }


def stamp(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the time and the machine added."""
    return {**result, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine()}


def address_of(endpoints: Endpoints, protocol: str) -> str:
    """``host:port`` of ``protocol``'s endpoint on a launched server."""
    return f"{endpoints.host}:{endpoints.ports[ENDPOINT_OF[protocol]]}"


def engine_stats(endpoints: Endpoints, model: str) -> Callable[[], dict[str, Any] | None] | None:
    """Reads ``model``'s statistics from a launched engine's REST endpoint (None without one)."""
    port = endpoints.ports.get("rest")
    if not port:
        return None
    return lambda: engine_model_stats(endpoints.host, port, model)


def engine_args(settings: Sequence[str]) -> list[str]:
    """``--set KEY=VALUE`` flags for the engine from ``KEY=VALUE`` strings."""
    args: list[str] = []
    for setting in settings:
        args += ["--set", setting]
    return args


# ---- output ------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _client_note(result: dict[str, Any]) -> str:
    client = result.get("client")
    return f" ({client} client)" if result["protocol"] in ("grpc", "zmq") and client else ""


def format_result(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    if result["mode"] == "burst":
        shape = f"burst={result['burst']}"
    elif result["mode"] == "open":
        shape = f"rate={result['rate']:g}/s c<={result['concurrency']}"
    else:
        shape = f"c={result['concurrency']}"
    errors = ", ".join(f"{k} {v}" for k, v in result["errors_by_code"].items()) or "0"
    lines = [
        f"{result['target'] or 'server'} {result['protocol']}{_client_note(result)} {result['model']} "
        f"{shape} procs={result['procs']}: "
        f"{result['requests']} ok in {result['duration_s']:.2f} s = {result['rps']:.0f} req/s; "
        f"ms p50 {_ms(result['p50_ms'])} p95 {_ms(result['p95_ms'])} p99 {_ms(result['p99_ms'])} "
        f"max {_ms(result['max_ms'])}; errors {errors}; checked {result['checked']}"
    ]
    if result.get("max_schedule_lag_ms"):
        lines.append(f"  open loop fell behind schedule by up to {result['max_schedule_lag_ms']:.1f} ms")
    for i, r in enumerate(result.get("rounds") or ()):
        lines.append(
            f"  round {i + 1}: {r['requests']} ok in {r['duration_s'] * 1e3:.1f} ms; p50 {_ms(r['p50_ms'])} "
            f"p95 {_ms(r['p95_ms'])} p99 {_ms(r['p99_ms'])} max {_ms(r['max_ms'])}; errors {r['errors']}"
        )
    batches = result.get("batches")
    if batches and batches.get("batches"):
        sizes = " ".join(f"<={k}:{v}" for k, v in batches["sizes"].items())
        lines.append(
            f"  worker: {batches['batches']} batches, mean {batches['mean_batch']} rows "
            f"({sizes}); {batches['compute_ms_per_batch']} ms compute per batch"
        )
    cpu = result.get("cpu")
    if cpu:
        parts = [
            f"{name} {p['cores']:.2f} cores ({p['us_per_request'] or 0:.0f} us/req)"
            for name, p in cpu["processes"].items()
            if p["cores"] is not None and p["cores"] >= 0.005
        ]
        lines.append("  cpu: " + "; ".join(parts))
    for name, prof in (result.get("profile") or {}).items():
        top = ", ".join(f"{fn} {pct}%" for fn, pct in prof.get("self", [])[:5])
        lines.append(f"  profile {name} ({prof['samples']} samples): {top}")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------------

#: Defaults of the options a scenario may fill in.
DEFAULTS: dict[str, Any] = {
    "protocol": "grpc",
    "model": "mlp",
    "concurrency": 1,
    "duration": 10.0,
    "rate": None,
    "burst": None,
    "rounds": 5,
    "procs": 1,
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench load``."""
    from bench.scenarios import SCENARIOS

    add = parser.add_argument
    add("--scenario", choices=sorted(SCENARIOS), help="a named load shape (explicit options override it)")
    add("--protocol", choices=PROTOCOLS, help="grpc (KServe v2), zmq, rest (binary tensors); default grpc")
    add("--model", help="model to call (a built-in model); default mlp")
    add("--concurrency", type=int, metavar="N", help="requests in flight (open loop: at most); default 1")
    add("--duration", type=float, metavar="S", help="measured seconds; default 10")
    add("--rate", type=float, metavar="R", help="open loop: R requests per second, latency from due time")
    add("--burst", type=int, metavar="N", help="burst mode: N requests released at once, per round")
    add("--rounds", type=int, metavar="K", help="burst rounds; default 5")
    add("--procs", type=int, metavar="P", help="client processes sharing the load; default 1")
    add("--warmup", type=float, default=1.0, metavar="S", help="unmeasured seconds first; default 1")
    add("--timeout", type=float, default=30.0, metavar="S", help="per-request timeout; default 30")
    add(
        "--grpc-client",
        choices=GRPC_CLIENTS,
        default="h2",
        help="gRPC load client: h2 (HTTP/2 by hand, little client CPU) or grpcio (grpc.aio); default h2",
    )
    add(
        "--zmq-client",
        choices=ZMQ_CLIENTS,
        default="zmtp",
        help="ZMQ load client: zmtp (a DEALER spoken by hand, little client CPU) or pyzmq (libzmq); "
        "default zmtp",
    )
    add("--check-every", type=int, default=100, metavar="K", help="check one answer in K; default 100")
    add("--url", metavar="HOST:PORT", help="an existing server's endpoint (default: launch the engine)")
    add(
        "--server-pid",
        type=int,
        default=0,
        metavar="PID",
        help="with --url: account CPU of this process tree",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine config for the launched server",
    )
    add("--json", metavar="FILE", help="write the result as one JSON object")
    add("--plot", metavar="FILE.png", help="draw the latency CDF")
    add("--profile", metavar="DIR", help="py-spy profiles of every client and server process, in DIR")
    add("--quiet", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace) -> tuple[LoadSpec, int]:
    """The load the options describe (scenario first, explicit options over it), and its procs."""
    from bench.scenarios import SCENARIOS

    values = dict(DEFAULTS)
    if args.scenario:
        values.update(SCENARIOS[args.scenario].options())
    for key in DEFAULTS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    spec = LoadSpec(
        protocol=values["protocol"],
        model=values["model"],
        concurrency=values["concurrency"],
        duration_s=values["duration"],
        rate=values["rate"],
        burst=values["burst"],
        rounds=values["rounds"],
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        check_every=args.check_every,
        grpc_client=args.grpc_client,
        zmq_client=args.zmq_client,
    )
    return spec, int(values["procs"])


def run_load(
    spec: LoadSpec,
    *,
    procs: int = 1,
    url: str | None = None,
    server_pid: int = 0,
    settings: Sequence[str] = (),
    profile_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`measure` against ``url``, or against an engine launched for the run; the result stamped."""
    if url:
        address = url.removeprefix("tcp://").removeprefix("http://")
        server = server_processes(server_pid)
        return stamp(
            measure(
                spec,
                address,
                procs=procs,
                label="server",
                server=server,
                profile_dir=profile_dir,
                progress=progress,
                settle=True,
            )
        )
    payload = make_payload(spec.model)  # before the server starts: the mlp reference loads torch
    with launched_server(engine_args(settings)) as endpoints:
        result = measure(
            spec,
            address_of(endpoints, spec.protocol),
            payload=payload,
            procs=procs,
            label="engine",
            server=server_processes(endpoints.pid),
            profile_dir=profile_dir,
            progress=progress,
            stats=engine_stats(endpoints, spec.model),
            settle=True,
        )
    return stamp(result)


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench load``."""
    spec, procs = spec_from_args(args)
    result = run_load(
        spec,
        procs=procs,
        url=args.url,
        server_pid=args.server_pid,
        settings=args.set,
        profile_dir=args.profile,
        progress=not args.quiet,
    )
    print(format_result(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    if args.plot:
        from bench.report import plot_cdf

        print(f"wrote {plot_cdf([result], args.plot)}")
    return 0 if result["requests"] else 1
