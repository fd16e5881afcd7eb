"""`python -m bench compare SCENARIO`: the same load against the engine and what a user would otherwise run.

In one run, on one machine, the scenario's load (`bench.scenarios`) goes to each of these in turn
(all are started first and wait idle while another is measured; ``--repeat K`` measures every row K
times, interleaved, and keeps each row's median run):

- ``engine``: this engine over the scenario's protocol (gRPC for every named scenario): row (a), the
  one every ratio is taken against; ``engine-zmq`` and ``engine-rest``: the same engine over ZMQ and
  REST (binary tensors); ``engine-grpcio``: a second engine serving gRPC on grpc.aio
  (``grpc_transport=grpcio``) instead of the default `servers.grpc_h2`; ``engine-aio-client``: the
  engine again, loaded through grpc.aio's client instead of the lean one (`bench.grpc_h2_client`,
  ``--grpc-client``), as most Python services would call it;
- ``inproc``: the model called in this process with ideal batching: the compute floor (b);
- ``echo``: a bare grpc.aio echo server on uvloop: the protocol floor (c); ``echo-aio-client``: the
  same through grpc.aio's client (the floor for ``engine-aio-client``);
- ``grpc-torch`` and ``fastapi-torch``: the afternoon servers, plain grpc.aio + torch and FastAPI +
  torch, one process each, one forward per request (d).

It prints a table with each row's requests/s and p99 as ratios to (a), and writes JSON:
``{"scenario", "model", "rows": [load results], "ratios": {...}, "time", "machine"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.load import address_of, engine_args, engine_stats, format_result, measure, stamp, write_json
from bench.load_payload import make_payload
from bench.load_profile import server_processes
from bench.load_runner import LoadSpec
from bench.load_server import Endpoints, launched, launched_server
from bench.load_targets import GRPC_CLIENTS
from bench.scenarios import SCENARIOS


@dataclass(frozen=True)
class Row:
    """One server of the comparison.

    Attributes:
        name: its name in the table.
        kind: ``engine``, ``baseline`` (a `bench.baselines` server) or ``inproc``.
        protocol: the protocol the load speaks to it; None: the scenario's.
        module: the baseline's module (``bench.baselines.echo_grpc``...).
        echo: the server answers its inputs (the expected answer is the input).
        what: one line for the table's legend.
        settings: engine config (``KEY=VALUE``) of this row's engine, on top of the run's.
        grpc_client: the gRPC load client for this row (``h2``, ``grpcio``); None: the run's.
    """

    name: str
    kind: str
    protocol: str | None = None
    module: str = ""
    echo: bool = False
    what: str = ""
    settings: tuple[str, ...] = ()
    grpc_client: str | None = None


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("engine", "engine", what="(a) this engine, the scenario's protocol"),
        Row("engine-zmq", "engine", "zmq", what="this engine over ZMQ"),
        Row("engine-rest", "engine", "rest", what="this engine over REST, binary tensors"),
        Row(
            "engine-grpcio",
            "engine",
            "grpc",
            what="this engine with gRPC on grpc.aio (grpc_transport=grpcio)",
            settings=("grpc_transport=grpcio",),
        ),
        Row(
            "engine-aio-client",
            "engine",
            "grpc",
            what="this engine over gRPC, loaded through grpc.aio's client",
            grpc_client="grpcio",
        ),
        Row("inproc", "inproc", what="(b) compute floor: the model in-process, ideal batching"),
        Row(
            "echo",
            "baseline",
            "grpc",
            "bench.baselines.echo_grpc",
            echo=True,
            what="(c) protocol floor: bare grpc.aio echo on uvloop",
        ),
        Row(
            "echo-aio-client",
            "baseline",
            "grpc",
            "bench.baselines.echo_grpc",
            echo=True,
            what="the protocol floor loaded through grpc.aio's client",
            grpc_client="grpcio",
        ),
        Row(
            "grpc-torch",
            "baseline",
            "grpc",
            "bench.baselines.grpc_torch",
            what="(d) afternoon: grpc.aio + torch, one process",
        ),
        Row(
            "fastapi-torch",
            "baseline",
            "rest",
            "bench.baselines.fastapi_torch",
            what="(d) afternoon: FastAPI + torch, one process (REST binary)",
        ),
    )
}


def compare(
    spec: LoadSpec,
    rows: Sequence[str] = tuple(ROWS),
    *,
    procs: int = 1,
    settings: Sequence[str] = (),
    progress: bool = True,
    echo_rows: bool = True,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Run ``spec`` against each of ``rows`` (names of `ROWS`), ``repeat`` times, interleaved.

    Every server is started first; they then take turns (an idle one uses well under 1% of a core),
    row after row, ``repeat`` rounds, so a drift in the machine's background load spreads over every
    row instead of landing on one. Each row reports its median run by requests/s, with the
    requests/s of every run under ``runs_rps``.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    chosen = [ROWS[r] for r in rows]
    payload = make_payload(spec.model)
    echo_payload = make_payload(spec.model, echo=True)
    runs: dict[str, list[dict[str, Any]]] = {row.name: [] for row in chosen}
    with contextlib.ExitStack() as stack:
        measures: dict[str, Callable[[], dict[str, Any]]] = {}
        engines: dict[tuple[str, ...], Endpoints] = {}
        for row in chosen:
            row_spec = dataclasses.replace(
                spec, protocol=row.protocol or spec.protocol, grpc_client=row.grpc_client or spec.grpc_client
            )
            if row.kind == "inproc":
                from bench.baselines.inproc import measure_inproc

                measures[row.name] = functools.partial(measure_inproc, row_spec, payload)
                continue
            if row.kind == "engine":
                if row.settings not in engines:
                    argv = engine_args([*settings, *row.settings])
                    engines[row.settings] = stack.enter_context(launched_server(argv))
                endpoints = engines[row.settings]
                stats = engine_stats(endpoints, spec.model)
            else:
                argv = [sys.executable, "-m", row.module] + ([] if row.echo else ["--model", spec.model])
                endpoints, stats = stack.enter_context(launched(argv)), None
            measures[row.name] = functools.partial(
                measure,
                row_spec,
                address_of(endpoints, row_spec.protocol),
                payload=echo_payload if row.echo else payload,
                procs=procs,
                label=row.name,
                server=server_processes(endpoints.pid),
                progress=progress,
                stats=stats,
                settle=True,
            )
        for _ in range(repeat):
            for row in chosen:
                result = measures[row.name]()
                result["target"] = row.name
                runs[row.name].append(result)
                if echo_rows:
                    print(format_result(result), flush=True)
    return [_median_run(runs[row.name]) for row in chosen]


def _median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median requests/s (the lower middle one of an even count), and every run's."""
    ordered = sorted(results, key=lambda r: r["rps"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["runs_rps"] = [r["rps"] for r in results]
    return median


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests/s and p99 of every row over row ``engine``'s, plus the issue's named ratios."""
    by_name = {r["target"]: r for r in results}
    base = by_name.get("engine")

    def ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None, key: str) -> float | None:
        if not top or not bottom or not top.get(key) or not bottom.get(key):
            return None
        return round(float(top[key]) / float(bottom[key]), 2)

    out: dict[str, Any] = {
        "rps_vs_engine": {name: ratio(r, base, "rps") for name, r in by_name.items()},
        "p99_vs_engine": {name: ratio(r, base, "p99_ms") for name, r in by_name.items()},
        "engine_over_echo_rps": ratio(base, by_name.get("echo"), "rps"),
        "engine_over_echo_rps_aio_client": ratio(
            by_name.get("engine-aio-client"), by_name.get("echo-aio-client"), "rps"
        ),
        "engine_zmq_over_grpc_rps": ratio(by_name.get("engine-zmq"), base, "rps"),
        "engine_rest_over_fastapi_rps": ratio(
            by_name.get("engine-rest"), by_name.get("fastapi-torch"), "rps"
        ),
        "engine_over_grpc_torch_rps": ratio(base, by_name.get("grpc-torch"), "rps"),
    }
    return out


def _protocol(result: dict[str, Any]) -> str:
    client = result.get("client")
    if result["protocol"] in ("grpc", "zmq") and client:
        return f"{result['protocol']} ({'grpc.aio' if client == 'grpcio' else client} client)"
    return str(result["protocol"])


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    """The comparison as a text (or Markdown) table, ratios to row (a)."""
    head = ["server", "protocol", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors", "req/s ÷ (a)",
            "p99 ÷ (a)"]  # fmt: skip
    ratios_ = report["ratios"]
    body = []
    for r in report["rows"]:
        body.append(
            [
                r["target"],
                _protocol(r),
                _cell(r["rps"], ".0f"),
                _cell(r["p50_ms"], ".2f"),
                _cell(r["p95_ms"], ".2f"),
                _cell(r["p99_ms"], ".2f"),
                _cell(r["max_ms"], ".1f"),
                str(r["errors"]),
                _cell(ratios_["rps_vs_engine"].get(r["target"]), ".2f"),
                _cell(ratios_["p99_vs_engine"].get(r["target"]), ".2f"),
            ]
        )
    spec = report["load"]
    if spec["burst"]:
        shape = f"bursts of {spec['burst']} x {spec['rounds']}"
    else:
        shape = f"concurrency {spec['concurrency']}, {spec['duration_s']:g} s"
    procs = report["procs"]
    title = f"compare {report['scenario']}: model {report['model']}, {shape}, {procs} client process(es)"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [title, "  " + "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    for row in report["rows"]:
        lines.append(f"  {row['target']}: {ROWS[row['target']].what}" if row["target"] in ROWS else "")
    return "\n".join(lines)


def run_compare(
    scenario: str,
    *,
    model: str = "mlp",
    rows: Sequence[str] = tuple(ROWS),
    duration_s: float | None = None,
    procs: int = 1,
    settings: Sequence[str] = (),
    progress: bool = True,
    repeat: int = 1,
    grpc_client: str = "h2",
) -> dict[str, Any]:
    """`compare` for a named scenario; the report (what the JSON holds)."""
    shape = SCENARIOS[scenario]
    spec = LoadSpec(
        protocol=shape.protocol,
        model=model,
        concurrency=shape.concurrency,
        duration_s=duration_s or shape.duration_s,
        burst=shape.burst,
        rounds=shape.rounds,
        grpc_client=grpc_client,
    )
    results = compare(spec, rows, procs=procs, settings=settings, progress=progress, repeat=repeat)
    return stamp(
        {
            "benchmark": "compare",
            "scenario": scenario,
            "model": model,
            "procs": procs,
            "repeat": repeat,
            "settings": list(settings),
            "load": spec.to_json(),
            "rows": results,
            "ratios": ratios(results),
        }
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench compare``."""
    parser.add_argument("scenario", choices=sorted(SCENARIOS), help="the load shape (bench.scenarios)")
    parser.add_argument("--model", default="mlp", help="a built-in model; default mlp")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated servers; default {','.join(ROWS)}"
    )
    parser.add_argument("--duration", type=float, metavar="S", help="override the scenario's seconds")
    parser.add_argument("--procs", type=int, default=1, metavar="P", help="client processes; default 1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine config")
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="K interleaved runs per row, median kept"
    )
    parser.add_argument(
        "--grpc-client",
        choices=GRPC_CLIENTS,
        default="h2",
        help="gRPC load client of the rows that do not name theirs: h2 (lean) or grpcio (grpc.aio)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench compare``."""
    report = run_compare(
        args.scenario,
        model=args.model,
        rows=[r.strip() for r in args.rows.split(",") if r.strip()],
        duration_s=args.duration,
        procs=args.procs,
        settings=args.set,
        progress=not args.quiet,
        repeat=args.repeat,
        grpc_client=args.grpc_client,
    )
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0 if all(r["requests"] for r in report["rows"]) else 1
