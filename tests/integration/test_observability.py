"""Observability of a real server: /metrics after a known mix of requests, KServe statistics over gRPC and
REST, JSON logs carrying request ids, /v2/status and ``python -m engine.status``.

One launched server for the module (JSON logs, access log on, ``/metrics`` also on its own port,
``max_inflight_per_model=1`` so that a second concurrent request to the slow model is refused). Each
test works on deltas of what it scrapes, so the tests do not depend on each other's traffic.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from google.protobuf.json_format import MessageToDict
from prometheus_client.parser import text_string_to_metric_families

from engine.models import builtin_repository
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.client.zmq_client import ZmqClient
from tests.integration.server import ServerProcess, serving

TIMEOUT_S = 60.0
#: The slow model sleeps this long per request: long enough for the refused request to arrive meanwhile.
SLOW_S = 1.5
REPO_ROOT = Path(__file__).resolve().parents[2]

_SLOW_YAML = """\
backend: python
source: model.py:forward
inputs: [{name: INPUT0, datatype: FP32, shape: [4]}]
outputs: [{name: OUTPUT0, datatype: FP32, shape: [4]}]
"""
_SLOW_PY = f"""\
import time

def forward(x):
    time.sleep({SLOW_S} if x[0] > 0 else 0)
    return x.copy()
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("obs") / "models"
    for name in ("identity", "simple"):
        shutil.copytree(
            builtin_repository() / name, repo / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    (repo / "slow").mkdir()
    (repo / "slow" / "model.yaml").write_text(_SLOW_YAML)
    (repo / "slow" / "model.py").write_text(_SLOW_PY)
    args = [
        "--model-repository", str(repo),
        "--set", "max_inflight_per_model=1",
        "--set", "log_format=json",
        "--set", "access_log=true",
        "--set", "metrics_port=0",
    ]  # fmt: skip
    with serving(args) as launched:
        yield launched


# ---- clients ---------------------------------------------------------------------------------------


def rest(
    server: ServerProcess, method: str, path: str, body: Any = None, port: int | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, port or server.ports["rest"], timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=None if body is None else orjson.dumps(body))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rest_infer(server: ServerProcess, model: str, datatype: str, shape: list[int], rid: str = "") -> int:
    data = list(range(1, 1 + int(np.prod(shape))))  # the slow model sleeps on a positive first value
    body: dict[str, Any] = {
        "inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape, "data": data}]
    }
    if rid:
        body["id"] = rid
    return rest(server, "POST", f"/v2/models/{model}/infer", body)[0]


def grpc_simple(
    stub: pb_grpc.GRPCInferenceServiceStub, rows: int, rid: str = "", columns: int = 16
) -> grpc.StatusCode:
    """``simple`` over gRPC (``columns`` other than 16 is invalid); the status code it answered."""
    request = pb.ModelInferRequest(model_name="simple", id=rid)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[rows, columns])
        request.raw_input_contents.append(np.ones((rows, columns), np.int32).tobytes())
    try:
        stub.ModelInfer(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def scrape(server: ServerProcess, port: int | None = None) -> Samples:
    status, body = rest(server, "GET", "/metrics", port=port)
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def status(server: ServerProcess) -> dict[str, Any]:
    code, body = rest(server, "GET", "/v2/status")
    assert code == 200, body
    doc: dict[str, Any] = orjson.loads(body)
    return doc


# ---- /metrics after a known mix ----------------------------------------------------------------------

#: (model, protocol, code) -> requests the mix sends
EXPECTED_REQUESTS = {
    ("identity", "rest", "OK"): 3,
    ("identity", "rest", "INVALID_ARGUMENT"): 2,
    ("_unknown_", "rest", "NOT_FOUND"): 1,
    ("slow", "rest", "OK"): 1,
    ("slow", "rest", "RESOURCE_EXHAUSTED"): 1,
    ("simple", "grpc", "OK"): 2,
    ("simple", "grpc", "INVALID_ARGUMENT"): 1,
    ("identity", "zmq", "OK"): 2,
}
#: model -> requests computed by the worker (one batch each: every client waits for its answer)
EXPECTED_COMPUTED = {"identity": 5, "simple": 2, "slow": 1}
#: model -> rows of those batches (the second gRPC request has 2 rows)
EXPECTED_ROWS = {"identity": 5, "simple": 3, "slow": 1}


def send_the_mix(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    for i in range(3):
        assert rest_infer(server, "identity", "FP32", [1, 7], rid=f"obs-rest-{i}") == 200
    for _ in range(2):
        assert rest_infer(server, "identity", "INT32", [1, 7]) == 400
    assert rest_infer(server, "no-such-model", "FP32", [1, 4]) == 404
    assert grpc_simple(stub, 1, rid="obs-grpc-0") == grpc.StatusCode.OK
    assert grpc_simple(stub, 2) == grpc.StatusCode.OK
    assert grpc_simple(stub, 1, columns=15) == grpc.StatusCode.INVALID_ARGUMENT
    with ZmqClient(server.zmq_endpoint, timeout_s=TIMEOUT_S) as client:
        for _ in range(2):
            client.infer("identity", {"INPUT0": np.ones((1, 7), np.float32)})
    # refused: the slow model holds its one admission slot on the REST front-end for SLOW_S
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(rest_infer(server, "slow", "FP32", [4])))
    first.start()
    try:
        wait_until(
            lambda: any(
                p["name"] == "frontend rest#0" and p["inflight"] for p in status(server)["processes"]
            ),
            "the slow request to be in flight",
        )
        assert rest_infer(server, "slow", "FP32", [4]) == 429
    finally:
        first.join(TIMEOUT_S)
    assert codes == [200]


def test_metrics_count_a_known_mix_exactly(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    before = scrape(server)
    send_the_mix(server, stub)

    def delta(found: Samples, name: str, **labels: str) -> float:
        return get(found, name, **labels) - get(before, name, **labels)

    def complete() -> bool:
        # other front-ends and the worker hand their counts over every 0.5 s: wait for the last one
        found = scrape(server)
        total = sum(
            delta(found, "engine_requests_total", model=m, protocol=p, code=c)
            for m, p, c in EXPECTED_REQUESTS
        )
        computed = sum(
            delta(found, "engine_queue_duration_seconds_count", model=m) for m in EXPECTED_COMPUTED
        )
        return total >= sum(EXPECTED_REQUESTS.values()) and computed >= sum(EXPECTED_COMPUTED.values())

    wait_until(complete, "every process to publish its counts")
    after = scrape(server)
    for (model, protocol, code), n in EXPECTED_REQUESTS.items():
        got = delta(after, "engine_requests_total", model=model, protocol=protocol, code=code)
        assert got == n, (model, protocol, code)
    assert delta(after, "engine_requests_refused_total", model="slow", protocol="rest") == 1
    assert delta(after, "engine_requests_refused_total", model="identity", protocol="rest") == 0
    ok = {(m, p): n for (m, p, c), n in EXPECTED_REQUESTS.items() if c == "OK"}
    for (model, protocol), n in ok.items():
        assert delta(after, "engine_request_duration_seconds_count", model=model, protocol=protocol) == n
        assert (
            delta(after, "engine_request_duration_seconds_bucket", model=model, protocol=protocol, le="+Inf")
            == n
        )
    slow_latency = delta(after, "engine_request_duration_seconds_sum", model="slow", protocol="rest")
    assert slow_latency >= SLOW_S
    for model, n in EXPECTED_COMPUTED.items():
        assert delta(after, "engine_queue_duration_seconds_count", model=model) == n
        assert delta(after, "engine_compute_duration_seconds_count", model=model) == n
        assert delta(after, "engine_batch_size_count", model=model) == n
        assert delta(after, "engine_batch_size_sum", model=model) == EXPECTED_ROWS[model]
        assert delta(after, "engine_worker_requests_total", model=model, outcome="success") == n
    assert delta(after, "engine_compute_duration_seconds_sum", model="slow") >= SLOW_S
    # nothing is left in flight, and the board-side gauges are there
    assert get(after, "engine_inflight_requests", model="slow", protocol="rest") == 0
    assert get(after, "engine_queue_depth", model="slow") == 0
    assert get(after, "engine_process_up", process="worker cpu", role="worker") == 1
    assert get(after, "engine_process_restarts_total", process="frontend rest#0", role="frontend") == 0
    assert get(after, "engine_arena_capacity_bytes", process="frontend rest#0") > 0
    assert (
        "engine_ring_occupancy",
        (("direction", "request"), ("frontend", "zmq#0"), ("worker", "cpu")),
    ) in after
    assert get(after, "engine_circuit_breaker_state", model="slow", worker="cpu") == 0
    assert get(after, "engine_server_ready") == 1
    # the supervisor's metrics port serves the same numbers
    own = scrape(server, port=server.ports["metrics"])
    for key in (("engine_requests_total", (("code", "OK"), ("model", "slow"), ("protocol", "rest"))),):
        assert own[key] == after[key]


# ---- statistics --------------------------------------------------------------------------------------


def _normalized(doc: Any) -> Any:
    """Integers for the int64 strings of MessageToDict, zero leaves left out (protobuf omits them)."""
    if isinstance(doc, dict):
        out = {k: _normalized(v) for k, v in doc.items()}
        return {k: v for k, v in out.items() if v not in (0, "0", {}, [], None)}
    if isinstance(doc, list):
        return [_normalized(v) for v in doc]
    if isinstance(doc, str) and doc.isdigit():
        return int(doc)
    return doc


def test_statistics_are_equal_over_grpc_and_rest(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    assert grpc_simple(stub, 3) == grpc.StatusCode.OK  # something to count, batch statistics included
    grpc_stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=TIMEOUT_S)
    code, body = rest(server, "GET", "/v2/models/stats")
    assert code == 200
    rest_stats = orjson.loads(body)["model_stats"]
    from_grpc = [
        _normalized(MessageToDict(s, preserving_proto_field_name=True)) for s in grpc_stats.model_stats
    ]
    from_rest = [
        _normalized({k: v for k, v in s.items() if k not in ("breaker", "breaker_trips")}) for s in rest_stats
    ]
    assert from_grpc == from_rest
    (simple,) = [s for s in rest_stats if s["name"] == "simple"]
    success = simple["inference_stats"]["success"]["count"]
    assert success >= 1 and simple["inference_stats"]["queue"]["count"] == success
    assert simple["inference_stats"]["compute_infer"]["ns"] > 0 and simple["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in simple["batch_stats"]) == simple["execution_count"]
    assert {b["batch_size"] for b in simple["batch_stats"]} >= {4}  # 3 rows: the power-of-two bucket 4


# ---- logs --------------------------------------------------------------------------------------------


def test_logs_are_json_lines_carrying_request_ids(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    assert rest_infer(server, "identity", "FP32", [1, 7], rid="log-rest-7") == 200
    assert grpc_simple(stub, 1, rid="log-grpc-7") == grpc.StatusCode.OK

    def records() -> list[dict[str, Any]]:
        lines = server.log_path.read_text(errors="replace").splitlines()
        return [orjson.loads(line) for line in lines if line.strip()]  # every line parses

    def logged(rid: str) -> list[dict[str, Any]]:
        return [r for r in records() if r.get("request_id") == rid and r.get("event") == "access"]

    wait_until(lambda: bool(logged("log-rest-7") and logged("log-grpc-7")), "the access lines")
    (rest_line,) = logged("log-rest-7")
    assert (rest_line["protocol"], rest_line["model"], rest_line["code"]) == ("rest", "identity", "OK")
    assert rest_line["role"] == "frontend rest#0" and rest_line["duration_ms"] >= 0
    (grpc_line,) = logged("log-grpc-7")
    assert (grpc_line["protocol"], grpc_line["model"]) == ("grpc", "simple")
    events = {(r["role"], r["event"]) for r in records()}
    assert {("supervisor", "start"), ("worker cpu", "model_load"), ("worker cpu", "ready")} <= events
    assert {("frontend rest#0", "ready"), ("supervisor", "ready")} <= events


# ---- status --------------------------------------------------------------------------------------------


def test_status_route_and_command(server: ServerProcess) -> None:
    doc = status(server)
    assert doc["server"]["state"] == "ready" and doc["metrics"] is True
    names = {p["name"]: p for p in doc["processes"]}
    assert set(names) == {"worker cpu", "frontend grpc#0", "frontend rest#0", "frontend zmq#0"}
    assert all(p["state"] == "up" and p["pid"] > 0 for p in names.values())
    assert {m["name"] for m in doc["models"]} == {"identity", "simple", "slow"}
    url = f"http://{server.rest_address}"
    shown = _status_command("--url", url)
    assert shown.returncode == 0, shown.stderr
    for word in ("server: ready", "worker cpu", "frontend rest#0", "identity", "P99 ms", "ARENA"):
        assert word in shown.stdout
    as_json = _status_command("--url", url, "--json")
    assert orjson.loads(as_json.stdout)["server"]["state"] == "ready"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    unreachable = _status_command("--url", f"http://127.0.0.1:{closed_port}", "--timeout", "5")
    assert unreachable.returncode == 1 and "cannot read" in unreachable.stderr


def _status_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.status", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )


def _env() -> Mapping[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
