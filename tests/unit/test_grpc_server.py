"""The gRPC front-end against `tests.fakes.FakeGateway`, through real tritonclient clients (sync and aio).

Each server runs `servers.grpc_server.serve` on uvloop in a background thread on an ephemeral port; the
clients run in the test's thread. Fixtures stop the server (and join its thread) even when a test fails.
Every test runs once per gRPC transport: grpc.aio (``grpcio``) and `servers.grpc_h2` (``h2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from engine.errors import InvalidArgument
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers import grpc_handlers, grpc_server
from servers.gateway_api import FrontendSettings, InferInput
from servers.grpc_h2_call import Abort
from servers.grpc_handlers import Malformed
from servers.grpc_health import HealthServicer
from servers.grpc_infer_wire import parse_infer_request
from servers.grpc_messages import (
    TENSOR_FIELDS_MAX,
    ModelCache,
    encode_infer_response,
    statistics_message,
    typed_contents,
)
from tests.fakes import SPECS, FakeGateway, FakeResult

TIMEOUT_S = 30.0


class RunningServer:
    """`serve` on its own uvloop loop in a thread; `close()` sets `stop` and joins."""

    def __init__(self, gateway: Any, settings: FrontendSettings) -> None:
        self.gateway = gateway
        self.port = 0
        self.error: BaseException | None = None
        self._bound = threading.Event()
        self._loop = uvloop.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, args=(settings,), name="grpc-test-server")
        self._thread.start()
        if not self._bound.wait(TIMEOUT_S):
            self.close()
            raise TimeoutError("the gRPC server did not report its port")
        if self.error is not None:
            self.close()
            raise self.error

    def _on_bound(self, port: int) -> None:
        self.port = port
        self._bound.set()

    def _run(self, settings: FrontendSettings) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            await grpc_server.serve(self.gateway, settings, self._on_bound, self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._loop.close()
            self._bound.set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        stop = self._stop
        if stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: serve() has returned
                self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(TIMEOUT_S)
        assert not self._thread.is_alive(), "serve() did not return after stop was set"


#: the gRPC transport the servers of the current module parameter run on (see `transport`)
_transport = {"name": "h2"}


@pytest.fixture(scope="module", params=["grpcio", "h2"], autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs on both gRPC transports (``grpc_transport``)."""
    _transport["name"] = request.param
    yield request.param


@contextmanager
def running(gateway: Any = None, **settings: Any) -> Iterator[RunningServer]:
    settings.setdefault("grpc_transport", _transport["name"])
    server = RunningServer(gateway or FakeGateway(), FrontendSettings(**settings))
    try:
        yield server
    finally:
        server.close()
    assert server.error is None


@pytest.fixture(scope="module")
def server(transport: str) -> Iterator[RunningServer]:
    with running() as srv:
        yield srv


@pytest.fixture
def client(server: RunningServer) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = tc.InferInput(name, list(array.shape), "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def rng_arrays(rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    return (
        rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
        rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
    )


# --- health and metadata --------------------------------------------------------------------------


def test_live_ready_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "shm-inference-engine"
    assert "statistics" in meta["extensions"]
    model = client.get_model_metadata("simple", as_json=True)
    assert model["name"] == "simple" and model["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert status_of(info.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("simple", model_version="7")
    assert status_of(info.value) == "StatusCode.NOT_FOUND"


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("simple").config
    assert config.name == "simple"
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT0", tc.model_config_pb2.TYPE_INT32, [16]),
        ("INPUT1", tc.model_config_pb2.TYPE_INT32, [16]),
    ]
    assert config.output[0].data_type == tc.model_config_pb2.TYPE_INT32
    identity = client.get_model_config("identity", as_json=True)["config"]
    assert identity["dynamic_batching"]["max_queue_delay_microseconds"] == "200"
    assert identity["input"][0]["data_type"] == "TYPE_FP32"


def test_repository_index(client: tc.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m["state"] for m in index} == {"simple": "READY", "identity": "READY", "fail": "READY"}


def test_index_reports_load_errors() -> None:
    class Broken(FakeGateway):
        def model_load_errors(self) -> dict[str, str]:
            return {"broken": "model.py raised ImportError"}

    with running(Broken()) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        models = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        broken = [m for m in models if m.name == "broken"]
        assert broken and broken[0].state == "UNAVAILABLE"
        assert "ImportError" in broken[0].reason
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        assert "broken" not in {m.name for m in ready}


def test_statistics(client: tc.InferenceServerClient, server: RunningServer) -> None:
    before = server.gateway.calls["simple"]
    client.infer("simple", simple_inputs(*rng_arrays()))
    stats = client.get_inference_statistics("simple").model_stats
    assert [s.name for s in stats] == ["simple"]
    assert stats[0].inference_count == before + 1
    assert stats[0].inference_stats.success.count == before + 1
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"simple", "identity", "fail"}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("no-such-model")
    assert status_of(info.value) == "StatusCode.NOT_FOUND"


def test_statistics_message_reads_batch_stats() -> None:
    message = statistics_message(
        {"name": "m", "version": "1", "success_count": 3, "batch_stats": {"4": {"count": 2, "ns": 9}, 1: 1}}
    )
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in message.batch_stats] == [
        (1, 1, 0),
        (4, 2, 9),
    ]
    assert not message.inference_stats.HasField("compute_input")


def test_health(server: RunningServer) -> None:
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "simple"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        statuses = health.List(health_pb2.HealthListRequest()).statuses
        assert statuses["simple"].status == serving and statuses[""].status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == serving
        watch.cancel()


def test_not_ready_gateway() -> None:
    gateway = FakeGateway()
    gateway.ready = False
    with running(gateway) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            assert client.is_server_live()
            assert not client.is_server_ready()
            assert not client.is_model_ready("simple")
        finally:
            client.close()
        with grpc.insecure_channel(srv.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_unimplemented_rpcs(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert status_of(info.value) == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple")
    assert status_of(info.value) == "StatusCode.UNIMPLEMENTED"


# --- inference --------------------------------------------------------------------------------------


def test_infer_simple_raw(client: tc.InferenceServerClient) -> None:
    a, b = rng_arrays(rows=3)
    result = client.infer("simple", simple_inputs(a, b), request_id="req-42")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "req-42"
    assert (response.model_name, response.model_version) == ("simple", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "INT32", [3, 16]),
        ("OUTPUT1", "INT32", [3, 16]),
    ]


def test_infer_releases_results(server: RunningServer) -> None:
    results: list[FakeResult] = []

    class Recording(FakeGateway):
        async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
            result = await super().infer(*args, **kwargs)
            results.append(result)
            return result

    with running(Recording()) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            client.infer("simple", simple_inputs(*rng_arrays()))
        finally:
            client.close()
    assert len(results) == 1 and results[0].released


class Scribbling(FakeGateway):
    """Results whose outputs are scribbled over the moment they are released (as the engine reuses
    shared memory): a release before the bytes are sent shows as a wrong answer."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[FakeResult] = []

    async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
        result = await super().infer(*args, **kwargs)
        outputs = {name: np.array(a) for name, a in result.outputs.items()}
        result.outputs = outputs
        release = result.release

        def scribble() -> None:
            for array in outputs.values():
                array.fill(-1)
            release()

        result.release = scribble  # type: ignore[method-assign]
        self.results.append(result)
        return result


def test_a_large_answer_is_sent_before_its_result_is_released() -> None:
    # The h2 transport writes a large answer from the result's memory; grpcio copies before releasing.
    gateway = Scribbling()
    results = gateway.results
    x = np.arange(1 << 20, dtype=np.float32).reshape(1, -1)  # 4 MiB
    tensor = tc_aio.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)

    async def calls(url: str) -> list[Any]:
        client = tc_aio.InferenceServerClient(url)
        try:
            answers = asyncio.gather(*(client.infer("identity", [tensor]) for _ in range(4)))
            return list(await asyncio.wait_for(answers, TIMEOUT_S))
        finally:
            await client.close()

    with running(gateway, max_message_bytes=16 << 20) as srv:
        answers = asyncio.run(calls(srv.url))
        deadline = time.monotonic() + 10
        while not all(r.released for r in results) and time.monotonic() < deadline:
            time.sleep(0.01)
    for answer in answers:
        out = answer.as_numpy("OUTPUT0")
        # not `==` on the arrays' bytes: a failure would have pytest diff 4 MiB
        assert out is not None and np.array_equal(out, x), "an answer was sent after its release"
    assert len(results) == 4 and all(r.released for r in results)


def test_large_stream_messages_both_ways() -> None:
    # ModelStreamInfer: six 4 MiB requests and answers on one stream, each a different array, all
    # in flight (requests larger than the h2 transport's stream window hung it until 588c2f4)
    gateway = Scribbling()
    count = 6
    arrays = [np.full((1, 1 << 20), i, dtype=np.float32) for i in range(count)]

    async def stream(url: str) -> dict[str, np.ndarray]:
        client = tc_aio.InferenceServerClient(url)

        async def requests() -> Any:
            for i, x in enumerate(arrays):
                tensor = tc_aio.InferInput("INPUT0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                yield {"model_name": "identity", "inputs": [tensor], "request_id": str(i)}

        answers: dict[str, np.ndarray] = {}
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async for result, error in client.stream_infer(requests()):
                    assert error is None, error
                    answers[result.get_response().id] = result.as_numpy("OUTPUT0")
                    if len(answers) == count:
                        break
        finally:
            await client.close()
        return answers

    with running(gateway, max_message_bytes=16 << 20) as srv:
        answers = asyncio.run(stream(srv.url))
        deadline = time.monotonic() + 10
        while not all(r.released for r in gateway.results) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sorted(answers) == [str(i) for i in range(count)]
    for i, x in enumerate(arrays):
        assert np.array_equal(answers[str(i)], x), f"answer {i} is not its request's array"
    assert len(gateway.results) == count and all(r.released for r in gateway.results)


def test_a_stream_not_read_holds_no_results() -> None:
    # A client that sends and does not read: its answers wait for its window, copied out of shared
    # memory (stream answers are never written from it), so they hold none of the engine's arena.
    count = 16
    gateway = Scribbling()
    x = np.ones((1, 1 << 18), dtype=np.float32)  # 1 MiB answers; the window is 64 KiB
    requests = [
        pb.ModelInferRequest(
            model_name="identity",
            id=str(i),
            inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=x.shape)],
            raw_input_contents=[x.tobytes()],
        )
        for i in range(count)
    ]

    def held() -> int:
        return sum(not r.released for r in gateway.results)

    with running(gateway, max_message_bytes=16 << 20) as srv, grpc.insecure_channel(srv.url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests))
        deadline = time.monotonic() + TIMEOUT_S
        while len(gateway.results) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(gateway.results) == count
        time.sleep(0.2)  # the writer is stuck on the window by now
        assert held() == 0, "a stream's answers waiting for its window hold shared memory"
        call.cancel()


def test_output_selection(client: tc.InferenceServerClient) -> None:
    a, b = rng_arrays()
    result = client.infer("simple", simple_inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", simple_inputs(a, b), outputs=[tc.InferRequestedOutput("NOPE")])
    assert status_of(info.value) == "StatusCode.INVALID_ARGUMENT"


def typed_request(model: str, datatype: str, shape: Sequence[int], **contents: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def test_infer_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    values = [0.5, -1.25, 3.0, 8.0]
    response = stub.ModelInfer(typed_request("identity", "FP32", [2, 2], fp32_contents=values))
    assert response.id == "typed"
    assert list(response.outputs[0].shape) == [2, 2]
    out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_array_equal(out, np.array(values, dtype=np.float32))

    request = typed_request("simple", "INT32", [1, 16], int_contents=range(16))
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16]).contents.int_contents.extend([2] * 16)
    response = stub.ModelInfer(request)
    out0 = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(out0, np.arange(16, dtype=np.int32) + 2)


@pytest.mark.parametrize(
    ("datatype", "shape", "contents", "fragment"),
    [
        ("FP32", [2, 2], {"fp32_contents": [1.0, 2.0, 3.0]}, "3 elements"),
        ("FP16", [1, 1], {"fp32_contents": [1.0]}, "no typed contents"),
        ("FP32", [1, -2], {"fp32_contents": []}, "negative dimension"),
        ("FP64", [1, 1], {"fp64_contents": [1.0]}, "datatype FP64"),
    ],
)
def test_infer_typed_contents_errors(
    stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, shape: list[int], contents: Any, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(typed_request("identity", datatype, shape, **contents))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_typed_contents_range_check() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT8", shape=[3])
    tensor.contents.int_contents.extend([1, -128, 127])
    array = typed_contents(tensor)
    assert array.dtype == np.int8 and array.tolist() == [1, -128, 127]
    tensor.contents.int_contents.append(300)
    tensor.shape[0] = 4
    with pytest.raises(InvalidArgument, match="out of range for INT8"):
        typed_contents(tensor)
    unsigned = pb.ModelInferRequest.InferInputTensor(name="u", datatype="UINT64", shape=[1])
    unsigned.contents.uint64_contents.append(2**64 - 1)
    assert typed_contents(unsigned).tolist() == [2**64 - 1]


def test_unknown_model_is_not_found(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", simple_inputs(*rng_arrays()))
    assert status_of(info.value) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in info.value.message()


def test_bad_inputs_are_invalid_argument(client: tc.InferenceServerClient) -> None:
    wrong_dtype = tc.InferInput("INPUT0", [1, 16], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    ok = simple_inputs(*rng_arrays(rows=1))[1]
    wrong_shape = simple_inputs(np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32))
    for inputs in ([wrong_dtype, ok], wrong_shape, [ok]):
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", inputs)
        assert status_of(info.value) == "StatusCode.INVALID_ARGUMENT"


def test_wrong_byte_count_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="simple")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    request.raw_input_contents.extend([bytes(64), bytes(60)])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60 bytes" in info.value.details()

    del request.raw_input_contents[1]  # one raw buffer for two inputs
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_error_is_internal_with_message(client: tc.InferenceServerClient) -> None:
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("fail", [tensor])
    assert status_of(info.value) == "StatusCode.INTERNAL"
    assert "always fails" in info.value.message()


def test_unexpected_error_is_internal_without_details(caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(FakeGateway):
        async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
            raise KeyError("secret detail")

    with running(Buggy()) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", simple_inputs(*rng_arrays()))
        finally:
            client.close()
    assert status_of(info.value) == "StatusCode.INTERNAL"
    assert info.value.message() == "internal error"
    assert any("frontend grpc#0" in r.getMessage() and r.exc_info for r in caplog.records)


def test_deadline_exceeded() -> None:
    deadlines: list[int | None] = []

    class Slow(FakeGateway):
        async def infer(self, *args: Any, deadline_ns: int | None = None, **kwargs: Any) -> FakeResult:
            deadlines.append(deadline_ns)
            return await super().infer(*args, deadline_ns=deadline_ns, **kwargs)

    with running(Slow(delay_s=0.2)) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            before = time.monotonic_ns()
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", simple_inputs(*rng_arrays()), client_timeout=0.05)
            assert status_of(info.value) == "StatusCode.DEADLINE_EXCEEDED"
            client.infer("simple", simple_inputs(*rng_arrays()))  # no timeout: no deadline
        finally:
            client.close()
    assert len(deadlines) == 2
    assert deadlines[0] is not None and deadlines[0] > before
    assert deadlines[1] is None


def test_oversize_message_is_resource_exhausted() -> None:
    with running(max_message_bytes=64 * 1024) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            big = tc.InferInput("INPUT0", [1, 32 * 1024], "FP32")
            big.set_data_from_numpy(np.zeros((1, 32 * 1024), dtype=np.float32))
            with pytest.raises(InferenceServerException) as info:
                client.infer("identity", [big])
            assert status_of(info.value) == "StatusCode.RESOURCE_EXHAUSTED"
            small = tc.InferInput("INPUT0", [1, 4], "FP32")
            small.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            assert client.infer("identity", [small]).as_numpy("OUTPUT0").shape == (1, 4)
        finally:
            client.close()


def test_aio_client() -> None:
    async def main(url: str) -> None:
        client = tc_aio.InferenceServerClient(url)
        try:
            assert await client.is_server_live()
            assert await client.is_model_ready("identity")
            meta = await client.get_model_metadata("identity", as_json=True)
            assert meta["inputs"][0]["shape"] == ["-1", "-1"]
            a, b = rng_arrays()
            result = await client.infer("simple", simple_inputs(a, b), request_id="aio-1")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert result.get_response().id == "aio-1"
            with pytest.raises(InferenceServerException) as info:
                await client.infer("no-such-model", simple_inputs(a, b))
            assert status_of(info.value) == "StatusCode.NOT_FOUND"
        finally:
            await client.close()

    with running() as srv:
        asyncio.run(main(srv.url))


# --- streaming ---------------------------------------------------------------------------------------


class GatedGateway(FakeGateway):
    """Holds every request until ``count`` are in flight at once, then lets them all go."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.waiting = 0
        self.peak = 0
        self.gate: asyncio.Event | None = None

    async def infer(self, model: str, inputs: Sequence[InferInput], **kwargs: Any) -> FakeResult:
        if self.gate is None:
            self.gate = asyncio.Event()
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        if self.waiting >= self.count:
            self.gate.set()
        try:
            await asyncio.wait_for(self.gate.wait(), TIMEOUT_S)
        finally:
            self.waiting -= 1
        return await super().infer(model, inputs, **kwargs)


def identity_input(value: float) -> list[tc.InferInput]:
    tensor = tc.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([[value, -value]], dtype=np.float32))
    return [tensor]


def test_stream_infer_thousand_in_flight() -> None:
    count = 1000
    gateway = GatedGateway(count)
    results: dict[str, np.ndarray] = {}
    errors: list[Any] = []
    all_done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result.as_numpy("OUTPUT0")
        if len(results) + len(errors) == count:
            all_done.set()

    with running(gateway) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            client.start_stream(callback)
            for i in range(count):
                client.async_stream_infer("identity", identity_input(float(i)), request_id=str(i))
            assert all_done.wait(TIMEOUT_S), f"{len(results)} answers of {count}"
            client.stop_stream()
        finally:
            client.close()
    assert errors == []
    assert gateway.peak == count
    for i in range(count):
        np.testing.assert_array_equal(results[str(i)], [[i, -i]])


def test_stream_errors_do_not_end_the_stream() -> None:
    async def main(url: str) -> list[tuple[str, str]]:
        client = tc_aio.InferenceServerClient(url)

        async def requests() -> Any:
            for i in range(20):
                model = "fail" if i % 5 == 0 else "identity"
                yield {"model_name": model, "inputs": identity_input(float(i)), "request_id": str(i)}

        seen: list[tuple[str, str]] = []
        try:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    seen.append(("error", error.message()))
                else:
                    response = result.get_response()
                    assert result.as_numpy("OUTPUT0")[0, 0] == float(response.id)
                    seen.append(("ok", response.id))
                if len(seen) == 20:
                    break
        finally:
            await client.close()
        return seen

    with running() as srv:
        seen = asyncio.run(main(srv.url))
    assert sorted(int(i) for kind, i in seen if kind == "ok") == [i for i in range(20) if i % 5]
    failure = "model 'fail' raised RuntimeError: always fails"
    assert [m for kind, m in seen if kind == "error"] == [failure] * 4


def test_stream_error_echoes_id(server: RunningServer) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [pb.ModelInferRequest(model_name="no-such-model", id="lost-1")]
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
    assert len(responses) == 1
    assert responses[0].infer_response.id == "lost-1"
    assert "no-such-model" in responses[0].error_message


# --- robustness and transport --------------------------------------------------------------------------


def test_garbage_bytes_then_good_request(client: tc.InferenceServerClient, server: RunningServer) -> None:
    seed = 20240601
    print(f"garbage seed {seed}")
    rng = random.Random(seed)
    payloads = [
        rng.randbytes(4096),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(2048),  # a valid preface, then junk frames
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # the server answers or closes; either way it must not hang up on us
                pass
    a, b = rng_arrays()
    result = client.infer("simple", simple_inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_bearer_auth() -> None:
    with running(auth_tokens=("s3cret",)) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.is_server_live()
            assert status_of(info.value) == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", simple_inputs(*rng_arrays()), headers={"authorization": "Bearer nope"})
            assert status_of(info.value) == "StatusCode.UNAUTHENTICATED"
            assert client.is_server_live(headers={"authorization": "Bearer s3cret"})
            a, b = rng_arrays()
            result = client.infer("simple", simple_inputs(a, b), headers={"authorization": "Bearer s3cret"})
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        finally:
            client.close()
        with grpc.insecure_channel(srv.url) as channel:  # health probes carry no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reuse_port_lets_two_servers_share_a_port() -> None:
    with running(reuse_port=True) as first, running(reuse_port=True, port=first.port) as second:
        assert second.port == first.port
        client = tc.InferenceServerClient(second.url)
        try:
            assert client.is_server_live()
        finally:
            client.close()


def test_busy_port_without_reuse_port_raises() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot bind"), running(port=port):
            pass


def test_cancelled_stream_cancels_its_requests() -> None:
    count = 10
    all_waiting = threading.Event()
    all_cancelled = threading.Event()

    class Stuck(FakeGateway):
        waiting = 0
        cancelled = 0

        async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
            self.waiting += 1
            if self.waiting == count:
                all_waiting.set()
            try:
                await asyncio.Event().wait()  # never answers
            except asyncio.CancelledError:
                self.cancelled += 1
                if self.cancelled == count:
                    all_cancelled.set()
                raise
            raise AssertionError("unreachable")

    with running(Stuck()) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [typed_request("identity", "FP32", [1, 1], fp32_contents=[i]) for i in range(count)]
        call = stub.ModelStreamInfer(iter(requests))
        assert all_waiting.wait(TIMEOUT_S)
        call.cancel()
        assert all_cancelled.wait(TIMEOUT_S)


class Unanswered(FakeGateway):
    """Requests that are never answered; counts those waiting and those cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.cancelled = 0

    async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
        self.waiting += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_cancelled_infer_is_abandoned_at_the_gateway() -> None:
    # the work of a call the client cancels is stopped (the engine's worker drops the request)
    gateway = Unanswered()
    with running(gateway) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [
            stub.ModelInfer.future(typed_request("identity", "FP32", [1, 1], fp32_contents=[i]))
            for i in range(5)
        ]
        assert wait_for(lambda: gateway.waiting == 5)
        for call in calls:
            call.cancel()
        assert wait_for(lambda: gateway.cancelled == 5)
        assert wait_for(lambda: not gateway.admitted)
        # the server goes on answering
        gateway.infer = FakeGateway.infer.__get__(gateway)  # type: ignore[method-assign]
        answer = stub.ModelInfer(typed_request("identity", "FP32", [1, 1], fp32_contents=[7.0]))
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [7.0]


def test_an_infer_past_its_deadline_is_abandoned_at_the_gateway() -> None:
    gateway = Unanswered()
    with running(gateway) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(typed_request("identity", "FP32", [1, 1], fp32_contents=[1]), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: gateway.cancelled == 1)


def test_infer_flight_releases_an_answer_nobody_sends() -> None:
    # h2's ModelInfer without a task: a call that ended (reset, deadline) just as its answer came
    async def main() -> None:
        loop = asyncio.get_running_loop()
        servicer = grpc_server.InferenceServicer(FakeGateway())
        request = typed_request("identity", "FP32", [1, 2], fp32_contents=[1, 2])
        flight = servicer.start_model_infer(parse_infer_request(request.SerializeToString()), None)
        result = await flight.future
        flight.discard()
        assert result.released
        # a call that ended before its answer came: cancelled, then discarded once the future is done
        flight = servicer.start_model_infer(parse_infer_request(request.SerializeToString()), None)
        flight.cancel()
        done = loop.create_future()
        flight.future.add_done_callback(done.set_result)
        await done
        assert flight.future.cancelled()
        with pytest.raises(asyncio.CancelledError):
            flight.finish()
        flight.discard()

    uvloop.run(main())


def test_infer_flight_refusals_are_statuses() -> None:
    async def main() -> None:
        servicer = grpc_server.InferenceServicer(FakeGateway())
        with pytest.raises(Abort) as info:
            servicer.start_model_infer(Malformed("truncated"), None)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        unknown = typed_request("nope", "FP32", [1, 1], fp32_contents=[1])
        with pytest.raises(Abort) as info:
            servicer.start_model_infer(parse_infer_request(unknown.SerializeToString()), None)
        assert info.value.code is grpc.StatusCode.NOT_FOUND
        wrong = typed_request("identity", "INT32", [1, 1], int_contents=[1])
        flight = servicer.start_model_infer(parse_infer_request(wrong.SerializeToString()), None)
        with contextlib.suppress(Exception):
            await flight.future
        with pytest.raises(Abort) as info:
            flight.finish()
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT

    uvloop.run(main())


# --- malformed messages and method registration ----------------------------------------------------------

#: Field 1 announcing 255 bytes that never come: no message type of either service parses it.
MALFORMED = b"\x0a\xff\x01"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.mark.parametrize(
    "method",
    [
        INFER_METHOD,
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/ServerLive",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_malformed_message_is_invalid_argument(
    server: RunningServer, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(method)  # no serializers: bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(MALFORMED, timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed request message: ")
    assert _tracebacks(caplog) == []


def test_malformed_stream_message_ends_the_stream_with_invalid_argument(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = typed_request("identity", "FP32", [1, 1], fp32_contents=[1.0]).SerializeToString()
    with grpc.insecure_channel(server.url) as channel:
        responses = channel.stream_stream(STREAM_METHOD)(iter([good, MALFORMED]), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as info:
            for _ in responses:  # the good request may be answered before the stream fails
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed request message: ")
    assert _tracebacks(caplog) == []


@pytest.mark.parametrize(
    "method",
    ["/inference.GRPCInferenceService/NoSuchMethod", "/no.such.Service/Check", "/grpc.health.v1.Health/Nope"],
)
def test_unknown_method_is_unimplemented(server: RunningServer, method: str) -> None:
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(b"", timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bearer_auth_refuses_malformed_messages_before_parsing() -> None:
    with running(auth_tokens=("s3cret",)) as srv, grpc.insecure_channel(srv.url) as channel:
        call = channel.unary_unary(INFER_METHOD)
        with pytest.raises(grpc.RpcError) as info:
            call(MALFORMED, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            call(MALFORMED, timeout=TIMEOUT_S, metadata=(("authorization", "Bearer s3cret"),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("malformed request message: ")
        answer = call(
            typed_request("identity", "FP32", [1, 2], fp32_contents=[1.0, 2.0]).SerializeToString(),
            timeout=TIMEOUT_S,
            metadata=(("authorization", "Bearer s3cret"),),
        )
        assert pb.ModelInferResponse.FromString(answer).id == "typed"


def test_generic_handlers_serve_every_method_of_both_services() -> None:
    gateway = FakeGateway()
    handlers = grpc_handlers.generic_handlers(grpc_server.InferenceServicer(gateway), HealthServicer(gateway))
    services = [
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    for service in services:
        for method in service.methods:
            details = SimpleNamespace(method=f"/{service.full_name}/{method.name}", invocation_metadata=())
            found = [h for h in (g.service(details) for g in handlers) if h is not None]
            assert len(found) == 1, details.method
            assert found[0].request_streaming == method.client_streaming, details.method
            assert found[0].response_streaming == method.server_streaming, details.method
            assert found[0].request_deserializer is not None, details.method


# --- response wire bytes ------------------------------------------------------------------------------------


class _SpecGateway:
    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def model_spec(self, name: str) -> Any:
        return self.spec


def _expected(
    name: str, version: str, request_id: str, outputs: dict[str, np.ndarray], types: dict[str, str]
) -> bytes:
    from engine.dtypes import kserve_name

    message = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for out_name, array in outputs.items():
        datatype = types.get(out_name) or kserve_name(array.dtype)
        message.outputs.add(name=out_name, datatype=datatype, shape=array.shape)
        message.raw_output_contents.append(array.tobytes())
    return bytes(message.SerializeToString())


def test_encoded_response_is_what_protobuf_serializes() -> None:
    seed = 20251126
    print(f"encoder seed {seed}")
    rng = np.random.default_rng(seed)
    dtypes = [np.float32, np.int32, np.int64, np.uint8, np.bool_, np.float16, np.float64]
    ids = ["", "req-1", "ü" * 70, "x" * 300]
    for version in ("1", ""):
        spec = dataclasses.replace(SPECS["simple"], version=version)
        entry = ModelCache(_SpecGateway(spec)).get("simple")  # type: ignore[arg-type]
        for _ in range(150):
            outputs: dict[str, np.ndarray] = {}
            for name in rng.choice(
                ["OUTPUT0", "OUTPUT1", "EXTRA", "x" * 200], int(rng.integers(0, 4)), replace=False
            ):
                shape = tuple(
                    int(d) for d in rng.choice([0, 1, 2, 3, 127, 128, 300], int(rng.integers(0, 4)))
                )
                dtype = dtypes[int(rng.integers(len(dtypes)))]
                array: np.ndarray = (rng.standard_normal(shape) * 100).astype(dtype)
                if array.ndim == 2 and rng.random() < 0.3:
                    array = array.T  # not C-contiguous
                outputs[str(name)] = array
            request_id = ids[int(rng.integers(len(ids)))]
            want = _expected("simple", version, request_id, outputs, {"OUTPUT0": "INT32", "OUTPUT1": "INT32"})
            assert encode_infer_response(entry, request_id, outputs) == want
            stream = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(want))
            assert (
                encode_infer_response(entry, request_id, outputs, stream=True) == stream.SerializeToString()
            )


def test_encoded_response_large_output_and_bounded_cache() -> None:
    entry = ModelCache(FakeGateway()).get("identity")
    big = np.arange(1 << 20, dtype=np.float32).reshape(2, -1)  # 4 MiB: a 4-byte varint length
    want = _expected("identity", "1", "big", {"OUTPUT0": big}, {"OUTPUT0": "FP32"})
    assert encode_infer_response(entry, "big", {"OUTPUT0": big}) == want
    for n in range(TENSOR_FIELDS_MAX + 50):  # shapes chosen by clients must not grow memory
        array = np.zeros((1, n), np.float32)
        assert encode_infer_response(entry, "", {"OUTPUT0": array}) == _expected(
            "identity", "1", "", {"OUTPUT0": array}, {"OUTPUT0": "FP32"}
        )
    assert len(entry.tensor_fields) == TENSOR_FIELDS_MAX


def test_a_large_request_reaches_the_gateway_as_views_of_the_received_message() -> None:
    # 4 MiB arrives in several HTTP/2 DATA frames; its tensor goes on without protobuf's two copies
    seen: list[type] = []

    class Recording(FakeGateway):
        async def infer(self, *args: Any, **kwargs: Any) -> FakeResult:
            seen.extend(type(item.data) for item in args[1])
            return await super().infer(*args, **kwargs)

    x = np.arange(1 << 20, dtype=np.float32).reshape(1, -1)
    tensor = tc.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with running(Recording(), max_message_bytes=16 << 20) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            result = client.infer("identity", [tensor])
        finally:
            client.close()
    out = result.as_numpy("OUTPUT0")
    assert out is not None and np.array_equal(out, x), "the answer differs from the request"
    assert seen == [memoryview]


def test_a_modelinfer_answer_over_the_peers_window_waits_for_it(transport: str) -> None:
    # An answer whose whole frames the window allows goes out in one go; one larger than the
    # peer's stream window goes the general way: what fits, the rest once the window opens.
    def call(x: np.ndarray, rid: str) -> bytes:
        message = pb.ModelInferRequest(
            model_name="identity",
            id=rid,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=x.shape)],
            raw_input_contents=[x.tobytes()],
        ).SerializeToString()
        return len(message).to_bytes(5, "big") + message

    def answer(data: bytes, rid: str, x: np.ndarray) -> None:
        assert int.from_bytes(data[:5], "big") == len(data) - 5
        response = pb.ModelInferResponse.FromString(data[5:])
        assert response.id == rid
        assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), x.ravel())

    small, large = np.arange(4, dtype=np.float32)[None], np.arange(256, dtype=np.float32)[None]
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    client = h2.connection.H2Connection(config)
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 200}
    )
    client.initiate_connection()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b":authority", b"test"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    with running() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT_S) as sock:
        got: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}
        trailers: dict[int, list[tuple[bytes, bytes]]] = {}

        def pump(until: Callable[[], bool]) -> None:
            deadline = time.monotonic() + TIMEOUT_S
            while not until():
                assert time.monotonic() < deadline, f"no answer in time: {got!r} {trailers!r}"
                sock.sendall(client.data_to_send())
                for event in client.receive_data(sock.recv(1 << 16)):
                    if isinstance(event, h2.events.DataReceived):
                        got[event.stream_id] += event.data
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers[event.stream_id] = event.headers
            sock.sendall(client.data_to_send())

        for sid, x in ((1, small), (3, large)):
            client.send_headers(sid, headers)
            client.send_data(sid, call(x, str(sid)), end_stream=True)
        pump(lambda: 1 in trailers and len(got[3]) == 200)
        answer(bytes(got[1]), "1", small)
        assert (b"grpc-status", b"0") in trailers[1]
        sock.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            pump(lambda: False)  # whatever else comes within 0.2 s
        sock.settimeout(TIMEOUT_S)
        assert 3 not in trailers and len(got[3]) == 200, "sent past the window"
        client.increment_flow_control_window(1 << 16, stream_id=3)
        pump(lambda: 3 in trailers)
        answer(bytes(got[3]), "3", large)
        assert (b"grpc-status", b"0") in trailers[3]
