"""`bench.report_markdown.targets_table`: the issue's targets read from compare/idle JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report_markdown import targets_table


def _row(target: str, rps: float, **ms: float) -> dict[str, Any]:
    return {"target": target, "rps": rps, "errors": 0, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, **ms}


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"rows": rows}))


def _met(table: str) -> dict[str, str]:
    lines = table.splitlines()[2:]
    return {cells[1].strip(): cells[4].strip() for cells in (line.split("|") for line in lines)}


def test_ratio_and_absolute_throughput_targets_are_judged_apart(tmp_path: Path) -> None:
    _write(
        tmp_path / "compare-throughput.json",
        [
            _row("engine", 1900, p99_ms=60.0),
            _row("echo", 2000),
            _row("engine-aio-client", 1000, p99_ms=30.0),
            _row("echo-aio-client", 2000),
            _row("engine-zmq", 3900),
            _row("engine-rest", 4600),
            _row("fastapi-torch", 1400),
        ],
    )
    _write(tmp_path / "compare-seed.json", [_row("engine", 1000, p95_ms=90.0), _row("echo", 2000)])
    _write(tmp_path / "compare-burst.json", [_row("engine", 1700, p95_ms=400.0)])
    _write(
        tmp_path / "compare-latency.json",
        [_row("engine", 500, p50_ms=1.5), _row("echo", 900, p50_ms=1.0), _row("inproc", 4000, p50_ms=0.25)],
    )
    (tmp_path / "idle.json").write_text(json.dumps({"percent_of_one_core": 0.8}))
    met = _met(targets_table(tmp_path))
    assert met == {
        "gRPC c=64 req/s vs echo, lean client": "yes",  # 0.95x
        "gRPC c=64 req/s absolute, lean client": "no",
        "gRPC c=64 p99, lean client": "no",
        "gRPC c=500 req/s vs echo, lean client": "no",  # 0.5x
        "gRPC c=500 req/s absolute, lean client": "no",
        "gRPC c=500 p95, lean client": "yes",
        "gRPC 500-call burst p95, lean client": "no",
        "gRPC c=1 p50, lean client": "yes",  # 1.5 <= 1.0 + 0.25 + 0.3
        "ZMQ vs gRPC req/s at c=64, lean client": "yes",  # 3900 / 1900
        # the same engine through grpc.aio's client, against echo through that client
        "gRPC c=64 req/s vs echo, grpc.aio client": "no",  # 0.5x
        "gRPC c=64 req/s absolute, grpc.aio client": "no",
        "gRPC c=64 p99, grpc.aio client": "yes",
        "ZMQ vs gRPC req/s at c=64, grpc.aio client": "yes",  # 3900 / 1000
        "REST binary vs FastAPI + torch at c=64": "yes",
        "idle server CPU": "yes",
    }


def test_missing_results_leave_their_targets_out(tmp_path: Path) -> None:
    _write(tmp_path / "compare-throughput.json", [_row("engine", 1900)])  # no echo row
    met = _met(targets_table(tmp_path))
    assert met["gRPC c=64 req/s vs echo, lean client"] == "-"
    assert not any("grpc.aio client" in name for name in met)
    assert "idle server CPU" not in met
