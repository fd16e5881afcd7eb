"""The Markdown of `python -m bench report`: the generated blocks of BENCHMARKS.md from the JSON results.

Each block is a ``<!-- generated:NAME -->`` ... ``<!-- /generated -->`` span of BENCHMARKS.md;
`generated_blocks` builds every block's body from a results folder (the machine, the sweep, the
comparison and CPU-budget tables per scenario, the targets, the profile, the plot links) and
`fill_markdown` puts them in place, keeping the text around them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The comparison scenarios, in the order they are measured and shown.
SCENARIO_ORDER = ("latency", "throughput", "seed", "burst")


def read_result(path: Path) -> dict[str, Any] | None:
    """The JSON result at ``path``, or None when it is missing or unreadable."""
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


def _grpc_targets(
    row_of: Callable[[str, str], dict[str, Any] | None],
    add: Callable[[str, str, str, bool | None], None],
    engine_row: str,
    echo_row: str,
    client: str,
) -> None:
    """The issue's gRPC targets for the engine loaded through one client (rows of the compare files)."""
    for scenario, c, latency_key, latency_goal in (
        ("throughput", 64, "p99_ms", 35.0),
        ("seed", 500, "p95_ms", 100.0),
    ):
        engine, echo = row_of(scenario, engine_row), row_of(scenario, echo_row)
        if engine:
            # The issue states both: 5,000 req/s, "i.e. at least 0.7x the bare echo floor measured in
            # the same run" (its reference machine ran echo at 6,600-7,700). Shown apart, so a
            # machine's speed and the engine's overhead are not read as one.
            ratio = engine["rps"] / echo["rps"] if echo and echo["rps"] else None
            add(
                f"gRPC c={c} req/s vs echo, {client}",
                ">= 0.7x the echo floor of the same run, 0 errors",
                f"{_f(ratio)}x ({engine['rps']:.0f} / echo {_f(echo and echo['rps'], '.0f')}), "
                f"errors {engine['errors']}",
                None if ratio is None else ratio >= 0.7 and engine["errors"] == 0,
            )
            add(
                f"gRPC c={c} req/s absolute, {client}",
                ">= 5,000 (where echo did 6,600-7,700)",
                f"{engine['rps']:.0f}",
                engine["rps"] >= 5000,
            )
            value = engine[latency_key]
            add(
                f"gRPC c={c} {latency_key[:3]}, {client}",
                f"< {latency_goal:g} ms",
                f"{_f(value)} ms",
                value is not None and value < latency_goal,
            )
    burst = row_of("burst", engine_row)
    if burst:
        add(
            f"gRPC 500-call burst p95, {client}",
            "< 50 ms",
            f"{_f(burst['p95_ms'])} ms",
            burst["p95_ms"] is not None and burst["p95_ms"] < 50,
        )
    engine, echo = row_of("latency", engine_row), row_of("latency", echo_row)
    inproc = row_of("latency", "inproc")
    if engine and echo and inproc:
        floor = echo["p50_ms"] + inproc["p50_ms"]
        add(
            f"gRPC c=1 p50, {client}",
            "<= echo p50 + model time + 0.3 ms",
            f"{_f(engine['p50_ms'])} ms vs {_f(echo['p50_ms'])} + {_f(inproc['p50_ms'])} + 0.3 "
            f"= {floor + 0.3:.2f} ms",
            engine["p50_ms"] <= floor + 0.3,
        )
    zmq, grpc = row_of("throughput", "engine-zmq"), row_of("throughput", engine_row)
    if zmq and grpc:
        add(
            f"ZMQ vs gRPC req/s at c=64, {client}",
            ">= 2x",
            f"{zmq['rps'] / grpc['rps']:.2f}x ({zmq['rps']:.0f} / {grpc['rps']:.0f})",
            zmq["rps"] >= 2 * grpc["rps"],
        )


def targets_table(results_dir: Path) -> str:
    """The issue's targets against the latest results, as a Markdown table."""

    def row_of(scenario: str, target: str) -> dict[str, Any] | None:
        report = read_result(results_dir / f"compare-{scenario}.json")
        if report is None:
            return None
        return next((r for r in report["rows"] if r["target"] == target), None)

    rows: list[tuple[str, str, str, bool | None]] = []

    def add(name: str, goal: str, measured: str, met: bool | None) -> None:
        rows.append((name, goal, measured, met))

    # the gRPC targets once per load client: the lean one (`bench.grpc_h2_client`, rows engine and
    # echo) and grpc.aio's (rows engine-aio-client and echo-aio-client), each against its own floor
    for engine_row, echo_row, client in (
        ("engine", "echo", "lean client"),
        ("engine-aio-client", "echo-aio-client", "grpc.aio client"),
    ):
        _grpc_targets(row_of, add, engine_row, echo_row, client)
    rest, fastapi = row_of("throughput", "engine-rest"), row_of("throughput", "fastapi-torch")
    if rest and fastapi:
        add(
            "REST binary vs FastAPI + torch at c=64",
            ">= 2x",
            f"{rest['rps'] / fastapi['rps']:.2f}x ({rest['rps']:.0f} / {fastapi['rps']:.0f})",
            rest["rps"] >= 2 * fastapi["rps"],
        )
    h2load = read_result(results_dir / "h2load.json")
    for r in h2load["results"] if h2load else ():
        if r["server"] == "engine" and r.get("burst") == 500:
            add(
                "gRPC 500-call burst with a C client (h2load)",
                "p95 < 50 ms, 0 errors",
                f"p95 {_f(r.get('p95_ms'))} ms over {r['rounds']} bursts (each: "
                f"{' / '.join(f'{p:.0f}' for p in r['round_p95_ms'])} ms), "
                f"{r['grpc_ok']} OK of {r['requests']}",
                (r.get("p95_ms") or 50.0) < 50.0 and r["grpc_ok"] == r["requests"],
            )
        elif r["server"] == "engine" and r["streams"] in (64, 500) and not r.get("burst"):
            latency_key, goal = ("p99_ms", 35.0) if r["streams"] == 64 else ("p95_ms", 100.0)
            add(
                f"gRPC c={r['streams']} with a C client (h2load)",
                f">= 5,000 req/s, {latency_key[:3]} < {goal:g} ms, 0 errors",
                f"{r['rps']:.0f} req/s, {latency_key[:3]} {_f(r.get(latency_key))} ms, "
                f"{r['grpc_ok']} OK of {r['requests']}",
                r["rps"] >= 5000 and (r.get(latency_key) or goal) < goal and r["grpc_ok"] == r["requests"],
            )
    idle = read_result(results_dir / "idle.json")
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
    sweep = read_result(results_dir / "sweep.json") or {}
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
    sweep = read_result(results_dir / "sweep.json")
    if sweep:
        blocks["sweep"] = sweep_table(sweep)
    from bench.compare import format_table

    for scenario in SCENARIO_ORDER:
        report = read_result(results_dir / f"compare-{scenario}.json")
        if report:
            title = format_table(report).splitlines()[0]
            blocks[f"compare-{scenario}"] = f"{title}\n\n{format_table(report, markdown=True)}"
            blocks[f"cpu-{scenario}"] = cpu_budget_table(report)
    profile = read_result(results_dir / "profile-grpc-c64.json")
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
    h2load = read_result(results_dir / "h2load.json")
    if h2load:
        from bench.h2load import format_table as h2load_table

        blocks["h2load"] = (
            f"h2load, {h2load['requests']} requests per row after a warm-up, one HTTP/2 connection "
            "(bursts: each round one h2load run on a new connection, every call sent at once, after "
            f"one unmeasured burst), measured {h2load['time']}\n\n{h2load_table(h2load['results'])}"
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


__all__ = [
    "SCENARIO_ORDER",
    "cpu_budget_table",
    "cpu_table",
    "fill_markdown",
    "generated_blocks",
    "machine_block",
    "profile_tables",
    "read_result",
    "sweep_table",
    "targets_table",
]
