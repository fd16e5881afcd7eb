"""`python -m bench report`: PNG plots and the BENCHMARKS.md tables from the JSON results.

Reads a results folder (default ``bench/results``) holding what `run_all` writes: ``sweep.json``
(the engine over each protocol at several concurrencies), ``compare-<scenario>.json`` (`bench.compare`
for each named scenario), ``idle.json`` (CPU of an idle engine) and ``profile-grpc-c64.json`` (py-spy
summaries at gRPC concurrency 64). It draws

- ``latency-cdf.png``: the latency of every request at concurrency 64, per protocol and server, as a
  percentile spectrum (x: percentile, log-spaced so the tail is visible; y: latency, log);
- ``sweep.png``: requests/s and p99 latency against concurrency, one line per protocol;

and rewrites the generated blocks of BENCHMARKS.md (``<!-- generated:NAME -->`` ... ``<!-- /generated -->``)
with the machine, the tables, the targets and the profile; the text around them is kept.
``--run`` measures everything first (`run_all`, about 12 minutes): ``make benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load_stats import CDF_PERCENTILES

RESULTS_DIR = Path("bench/results")
MARKDOWN = Path("BENCHMARKS.md")
SWEEP_PROTOCOLS = ("grpc", "zmq", "rest")
SWEEP_CONCURRENCIES = (1, 8, 64, 256, 500)
SWEEP_DURATION_S = 5.0
SCENARIO_ORDER = ("latency", "throughput", "seed", "burst")
#: Comparison runs: each row measured this many times, interleaved with the others; median kept.
COMPARE_REPEAT = 3
COMPARE_DURATION_S = 5.0
IDLE_SECONDS = 10.0
PROFILE_SECONDS = 10.0


# ---- plots -------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _log_axis_labels(axis: Any) -> None:
    """A log scale labelled 1, 2, 5, 10, 20, 50... in plain numbers (no 10^n)."""
    from matplotlib import ticker

    axis.axes.set_yscale("log") if axis is axis.axes.yaxis else axis.axes.set_xscale("log")
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _label(result: dict[str, Any]) -> str:
    target = result.get("target") or "server"
    shape = f"burst {result['burst']}" if result.get("burst") else f"c={result['concurrency']}"
    return f"{target} {result['protocol']} {shape}"


def plot_cdf(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Latency percentile spectrum of each result (its ``cdf`` points) in one PNG; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for result in results:
        points = [(p, ms) for p, ms in result.get("cdf") or () if p < 100.0]
        if not points:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]  # 50% -> 2, 99% -> 100, 99.9% -> 1000
        style = (
            "--"
            if result.get("target") not in (None, "", "engine", "server")
            and not str(result.get("target", "")).startswith("engine")
            else "-"
        )
        ax.plot(xs, [ms for _, ms in points], style, label=_label(result), linewidth=1.6)
    ticks = [0, 50, 90, 99, 99.9, 99.99]
    ax.set_xscale("log")
    ax.set_xticks([1.0 / (1.0 - t / 100.0) for t in ticks])
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlim(1, 1.0 / (1.0 - 99.99 / 100.0))
    _log_axis_labels(ax.yaxis)
    ax.set_xlabel("percentile of requests")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title or "Latency by percentile (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_sweep(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Requests/s and p99 against concurrency, one line per protocol, side by side; returns the path."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault(f"{r.get('target') or 'engine'} {r['protocol']}", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rows]
        left.plot(cs, [r["rps"] for r in rows], "o-", label=name)
        right.plot(cs, [r["p99_ms"] or math.nan for r in rows], "o-", label=name)
    concurrencies = sorted({r["concurrency"] for r in results})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(concurrencies)
        ax.set_xticklabels([str(c) for c in concurrencies])
        ax.minorticks_off() if ax is left else None
        ax.set_xlabel("requests in flight (concurrency, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("requests per second (higher is better)")
    left.set_ylim(bottom=0)
    left.set_title("Throughput")
    _log_axis_labels(right.yaxis)
    right.set_ylabel("p99 latency (ms, log scale; lower is better)")
    right.set_title("p99 latency")
    fig.suptitle(title or "Engine over each protocol, mlp model, one request = one row")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


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


# ---- Markdown ----------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def _f(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def sweep_table(sweep: dict[str, Any]) -> str:
    """The sweep as a Markdown table."""
    lines = [
        "| protocol | concurrency | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['concurrency']} | {_f(r['rps'], '.0f')} | {_f(r['p50_ms'])} | "
            f"{_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {_f(r['max_ms'], '.1f')} | {r['errors']} |"
        )
    return "\n".join(lines)


def targets_table(results_dir: Path) -> str:
    """The issue's targets against the latest results, as a Markdown table."""

    def row_of(scenario: str, target: str) -> dict[str, Any] | None:
        report = _load(results_dir / f"compare-{scenario}.json")
        if report is None:
            return None
        return next((r for r in report["rows"] if r["target"] == target), None)

    rows: list[tuple[str, str, str, bool | None]] = []

    def add(name: str, goal: str, measured: str, met: bool | None) -> None:
        rows.append((name, goal, measured, met))

    for scenario, c, latency_key, latency_goal in (
        ("throughput", 64, "p99_ms", 35.0),
        ("seed", 500, "p95_ms", 100.0),
    ):
        engine, echo = row_of(scenario, "engine"), row_of(scenario, "echo")
        if engine:
            ratio = engine["rps"] / echo["rps"] if echo and echo["rps"] else None
            add(
                f"gRPC c={c} req/s",
                ">= 5,000 and >= 0.7x echo, 0 errors",
                f"{engine['rps']:.0f} ({_f(ratio)}x echo {_f(echo and echo['rps'], '.0f')}), "
                f"errors {engine['errors']}",
                engine["rps"] >= 5000 and (ratio or 0) >= 0.7 and engine["errors"] == 0,
            )
            value = engine[latency_key]
            add(
                f"gRPC c={c} {latency_key[:3]}",
                f"< {latency_goal:g} ms",
                f"{_f(value)} ms",
                value is not None and value < latency_goal,
            )
    burst = row_of("burst", "engine")
    if burst:
        add(
            "gRPC 500-call burst p95",
            "< 50 ms",
            f"{_f(burst['p95_ms'])} ms",
            burst["p95_ms"] is not None and burst["p95_ms"] < 50,
        )
    engine, echo, inproc = row_of("latency", "engine"), row_of("latency", "echo"), row_of("latency", "inproc")
    if engine and echo and inproc:
        floor = echo["p50_ms"] + inproc["p50_ms"]
        add(
            "gRPC c=1 p50",
            "<= echo p50 + model time + 0.3 ms",
            f"{_f(engine['p50_ms'])} ms vs {_f(echo['p50_ms'])} + {_f(inproc['p50_ms'])} + 0.3 "
            f"= {floor + 0.3:.2f} ms",
            engine["p50_ms"] <= floor + 0.3,
        )
    zmq, grpc = row_of("throughput", "engine-zmq"), row_of("throughput", "engine")
    if zmq and grpc:
        add(
            "ZMQ vs gRPC req/s at c=64",
            ">= 2x",
            f"{zmq['rps'] / grpc['rps']:.2f}x ({zmq['rps']:.0f} / {grpc['rps']:.0f})",
            zmq["rps"] >= 2 * grpc["rps"],
        )
    rest, fastapi = row_of("throughput", "engine-rest"), row_of("throughput", "fastapi-torch")
    if rest and fastapi:
        add(
            "REST binary vs FastAPI + torch at c=64",
            ">= 2x",
            f"{rest['rps'] / fastapi['rps']:.2f}x ({rest['rps']:.0f} / {fastapi['rps']:.0f})",
            rest["rps"] >= 2 * fastapi["rps"],
        )
    idle = _load(results_dir / "idle.json")
    if idle:
        add(
            "idle server CPU",
            "< 2% of one core",
            f"{idle['percent_of_one_core']:.2f}%",
            idle["percent_of_one_core"] < 2.0,
        )
    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [
        f"| {n} | {g} | {m} | {'yes' if ok else 'no' if ok is not None else '-'} |" for n, g, m, ok in rows
    ]
    return "\n".join(lines)


def cpu_table(result: dict[str, Any]) -> str:
    """CPU per process of one load result, as a Markdown table."""
    cpu = result.get("cpu") or {}
    lines = ["| process | cores used | CPU us per request |", "|---|---|---|"]
    for name, p in sorted((cpu.get("processes") or {}).items(), key=lambda kv: -(kv[1]["cpu_s"] or 0)):
        if p["cpu_s"] >= 0.01:
            lines.append(f"| {name} | {_f(p['cores'])} | {_f(p['us_per_request'], '.0f')} |")
    return "\n".join(lines)


def cpu_budget_table(report: dict[str, Any]) -> str:
    """CPU microseconds per answered request of every row of a comparison, by role, as Markdown: who
    spends the machine's cores (on 2 cores, req/s can never exceed 2e6 / the total)."""
    lines = [
        "| server | req/s | client µs | front-end / server µs | worker µs | total µs | 2-core ceiling req/s "
        "| mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        processes = (r.get("cpu") or {}).get("processes") or {}
        if not processes:
            continue
        roles = {"client": 0.0, "server": 0.0, "worker": 0.0}
        for name, p in processes.items():
            us = p.get("us_per_request") or 0.0
            role = (
                "client" if name.startswith("client") else "worker" if name.startswith("worker") else "server"
            )
            roles[role] += us
        total = sum(roles.values())
        batch = (r.get("batches") or {}).get("mean_batch")
        lines.append(
            f"| {r['target']} | {r['rps']:.0f} | {roles['client']:.0f} | {roles['server']:.0f} | "
            f"{_f(roles['worker'] or None, '.0f')} | {total:.0f} | {2e6 / total:.0f} | {_f(batch, '.1f')} |"
            if total
            else f"| {r['target']} | {r['rps']:.0f} | - | - | - | - | - | - |"
        )
    return "\n".join(lines)


def profile_tables(result: dict[str, Any]) -> str:
    """py-spy top functions (own time) per process, as Markdown."""
    parts = []
    for name, prof in (result.get("profile") or {}).items():
        if not prof.get("samples"):
            continue
        parts.append(
            f"**{name}** ({prof['samples']} samples; % of the process's samples, own time / with callees)\n"
        )
        parts.append("| function (own time) | % | function (with callees) | % |\n|---|---|---|---|")
        own, total = prof.get("self", []), prof.get("total", [])
        for i in range(max(len(own), len(total))):
            a = own[i] if i < len(own) else ["", ""]
            b = total[i] if i < len(total) else ["", ""]
            parts.append(f"| `{a[0]}` | {a[1]} | `{b[0]}` | {b[1]} |")
        parts.append("")
    return "\n".join(parts)


def machine_block(results_dir: Path) -> str:
    """Where and when the results were measured."""
    sweep = _load(results_dir / "sweep.json") or {}
    m = sweep.get("machine") or {}
    return (
        f"- CPU: {m.get('cpu', '?')}, {m.get('cpus', '?')} logical CPUs, shared by client and server "
        f"(and by other users: 1-minute load average {m.get('load_average_1m', '?')} when the sweep began)\n"
        f"- Python {m.get('python', '?')}, {m.get('platform', '?')}\n"
        f"- measured {sweep.get('time', '?')}"
    )


def generated_blocks(results_dir: Path, image_prefix: str) -> dict[str, str]:
    """Every generated block of BENCHMARKS.md by name."""
    blocks = {"machine": machine_block(results_dir), "targets": targets_table(results_dir)}
    sweep = _load(results_dir / "sweep.json")
    if sweep:
        blocks["sweep"] = sweep_table(sweep)
    from bench.compare import format_table

    for scenario in SCENARIO_ORDER:
        report = _load(results_dir / f"compare-{scenario}.json")
        if report:
            title = format_table(report).splitlines()[0]
            blocks[f"compare-{scenario}"] = f"{title}\n\n{format_table(report, markdown=True)}"
            blocks[f"cpu-{scenario}"] = cpu_budget_table(report)
    profile = _load(results_dir / "profile-grpc-c64.json")
    if profile:
        from bench.load import format_result

        blocks["profile"] = (
            "```\n"
            + format_result(profile).split("\n  profile")[0]
            + "\n```\n\n"
            + cpu_table(profile)
            + "\n\n"
            + profile_tables(profile)
        )
    blocks["plots"] = (
        f"![latency by percentile at concurrency 64]({image_prefix}latency-cdf.png)\n\n"
        f"![throughput and p99 against concurrency]({image_prefix}sweep.png)"
    )
    return blocks


_BLOCK = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def fill_markdown(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- generated:NAME -->`` block's body replaced by ``blocks[NAME]``."""

    def replace(match: re.Match[str]) -> str:
        body = blocks.get(match[2])
        return match[0] if body is None else f"{match[1]}{body.rstrip()}\n{match[4]}"

    return _BLOCK.sub(replace, text)


def make_plots(results_dir: Path) -> list[Path]:
    """Draw every plot the results allow; returns the files."""
    made = []
    sweep = _load(results_dir / "sweep.json")
    throughput = _load(results_dir / "compare-throughput.json")
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


__all__ = ["CDF_PERCENTILES", "fill_markdown", "plot_cdf", "plot_sweep", "report", "run_all"]
