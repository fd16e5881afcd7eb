"""The gRPC front-end of a real server: inference on every built-in model, metadata, health, error
mapping, malformed messages and unknown methods, deadlines, the message size limit, a multi-MiB answer,
500 concurrent calls with batching, and one stream with 1,000 requests in flight.

Every test runs against both gRPC transports (``grpc_transport``): grpc.aio and `servers.grpc_h2`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.integration.server import (
    BUILTIN_MODELS,
    ServerProcess,
    assert_outputs,
    builtin_specs,
    reference_outputs,
    sample_inputs,
    serving,
)

#: The client's own limits sit far above the server's 8 MiB, so the size test meets the server's.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
RPC_TIMEOUT_S = 60.0


@pytest.fixture(scope="module", params=["grpcio", "h2"])
def engine_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The module's server, once per gRPC transport (overrides the conftest fixture)."""
    with serving(["--set", f"grpc_transport={request.param}"]) as server:
        yield server


@pytest.fixture(scope="module")
def channel(engine_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(engine_server.grpc_address, options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def infer_request(model: str, inputs: dict[str, np.ndarray], request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in ``raw_input_contents``."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[array.dtype]
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def response_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT32": np.int32}
    return {
        out.name: np.frombuffer(raw, dtype=dtypes[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def rpc_error(call: object, request: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=RPC_TIMEOUT_S, **kwargs)  # type: ignore[operator]
    return info.value


# ---- inference -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_infer_every_builtin_model_with_tritonclient(
    engine_server: ServerProcess, model: str, rng: np.random.Generator
) -> None:
    inputs = sample_inputs(model, 3, rng)
    client = tgrpc.InferenceServerClient(engine_server.grpc_address)
    try:
        items = []
        for name, array in inputs.items():
            item = tgrpc.InferInput(name, list(array.shape), "INT32" if array.dtype == np.int32 else "FP32")
            item.set_data_from_numpy(array)
            items.append(item)
        result = client.infer(model, items, request_id="r1", client_timeout=RPC_TIMEOUT_S)
    finally:
        client.close()
    want = reference_outputs(model, inputs)
    assert_outputs(model, {name: result.as_numpy(name) for name in want}, want)
    assert result.get_response().id == "r1"


def test_infer_typed_contents_and_selected_output(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    request = pb.ModelInferRequest(model_name="simple")
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(array.ravel().tolist())
    request.outputs.add(name="OUTPUT1")
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    outputs = response_arrays(response)
    assert list(outputs) == ["OUTPUT1"]
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


# ---- metadata and health -------------------------------------------------------------------------------


def test_server_and_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
    assert server.name and "statistics" in server.extensions
    for name, spec in builtin_specs().items():
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=RPC_TIMEOUT_S)
        assert meta.name == name and list(meta.versions) == [spec.version]
        assert [(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.inputs
        ]
        assert [(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.outputs
        ]
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=RPC_TIMEOUT_S).config
        assert config.max_batch_size == spec.max_batch_size
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
    assert {(m.name, m.state) for m in index.models} == {(m, "READY") for m in BUILTIN_MODELS}
    err = rpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name="no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_health(stub: pb_grpc.GRPCInferenceServiceStub, channel: grpc.Channel) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    for name in BUILTIN_MODELS:
        assert stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=RPC_TIMEOUT_S).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no-such-model"), timeout=RPC_TIMEOUT_S).ready

    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "inference.GRPCInferenceService", "mlp"):
        check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
        assert check.status == serving, service
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ---- errors --------------------------------------------------------------------------------------------


def _bad_requests() -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode]]:
    row = np.zeros((1, 256), np.float32)
    bad_dtype = infer_request("mlp", {"INPUT0": row})
    bad_dtype.inputs[0].datatype = "FP64"
    bad_dtype.raw_input_contents[0] = np.zeros((1, 256), np.float64).tobytes()
    bad_shape = infer_request("mlp", {"INPUT0": np.zeros((1, 255), np.float32)})
    bad_bytes = infer_request("mlp", {"INPUT0": row})
    bad_bytes.raw_input_contents[0] = b"\0" * 1000
    unknown_input = infer_request("mlp", {"INPUT9": row})
    too_big_batch = infer_request("mlp", {"INPUT0": np.zeros((257, 256), np.float32)})
    unknown_model = infer_request("no-such-model", {"INPUT0": row})
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "dtype": (bad_dtype, invalid),
        "shape": (bad_shape, invalid),
        "byte_count": (bad_bytes, invalid),
        "unknown_input": (unknown_input, invalid),
        "batch_over_max": (too_big_batch, invalid),
        "unknown_model": (unknown_model, grpc.StatusCode.NOT_FOUND),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests()))
def test_error_mapping(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    request, code = _bad_requests()[case]
    err = rpc_error(stub.ModelInfer, request)
    assert err.code() == code, err.details()
    assert err.details()


#: Field 1 announcing 255 bytes that never come: protobuf cannot parse it as any request message.
MALFORMED = b"\x0a\xff\x01"


def test_malformed_messages_are_invalid_argument(
    channel: grpc.Channel, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    for method in ("ModelInfer", "ModelMetadata"):
        err = rpc_error(channel.unary_unary(f"/inference.GRPCInferenceService/{method}"), MALFORMED)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
        assert err.details().startswith("malformed request message: "), method
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream(iter([MALFORMED]), timeout=RPC_TIMEOUT_S):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed request message: ")
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    for method in ("/inference.GRPCInferenceService/NoSuchMethod", "/no.such.Service/Call"):
        err = rpc_error(channel.unary_unary(method), b"")
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED, method


def test_deadline_exceeded(stub: pb_grpc.GRPCInferenceServiceStub, rng: np.random.Generator) -> None:
    # 256 rows of mlp with a 1 ms deadline: sent to the server as grpc-timeout, which the front-end
    # passes down to the worker; either side ends it with DEADLINE_EXCEEDED.
    request = infer_request("mlp", sample_inputs("mlp", 256, rng))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ok = stub.ModelInfer(infer_request("mlp", sample_inputs("mlp", 2, rng)), timeout=RPC_TIMEOUT_S)
    assert response_arrays(ok)["OUTPUT0"].shape == (2, 256)


def test_message_over_the_size_limit(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    # 9 MiB of FP32 against max_message_mb=8: refused by grpc's receive limit before parsing.
    big = np.zeros((1, 9 * (1 << 20) // 4), np.float32)
    err = rpc_error(stub.ModelInfer, infer_request("identity", {"INPUT0": big}))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = np.arange(4, dtype=np.float32).reshape(1, 4)
    response = stub.ModelInfer(infer_request("identity", {"INPUT0": small}), timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(response_arrays(response)["OUTPUT0"], small)


def test_multi_mib_answer_round_trips(engine_server: ServerProcess) -> None:
    # 6 MiB out of the worker's shared memory into one answer, read back by tritonclient
    values = np.arange(3 << 19, dtype=np.float32).reshape(2, -1)
    item = tgrpc.InferInput("INPUT0", list(values.shape), "FP32")
    item.set_data_from_numpy(values)
    client = tgrpc.InferenceServerClient(engine_server.grpc_address)
    try:
        result = client.infer("identity", [item], request_id="big", client_timeout=RPC_TIMEOUT_S)
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)
    response = result.get_response()
    assert (response.id, response.model_name, list(response.outputs[0].shape)) == (
        "big",
        "identity",
        [2, 3 << 18],
    )


# ---- concurrency ---------------------------------------------------------------------------------------


def _stats(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[int, int]:
    response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=RPC_TIMEOUT_S)
    (stats,) = response.model_stats
    return stats.inference_count, stats.execution_count


def test_500_concurrent_calls_are_batched(
    engine_server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub, rng: np.random.Generator
) -> None:
    n = 500
    rows = sample_inputs("mlp", n, rng)["INPUT0"]
    want = reference_outputs("mlp", {"INPUT0": rows})["OUTPUT0"]
    inferences0, executions0 = _stats(stub, "mlp")

    async def run_all() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(engine_server.grpc_address, options=CHANNEL_OPTIONS) as ch:
            aio_stub = pb_grpc.GRPCInferenceServiceStub(ch)
            calls = [
                aio_stub.ModelInfer(
                    infer_request("mlp", {"INPUT0": rows[i : i + 1]}, str(i)), timeout=RPC_TIMEOUT_S
                )
                for i in range(n)
            ]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(run_all())
    assert len(responses) == n
    for i, response in enumerate(responses):
        assert response.id == str(i)
        assert_outputs("mlp", response_arrays(response), {"OUTPUT0": want[i : i + 1]})
    inferences, executions = _stats(stub, "mlp")
    assert inferences - inferences0 == n
    # dynamic batching: fewer model executions than requests
    assert 0 < executions - executions0 < n


def test_stream_with_1000_requests_in_flight(engine_server: ServerProcess) -> None:
    n = 1000
    values = np.arange(n * 4, dtype=np.float32).reshape(n, 1, 4)

    async def run_stream() -> list[pb.ModelStreamInferResponse]:
        async with grpc.aio.insecure_channel(engine_server.grpc_address, options=CHANNEL_OPTIONS) as ch:
            call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(timeout=RPC_TIMEOUT_S)

            async def send() -> None:
                for i in range(n):
                    await call.write(infer_request("identity", {"INPUT0": values[i]}, f"req-{i}"))
                await call.done_writing()

            writer = asyncio.create_task(send())
            answers = [response async for response in call]
            await writer
            return answers

    answers = asyncio.run(run_stream())
    assert len(answers) == n
    seen = set()
    for answer in answers:
        assert not answer.error_message, answer.error_message
        request_id = answer.infer_response.id
        i = int(request_id.removeprefix("req-"))
        seen.add(i)
        np.testing.assert_array_equal(response_arrays(answer.infer_response)["OUTPUT0"], values[i])
    assert seen == set(range(n))


def test_stream_error_does_not_end_the_stream(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = np.ones((1, 3), np.float32)
    requests = [
        infer_request("identity", {"INPUT0": good}, "a"),
        infer_request("no-such-model", {"INPUT0": good}, "b"),
        infer_request("identity", {"INPUT0": np.ones((1, 3), np.int32)}, "c"),
        infer_request("identity", {"INPUT0": good * 2}, "d"),
    ]
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S)}
    assert set(answers) == {"a", "b", "c", "d"}
    assert not answers["a"].error_message and not answers["d"].error_message
    assert "no-such-model" in answers["b"].error_message
    assert answers["c"].error_message
    np.testing.assert_array_equal(response_arrays(answers["d"].infer_response)["OUTPUT0"], good * 2)
