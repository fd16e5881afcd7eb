"""`python -m engine.status [--url http://127.0.0.1:8008]`: what a running engine is doing, as tables.

Reads ``GET /v2/status`` from the REST front-end (`servers.metrics_http.status_document`) and prints
the server state, one row per process (state, pid, generation, restarts, uptime, heartbeat age,
requests in flight), one row per model (readiness, requests, failures, queue depth, batches, average
batch size, average queue and compute time, latency percentiles) and the shared-memory use (arenas,
non-empty rings). ``--json`` prints the document itself.

Exit status: 0 when the server answered, 1 when it could not be reached or answered an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8008"


def fetch_status(url: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """The status document of the server at ``url`` (the REST front-end's base URL).

    Raises:
        OSError: the server could not be reached or answered an HTTP error (``urllib.error.URLError``).
    """
    request = urllib.request.Request(url.rstrip("/") + "/v2/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows under headers, columns padded to their widest cell ("-" for None)."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_status(doc: dict[str, Any]) -> str:
    """The human-readable report of a status document."""
    out = [
        f"server: {doc.get('server', {}).get('state', '?')}"
        + ("" if doc.get("metrics") else " (metrics off)")
    ]
    procs = doc.get("processes", [])
    if procs:
        out += [
            "",
            table(
                ("PROCESS", "STATE", "PID", "GEN", "RESTARTS", "UPTIME s", "HEARTBEAT s", "IN FLIGHT"),
                [
                    (
                        p["name"],
                        p["state"],
                        p["pid"] or None,
                        p["generation"],
                        p["restarts"],
                        p["uptime_s"],
                        p["heartbeat_age_s"],
                        p["inflight"],
                    )
                    for p in procs
                ],
            ),
        ]
    models = doc.get("models", [])
    if models:
        rows = []
        for m in models:
            lat = m.get("latency_ms") or {}
            rows.append(
                (
                    m["name"],
                    m.get("ready"),
                    m.get("requests"),
                    m.get("success"),
                    (m.get("failure") or 0) + (m.get("expired") or 0),
                    m.get("inflight"),
                    m.get("queue_depth"),
                    m.get("batches"),
                    m.get("avg_batch_size"),
                    m.get("avg_queue_ms"),
                    m.get("avg_compute_ms"),
                    lat.get("p50"),
                    lat.get("p90"),
                    lat.get("p99"),
                    m.get("breaker"),
                )
            )
        out += [
            "",
            table(
                (
                    "MODEL", "READY", "REQUESTS", "OK", "FAILED", "IN FLIGHT", "QUEUED", "BATCHES",
                    "AVG BATCH", "QUEUE ms", "COMPUTE ms", "P50 ms", "P90 ms", "P99 ms", "BREAKER",
                ),
                rows,
            ),
        ]  # fmt: skip
    arenas = doc.get("arenas", [])
    if arenas:
        out += [
            "",
            table(
                ("ARENA", "IN USE", "CAPACITY", "USED %"),
                [
                    (
                        a["process"],
                        _mib(a["bytes_in_use"]),
                        _mib(a["capacity"]),
                        round(100 * a["bytes_in_use"] / a["capacity"], 1) if a["capacity"] else None,
                    )
                    for a in arenas
                ],
            ),
        ]
    busy = [r for r in doc.get("rings", []) if r["occupancy"]]
    capacity = doc.get("ring_capacity")
    if busy:
        out += [
            "",
            table(
                ("RING", "DIRECTION", "QUEUED", "CAPACITY"),
                [
                    (f"{r['frontend']} -> {r['worker']}", r["direction"], r["occupancy"], capacity)
                    for r in busy
                ],
            ),
        ]
    elif doc.get("rings"):
        out += ["", f"rings: all {len(doc['rings'])} empty (capacity {capacity})"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.status", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the REST front-end (default {DEFAULT_URL})")
    parser.add_argument("--token", help="bearer token, when the server requires one")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default 5)")
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")
    args = parser.parse_args(argv)
    try:
        doc = fetch_status(args.url, args.token, args.timeout)
    except (OSError, ValueError) as err:
        print(f"engine.status: cannot read {args.url}/v2/status: {err}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
