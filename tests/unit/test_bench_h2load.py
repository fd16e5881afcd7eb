"""`bench.h2load`: reading h2load's report and the engine's request counters, and the table (a run
against real servers: tests/integration/test_h2load_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import h2load, report_markdown

REPORT = """starting benchmark...
spawning thread #0: 1 total client(s). 3000 total requests

finished in 781.62ms, 3838.26 req/s, 4.12MB/s
requests: 3000 total, 3000 started, 3000 done, 3000 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 3000 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 3.22MB (3377432) total, 61.55KB (63028) headers (space savings 47.31%), 3.16MB (3312000) data
                     min         max         mean         sd        +/- sd
time for request:      560us      9.10ms      4.12ms      1.33ms    71.20%
time for connect:      120us      120us      120us         0us   100.00%
"""

REFUSED = """finished in 2.31ms, 0.00 req/s, 0B/s
requests: 200 total, 0 started, 0 done, 0 succeeded, 200 failed, 200 errored, 0 timeout
                     min         max         mean         sd        +/- sd
time for request:        0us         0us         0us         0us     0.00%
"""

METRICS = """# HELP engine_requests_total answered inference requests
engine_requests_total{code="OK",model="mlp",protocol="grpc"} 124724.0
engine_requests_total{code="CANCELLED",model="mlp",protocol="grpc"} 37.0
engine_requests_total{code="OK",model="identity",protocol="grpc"} 6.0
engine_requests_total{code="OK",model="mlp",protocol="zmq"} 99.0
engine_requests_refused_total{model="mlp",protocol="grpc"} 3.0
"""


def test_an_h2load_report_is_read_in_milliseconds() -> None:
    figures = h2load.parse_h2load(REPORT)
    assert figures["rps"] == 3838.26
    assert figures["duration_s"] == pytest.approx(0.78162)
    assert (figures["requests"], figures["done"], figures["succeeded"], figures["http_errors"]) == (
        3000,
    ) * 3 + (0,)
    assert figures["min_ms"] == pytest.approx(0.56)
    assert (figures["max_ms"], figures["mean_ms"], figures["sd_ms"]) == (9.10, 4.12, 1.33)


def test_a_run_that_reached_nobody_counts_every_request_as_an_error() -> None:
    figures = h2load.parse_h2load(REFUSED)
    assert figures["http_errors"] == 200  # failed and errored overlap: counted once
    assert not h2load._complete({"server": "echo", **figures})
    with pytest.raises(ValueError):
        h2load.parse_h2load("h2load: unknown option")


def test_engine_counts_by_code_for_one_protocol() -> None:
    assert h2load.engine_counts(METRICS) == {"OK": 124730.0, "CANCELLED": 37.0}
    assert h2load.engine_counts(METRICS, "zmq") == {"OK": 99.0}


def test_the_engine_is_complete_only_when_its_counters_saw_every_request_ok() -> None:
    figures = {"server": "engine", **h2load.parse_h2load(REPORT), "streams": 16}
    assert h2load._complete({**figures, "grpc_ok": 3000, "grpc_errors": {}})
    assert not h2load._complete({**figures, "grpc_ok": 2999, "grpc_errors": {"INTERNAL": 1}})
    table = h2load.format_table(
        [{**figures, "grpc_ok": 2999, "grpc_errors": {"INTERNAL": 1}, "client_us_per_request": 18.0,
          "server_us_per_request": 370.0}]
    )  # fmt: skip
    assert "| engine | 16 | 3,838 | 0.00 |" in table  # no per-request log: no percentiles
    assert "2999 OK, 1 errors {'INTERNAL': 1}" in table


def test_percentiles_from_the_per_request_log() -> None:
    log = "".join(f"1700000000{i:06d}\t200\t{(i + 1) * 1000}\n" for i in range(100))  # 1..100 ms
    figures = h2load.percentiles(log)
    assert figures["p50_ms"] == pytest.approx(50.5)
    assert figures["p99_ms"] == pytest.approx(99.01)
    assert figures["max_ms"] == 100.0
    assert h2load.percentiles("") == {}


def test_the_max_is_never_below_the_percentiles() -> None:
    # the report rounds the max to 10 µs ("9.10ms"); the log's exact times put p99 above that
    times_us = [8000] * 100 + [9104] * 10 + [9105] * 10
    log = "".join(f"1700000000{i:06d}\t200\t{t}\n" for i, t in enumerate(times_us))
    figures = {**h2load.parse_h2load(REPORT), **h2load.percentiles(log)}
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"] <= figures["max_ms"]


def test_the_report_shows_the_h2load_table_and_its_targets(tmp_path: Path) -> None:
    figures = {**h2load.parse_h2load(REPORT), "p50_ms": 9.9, "p95_ms": 15.0, "p99_ms": 21.4}
    rows = [
        {**figures, "server": "engine", "streams": 64, "rps": 6167.0, "grpc_ok": 3000, "grpc_errors": {}},
        {**figures, "server": "engine", "streams": 500, "rps": 6051.0, "p95_ms": 103.0, "grpc_ok": 3000,
         "grpc_errors": {}},
        {**figures, "server": "echo", "streams": 64, "rps": 2268.0},
    ]  # fmt: skip
    for row in rows:
        row.update(client_us_per_request=11.0, server_us_per_request=270.0)
    report = {"tool": "h2load", "model": "mlp", "time": "2026-11-27T09:44:11+00:00", "requests": 3000}
    (tmp_path / "h2load.json").write_text(json.dumps({**report, "results": rows}))
    blocks = report_markdown.generated_blocks(tmp_path, "")
    assert "measured 2026-11-27T09:44:11+00:00" in blocks["h2load"]
    assert "| echo | 64 | 2,268 |" in blocks["h2load"]
    targets = blocks["targets"]
    assert "| gRPC c=64 with a C client (h2load) | >= 5,000 req/s, p99 < 35 ms, 0 errors |" in targets
    assert "| 6167 req/s, p99 21.40 ms" in targets
    assert "p99 21.40 ms, 3000 OK of 3000 | yes |" in targets
    assert "p95 103.00 ms, 3000 OK of 3000 | no |" in targets  # the latency goal missed


def test_a_burst_row_and_its_target(tmp_path: Path) -> None:
    figures = {**h2load.parse_h2load(REPORT), "p50_ms": 40.0, "p95_ms": 64.5, "p99_ms": 66.0}
    burst = {**figures, "server": "engine", "streams": 500, "burst": 500, "rounds": 5, "requests": 2500,
             "rps": 6400.0, "round_p95_ms": [60.2, 71.0, 64.4, 58.0, 66.6], "grpc_ok": 2500,
             "grpc_errors": {}, "client_us_per_request": 12.0, "server_us_per_request": 300.0}  # fmt: skip
    report = {"tool": "h2load", "model": "mlp", "time": "2026-11-28T00:10:00+00:00", "requests": 40000}
    (tmp_path / "h2load.json").write_text(json.dumps({**report, "results": [burst]}))
    blocks = report_markdown.generated_blocks(tmp_path, "")
    assert "| engine | 5 bursts of 500 | 6,400 | 40.00 | 64.50 |" in blocks["h2load"]
    assert (
        "| gRPC 500-call burst with a C client (h2load) | p95 < 50 ms, 0 errors | p95 64.50 ms over 5 "
        "bursts (each: 60 / 71 / 64 / 58 / 67 ms), 2500 OK of 2500 | no |"
    ) in blocks["targets"]
    # a burst row is not a stream row: no c=500 target from it
    assert "gRPC c=500 with a C client" not in blocks["targets"]
