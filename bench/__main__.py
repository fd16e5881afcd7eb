"""The benchmark command line: `python -m bench <subcommand> [options]`.

Each subcommand lives in its own module, which provides ``configure(parser)`` (adds its options) and
``main(args) -> int``; add one by adding a line to SUBCOMMANDS. A subcommand module keeps its heavy
imports (torch, clients) inside functions, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "micro": ("bench.micro", "micro-benchmarks of the compiled hot path (rings, wake-ups, arena)"),
    "engine": ("bench.engine_rtt", "engine round trip (gateway -> worker -> gateway), latency and req/s"),
    "protocols": ("bench.protocols", "gRPC, ZMQ and REST against a launched server: req/s, p50, p99"),
    "overload": ("bench.overload", "gRPC at 5x the sustainable rate: admitted p99, refused share, RSS"),
    "faults": ("bench.faults", "signals under steady load: requests sent, answered OK/error, hung"),
    "metrics": ("bench.metrics_overhead", "requests/s with metrics on vs off (the cost of observability)"),
    "load": ("bench.load", "closed/open-loop or burst load over gRPC, ZMQ or REST; HDR percentiles"),
    "scenario": ("bench.scenarios", "a named load: latency, throughput, seed, burst"),
    "h2load": ("bench.h2load", "gRPC load from h2load (a C client): engine and echo floor, answers checked"),
    "compare": ("bench.compare", "one load against the engine, compute floor, echo floor and baselines"),
    "report": ("bench.report", "plots and BENCHMARKS.md tables from the JSON results (--run: measure)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(module=module_name)
        importlib.import_module(module_name).configure(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args.module).main(args))


if __name__ == "__main__":
    sys.exit(main())
