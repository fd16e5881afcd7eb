"""The REST front-end of a real server: JSON and binary-tensor inference on every built-in model,
metadata, health, error mapping (4xx), deadlines, the body size limit, and 200 concurrent requests."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as thttp

from tests.integration.server import (
    BUILTIN_MODELS,
    ServerProcess,
    assert_outputs,
    builtin_specs,
    reference_outputs,
    sample_inputs,
)

TIMEOUT_S = 60.0
HEADER_LENGTH = "Inference-Header-Content-Length"
_DTYPES = {"FP32": np.float32, "INT32": np.int32, "FP64": np.float64}


def datatype(array: np.ndarray) -> str:
    return {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[array.dtype]


def request(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on a fresh connection: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection(server.host, server.ports["rest"], timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def json_body(model_inputs: Mapping[str, np.ndarray], **extra: Any) -> bytes:
    inputs = [
        {"name": name, "datatype": datatype(a), "shape": list(a.shape), "data": a.ravel().tolist()}
        for name, a in model_inputs.items()
    ]
    return orjson.dumps({"inputs": inputs, **extra})


def binary_body(model_inputs: Mapping[str, np.ndarray], **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor request: JSON header, then each input's raw bytes; and its headers."""
    inputs = [
        {
            "name": name,
            "datatype": datatype(a),
            "shape": list(a.shape),
            "parameters": {"binary_data_size": a.nbytes},
        }
        for name, a in model_inputs.items()
    ]
    header = orjson.dumps({"inputs": inputs, **extra})
    body = header + b"".join(np.ascontiguousarray(a).tobytes() for a in model_inputs.values())
    return body, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def decode_response(headers: Mapping[str, str], body: bytes) -> dict[str, np.ndarray]:
    """Outputs of an /infer response, JSON or binary."""
    length = headers.get(HEADER_LENGTH.lower())
    doc = orjson.loads(body[: int(length)] if length else body)
    offset = int(length) if length else 0
    arrays = {}
    for out in doc["outputs"]:
        dtype = _DTYPES[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            raw = body[offset : offset + size]
            offset += size
            arrays[out["name"]] = np.frombuffer(raw, dtype=dtype).reshape(out["shape"])
    return arrays


def error_of(body: bytes) -> str:
    doc = orjson.loads(body)
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    return str(doc["error"])


# ---- inference -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_infer_every_builtin_model_json(
    engine_server: ServerProcess, model: str, rng: np.random.Generator
) -> None:
    inputs = sample_inputs(model, 3, rng)
    status, headers, body = request(
        engine_server, "POST", f"/v2/models/{model}/infer", json_body(inputs, id="j1")
    )
    assert status == 200, body
    assert orjson.loads(body)["id"] == "j1"
    assert_outputs(model, decode_response(headers, body), reference_outputs(model, inputs))


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_infer_every_builtin_model_binary_with_tritonclient(
    engine_server: ServerProcess, model: str, rng: np.random.Generator
) -> None:
    inputs = sample_inputs(model, 2, rng)
    client = thttp.InferenceServerClient(engine_server.rest_address, network_timeout=TIMEOUT_S)
    try:
        items = []
        for name, array in inputs.items():
            item = thttp.InferInput(name, list(array.shape), datatype(array))
            item.set_data_from_numpy(array, binary_data=True)
            items.append(item)
        want = reference_outputs(model, inputs)
        outputs = [thttp.InferRequestedOutput(name, binary_data=True) for name in want]
        result = client.infer(model, items, outputs=outputs)
    finally:
        client.close()
    assert_outputs(model, {name: result.as_numpy(name) for name in want}, want)


# ---- metadata and health -------------------------------------------------------------------------------


def test_server_and_model_metadata(engine_server: ServerProcess) -> None:
    status, _, body = request(engine_server, "GET", "/v2")
    assert status == 200 and "binary_tensor_data" in orjson.loads(body)["extensions"]
    for name, spec in builtin_specs().items():
        status, _, body = request(engine_server, "GET", f"/v2/models/{name}")
        assert status == 200, body
        meta = orjson.loads(body)
        assert meta["name"] == name and meta["versions"] == [spec.version]
        assert [(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.inputs
        ]
        assert [(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.outputs
        ]
        status, _, body = request(engine_server, "GET", f"/v2/models/{name}/config")
        assert status == 200 and orjson.loads(body)["max_batch_size"] == spec.max_batch_size
    status, _, body = request(engine_server, "POST", "/v2/repository/index", b"{}")
    assert status == 200
    assert {(m["name"], m["state"]) for m in orjson.loads(body)} == {(m, "READY") for m in BUILTIN_MODELS}
    status, _, body = request(engine_server, "GET", "/v2/models/no-such-model")
    assert status == 404 and "no-such-model" in error_of(body)


def test_health(engine_server: ServerProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", *(f"/v2/models/{m}/ready" for m in BUILTIN_MODELS)):
        status, _, body = request(engine_server, "GET", path)
        assert status == 200, (path, body)
    status, _, body = request(engine_server, "GET", "/v2/models/no-such-model/ready")
    assert status == 404, body
    client = thttp.InferenceServerClient(engine_server.rest_address, network_timeout=TIMEOUT_S)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    finally:
        client.close()


# ---- errors --------------------------------------------------------------------------------------------


def _bad_requests() -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    row = np.zeros((1, 256), np.float32)
    fp64 = {"name": "INPUT0", "datatype": "FP64", "shape": [1, 256], "data": [0.0] * 256}
    short_shape = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 255], "data": [0.0] * 255}
    few_elements = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 256], "data": [0.0] * 200}
    binary, headers = binary_body({"INPUT0": row})
    # the binary part is 1000 bytes, the header says 1024 (shape [1, 256] of FP32)
    short_binary = binary[: int(headers[HEADER_LENGTH])] + b"\0" * 1000
    unknown, unknown_headers = binary_body({"INPUT0": row})
    mlp = "/v2/models/mlp/infer"
    return {
        "dtype": (mlp, orjson.dumps({"inputs": [fp64]}), {}, 400),
        "shape": (mlp, orjson.dumps({"inputs": [short_shape]}), {}, 400),
        "element_count": (mlp, orjson.dumps({"inputs": [few_elements]}), {}, 400),
        "byte_count": (mlp, short_binary, headers, 400),
        "unknown_model": ("/v2/models/no-such-model/infer", unknown, unknown_headers, 404),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests()))
def test_error_mapping(engine_server: ServerProcess, case: str) -> None:
    path, body, headers, expected = _bad_requests()[case]
    status, _, answer = request(engine_server, "POST", path, body, headers)
    assert status == expected, answer
    error_of(answer)


def test_deadline_exceeded(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    # A 1 us deadline (Triton's "timeout" parameter) travels with the request; the worker finds it
    # expired and answers without computing: 504.
    body, headers = binary_body(sample_inputs("mlp", 256, rng), parameters={"timeout": 1})
    status, _, answer = request(engine_server, "POST", "/v2/models/mlp/infer", body, headers)
    assert status == 504, answer
    assert "deadline" in error_of(answer).lower()
    # the same with the Timeout-Ms header (1 ms)
    body, headers = binary_body(sample_inputs("mlp", 256, rng))
    status, _, answer = request(
        engine_server, "POST", "/v2/models/mlp/infer", body, {**headers, "Timeout-Ms": "1"}
    )
    assert status in (200, 504), answer  # 1 ms may be enough on a fast machine: never another status


def test_body_over_the_size_limit(engine_server: ServerProcess) -> None:
    big = np.zeros((1, 9 * (1 << 20) // 4), np.float32)
    body, headers = binary_body({"INPUT0": big})
    status, _, answer = request(engine_server, "POST", "/v2/models/identity/infer", body, headers)
    assert status == 413, answer
    error_of(answer)
    small = {"INPUT0": np.ones((1, 5), np.float32)}
    status, headers, answer = request(engine_server, "POST", "/v2/models/identity/infer", json_body(small))
    assert status == 200, answer
    np.testing.assert_array_equal(decode_response(headers, answer)["OUTPUT0"], small["INPUT0"])


# ---- infer paths (the fast path in front of FastAPI) ---------------------------------------------------


def test_infer_versioned_and_encoded_paths(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    inputs = sample_inputs("mlp", 2, rng)
    want = reference_outputs("mlp", inputs)
    version = builtin_specs()["mlp"].version
    body, headers = binary_body(inputs)
    for path in (f"/v2/models/mlp/versions/{version}/infer", "/v2/models/ml%70/infer"):
        status, answer_headers, answer = request(engine_server, "POST", path, body, headers)
        assert status == 200, (path, answer)
        assert_outputs("mlp", decode_response(answer_headers, answer), want)
    status, _, answer = request(
        engine_server, "POST", f"/v2/models/mlp/versions/{version}0/infer", body, headers
    )
    assert status == 404, answer
    assert f"has no version '{version}0'" in error_of(answer)
    for method in ("PUT", "GET"):
        status, answer_headers, answer = request(engine_server, method, "/v2/models/mlp/infer")
        assert (status, answer_headers["allow"]) == (405, "POST"), answer
        error_of(answer)


def test_chunked_binary_body(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    inputs = sample_inputs("mlp", 3, rng)
    body, headers = binary_body(inputs)
    conn = http.client.HTTPConnection(engine_server.host, engine_server.ports["rest"], timeout=TIMEOUT_S)
    try:
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        conn.request("POST", "/v2/models/mlp/infer", body=iter(pieces), headers=headers, encode_chunked=True)
        response = conn.getresponse()
        answer = response.read()
        assert response.status == 200, answer
        outputs = decode_response({k.lower(): v for k, v in response.getheaders()}, answer)
    finally:
        conn.close()
    assert_outputs("mlp", outputs, reference_outputs("mlp", inputs))


# ---- concurrency ---------------------------------------------------------------------------------------


def _stats(server: ServerProcess, model: str) -> tuple[int, int]:
    status, _, body = request(server, "GET", f"/v2/models/{model}/stats")
    assert status == 200, body
    (stats,) = orjson.loads(body)["model_stats"]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_200_concurrent_requests(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    n = 200
    rows = sample_inputs("mlp", n, rng)["INPUT0"]
    want = reference_outputs("mlp", {"INPUT0": rows})["OUTPUT0"]
    inferences0, executions0 = _stats(engine_server, "mlp")
    start = threading.Barrier(n)

    def one(i: int) -> tuple[int, dict[str, np.ndarray]]:
        body, headers = binary_body({"INPUT0": rows[i : i + 1]})
        conn = http.client.HTTPConnection(engine_server.host, engine_server.ports["rest"], timeout=TIMEOUT_S)
        try:
            conn.connect()
            start.wait(TIMEOUT_S)  # every connection is open before any request goes out
            conn.request("POST", "/v2/models/mlp/infer", body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 200, answer
            return i, decode_response({k.lower(): v for k, v in response.getheaders()}, answer)
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    assert len(results) == n
    for i, outputs in results:
        assert_outputs("mlp", outputs, {"OUTPUT0": want[i : i + 1]})
    inferences, executions = _stats(engine_server, "mlp")
    assert inferences - inferences0 == n
    # dynamic batching: fewer model executions than requests
    assert 0 < executions - executions0 < n
