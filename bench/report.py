"""`python -m bench report`: measure (``--run``), then draw the plots and rewrite BENCHMARKS.md.

Reads a results folder (default ``bench/results``) holding what `run_all` writes: ``sweep.json``
(the engine over each protocol at several concurrencies), ``compare-<scenario>.json`` (`bench.compare`
for each named scenario), ``idle.json`` (CPU of an idle engine) and ``profile-grpc-c64.json`` (py-spy
summaries at gRPC concurrency 64). It draws (`bench.report_plots`)

- ``latency-cdf.png``: the latency of every request at concurrency 64, per protocol and server, as a
  percentile spectrum (x: percentile, log-spaced so the tail is visible; y: latency, log);
- ``sweep.png``: requests/s and p99 latency against concurrency, one line per protocol;

and rewrites the generated blocks of BENCHMARKS.md (``<!-- generated:NAME -->`` ... ``<!-- /generated -->``)
with the machine, the tables, the targets and the profile (`bench.report_markdown`); the text around
them is kept. ``--run`` measures everything first (`run_all`, about 12 minutes): ``make benchmarks``.
This module holds the command, the measurements and the order of the steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load_stats import CDF_PERCENTILES
from bench.report_markdown import SCENARIO_ORDER, fill_markdown, generated_blocks, read_result
from bench.report_plots import plot_cdf, plot_sweep

RESULTS_DIR = Path("bench/results")
MARKDOWN = Path("BENCHMARKS.md")
SWEEP_PROTOCOLS = ("grpc", "zmq", "rest")
SWEEP_CONCURRENCIES = (1, 8, 64, 256, 500)
SWEEP_DURATION_S = 5.0
#: Comparison runs: each row measured this many times, interleaved with the others; median kept.
COMPARE_REPEAT = 3
COMPARE_DURATION_S = 5.0
IDLE_SECONDS = 10.0
PROFILE_SECONDS = 10.0


# ---- measuring everything ----------------------------------------------------------------------------


def run_sweep(duration_s: float, progress: bool, settings: Sequence[str] = ()) -> dict[str, Any]:
    """The engine over each protocol at each of `SWEEP_CONCURRENCIES` (one launched engine)."""
    from bench.load import address_of, engine_args, engine_stats, format_result, measure, stamp
    from bench.load_payload import make_payload
    from bench.load_profile import server_processes
    from bench.load_runner import LoadSpec
    from bench.load_server import launched_server

    payload = make_payload("mlp")
    results = []
    with launched_server(engine_args(settings)) as endpoints:
        server = server_processes(endpoints.pid)
        for protocol in SWEEP_PROTOCOLS:
            for concurrency in SWEEP_CONCURRENCIES:
                spec = LoadSpec(protocol=protocol, concurrency=concurrency, duration_s=duration_s)
                result = measure(
                    spec,
                    address_of(endpoints, protocol),
                    payload=payload,
                    label="engine",
                    server=server,
                    progress=progress,
                    stats=engine_stats(endpoints, "mlp"),
                    settle=True,
                )
                print(format_result(result), flush=True)
                results.append(result)
    return stamp(
        {
            "benchmark": "sweep",
            "model": "mlp",
            "duration_s": duration_s,
            "settings": list(settings),
            "rows": results,
        }
    )


def measure_idle(seconds: float, settings: Sequence[str] = ()) -> dict[str, Any]:
    """CPU used by every process of a launched, idle engine over ``seconds`` (after 2 s to settle)."""
    from bench.load import engine_args, stamp
    from bench.load_profile import CpuMeter, server_processes
    from bench.load_server import launched_server

    with launched_server(engine_args(settings)) as endpoints:
        time.sleep(2.0)
        meter = CpuMeter(server_processes(endpoints.pid))
        meter.start()
        time.sleep(seconds)
        cpu = meter.stop(seconds, 0)
    total = sum(p["cpu_s"] for p in cpu["processes"].values())
    return stamp(
        {
            "benchmark": "idle",
            "seconds": seconds,
            "cpu": cpu,
            "percent_of_one_core": round(100.0 * total / seconds, 2),
        }
    )


def run_profile(seconds: float, progress: bool, settings: Sequence[str] = ()) -> dict[str, Any]:
    """gRPC at concurrency 64 for ``seconds`` with py-spy on the client and every server process; the
    raw profiles go to a temporary folder (named in the result), their summaries into the result."""
    import tempfile

    from bench.load import run_load
    from bench.load_runner import LoadSpec

    spec = LoadSpec(protocol="grpc", concurrency=64, duration_s=seconds)
    profiles = tempfile.mkdtemp(prefix="bench-profiles-")
    result = run_load(spec, profile_dir=profiles, progress=progress, settings=settings)
    result.pop("hdr", None)
    return result


def run_all(
    results_dir: Path, *, quick: bool = False, progress: bool = True, settings: Sequence[str] = ()
) -> None:
    """Measure everything `report` shows, writing the JSON files into ``results_dir``.

    Args:
        results_dir: where the JSON files go.
        quick: short measurements (a smoke run).
        progress: progress bars on stderr.
        settings: ``KEY=VALUE`` engine config for every engine launched.
    """
    from bench.compare import format_table, run_compare
    from bench.load import write_json

    duration = 1.0 if quick else COMPARE_DURATION_S
    write_json(run_sweep(1.0 if quick else SWEEP_DURATION_S, progress, settings), results_dir / "sweep.json")
    for scenario in SCENARIO_ORDER:
        report = run_compare(
            scenario,
            duration_s=duration,
            progress=progress,
            settings=settings,
            repeat=1 if quick else COMPARE_REPEAT,
        )
        print(format_table(report), flush=True)
        write_json(report, results_dir / f"compare-{scenario}.json")
    write_json(measure_idle(3.0 if quick else IDLE_SECONDS, settings), results_dir / "idle.json")
    profile = run_profile(3.0 if quick else PROFILE_SECONDS, progress, settings)
    write_json(profile, results_dir / "profile-grpc-c64.json")
    from bench import h2load

    if h2load.available():
        streams, requests, burst = ([8], 300, 20) if quick else ([64, 500], 40_000, 500)
        h2load_report = h2load.run_report(["engine", "echo"], streams, requests, burst, rounds=5)
        write_json(h2load_report, results_dir / "h2load.json")
        print(h2load.format_table(h2load_report["results"]), flush=True)
    else:
        print("h2load not on PATH: its table is not remeasured", flush=True)


# ---- plots and Markdown ------------------------------------------------------------------------------


def make_plots(results_dir: Path) -> list[Path]:
    """Draw every plot the results allow; returns the files."""
    made = []
    sweep = read_result(results_dir / "sweep.json")
    throughput = read_result(results_dir / "compare-throughput.json")
    cdf_rows = [r for r in (sweep or {}).get("rows", []) if r["concurrency"] == 64]
    cdf_rows += [r for r in (throughput or {}).get("rows", []) if not str(r["target"]).startswith("engine")]
    if cdf_rows:
        made.append(
            plot_cdf(
                cdf_rows,
                results_dir / "latency-cdf.png",
                "Latency by percentile at 64 requests in flight, mlp (lower is better)",
            )
        )
    if sweep:
        made.append(plot_sweep(sweep["rows"], results_dir / "sweep.png"))
    return made


def report(results_dir: Path = RESULTS_DIR, markdown: Path | None = MARKDOWN) -> list[Path]:
    """Plots, then the generated blocks of ``markdown`` (when it exists); returns the files written."""
    written = make_plots(results_dir)
    if markdown is not None and markdown.exists():
        try:
            prefix = results_dir.resolve().relative_to(markdown.resolve().parent).as_posix() + "/"
        except ValueError:
            prefix = results_dir.resolve().as_posix() + "/"
        text = markdown.read_text(encoding="utf-8")
        markdown.write_text(fill_markdown(text, generated_blocks(results_dir, prefix)), encoding="utf-8")
        written.append(markdown)
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench report``."""
    parser.add_argument("--results", default=str(RESULTS_DIR), metavar="DIR", help="the JSON results folder")
    parser.add_argument(
        "--markdown",
        default=str(MARKDOWN),
        metavar="FILE",
        help="Markdown file whose generated blocks to rewrite ('' for none)",
    )
    parser.add_argument("--run", action="store_true", help="measure everything first (about 12 minutes)")
    parser.add_argument("--quick", action="store_true", help="with --run: short measurements (a smoke run)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with --run: engine config"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench report``."""
    results_dir = Path(args.results)
    if args.run:
        run_all(results_dir, quick=args.quick, progress=not args.quiet, settings=args.set)
    written = report(results_dir, Path(args.markdown) if args.markdown else None)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no results in {results_dir}: run `python -m bench report --run` first", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "CDF_PERCENTILES",
    "SCENARIO_ORDER",
    "fill_markdown",
    "make_plots",
    "plot_cdf",
    "plot_sweep",
    "report",
    "run_all",
]
