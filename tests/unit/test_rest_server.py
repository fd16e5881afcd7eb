"""The REST front-end over real HTTP: `servers.rest_server.serve` on an ephemeral port with a FakeGateway.

Each server runs in its own thread and uvloop event loop; the tests talk to it with tritonclient.http
and with raw http.client requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
import uvloop
from starlette.requests import ClientDisconnect
from tritonclient.utils import InferenceServerException

from engine.errors import InternalError, InvalidArgument, ResourceExhausted, Unavailable
from servers import observer as observer_module
from servers.gateway_api import FrontendSettings, InferInput
from servers.observer import RequestObserver
from servers.rest_fastpath import PayloadTooLarge, deadline, match_infer_path, read_body
from servers.rest_server import serve
from tests.fakes import SPECS, FakeGateway, FakeResult

WAIT_S = 10.0
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


class RestServer:
    """`serve` in a background thread; a context manager that always stops and joins it."""

    def __init__(self, gateway: Any, settings: FrontendSettings | None = None) -> None:
        self.gateway = gateway
        self.settings = settings or FrontendSettings()
        self.port = 0
        self.error: BaseException | None = None
        self._bound = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="rest-server", daemon=True)

    def __enter__(self) -> RestServer:
        self._thread.start()
        assert self._bound.wait(WAIT_S), "REST server did not bind"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between, so the server is gone already.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "REST server did not stop"
        assert self.error is None, f"serve() failed: {self.error!r}"

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.gateway, self.settings, self._on_bound, self._stop)

        try:
            uvloop.run(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._bound.set()

    def _on_bound(self, port: int) -> None:
        self.port = port
        self._bound.set()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            if own:
                conn.close()

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(url=f"127.0.0.1:{self.port}", network_timeout=WAIT_S)


class ScriptedGateway(FakeGateway):
    """FakeGateway that can fail on demand, records every result and signals requests in flight."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.raise_next: BaseException | None = None
        self.results: list[FakeResult] = []
        self.entered = threading.Event()

    async def infer(self, model: str, inputs: Any, **kwargs: Any) -> FakeResult:
        self.entered.set()
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        result = await super().infer(model, inputs, **kwargs)
        self.results.append(result)
        return result


@pytest.fixture(autouse=True)
def _collect_on_main_thread() -> Iterator[None]:
    """tritonclient's clients hold gevent objects in reference cycles, and gevent objects must be
    finalised on the thread that made them. With automatic collection on, the server thread may
    run the collection that finalises a dropped client, so collect here, on the main thread."""
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.enable()


@pytest.fixture(scope="module")
def server() -> Iterator[RestServer]:
    with RestServer(ScriptedGateway()) as running:
        yield running


@pytest.fixture
def gateway(server: RestServer) -> Iterator[ScriptedGateway]:
    gw: ScriptedGateway = server.gateway
    yield gw
    gw.ready = True
    gw.raise_next = None


def _infer_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def _simple_json(a: np.ndarray = A, b: np.ndarray = B, **extra: Any) -> bytes:
    return _infer_body(
        [
            {"name": "INPUT0", "datatype": "INT32", "shape": list(a.shape), "data": a.tolist()},
            {"name": "INPUT1", "datatype": "INT32", "shape": list(b.shape), "data": b.ravel().tolist()},
        ],
        **extra,
    )


def _binary_tensor(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def _error(body: bytes) -> str:
    doc = orjson.loads(body)
    assert set(doc) == {"error"}, doc
    assert isinstance(doc["error"], str)
    return doc["error"]


# ---- tritonclient --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True, None])
def test_tritonclient_simple(server: RestServer, binary_in: bool, binary_out: bool | None) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 7, dtype=np.int32)
    inputs = [triton.InferInput("INPUT0", [2, 16], "INT32"), triton.InferInput("INPUT1", [2, 16], "INT32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary_in)
    inputs[1].set_data_from_numpy(b, binary_data=binary_in)
    outputs = None
    if binary_out is not None:  # None: ask for nothing, tritonclient then wants binary outputs
        outputs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
    client = server.client()
    try:
        result = client.infer("simple", inputs, outputs=outputs, request_id="req-1")
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-1"
    assert response["model_name"] == "simple"


def test_tritonclient_identity_one_output_mixed(server: RestServer) -> None:
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)
    item = triton.InferInput("INPUT0", [3, 5], "FP32")
    item.set_data_from_numpy(x, binary_data=True)
    client = server.client()
    try:
        result = client.infer(
            "identity", [item], outputs=[triton.InferRequestedOutput("OUTPUT0", binary_data=False)]
        )
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def test_tritonclient_metadata_routes(server: RestServer) -> None:
    client = server.client()
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("simple")
        assert client.is_model_ready("simple", model_version="1")
        assert not client.is_model_ready("nope")
        metadata = client.get_server_metadata()
        assert metadata["name"] == "shm-inference-engine"
        assert "binary_tensor_data" in metadata["extensions"]
        model = client.get_model_metadata("simple")
        assert model["inputs"][0]["shape"] == [-1, 16]
        config = client.get_model_config("simple")
        assert config["max_batch_size"] == 8
        assert config["input"][0] == {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]}
        index = client.get_model_repository_index()
        assert {e["name"] for e in index} == {"simple", "identity", "fail"}
        stats = client.get_inference_statistics("simple")
        assert stats["model_stats"][0]["name"] == "simple"
        assert len(client.get_inference_statistics()["model_stats"]) == 3
    finally:
        client.close()


def test_tritonclient_sees_errors(server: RestServer) -> None:
    item = triton.InferInput("INPUT0", [1, 16], "INT32")
    item.set_data_from_numpy(A)
    client = server.client()
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", [item])  # INPUT1 missing
        assert info.value.status() == "400"
        assert "INPUT1" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("nope", [item])
        assert info.value.status() == "404"
    finally:
        client.close()


# ---- routes --------------------------------------------------------------------------------------


def test_server_and_health_routes(server: RestServer, gateway: ScriptedGateway) -> None:
    status, headers, body = server.request("GET", "/v2")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["name"] == "shm-inference-engine"
    assert server.request("GET", "/v2/health/live")[:3:2] == (200, b'{"live":true}')
    assert server.request("GET", "/v2/health/ready")[0] == 200
    gateway.ready = False
    status, _, body = server.request("GET", "/v2/health/ready")
    assert status == 503
    assert orjson.loads(body)["ready"] is False
    status, _, body = server.request("GET", "/v2/models/simple/ready")
    assert status == 503
    assert "not ready" in _error(body)


@pytest.mark.parametrize("prefix", ["/v2/models/simple", "/v2/models/simple/versions/1"])
def test_model_routes(server: RestServer, prefix: str) -> None:
    status, _, body = server.request("GET", prefix)
    assert status == 200
    doc = orjson.loads(body)
    assert doc["name"] == "simple"
    assert doc["versions"] == ["1"]
    assert doc["outputs"] == [
        {"name": "OUTPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "OUTPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    status, _, body = server.request("GET", f"{prefix}/ready")
    assert (status, orjson.loads(body)) == (200, {"name": "simple", "ready": True})
    status, _, body = server.request("GET", f"{prefix}/config")
    assert status == 200
    assert orjson.loads(body)["output"][1] == {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [16]}
    status, _, body = server.request("GET", f"{prefix}/stats")
    assert status == 200
    assert [s["name"] for s in orjson.loads(body)["model_stats"]] == ["simple"]
    status, _, body = server.request("POST", f"{prefix}/infer", _simple_json())
    assert status == 200
    assert orjson.loads(body)["outputs"][0]["data"] == (A + B).ravel().tolist()


def test_unbatched_metadata_and_all_stats(server: RestServer) -> None:
    status, _, body = server.request("GET", "/v2/models/stats")
    assert status == 200
    assert {s["name"] for s in orjson.loads(body)["model_stats"]} == {"simple", "identity", "fail"}


def test_repository_index(server: RestServer, gateway: ScriptedGateway) -> None:
    status, _, body = server.request("POST", "/v2/repository/index")
    assert status == 200
    assert {e["name"]: e["state"] for e in orjson.loads(body)} == {
        "simple": "READY",
        "identity": "READY",
        "fail": "READY",
    }
    gateway.ready = False
    status, _, body = server.request("POST", "/v2/repository/index", b'{"ready": true}')
    assert (status, orjson.loads(body)) == (200, [])
    status, _, body = server.request("POST", "/v2/repository/index", b'{"ready": 1}')
    assert status == 400
    assert "ready" in _error(body)
    status, _, body = server.request("POST", "/v2/repository/index", b"{nope")
    assert status == 400
    assert "malformed JSON" in _error(body)


def test_metrics_and_docs(server: RestServer) -> None:
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE engine_up gauge" in body.decode()
    assert "\nengine_up 1\n" in body.decode()
    assert server.request("GET", "/docs")[0] == 200
    status, _, body = server.request("GET", "/openapi.json")
    assert status == 200
    assert "/v2/models/{name}/infer" in orjson.loads(body)["paths"]


def test_unknown_route_and_method(server: RestServer) -> None:
    status, _, body = server.request("GET", "/v3/nothing")
    assert status == 404
    _error(body)
    status, _, body = server.request("GET", "/v2/models/simple/infer")
    assert status == 405
    _error(body)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/config",
        "/v2/models/nope/stats",
        "/v2/models/simple/versions/2",
        "/v2/models/simple/versions/2/config",
    ],
)
def test_unknown_model_or_version(server: RestServer, path: str) -> None:
    status, _, body = server.request("GET", path)
    assert status == 404
    assert "nope" in _error(body) or "version" in _error(body)


# ---- infer: errors -------------------------------------------------------------------------------

_ROW = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
_ROW1 = {**_ROW, "name": "INPUT1"}

INFER_ERRORS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed_json", "simple", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not_object", "simple", b"[]", {}, 400, "JSON object"),
    ("wrong_types", "simple", _infer_body([{**_ROW, "shape": "1x16"}, _ROW1]), {}, 400, "shape"),
    ("string_data", "simple", _infer_body([{**_ROW, "data": ["a"] * 16}, _ROW1]), {}, 400, "INT32"),
    ("negative_dims", "simple", _infer_body([{**_ROW, "shape": [-1, 16]}, _ROW1]), {}, 400, "negative"),
    (
        "overflow_shape",
        "simple",
        _infer_body([{**_ROW, "shape": [2**40, 2**40, 2**40]}, _ROW1]),
        {},
        400,
        "elements",
    ),
    ("count_mismatch", "simple", _infer_body([{**_ROW, "shape": [2, 16]}, _ROW1]), {}, 400, "elements"),
    ("model_shape", "simple", _infer_body([{**_ROW, "shape": [4, 4]}, _ROW1]), {}, 400, "does not match"),
    ("model_dtype", "simple", _infer_body([{**_ROW, "datatype": "INT64"}, _ROW1]), {}, 400, "datatype"),
    ("bytes", "simple", _infer_body([{**_ROW, "datatype": "BYTES"}, _ROW1]), {}, 400, "BYTES"),
    ("missing_input", "simple", _infer_body([_ROW]), {}, 400, "INPUT1"),
    ("unknown_input", "simple", _infer_body([_ROW, _ROW1, {**_ROW, "name": "X"}]), {}, 400, "'X'"),
    ("unknown_output", "simple", _simple_json(outputs=[{"name": "OUT9"}]), {}, 400, "OUT9"),
    ("bad_timeout", "simple", _simple_json(), {"Timeout-Ms": "soon"}, 400, "Timeout-Ms"),
    (
        "binary_size_vs_shape",
        "simple",
        _infer_body([{**_ROW, "data": None, "parameters": {"binary_data_size": 60}}, _ROW1]) + b"\0" * 60,
        {"Inference-Header-Content-Length": "PLACEHOLDER"},
        400,
        "binary_data_size",
    ),
    (
        "binary_trailing",
        "simple",
        _simple_json() + b"\0" * 8,
        {"Inference-Header-Content-Length": "PLACEHOLDER"},
        400,
        "after the binary inputs",
    ),
    (
        "header_length_too_big",
        "simple",
        _simple_json(),
        {"Inference-Header-Content-Length": "100000"},
        400,
        "Inference-Header-Content-Length",
    ),
    ("unknown_model", "nope", _simple_json(), {}, 404, "nope"),
    ("model_error", "fail", _infer_body([{**_ROW, "datatype": "FP32"}]), {}, 500, "always fails"),
]


def _fix_header_length(body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """Point a PLACEHOLDER header length at the end of the JSON part of ``body``."""
    if headers.get("Inference-Header-Content-Length") != "PLACEHOLDER":
        return headers
    json_end = body.rindex(b"}") + 1
    return {**headers, "Inference-Header-Content-Length": str(json_end)}


@pytest.mark.parametrize(
    ("case", "model", "body", "headers", "status", "message"),
    INFER_ERRORS,
    ids=[c[0] for c in INFER_ERRORS],
)
def test_infer_errors(
    server: RestServer, case: str, model: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, response_headers, content = server.request(
        "POST", f"/v2/models/{model}/infer", body, _fix_header_length(body, headers)
    )
    assert got == status, content
    assert response_headers["content-type"] == "application/json"
    assert message in _error(content)


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (ResourceExhausted("queue of 'simple' is full"), 429, "queue of 'simple' is full"),
        (Unavailable("breaker open"), 503, "breaker open"),
        (InternalError("segment offset 99 out of range"), 500, "internal error"),
        (RuntimeError("a bug"), 500, "internal error"),
    ],
)
def test_gateway_failures_map_to_status(
    server: RestServer, gateway: ScriptedGateway, exc: BaseException, status: int, message: str
) -> None:
    gateway.raise_next = exc
    got, headers, body = server.request("POST", "/v2/models/simple/infer", _simple_json())
    assert got == status
    assert _error(body) == message
    if status == 429:
        assert headers["Retry-After"] == "1"
    assert b"a bug" not in body and b"offset 99" not in body  # server faults stay in the logs


def test_results_are_released(server: RestServer, gateway: ScriptedGateway) -> None:
    before = len(gateway.results)
    for binary in (False, True):
        assert (
            server.request(
                "POST", "/v2/models/simple/infer", _simple_json(parameters={"binary_data_output": binary})
            )[0]
            == 200
        )
    assert len(gateway.results) == before + 2
    assert all(result.released for result in gateway.results)


def test_good_request_after_bad_ones_on_one_connection(server: RestServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    try:
        for _, model, body, headers, status, _ in INFER_ERRORS:
            got = server.request(
                "POST", f"/v2/models/{model}/infer", body, _fix_header_length(body, headers), conn
            )
            assert got[0] == status
        status, _, body = server.request("POST", "/v2/models/simple/infer", _simple_json(), conn=conn)
        assert status == 200
        outputs = {o["name"]: o["data"] for o in orjson.loads(body)["outputs"]}
        assert outputs == {"OUTPUT0": (A + B).ravel().tolist(), "OUTPUT1": (A - B).ravel().tolist()}
    finally:
        conn.close()


def test_raw_binary_request_and_response(server: RestServer) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                _binary_tensor("INPUT0", "INT32", [1, 16], 64),
                _binary_tensor("INPUT1", "INT32", [1, 16], 64),
            ],
            "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
        }
    )
    status, headers, body = server.request(
        "POST",
        "/v2/models/simple/infer",
        header + A.tobytes() + B.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:length])
    assert doc["outputs"] == [_binary_tensor("OUTPUT1", "INT32", [1, 16], 64)]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.int32).reshape(1, 16), A - B)


# ---- settings: limits, deadlines, auth, lifecycle -------------------------------------------------


def test_oversize_body_is_413() -> None:
    with RestServer(ScriptedGateway(), FrontendSettings(max_message_bytes=4096)) as small:
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=WAIT_S)
        try:
            status, _, body = small.request("POST", "/v2/models/identity/infer", b" " * 8192, conn=conn)
            assert status == 413
            assert "max_message_bytes" in _error(body)
            # Chunked, so the size is only known while reading.
            conn.request(
                "POST", "/v2/models/identity/infer", body=iter([b" " * 3000] * 3), encode_chunked=True
            )
            response = conn.getresponse()
            assert response.status == 413
            _error(response.read())
            # The same connection still serves.
            assert small.request("POST", "/v2/models/simple/infer", _simple_json(), conn=conn)[0] == 200
        finally:
            conn.close()

        # Fits as a request, but the JSON answer would not.
        x = np.random.default_rng(7).standard_normal(700).astype(np.float32)
        request = _infer_body([_binary_tensor("INPUT0", "FP32", [1, 700], x.nbytes)])
        status, _, body = small.request(
            "POST",
            "/v2/models/identity/infer",
            request + x.tobytes(),
            {"Inference-Header-Content-Length": str(len(request))},
        )
        assert status == 400
        assert "max_message_bytes" in _error(body)
        assert all(result.released for result in small.gateway.results)

        assert small.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 200


def test_deadline_is_504() -> None:
    with RestServer(ScriptedGateway(delay_s=0.2)) as slow:
        status, _, body = slow.request(
            "POST", "/v2/models/simple/infer", _simple_json(), {"Timeout-Ms": "50"}
        )
        assert status == 504
        assert "deadline" in _error(body)
        # tritonclient's timeout parameter, in microseconds
        status, _, body = slow.request(
            "POST", "/v2/models/simple/infer", _simple_json(parameters={"timeout": 50_000})
        )
        assert status == 504
        assert slow.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 200


def test_auth() -> None:
    settings = FrontendSettings(auth_tokens=("s3cret", "other"))
    with RestServer(ScriptedGateway(), settings) as guarded:
        assert guarded.request("GET", "/v2/health/live")[0] == 200
        assert guarded.request("GET", "/v2/health/ready")[0] == 200
        for path in ("/v2", "/v2/models/simple", "/metrics", "/docs"):
            status, headers, body = guarded.request("GET", path)
            assert status == 401
            assert headers["WWW-Authenticate"] == "Bearer"
            _error(body)
        for value in ("Bearer wrong", "Basic s3cret", "s3cret", "Bearer ", "Bearer s3cret2"):
            assert guarded.request("GET", "/v2", headers={"Authorization": value})[0] == 401
        assert guarded.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 401
        for token in ("s3cret", "other"):
            ok = {"Authorization": f"Bearer {token}"}
            assert guarded.request("GET", "/v2", headers=ok)[0] == 200
            assert guarded.request("GET", "/metrics", headers={"authorization": f"bearer {token}"})[0] == 200
            assert guarded.request("POST", "/v2/models/simple/infer", _simple_json(), ok)[0] == 200

        item = triton.InferInput("INPUT0", [1, 16], "INT32")
        item.set_data_from_numpy(A)
        other = triton.InferInput("INPUT1", [1, 16], "INT32")
        other.set_data_from_numpy(B)
        client = guarded.client()
        try:
            result = client.infer("simple", [item, other], headers={"Authorization": "Bearer s3cret"})
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", [item, other])
            assert info.value.status() == "401"
        finally:
            client.close()


def test_auth_off_accepts_any_header(server: RestServer) -> None:
    assert server.request("GET", "/v2", headers={"Authorization": "Bearer anything"})[0] == 200


def test_stop_lets_the_request_in_flight_finish() -> None:
    gateway = ScriptedGateway(delay_s=0.3)
    running = RestServer(gateway)
    with running:
        outcome: dict[str, Any] = {}

        def call() -> None:
            outcome["response"] = running.request("POST", "/v2/models/simple/infer", _simple_json())

        caller = threading.Thread(target=call)
        caller.start()
        assert gateway.entered.wait(WAIT_S)
        running.stop()  # returns once serve() has finished
        caller.join(WAIT_S)
    status, _, body = outcome["response"]
    assert status == 200
    assert orjson.loads(body)["outputs"][0]["data"] == (A + B).ravel().tolist()


def test_reuse_port_shares_the_port() -> None:
    with RestServer(ScriptedGateway(), FrontendSettings(reuse_port=True)) as first:
        second = RestServer(ScriptedGateway(), FrontendSettings(port=first.port, reuse_port=True))
        with second:
            assert second.port == first.port
            assert second.request("GET", "/v2/health/live")[0] == 200


def test_port_in_use_fails_cleanly() -> None:
    with RestServer(ScriptedGateway()) as first:
        taken = RestServer(ScriptedGateway(), FrontendSettings(port=first.port))
        with pytest.raises(OSError):
            taken.__enter__()
        taken.error = None
        taken.stop()


def test_infer_input_types_reach_gateway(server: RestServer, gateway: ScriptedGateway) -> None:
    """JSON inputs arrive as numpy arrays, binary inputs as views of the body (no copies)."""
    seen: list[list[InferInput]] = []
    original = FakeGateway.infer

    async def spy(self: ScriptedGateway, model: str, inputs: Any, **kwargs: Any) -> FakeResult:
        seen.append(list(inputs))
        return await original(self, model, inputs, **kwargs)

    gateway.infer = spy.__get__(gateway)  # type: ignore[method-assign]
    try:
        header = orjson.dumps(
            {
                "inputs": [
                    _binary_tensor("INPUT0", "INT32", [1, 16], 64),
                    _ROW1,
                ]
            }
        )
        status, _, _ = server.request(
            "POST",
            "/v2/models/simple/infer",
            header + A.tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
    finally:
        del gateway.infer
    assert status == 200
    (inputs,) = seen
    assert isinstance(inputs[0].data, memoryview)
    assert isinstance(inputs[1].data, np.ndarray)
    assert inputs[1].data.dtype == np.int32


# ---- the /infer fast path (servers.rest_fastpath) --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/simple/infer", ("simple", None)),
        ("/v2/models/simple/versions/1/infer", ("simple", "1")),
        ("/v2/models/si mple/infer", ("si mple", None)),
        ("/v2/models/stats/infer", ("stats", None)),
        ("/v2/models/versions/infer", ("versions", None)),
        ("/v2/models/infer", None),
        ("/v2/models//infer", None),
        ("/v2/models/a/b/infer", None),
        ("/v2/models/simple/versions//infer", None),
        ("/v2/models//versions/1/infer", None),
        ("/v2/models/x/versions/infer", None),
        ("/v2/models/x/version/1/infer", None),
        ("/v2/models/x/versions/1/2/infer", None),
        ("/v2/models/simple/infer/", None),
        ("/v2/models/simple/infer\n", None),
        ("//v2/models/simple/infer", None),
        ("/v2/models/simple", None),
        ("/v2/health/live", None),
    ],
)
def test_match_infer_path(path: str, expected: tuple[str, str | None] | None) -> None:
    assert match_infer_path(path) == expected


def _receiver(*messages: dict[str, Any]) -> Any:
    """An ASGI ``receive`` that hands out ``messages`` in order and counts the calls."""
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        receive.calls += 1  # type: ignore[attr-defined]
        return pending.pop(0)

    receive.calls = 0  # type: ignore[attr-defined]
    return receive


def _chunk(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_read_body_joins_chunks_and_keeps_a_single_chunk_uncopied() -> None:
    one = b"x" * 100
    assert asyncio.run(read_body(_receiver(_chunk(one)), "100", 100)) is one
    chunks = _receiver(_chunk(b"ab", True), _chunk(b"", True), _chunk(b"cd", True), _chunk(b""))
    assert asyncio.run(read_body(chunks, None, 4)) == b"abcd"
    assert asyncio.run(read_body(_receiver(_chunk(b"")), "0", 0)) == b""


def test_read_body_limits() -> None:
    declared = _receiver(_chunk(b"x" * 11))
    with pytest.raises(PayloadTooLarge, match=r"11\+ bytes is over max_message_bytes=10") as info:
        asyncio.run(read_body(declared, "11", 10))
    assert info.value.http_status == 413
    assert declared.calls == 0  # refused before reading
    chunked = _receiver(_chunk(b"x" * 6, True), _chunk(b"x" * 6, True), _chunk(b"x" * 6))
    with pytest.raises(PayloadTooLarge, match=r"12\+ bytes"):
        asyncio.run(read_body(chunked, None, 10))
    assert chunked.calls == 2  # stops reading once over
    with pytest.raises(InvalidArgument, match="bad Content-Length"):
        asyncio.run(read_body(_receiver(_chunk(b"")), "12x", 10))


def test_read_body_client_disconnect() -> None:
    gone = _receiver(_chunk(b"ab", True), {"type": "http.disconnect"})
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(gone, "10", 100))


def test_deadline_earlier_of_header_and_parameter() -> None:
    assert deadline(1_000, None, None) is None
    assert deadline(1_000, "0", None) is None
    assert deadline(1_000, " 5 ", None) == 1_000 + 5_000_000
    assert deadline(1_000, None, 7) == 1_000 + 7_000
    assert deadline(1_000, "5", 7) == 1_000 + 7_000
    assert deadline(1_000, "1", 7_000_000) == 1_000 + 1_000_000
    for bad in ("soon", "-1", "1.5", "\u0661"):  # an Arabic-Indic one: a digit, not ASCII
        with pytest.raises(InvalidArgument, match="Timeout-Ms"):
            deadline(0, bad, None)


#: (method, path, status, part of the error message or None): what the server answered before the fast
#: path existed (FastAPI routing on the percent-decoded path), and must still answer.
INFER_PATHS: list[tuple[str, str, int, str | None]] = [
    ("POST", "/v2/models/simple/versions/1/infer", 200, None),
    ("POST", "/v2/models/sim%70le/infer", 200, None),
    ("POST", "/v2/models/sim%70le/versions/%31/infer", 200, None),
    ("POST", "/v2/models/simple/infer?x=1", 200, None),
    ("POST", "/v2/models/simple/infer%0A", 200, None),  # FastAPI's "$" matches before a final newline
    ("POST", "/v2/models/simple/versions/2/infer", 404, "model 'simple' has no version '2'; versions: 1"),
    ("POST", "/v2/models/nope/versions/1/infer", 404, "unknown model 'nope'"),
    ("POST", "/v2/models/si%20mple/infer", 404, "unknown model 'si mple'"),
    ("POST", "/v2/models/stats/infer", 404, "unknown model 'stats'"),
    ("POST", "/v2/models/a%2Fb/infer", 404, "Not Found"),
    ("POST", "/v2/models//infer", 404, "Not Found"),
    ("POST", "/v2/models/simple/versions//infer", 404, "Not Found"),
    ("POST", "//v2/models/simple/infer", 404, "Not Found"),
    ("POST", "/v2/models/infer", 405, "Method Not Allowed"),
    ("POST", "/v2/models/x/versions/infer", 405, "Method Not Allowed"),
    ("PUT", "/v2/models/simple/infer", 405, "Method Not Allowed"),
    ("DELETE", "/v2/models/simple/versions/1/infer", 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "status", "message"), INFER_PATHS)
def test_infer_paths_answer_as_before(
    server: RestServer, method: str, path: str, status: int, message: str | None
) -> None:
    got, headers, body = server.request(method, path, _simple_json())
    assert got == status, body
    assert headers["content-type"] == "application/json"
    if message is None:
        assert orjson.loads(body)["outputs"][0]["data"] == (A + B).ravel().tolist()
    else:
        assert message in _error(body)
    if status == 405:
        assert headers["Allow"] in ("POST", "GET")


def test_infer_trailing_slash_redirects_as_before(server: RestServer) -> None:
    for path in ("/v2/models/simple/infer/", "/v2/models/simple/versions/1/infer/"):
        status, headers, body = server.request("POST", path, _simple_json())
        assert (status, body) == (307, b"")
        assert headers["location"] == f"http://127.0.0.1:{server.port}{path[:-1]}"


def test_infer_response_headers_are_exact(server: RestServer, gateway: ScriptedGateway) -> None:
    """The fast path sends the headers Starlette's Response sent, in its order (uvicorn adds date)."""

    def names(headers: http.client.HTTPMessage) -> list[str]:
        return [name.lower() for name in headers.keys()]  # noqa: SIM118 (an HTTPMessage keeps duplicates)

    status, headers, body = server.request("POST", "/v2/models/simple/infer", _simple_json())
    assert status == 200
    assert names(headers) == ["date", "content-length", "content-type"]
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"] == "application/json"

    status, headers, body = server.request(
        "POST", "/v2/models/simple/infer", _simple_json(parameters={"binary_data_output": True})
    )
    assert status == 200
    assert names(headers) == ["date", "inference-header-content-length", "content-length", "content-type"]
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    assert [o["parameters"]["binary_data_size"] for o in orjson.loads(body[:length])["outputs"]] == [64, 64]
    assert len(body) == length + 128

    status, headers, body = server.request("POST", "/v2/models/simple/infer", b"{")
    assert status == 400
    assert names(headers) == ["date", "content-length", "content-type"]
    assert headers["content-length"] == str(len(body))

    gateway.raise_next = ResourceExhausted("full")
    status, headers, body = server.request("POST", "/v2/models/simple/infer", _simple_json())
    assert (status, _error(body)) == (429, "full")
    assert names(headers) == ["date", "retry-after", "content-length", "content-type"]


def test_chunked_bodies() -> None:
    with RestServer(ScriptedGateway(), FrontendSettings(max_message_bytes=4096)) as small:
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=WAIT_S)
        try:
            body = _simple_json()
            pieces = [body[i : i + 100] for i in range(0, len(body), 100)]
            for path in ("/v2/models/simple/infer", "/v2/models/simple/versions/1/infer"):
                conn.request("POST", path, body=iter(pieces), encode_chunked=True)
                response = conn.getresponse()
                answer = response.read()
                assert response.status == 200, answer
                assert orjson.loads(answer)["outputs"][1]["data"] == (A - B).ravel().tolist()
            # over the limit on the versioned path: 413, and the connection still serves
            conn.request(
                "POST",
                "/v2/models/simple/versions/1/infer",
                body=iter([b" " * 3000] * 3),
                encode_chunked=True,
            )
            response = conn.getresponse()
            assert response.status == 413
            # counted as the chunks arrive (uvicorn may hand over several at once)
            assert re.fullmatch(
                r"request body of [69]000\+ bytes is over max_message_bytes=4096", _error(response.read())
            )
            assert small.request("POST", "/v2/models/simple/infer", _simple_json(), conn=conn)[0] == 200
        finally:
            conn.close()


def test_auth_guards_every_infer_path() -> None:
    settings = FrontendSettings(auth_tokens=("s3cret",))
    with RestServer(ScriptedGateway(), settings) as guarded:
        ok = {"Authorization": "Bearer s3cret"}
        for path in (
            "/v2/models/simple/infer",
            "/v2/models/simple/versions/1/infer",
            "/v2/models/nope/infer",
        ):
            status, headers, body = guarded.request("POST", path, _simple_json())
            assert status == 401
            assert headers["WWW-Authenticate"] == "Bearer"
            assert "bearer token" in _error(body)
            assert guarded.request("POST", path, b"{", {"Authorization": "Bearer wrong"})[0] == 401
        assert guarded.request("POST", "/v2/models/simple/versions/1/infer", _simple_json(), ok)[0] == 200
        assert guarded.request("POST", "/v2/models/nope/infer", _simple_json(), ok)[0] == 404
        assert guarded.request("GET", "/v2/models/simple/infer", None, ok)[0] == 405
        assert guarded.gateway.calls["simple"] == 1


class RecordingMetrics:
    """Stands in for `engine.metrics.RequestMetrics`: keeps every answered request's (model, code)."""

    def __init__(self) -> None:
        self.begun: list[str] = []
        self.ended: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def begin(self, model: str) -> None:
        self.begun.append(model)

    def end(self, model: str, code: str, seconds: float) -> None:
        with self.changed:
            self.ended.append((model, code))
            self.changed.notify_all()

    def record(self, model: str, code: str) -> None:
        raise AssertionError("the REST front-end announces every request with begin")

    def flush(self) -> None:
        pass

    def wait_for(self, count: int) -> list[tuple[str, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ended) >= count, WAIT_S), self.ended
            return list(self.ended)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingMetrics:
    """This process's REST observer, counting into a `RecordingMetrics` (for servers started after)."""
    metrics = RecordingMetrics()
    observer = RequestObserver("rest", SPECS, metrics)  # type: ignore[arg-type]
    monkeypatch.setattr(observer_module, "_observer", observer)
    return metrics


def test_observer_counts_every_answer(recorded: RecordingMetrics) -> None:
    gateway = ScriptedGateway()
    with RestServer(gateway, FrontendSettings(max_message_bytes=4096)) as running:
        assert running.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 200
        assert running.request("POST", "/v2/models/simple/versions/1/infer", b"[]")[0] == 400
        assert running.request("POST", "/v2/models/simple/versions/9/infer", _simple_json())[0] == 404
        assert running.request("POST", "/v2/models/nope/infer", _simple_json())[0] == 404
        assert running.request("POST", "/v2/models/identity/infer", b" " * 5000)[0] == 413
        gateway.raise_next = RuntimeError("a bug")
        assert running.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 500
        assert running.request("POST", "/v2/models/simple/infer%0A", _simple_json())[0] == 200  # via FastAPI
        assert running.request("GET", "/v2/models/simple", None)[0] == 200  # not an inference
    assert recorded.wait_for(7) == [
        ("simple", "OK"),
        ("simple", "INVALID_ARGUMENT"),
        ("simple", "NOT_FOUND"),
        ("_unknown_", "NOT_FOUND"),
        ("identity", "INVALID_ARGUMENT"),
        ("simple", "INTERNAL"),
        ("simple", "OK"),
    ]
    assert recorded.begun == ["simple", "simple", "simple", "_unknown_", "identity", "simple", "simple"]


def test_client_disconnect_mid_body_is_cancelled(recorded: RecordingMetrics) -> None:
    with RestServer(ScriptedGateway()) as running:
        head = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n"
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT_S) as sock:
            sock.sendall(head + b'{"inputs": [')
            with recorded.changed:  # the request has begun before the client goes away
                assert recorded.changed.wait_for(lambda: bool(recorded.begun), WAIT_S)
        assert recorded.wait_for(1) == [("simple", "CANCELLED")]
        assert running.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 200
    assert recorded.wait_for(2)[1] == ("simple", "OK")
    assert running.gateway.calls["simple"] == 1


def test_server_faults_are_logged(
    server: RestServer, gateway: ScriptedGateway, caplog: pytest.LogCaptureFixture
) -> None:
    fail = _infer_body([{**_ROW, "datatype": "FP32"}])
    with caplog.at_level(logging.DEBUG, logger="servers.rest_server"):
        gateway.raise_next = RuntimeError("a bug")
        assert server.request("POST", "/v2/models/simple/versions/1/infer", _simple_json())[0] == 500
        gateway.raise_next = InternalError("segment offset 99 out of range")
        assert server.request("POST", "/v2/models/simple/infer", _simple_json())[0] == 500
        assert server.request("POST", "/v2/models/fail/infer", fail)[0] == 500
        assert server.request("POST", "/v2/models/simple/infer", b"{")[0] == 400
    records = [
        (r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "servers.rest_server"
    ]
    assert len(records) == 4, records
    level, message, exc_info = records[0]
    assert (level, message) == (
        logging.ERROR,
        "frontend rest#0: POST /v2/models/simple/versions/1/infer failed",
    )
    assert exc_info is not None and isinstance(exc_info[1], RuntimeError)  # with its traceback
    level, message, _ = records[1]
    assert (level, message) == (
        logging.ERROR,
        "frontend rest#0: POST /v2/models/simple/infer: segment offset 99 out of range",
    )
    level, message, _ = records[2]
    assert level == logging.WARNING
    assert message.startswith("frontend rest#0: POST /v2/models/fail/infer: ") and "always fails" in message
    level, message, _ = records[3]
    assert level == logging.DEBUG
    assert message.startswith("frontend rest#0: POST /v2/models/simple/infer: malformed JSON")
