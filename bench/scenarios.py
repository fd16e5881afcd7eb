"""Named load shapes: `SCENARIOS`, and ``python -m bench scenario NAME [load options]``.

- ``latency``: one request at a time (concurrency 1), gRPC, 10 s: the per-request floor.
- ``throughput``: 64 in flight, gRPC, 10 s: the dynamic batcher's sweet spot.
- ``seed``: 500 concurrent gRPC calls for 10 s (the original requirement's load).
- ``burst``: 500 gRPC calls released at once, 5 rounds: how fast a cold queue drains.

Each runs against an engine the command launches (default) or an existing server (``--url``); the
`bench.load` options override any part of the shape (``--protocol zmq``, ``--duration 5``...).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scenario:
    """A named load shape.

    Attributes:
        name: its name on the command line.
        description: one line.
        protocol: ``grpc``, ``zmq`` or ``rest``.
        concurrency: requests in flight (closed loop).
        duration_s: measured seconds.
        burst: burst mode: requests per round.
        rounds: burst rounds.
    """

    name: str
    description: str
    protocol: str = "grpc"
    concurrency: int = 1
    duration_s: float = 10.0
    burst: int | None = None
    rounds: int = 5

    def options(self) -> dict[str, Any]:
        """The `bench.load` option values this scenario sets."""
        out: dict[str, Any] = {
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "duration": self.duration_s,
        }
        if self.burst is not None:
            out.update(burst=self.burst, rounds=self.rounds)
        return out


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("latency", "one gRPC request at a time for 10 s", concurrency=1),
        Scenario("throughput", "64 gRPC requests in flight for 10 s", concurrency=64),
        Scenario("seed", "500 concurrent gRPC calls for 10 s", concurrency=500),
        Scenario("burst", "500 gRPC calls released at once, 5 rounds", concurrency=500, burst=500, rounds=5),
    )
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench scenario``: the scenario's name, then any `bench.load` option."""
    from bench import load

    parser.add_argument(
        "name",
        choices=sorted(SCENARIOS),
        help="; ".join(f"{s.name}: {s.description}" for s in SCENARIOS.values()),
    )
    load.configure(parser)


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench scenario``."""
    from bench import load

    args.scenario = args.name
    return load.main(args)
