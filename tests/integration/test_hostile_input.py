"""Hostile input against a real server: random bytes and truncated messages on every port, malformed and
mistyped requests, overflowing and negative shapes, size mismatches, unknown models.

Each case gets its protocol's error (REST: always 4xx, never 500), a correct request right after it still
succeeds, and after every test the supervisor and all its children are the same processes as before
(nothing crashed, nothing was restarted). Counts are bounded and randomness is seeded (the seed is
printed; replay with ENGINE_TEST_SEED).
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import zmq

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.zmq_protocol import PREFIX, MsgType, decode_header, encode_ping, encode_request
from tests.integration.server import ServerProcess

TIMEOUT_S = 30.0
#: Random messages per port and case; enough to hit many parser paths, few enough to stay quick.
RANDOM_MESSAGES = 20
MUTATIONS = 60
INFER = "/inference.GRPCInferenceService/ModelInfer"
HUGE = 2**62


# ---- no crash, and a correct request still succeeds ------------------------------------------------------


@pytest.fixture(scope="module")
def initial_children(engine_server: ServerProcess) -> set[int]:
    children = engine_server.child_pids()
    assert len(children) >= 4, children  # one worker and three front-ends
    return children


@pytest.fixture(autouse=True)
def same_processes(engine_server: ServerProcess, initial_children: set[int]) -> Iterator[None]:
    """After each test: the supervisor runs and its children are the very same pids."""
    yield
    assert engine_server.proc.poll() is None, f"supervisor exited; log:\n{engine_server.log_tail()}"
    assert engine_server.child_pids() == initial_children, (
        f"a child was replaced; log:\n{engine_server.log_tail()}"
    )
    log = engine_server.log_path.read_text(errors="replace")
    # the server logs JSON lines when stderr is not a terminal, text otherwise: catch both
    errors = ('"level":"ERROR"', '"level": "ERROR"', " ERROR ")
    assert "Traceback" not in log and not any(e in log for e in errors), (
        f"the server logged an error:\n{engine_server.log_tail()}"
    )


def grpc_ok(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        request = pb.ModelInferRequest(model_name="identity")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(np.arange(3, dtype=np.float32).tobytes())
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT_S)
    out = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(out, np.arange(3, dtype=np.float32))


def rest_post(
    server: ServerProcess, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.ports["rest"], timeout=TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rest_ok(server: ServerProcess) -> None:
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
    status, answer = rest_post(server, "/v2/models/identity/infer", body)
    assert status == 200, answer
    assert orjson.loads(answer)["outputs"][0]["data"] == [1.0, 2.0]


def zmq_exchange(server: ServerProcess, messages: list[list[Any]]) -> list[list[bytes]]:
    """Send each message in turn on one DEALER and collect its one reply (fails when one is missing)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.zmq_endpoint)
    replies = []
    try:
        for frames in messages:
            sock.send_multipart(frames, copy=True)
            assert sock.poll(int(TIMEOUT_S * 1000), zmq.POLLIN), f"no reply to {frames!r:.200}"
            replies.append(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    return replies


def zmq_ok(server: ServerProcess) -> None:
    (reply,) = zmq_exchange(server, [encode_request(1, "identity", {"INPUT0": np.ones((1, 2), np.float32)})])
    assert decode_header(reply[0]).msg_type is MsgType.REPLY
    np.testing.assert_array_equal(np.frombuffer(reply[1], np.float32), [1.0, 1.0])


CORRECT: dict[str, Callable[[ServerProcess], None]] = {"grpc": grpc_ok, "rest": rest_ok, "zmq": zmq_ok}


# ---- raw TCP: random bytes and truncated messages on every port -------------------------------------------


def raw_tcp(server: ServerProcess, proto: str, data: bytes) -> bytes:
    """Connect, send ``data``, half-close, and read what the server answers until it closes."""
    received = b""
    with socket.create_connection((server.host, server.ports[proto]), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server may drop a garbage connection before reading it all
    return received


def _binary_header(shape: list[int], size: int) -> bytes:
    params = {"binary_data_size": size}
    return orjson.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "parameters": params}]}
    )


def _rest_wire_request() -> bytes:
    header = _binary_header([1, 4], 16)
    body = header + np.ones(4, np.float32).tobytes()
    head = (
        "POST /v2/models/identity/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


#: What each port expects first: the HTTP/2 preface plus an empty SETTINGS frame, an HTTP/1.1 request,
#: a ZMTP 3.0 greeting (signature, version 3.0, mechanism NULL, as-server 0, filler).
WIRE_STARTS = {
    "grpc": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    "rest": _rest_wire_request(),
    "zmq": b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32),
}


@pytest.mark.parametrize("proto", sorted(WIRE_STARTS))
def test_random_bytes_on_every_port(
    engine_server: ServerProcess, proto: str, rng: np.random.Generator
) -> None:
    for _ in range(RANDOM_MESSAGES):
        answer = raw_tcp(engine_server, proto, rng.bytes(int(rng.integers(1, 4096))))
        if proto == "rest" and answer:
            assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
    CORRECT[proto](engine_server)


@pytest.mark.parametrize("proto", sorted(WIRE_STARTS))
def test_truncated_messages_on_every_port(engine_server: ServerProcess, proto: str) -> None:
    whole = WIRE_STARTS[proto]
    for cut in sorted({1, 5, 9, 10, 20, len(whole) // 2, len(whole) - 20, len(whole) - 1}):
        answer = raw_tcp(engine_server, proto, whole[:cut])
        if proto == "rest":
            assert not answer or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    CORRECT[proto](engine_server)


# ---- gRPC ------------------------------------------------------------------------------------------------


def test_grpc_undecodable_messages(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    valid = pb.ModelInferRequest(model_name="mlp")
    valid.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
    valid.raw_input_contents.append(bytes(1024))
    wire = valid.SerializeToString()
    blobs = [rng.bytes(int(rng.integers(1, 512))) for _ in range(RANDOM_MESSAGES)]
    blobs += [wire[: int(cut)] for cut in rng.integers(len(wire) - 1024, len(wire), RANDOM_MESSAGES)]
    with grpc.insecure_channel(engine_server.grpc_address) as channel:
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        for blob in blobs:
            with pytest.raises(grpc.RpcError) as info:
                call(blob, timeout=TIMEOUT_S)
            # cut inside raw contents: protobuf cannot parse it; random bytes rarely parse at all
            assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                info.value.code(),
                info.value.details(),
            )
    grpc_ok(engine_server)


def _grpc_request(
    shape: list[int], *, datatype: str = "FP32", raw: bytes | None = None, model: str = "mlp", typed: int = 0
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    if typed:
        tensor.contents.fp32_contents.extend([0.0] * typed)
    else:
        request.raw_input_contents.append(bytes(1024) if raw is None else raw)
    return request


GRPC_BAD: dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode]] = {
    "overflowing_shape": (_grpc_request([HUGE, HUGE]), grpc.StatusCode.INVALID_ARGUMENT),
    "overflowing_shape_typed": (_grpc_request([HUGE, HUGE], typed=256), grpc.StatusCode.INVALID_ARGUMENT),
    "int64_max_dim": (_grpc_request([2**63 - 1, 2]), grpc.StatusCode.INVALID_ARGUMENT),
    "negative_dim": (_grpc_request([-1, 256]), grpc.StatusCode.INVALID_ARGUMENT),
    "negative_dim_typed": (_grpc_request([1, -256], typed=256), grpc.StatusCode.INVALID_ARGUMENT),
    "zero_rows": (_grpc_request([0, 256]), grpc.StatusCode.INVALID_ARGUMENT),
    "bytes_short": (_grpc_request([1, 256], raw=bytes(1023)), grpc.StatusCode.INVALID_ARGUMENT),
    "bytes_long": (_grpc_request([1, 256], raw=bytes(4096)), grpc.StatusCode.INVALID_ARGUMENT),
    "typed_count": (_grpc_request([1, 256], typed=255), grpc.StatusCode.INVALID_ARGUMENT),
    "rank_9": (_grpc_request([1] * 9), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown_dtype": (_grpc_request([1, 256], datatype="FP7"), grpc.StatusCode.INVALID_ARGUMENT),
    "bytes_dtype": (_grpc_request([1, 256], datatype="BYTES"), grpc.StatusCode.INVALID_ARGUMENT),
    "empty_dtype": (_grpc_request([1, 256], datatype=""), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown_model": (_grpc_request([1, 256], model="no-such-model"), grpc.StatusCode.NOT_FOUND),
    "empty_model": (_grpc_request([1, 256], model=""), grpc.StatusCode.NOT_FOUND),
    "empty_request": (pb.ModelInferRequest(), grpc.StatusCode.NOT_FOUND),
}


def test_grpc_hostile_requests(engine_server: ServerProcess) -> None:
    raw_count = _grpc_request([1, 256])
    raw_count.raw_input_contents.append(b"extra")
    cases = {**GRPC_BAD, "raw_count": (raw_count, grpc.StatusCode.INVALID_ARGUMENT)}
    with grpc.insecure_channel(engine_server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for case, (request, code) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=TIMEOUT_S)
            assert info.value.code() == code, (case, info.value.details())
    grpc_ok(engine_server)


# ---- REST ------------------------------------------------------------------------------------------------


def _tensor(request: dict[str, Any] | None = None, **fields: Any) -> bytes:
    """A JSON request for identity with one 1x2 input; ``fields`` override the input's, ``request``
    adds top-level keys."""
    entry = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2], **fields}
    return orjson.dumps({"inputs": [entry], **(request or {})})


def _binary(shape: list[int], size: int, tail: int) -> tuple[bytes, dict[str, str]]:
    header = _binary_header(shape, size)
    return header + bytes(tail), {"Inference-Header-Content-Length": str(len(header))}


REST_BAD: dict[str, tuple[bytes, dict[str, str]]] = {
    "truncated_json": (b'{"inputs": [{"name": "INPUT0", "datat', {}),
    "not_json": (b"not json at all", {}),
    "invalid_utf8": (b'\xff\xfe{"inputs": []}', {}),
    "empty": (b"", {}),
    "list": (b"[1, 2]", {}),
    "null": (b"null", {}),
    "inputs_number": (b'{"inputs": 5}', {}),
    "inputs_empty": (b'{"inputs": []}', {}),
    "input_not_object": (b'{"inputs": ["INPUT0"]}', {}),
    "name_number": (_tensor(name=1), {}),
    "datatype_number": (_tensor(datatype=3), {}),
    "datatype_unknown": (_tensor(datatype="FP7"), {}),
    "shape_string": (_tensor(shape="1,2"), {}),
    "shape_floats": (_tensor(shape=[1.0, 2.0]), {}),
    "shape_bools": (_tensor(shape=[True, 2]), {}),
    "shape_null": (_tensor(shape=None), {}),
    "shape_overflow": (_tensor(shape=[HUGE, HUGE]), {}),
    "shape_over_int64": (_tensor(shape=[HUGE]).replace(str(HUGE).encode(), str(2**64).encode()), {}),
    "negative_dim": (_tensor(shape=[-1, 2]), {}),
    "rank_9": (_tensor(shape=[1] * 9, data=[1]), {}),
    "data_strings": (_tensor(data=["a", "b"]), {}),
    "data_nulls": (_tensor(data=[None, 1]), {}),
    "data_ragged": (_tensor(data=[[1], [2, 3]]), {}),
    "data_object": (_tensor(data={"a": 1}), {}),
    "data_count": (_tensor(data=[1, 2, 3]), {}),
    "data_and_binary": (_tensor(parameters={"binary_data_size": 8}), {}),
    "parameters_number": (_tensor(parameters=5), {}),
    "outputs_number": (_tensor({"outputs": 3}), {}),
    "unknown_output": (_tensor({"outputs": [{"name": "X"}]}), {}),
    "id_number": (_tensor({"id": 5}), {}),
    "timeout_string": (_tensor({"parameters": {"timeout": "x"}}), {}),
    "binary_size_negative": _binary([1, 2], -1, 8),
    "binary_size_float": (
        _binary([1, 2], 8, 8)[0].replace(b'"binary_data_size":8', b'"binary_data_size":8.0'),
        _binary([1, 2], 8, 8)[1],
    ),
    "binary_size_mismatch": _binary([1, 2], 12, 12),
    "binary_overflow_shape": _binary([HUGE, HUGE], 8, 8),
    "binary_short_body": _binary([1, 2], 8, 4),
    "binary_extra_tail": _binary([1, 2], 8, 16),
    "header_length_text": (_binary([1, 2], 8, 8)[0], {"Inference-Header-Content-Length": "x"}),
    "header_length_too_big": (_binary([1, 2], 8, 8)[0], {"Inference-Header-Content-Length": "99999"}),
    "header_length_cut": (_binary([1, 2], 8, 8)[0], {"Inference-Header-Content-Length": "10"}),
    "timeout_header_text": (_tensor(), {"Timeout-Ms": "soon"}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REST_BAD))
def test_rest_malformed_requests_get_400(engine_server: ServerProcess, case: str) -> None:
    body, headers = REST_BAD[case]
    status, answer = rest_post(engine_server, "/v2/models/identity/infer", body, headers)
    assert status == 400, answer
    error = orjson.loads(answer)["error"]
    assert isinstance(error, str) and error


def test_rest_unknown_models_and_routes(engine_server: ServerProcess) -> None:
    body = _tensor()
    assert rest_post(engine_server, "/v2/models/no-such-model/infer", body)[0] == 404
    assert rest_post(engine_server, "/v2/models/identity/versions/9/infer", body)[0] == 404
    assert rest_post(engine_server, "/v2/no/such/route", body)[0] == 404
    conn = http.client.HTTPConnection(engine_server.host, engine_server.ports["rest"], timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/v2/models/identity/infer")  # wrong method
        response = conn.getresponse()
        response.read()
        assert response.status == 405
    finally:
        conn.close()
    rest_ok(engine_server)


def test_rest_mutated_requests_never_get_500(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    json_body = orjson.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "id": "m"}
    )
    binary_body, binary_headers = _binary([1, 4], 16, 16)
    statuses = []
    for i in range(MUTATIONS):
        body, headers = (json_body, {}) if i % 2 else (binary_body, binary_headers)
        data = bytearray(body)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(0, len(data)))]
        status, answer = rest_post(engine_server, "/v2/models/identity/infer", bytes(data), headers)
        assert status < 500, (bytes(data), answer)
        statuses.append(status)
    assert any(400 <= s < 500 for s in statuses)
    rest_ok(engine_server)


# ---- ZMQ -------------------------------------------------------------------------------------------------


def _zmq(body: dict[str, Any], frames: list[bytes], request_id: int = 9, *, msg_type: int = 1) -> list[Any]:
    payload = orjson.dumps(body)
    return [PREFIX.pack(b"SIE1", 1, msg_type, 0, request_id, 0, len(payload)) + payload, *frames]


def _zin(shape: Any, datatype: Any = "FP32", name: Any = "INPUT0") -> dict[str, Any]:
    return {"model": "mlp", "inputs": [{"name": name, "datatype": datatype, "shape": shape}]}


_ROW = bytes(1024)
_VALID = encode_request(9, "identity", {"INPUT0": np.ones((1, 4), np.float32)})
_HEADER = bytes(_VALID[0])
ZMQ_BAD: dict[str, tuple[list[Any], int]] = {
    "empty_frame": ([b""], 3),
    "prefix_cut": ([_HEADER[:10]], 3),
    "json_cut": ([_HEADER[:-3], _VALID[1]], 3),
    "bad_magic": ([b"XXXX" + _HEADER[4:], _VALID[1]], 3),
    "bad_version": ([PREFIX.pack(b"SIE1", 2, 1, 0, 9, 0, 0)], 3),
    "unknown_type": ([PREFIX.pack(b"SIE1", 1, 99, 0, 9, 0, 0)], 3),
    "reply_type": ([PREFIX.pack(b"SIE1", 1, int(MsgType.REPLY), 0, 9, 0, 0)], 3),
    "json_len_lies": ([PREFIX.pack(b"SIE1", 1, 1, 0, 9, 0, 1000) + b"{}"], 3),
    "json_len_huge": ([PREFIX.pack(b"SIE1", 1, 1, 0, 9, 0, 2**32 - 1) + b"{}"], 3),
    "json_not_object": ([PREFIX.pack(b"SIE1", 1, 1, 0, 9, 0, 2) + b"[]"], 3),
    "json_garbage": ([PREFIX.pack(b"SIE1", 1, 1, 0, 9, 0, 4) + b"\xff{\x00}"], 3),
    "model_number": (_zmq({"model": 5, "inputs": []}, []), 3),
    "model_missing": (_zmq({"inputs": []}, []), 3),
    "inputs_string": (_zmq({"model": "mlp", "inputs": "x"}, []), 3),
    "inputs_many": (_zmq({"model": "mlp", "inputs": [{}] * 65}, []), 3),
    "input_not_object": (_zmq({"model": "mlp", "inputs": [5]}, [_ROW]), 3),
    "name_number": (_zmq(_zin([1, 256], name=7), [_ROW]), 3),
    "datatype_number": (_zmq(_zin([1, 256], datatype=7), [_ROW]), 3),
    "datatype_unknown": (_zmq(_zin([1, 256], datatype="FP7"), [_ROW]), 3),
    "shape_overflow": (_zmq(_zin([HUGE, HUGE]), [_ROW]), 3),
    "shape_int64_max": (_zmq(_zin([2**63 - 1, 256]), [_ROW]), 3),
    "shape_negative": (_zmq(_zin([-1, 256]), [_ROW]), 3),
    "shape_bools": (_zmq(_zin([True, 256]), [_ROW]), 3),
    "shape_string": (_zmq(_zin("1,256"), [_ROW]), 3),
    "shape_rank_9": (_zmq(_zin([1] * 9), [b"\0" * 4]), 3),
    "shape_mismatch": (_zmq(_zin([1, 255]), [b"\0" * 1020]), 3),
    "bytes_short": (_zmq(_zin([1, 256]), [b"\0" * 1000]), 3),
    "bytes_long": (_zmq(_zin([1, 256]), [b"\0" * 2048]), 3),
    "frames_missing": (_zmq(_zin([1, 256]), []), 3),
    "frames_extra": (_zmq(_zin([1, 256]), [_ROW, _ROW]), 3),
    "ping_with_frames": ([encode_ping(9)[0], b"extra"], 3),
    "outputs_numbers": (_zmq({**_zin([1, 256]), "outputs": [1]}, [_ROW]), 3),
    "unknown_output": (_zmq({**_zin([1, 256]), "outputs": ["NOPE"]}, [_ROW]), 3),
    "unknown_model": (_zmq({**_zin([1, 256]), "model": "no-such-model"}, [_ROW]), 5),
    "metadata_unknown_model": (_zmq({"model": "no-such-model"}, [], msg_type=int(MsgType.METADATA)), 5),
}


def test_zmq_hostile_messages(engine_server: ServerProcess) -> None:
    cases = sorted(ZMQ_BAD)
    replies = zmq_exchange(engine_server, [ZMQ_BAD[case][0] for case in cases])
    for case, reply in zip(cases, replies, strict=True):
        header = decode_header(reply[0])
        assert header.msg_type is MsgType.ERROR, (case, header)
        assert header.body["code"] == ZMQ_BAD[case][1], (case, header.body)
        # an unreadable prefix cannot name its request: such errors carry id 0
        assert header.request_id in (0, 9), (case, header.request_id)
    zmq_ok(engine_server)


def test_zmq_random_frames_and_mutations(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    garbage = [
        [rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 4)))]
        for _ in range(RANDOM_MESSAGES)
    ]
    mutated = []
    for i in range(MUTATIONS):
        body = bytearray(_HEADER[PREFIX.size :])
        for _ in range(int(rng.integers(1, 4))):  # only the JSON part: the request id stays readable
            body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
        prefix = PREFIX.pack(b"SIE1", 1, int(MsgType.REQUEST), 0, 1000 + i, 0, len(body))
        mutated.append([prefix + body, _VALID[1]])
    replies = zmq_exchange(engine_server, garbage + mutated)
    for reply in replies[: len(garbage)]:
        header = decode_header(reply[0])
        assert header.msg_type is MsgType.ERROR and header.body["code"] == 3, header
    for i, reply in enumerate(replies[len(garbage) :]):
        header = decode_header(reply[0])
        assert header.request_id == 1000 + i
        assert header.msg_type is MsgType.REPLY or header.body["code"] in (3, 5), header
    zmq_ok(engine_server)
