"""pytest-benchmark of one request per protocol against a real server, and smoke runs of `bench load`.

A launched server (``python -m engine.launch``, every port 0; `tests.integration.server.serving`)
lives for the session. Each benchmark round is one ``identity`` request of FP32 [1, 256] through a
plain client: gRPC unary (and once with FP32 [1, 1 Mi], 4 MiB each way), gRPC stream (one
bidirectional stream kept open, one request per round), ZMQ (`ZmqClient`), REST with JSON tensors
and REST with binary tensors (one keep-alive HTTP/1.1 connection); every answer is checked. Skipped
unless benchmarks are asked for (see tests/conftest.py); in quick mode each benchmark runs a few
rounds, and the `bench load` / `bench compare` smoke runs last about a second each.
"""

from __future__ import annotations

import http.client
import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from bench.__main__ import main as bench_main
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.client.zmq_client import ZmqClient
from tests.integration.server import ServerProcess, serving

MODEL = "identity"
DATA = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
TIMEOUT_S = 30.0
#: Keys `bench load --json` must write (the issue's list).
LOAD_KEYS = {
    "protocol",
    "model",
    "concurrency",
    "duration_s",
    "requests",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "errors",
}


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One launched engine server for every test of this module."""
    with serving() as launched:
        yield launched


def measure(benchmark: Any, quick: bool, fn: Callable[[], np.ndarray]) -> np.ndarray:
    """Full runs let pytest-benchmark calibrate; quick runs do 5 rounds after 2 warm-up rounds."""
    if quick:
        out: np.ndarray = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=2)
    else:
        out = benchmark(fn)
    return out


def _grpc_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=DATA.shape)
    request.raw_input_contents.append(DATA.tobytes())
    return request


def _grpc_output(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(
        tuple(response.outputs[0].shape)
    )


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        yield ch


def test_grpc_unary(benchmark: Any, bench_quick_mode: bool, channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _grpc_request()
    out = measure(
        benchmark, bench_quick_mode, lambda: _grpc_output(stub.ModelInfer(request, timeout=TIMEOUT_S))
    )
    np.testing.assert_array_equal(out, DATA)


def test_grpc_unary_4mib(benchmark: Any, bench_quick_mode: bool, server: ServerProcess) -> None:
    # a large tensor: the front-end's copies and page faults, not its per-call overhead
    big = np.random.default_rng(1).standard_normal((1, 1 << 20), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=big.shape)
    request.raw_input_contents.append(big.tobytes())
    options = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    with grpc.insecure_channel(server.grpc_address, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        out = measure(
            benchmark, bench_quick_mode, lambda: _grpc_output(stub.ModelInfer(request, timeout=TIMEOUT_S))
        )
    assert np.array_equal(out, big), "the answer differs from the request"


def test_grpc_stream(benchmark: Any, bench_quick_mode: bool, channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def feed() -> Iterator[pb.ModelInferRequest]:
        while (item := requests.get()) is not None:
            yield item

    responses = stub.ModelStreamInfer(feed(), timeout=600)
    request = _grpc_request()

    def one() -> np.ndarray:
        requests.put(request)
        answer = next(responses)
        assert not answer.error_message, answer.error_message
        return _grpc_output(answer.infer_response)

    try:
        out = measure(benchmark, bench_quick_mode, one)
    finally:
        requests.put(None)
        responses.cancel()
    np.testing.assert_array_equal(out, DATA)


def test_zmq(benchmark: Any, bench_quick_mode: bool, server: ServerProcess) -> None:
    with ZmqClient(server.zmq_endpoint, timeout_s=TIMEOUT_S) as client:
        out = measure(
            benchmark, bench_quick_mode, lambda: np.array(client.infer(MODEL, {"INPUT0": DATA})["OUTPUT0"])
        )
    np.testing.assert_array_equal(out, DATA)


@pytest.fixture
def rest_conn(server: ServerProcess) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection(server.host, server.ports["rest"], timeout=TIMEOUT_S)
    yield conn
    conn.close()


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> tuple[bytes, int | None]:
    conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200, data[:300]
    length = response.getheader("Inference-Header-Content-Length")
    return data, int(length) if length is not None else None


def test_rest_json(benchmark: Any, bench_quick_mode: bool, rest_conn: http.client.HTTPConnection) -> None:
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": list(DATA.shape),
                    "data": DATA.ravel().tolist(),
                }
            ]
        }
    )

    def one() -> np.ndarray:
        data, _ = _post(rest_conn, body, {"Content-Type": "application/json"})
        output = orjson.loads(data)["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

    np.testing.assert_array_equal(measure(benchmark, bench_quick_mode, one), DATA)


def test_rest_binary(benchmark: Any, bench_quick_mode: bool, rest_conn: http.client.HTTPConnection) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": list(DATA.shape),
                    "parameters": {"binary_data_size": DATA.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    body = header + DATA.tobytes()

    def one() -> np.ndarray:
        data, json_length = _post(rest_conn, body, headers)
        assert json_length is not None
        output = orjson.loads(data[:json_length])["outputs"][0]
        return np.frombuffer(data[json_length:], dtype=np.float32).reshape(output["shape"])

    np.testing.assert_array_equal(measure(benchmark, bench_quick_mode, one), DATA)


# ---- the load generator end to end (a second or so each) -------------------------------------------------


def _load(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "load.json"
    assert bench_main(["load", "--quiet", "--warmup", "0.2", "--json", str(out), *argv]) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    assert result.keys() >= LOAD_KEYS
    return result


@pytest.mark.parametrize("client", ["h2", "grpcio"])
def test_load_closed_loop_grpc(tmp_path: Path, server: ServerProcess, client: str) -> None:
    result = _load(
        tmp_path,
        "--grpc-client",
        client,
        "--url",
        server.grpc_address,
        "--concurrency",
        "8",
        "--duration",
        "1",
        "--check-every",
        "1",
        "--server-pid",
        str(server.pid),
    )
    assert result["errors"] == 0 and result["requests"] > 0 and result["client"] == client
    assert result["checked"] == result["requests"]  # every answer compared with the mlp computed here
    assert any(name.startswith("worker") for name in result["cpu"]["processes"])


def test_load_bursts_over_grpc_with_the_lean_client(tmp_path: Path, server: ServerProcess) -> None:
    result = _load(
        tmp_path,
        "--url",
        server.grpc_address,
        "--burst",
        "200",
        "--rounds",
        "2",
        "--check-every",
        "7",
    )
    assert result["client"] == "h2"
    assert result["errors"] == 0 and result["requests"] == 400 and result["checked"] >= 50
    assert [r["requests"] for r in result["rounds"]] == [200, 200]


@pytest.mark.parametrize("client", ["h2", "grpcio"])
def test_grpc_clients_name_the_same_error_codes(server: ServerProcess, client: str) -> None:
    import asyncio

    from bench.load_payload import Payload
    from bench.load_targets import make_target

    identity = Payload("identity", {"INPUT0": DATA}, {"OUTPUT0": DATA})
    cases = [
        identity,
        Payload("no-such-model", {"INPUT0": DATA}, None),
        Payload("identity", {"INPUT0": DATA.astype(np.float64)}, None),  # wrong datatype
        Payload("identity", {"INPUT0": DATA}, {"OUTPUT0": DATA + 1}),  # answers differ from expected
    ]

    async def outcomes() -> list[str | None]:
        codes = []
        for payload in cases:
            target = make_target("grpc", server.grpc_address, payload, 10.0, grpc_client=client)
            await target.open()
            try:
                codes.append(await target.slot()(True))
            finally:
                await target.close()
        return codes

    assert asyncio.run(outcomes()) == [None, "NOT_FOUND", "INVALID_ARGUMENT", "WRONG_ANSWER"]


@pytest.mark.parametrize("client", ["zmtp", "pyzmq"])
def test_load_bursts_over_zmq_from_two_processes(tmp_path: Path, server: ServerProcess, client: str) -> None:
    result = _load(
        tmp_path,
        "--protocol",
        "zmq",
        "--zmq-client",
        client,
        "--url",
        f"{server.host}:{server.ports['zmq']}",
        "--burst",
        "20",
        "--rounds",
        "2",
        "--procs",
        "2",
        "--model",
        "identity",
    )
    assert result["errors"] == 0 and result["requests"] == 40 and result["client"] == client
    assert [r["requests"] for r in result["rounds"]] == [20, 20]


def test_load_open_loop_rest(tmp_path: Path, server: ServerProcess) -> None:
    result = _load(
        tmp_path,
        "--protocol",
        "rest",
        "--url",
        server.rest_address,
        "--rate",
        "50",
        "--duration",
        "1",
        "--concurrency",
        "4",
    )
    assert result["requests"] + result["errors"] == 50  # exactly the requests due in the window
    assert result["errors"] == 0 and result["checked"] >= 1


def test_compare_against_the_floors_and_an_afternoon_server(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    rows = "inproc,echo,echo-aio-client,fastapi-torch"
    argv = ["compare", "throughput", "--rows", rows, "--duration", "0.5", "--quiet"]
    assert bench_main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["target"] for r in report["rows"]] == rows.split(",")
    assert [r.get("client") for r in report["rows"][1:3]] == ["h2", "grpcio"]  # the row's own client
    for row in report["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["checked"] >= 1, row["target"]
