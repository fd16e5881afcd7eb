"""Tests of the ZMQ wire format: round trips both ways and every malformed case a decoder must refuse."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from engine.errors import (
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidArgument,
    ModelError,
    NotFound,
    ResourceExhausted,
    WorkerDied,
)
from servers import zmq_protocol
from servers.zmq_protocol import (
    MAGIC,
    MAX_TENSORS,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    MsgType,
    Unauthenticated,
    decode_header,
    decode_reply,
    decode_request,
    encode_error,
    encode_header,
    encode_metadata_reply,
    encode_metadata_request,
    encode_ping,
    encode_pong,
    encode_replies,
    encode_reply,
    encode_request,
    error_from_reply,
    frames_nbytes,
    model_metadata,
    peek_request_id,
)
from tests.fakes import SPECS


def header(
    body: Any, *, msg_type: int = MsgType.REQUEST, magic: bytes = MAGIC, version: int = VERSION
) -> bytes:
    payload = orjson.dumps(body)
    return PREFIX.pack(magic, version, msg_type, 0, 7, 0, len(payload)) + payload


def request(inputs: list[dict[str, Any]], frames: list[bytes], **extra: Any) -> list[bytes]:
    return [header({"model": "m", "inputs": inputs, **extra}), *frames]


FP32_4 = {"name": "x", "datatype": "FP32", "shape": [1, 4]}


def test_prefix_layout_is_fixed() -> None:
    assert PREFIX_SIZE == 28
    frame = encode_header(MsgType.PING, 0x0102030405060708, {}, timeout_us=99)
    assert frame[:4] == b"SIE1"
    assert frame[4] == VERSION and frame[5] == MsgType.PING
    assert frame[8:16] == (0x0102030405060708).to_bytes(8, "little")
    assert frame[16:24] == (99).to_bytes(8, "little")
    assert frame[24:28] == b"\0\0\0\0" and len(frame) == 28


def test_request_round_trip() -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.int32)
    frames = encode_request(
        42, "simple", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT0"], token="t", timeout_us=1500
    )
    req = decode_request(frames)
    assert (req.msg_type, req.request_id, req.timeout_us) == (MsgType.REQUEST, 42, 1500)
    assert (req.model, req.outputs, req.token) == ("simple", ("OUTPUT0",), "t")
    assert [(i.name, i.datatype, i.shape) for i in req.inputs] == [
        ("INPUT0", "INT32", (2, 16)),
        ("INPUT1", "INT32", (2, 16)),
    ]
    got = np.frombuffer(req.inputs[0].data, dtype=np.int32).reshape(2, 16)
    np.testing.assert_array_equal(got, a)
    assert frames_nbytes(frames) == len(frames[0]) + a.nbytes + b.nbytes


def test_request_data_is_a_view_not_a_copy() -> None:
    payload = bytearray(16)
    frames = request([FP32_4], [payload])  # type: ignore[list-item]
    req = decode_request(frames)
    payload[0] = 0xFF
    assert bytes(req.inputs[0].data)[0] == 0xFF


def test_encode_makes_arrays_contiguous_little_endian() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian and not C-contiguous
    req = decode_request(encode_request(1, "m", {"x": big}))
    assert req.inputs[0].shape == (3, 2)
    np.testing.assert_array_equal(np.frombuffer(req.inputs[0].data, dtype="<i4").reshape(3, 2), big)


def test_empty_tensor_and_scalar_round_trip() -> None:
    out = decode_reply(encode_reply(3, {"e": np.zeros((0, 4), np.float32), "s": np.array(2.5)}))
    assert out.outputs is not None
    assert out.outputs["e"].shape == (0, 4)
    assert out.outputs["s"].shape == () and out.outputs["s"] == 2.5


def test_reply_round_trip_is_read_only_view() -> None:
    arrays = {"OUTPUT0": np.arange(8, dtype=np.float16), "B": np.array([True, False])}
    reply = decode_reply(encode_reply(9, arrays))
    assert reply.msg_type is MsgType.REPLY and reply.request_id == 9
    assert reply.outputs is not None
    for name, value in arrays.items():
        np.testing.assert_array_equal(reply.outputs[name], value)
        assert reply.outputs[name].dtype == value.dtype
    assert not reply.outputs["OUTPUT0"].flags.writeable


def test_replies_of_requests_computed_together_are_each_what_encode_reply_gives() -> None:
    y = np.arange(24, dtype=np.float32).reshape(6, 4)
    z = np.arange(6, dtype=">i8")  # big-endian: made little-endian once
    replies = encode_replies([7, 8, 9], {"y": y, "z": z}, rows=2)
    assert len(replies) == 3
    for i, (frames, rid) in enumerate(zip(replies, [7, 8, 9], strict=True)):
        alone = encode_reply(rid, {"y": y[2 * i : 2 * i + 2], "z": z[2 * i : 2 * i + 2]})
        assert [bytes(f) for f in frames] == [bytes(f) for f in alone]
        reply = decode_reply(frames)
        assert reply.request_id == rid and reply.outputs is not None
        np.testing.assert_array_equal(reply.outputs["y"], y[2 * i : 2 * i + 2])


def test_replies_of_rows_the_outputs_do_not_hold_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not 3 x 2 rows"):
        encode_replies([1, 2, 3], {"y": np.zeros((5, 4), np.float32)}, rows=2)
    with pytest.raises(InvalidArgument, match="not 2 x 1 rows"):
        encode_replies([1, 2], {"s": np.array(1.5)}, rows=1)


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad"),
        NotFound("nope"),
        ResourceExhausted("busy"),
        WorkerDied("dead"),
        DeadlineExceeded("late"),
        ModelError("boom"),
        Unauthenticated("who"),
    ],
)
def test_error_round_trip_keeps_the_class(error: EngineError) -> None:
    reply = decode_reply([encode_error(5, error)])
    assert reply.msg_type is MsgType.ERROR and reply.request_id == 5
    assert type(reply.error) is type(error)
    assert reply.error is not None and reply.error.message == error.message
    body = orjson.loads(encode_error(5, error)[PREFIX_SIZE:])
    assert body["code"] == error.zmq_code and body["error_type"] == error.grpc_code


def test_internal_error_message_stays_on_the_server() -> None:
    reply = decode_reply([encode_error(1, InternalError("secret path /x/y"))])
    assert isinstance(reply.error, InternalError)
    assert "secret" not in reply.error.message


def test_error_rebuilt_from_grpc_code_alone() -> None:
    assert type(error_from_reply(5, "NOT_FOUND", "m")) is NotFound
    assert type(error_from_reply(14, "UNAVAILABLE", "m", "NoSuchClass")) is not NotFound
    odd = error_from_reply(99, "WEIRD", "m")
    assert type(odd) is EngineError and odd.zmq_code == 99 and odd.grpc_code == "WEIRD"


def test_ping_pong_and_metadata_round_trip() -> None:
    ping = decode_request(encode_ping(3, token="tok"))
    assert (ping.msg_type, ping.request_id, ping.token) == (MsgType.PING, 3, "tok")
    assert decode_request(encode_ping(4)).token is None
    pong = decode_reply([encode_pong(3, ready=True)])
    assert pong.msg_type is MsgType.PONG and pong.body == {"ready": True, "live": True}
    meta_req = decode_request(encode_metadata_request(8, "simple"))
    assert (meta_req.msg_type, meta_req.model) == (MsgType.METADATA, "simple")
    meta = model_metadata(SPECS["simple"], ready=True)
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    reply = decode_reply([encode_metadata_reply(8, meta)])
    assert reply.msg_type is MsgType.METADATA_REPLY and reply.body == meta


def test_peek_request_id() -> None:
    assert peek_request_id(encode_header(MsgType.REQUEST, 77, {"x": 1})) == 77
    assert peek_request_id(b"garbage") == 0
    assert peek_request_id(b"XXXX" + bytes(40)) == 0


# -- malformed ---------------------------------------------------------------------------------


def _prefix(**fields: int) -> bytes:
    values = {"version": VERSION, "type": MsgType.REQUEST, "json_len": 0, **fields}
    return PREFIX.pack(MAGIC, values["version"], values["type"], 0, 1, 0, values["json_len"])


def _raw_header(payload: bytes) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, MsgType.REQUEST, 0, 1, 0, len(payload)) + payload


MALFORMED: list[tuple[str, list[bytes], str]] = [
    ("empty message", [], "empty"),
    ("empty header", [b""], "shorter than"),
    ("truncated prefix", [MAGIC + b"\x01\x01"], "shorter than"),
    ("wrong magic", [header({}, magic=b"NOPE")], "magic"),
    ("wrong version", [header({}, version=9)], "version 9"),
    ("unknown type", [header({}, msg_type=200)], "unknown message type"),
    ("reply type sent as request", [header({}, msg_type=MsgType.PONG)], "not a request"),
    ("json length too long", [_prefix(json_len=10) + b"{}"], "says 10"),
    ("json length too short", [_prefix(json_len=1) + b"{}"], "says 1"),
    ("json over the limit", [_prefix(json_len=1 << 20)], "limit"),
    ("json that does not parse", [_prefix(json_len=3) + b"{x}"], "does not parse"),
    ("json not an object", [header([1, 2])], "must be an object"),
    ("model missing", [header({"inputs": []})], "'model' must be a string"),
    ("model not a string", [header({"model": 3, "inputs": []})], "'model' must be a string"),
    ("model empty", [header({"model": "", "inputs": []})], "must not be empty"),
    ("model too long", [header({"model": "m" * 1000, "inputs": []})], "longer than"),
    ("inputs missing", [header({"model": "m"})], "'inputs' must be a list"),
    ("inputs not a list", [header({"model": "m", "inputs": {}})], "'inputs' must be a list"),
    ("input not an object", request([5], [b""]), "must be an object"),  # type: ignore[list-item]
    ("input name missing", request([{"datatype": "FP32", "shape": [1]}], [bytes(4)]), "'name'"),
    ("bad datatype", request([{**FP32_4, "datatype": "FP128"}], [bytes(16)]), "unsupported datatype"),
    ("datatype not a string", request([{**FP32_4, "datatype": 1}], [bytes(16)]), "'datatype'"),
    ("shape not a list", request([{**FP32_4, "shape": "1,4"}], [bytes(16)]), "list of integers"),
    ("shape of floats", request([{**FP32_4, "shape": [1.0, 4]}], [bytes(16)]), "list of integers"),
    ("shape of bools", request([{**FP32_4, "shape": [True, 4]}], [bytes(16)]), "list of integers"),
    ("negative dim", request([{**FP32_4, "shape": [-1, 4]}], [bytes(16)]), "negative dimension"),
    ("rank too high", request([{**FP32_4, "shape": [1] * 9}], [bytes(4)]), "rank 9"),
    ("element overflow", request([{**FP32_4, "shape": [1 << 32, 1 << 32]}], [b""]), "exceeds"),
    (
        # orjson reads integers beyond 64 bits as floats
        "huge dims",
        [
            _raw_header(
                b'{"model":"m","inputs":[{"name":"x","datatype":"FP32","shape":[1' + b"0" * 30 + b"]}]}"
            ),
            b"",
        ],
        "list of integers",
    ),
    ("u64 dims", request([{**FP32_4, "shape": [(1 << 64) - 1, 0]}], [b""]), "exceeds"),
    ("too few bytes", request([FP32_4], [bytes(15)]), "needs 16"),
    ("too many bytes", request([FP32_4], [bytes(17)]), "needs 16"),
    ("missing frame", request([FP32_4], []), "carries 0 tensor frames"),
    ("extra frame", request([FP32_4], [bytes(16), bytes(16)]), "carries 2 tensor frames"),
    ("duplicate input", request([FP32_4, FP32_4], [bytes(16), bytes(16)]), "twice"),
    (
        "too many inputs",
        request(
            [{"name": f"i{n}", "datatype": "UINT8", "shape": [1]} for n in range(MAX_TENSORS + 1)],
            [b"x"] * (MAX_TENSORS + 1),
        ),
        "at most",
    ),
    ("outputs not a list", request([FP32_4], [bytes(16)], outputs="OUT"), "'outputs' must be a list"),
    ("outputs not strings", request([FP32_4], [bytes(16)], outputs=[1]), "non-empty strings"),
    ("token not a string", request([FP32_4], [bytes(16)], token=5), "'token' must be a string"),
    ("ping with frames", [header({}, msg_type=MsgType.PING), b"x"], "one frame"),
    ("metadata without model", [header({}, msg_type=MsgType.METADATA)], "'model'"),
]


@pytest.mark.parametrize(("frames", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_refused(frames: list[bytes], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_request(frames)


def test_decode_header_accepts_empty_body() -> None:
    h = decode_header(_prefix(type=MsgType.PING))
    assert h.body == {} and h.msg_type is MsgType.PING


def test_unknown_flags_are_ignored() -> None:
    frame = bytearray(encode_header(MsgType.PING, 1, {}))
    struct.pack_into("<H", frame, 6, 0xFFFF)
    assert decode_request([bytes(frame)]).msg_type is MsgType.PING


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([header({"outputs": [FP32_4]}, msg_type=MsgType.REPLY), bytes(3)], "needs 16"),
        ([header({"outputs": [FP32_4]}, msg_type=MsgType.REPLY)], "carries 0"),
        ([header({"outputs": 1}, msg_type=MsgType.REPLY)], "must be a list"),
        ([header({"code": "x", "error_type": "E", "message": ""}, msg_type=MsgType.ERROR)], "'code'"),
        ([header({"code": 3, "error_type": "E"}, msg_type=MsgType.ERROR)], "'message'"),
        ([header({}, msg_type=MsgType.PONG), b"x"], "one frame"),
        ([header({}, msg_type=MsgType.REQUEST)], "not a reply"),
    ],
)
def test_malformed_replies_are_refused(frames: list[bytes], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_reply(frames)


def test_encoder_refuses_out_of_range_ids() -> None:
    with pytest.raises(InvalidArgument):
        encode_header(MsgType.PING, -1, {})
    with pytest.raises(InvalidArgument):
        encode_header(MsgType.PING, 1 << 64, {})


# -- the decoders' memory of bodies seen before ------------------------------------------------


def test_a_known_request_body_decodes_as_it_did_the_first_time() -> None:
    # the JSON of a request is parsed and checked once; later requests with the same body take
    # their own id, deadline and tensor frames
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    first = decode_request(encode_request(1, "m", {"x": a}, outputs=["y"], token="t", timeout_us=5))
    b = a + 10
    again = decode_request(encode_request(2, "m", {"x": b}, outputs=["y"], token="t", timeout_us=9))
    assert (again.request_id, again.timeout_us) == (2, 9)
    assert (again.model, again.outputs, again.token) == (first.model, first.outputs, first.token)
    assert [(i.name, i.datatype, i.shape) for i in again.inputs] == [("x", "FP32", (1, 4))]
    np.testing.assert_array_equal(np.frombuffer(again.inputs[0].data, np.float32), b.ravel())


@pytest.mark.parametrize(
    ("tensors", "match"),
    [([bytes(15)], "needs 16"), ([], "carries 0"), ([bytes(16), bytes(16)], "carries 2")],
)
def test_a_known_request_body_with_the_wrong_frames_is_refused(tensors: list[bytes], match: str) -> None:
    good = request([FP32_4], [bytes(16)])
    decode_request(good)
    with pytest.raises(InvalidArgument, match=match):
        decode_request([good[0], *tensors])


def test_a_known_request_body_under_another_version_is_refused() -> None:
    body = {"model": "m", "inputs": [FP32_4]}
    decode_request([header(body), bytes(16)])
    with pytest.raises(InvalidArgument, match="version"):
        decode_request([header(body, version=VERSION + 1), bytes(16)])


def test_the_memory_of_known_bodies_is_bounded() -> None:
    for n in range(2 * zmq_protocol._KNOWN_MAX + 3):
        decode_request(encode_request(n, f"m{n}", {"x": np.zeros((1, 2), np.float32)}))
        decode_reply(encode_reply(n, {f"y{n}": np.zeros((1, 2), np.float32)}))
    assert 0 < len(zmq_protocol._KNOWN_REQUESTS) <= zmq_protocol._KNOWN_MAX
    assert 0 < len(zmq_protocol._KNOWN_REPLIES) <= zmq_protocol._KNOWN_MAX
    assert 0 < len(zmq_protocol._KNOWN_REPLY_SPECS) <= zmq_protocol._KNOWN_MAX


def test_a_known_reply_body_decodes_as_it_did_the_first_time() -> None:
    # the client parses and checks a reply's JSON once; later replies with the same body take their
    # own id and tensor frames, and their arrays are read-only like the first ones
    y = np.arange(6, dtype=np.int32).reshape(2, 3)
    first = decode_reply(encode_reply(4, {"y": y, "z": np.array(1.5)}))
    assert len(zmq_protocol._KNOWN_REPLY_SPECS) >= 1
    again = decode_reply(encode_reply(5, {"y": y + 1, "z": np.array(1.5)}))
    assert again.request_id == 5 and again.msg_type is MsgType.REPLY
    assert first.outputs is not None and again.outputs is not None
    assert list(again.outputs) == ["y", "z"]
    np.testing.assert_array_equal(again.outputs["y"], y + 1)
    assert again.outputs["y"].dtype == np.int32 and float(again.outputs["z"]) == 1.5
    assert not again.outputs["y"].flags.writeable


@pytest.mark.parametrize(
    ("tensors", "match"),
    [([bytes(15)], "needs 16"), ([], "carries 0"), ([bytes(16), bytes(16)], "carries 2")],
)
def test_a_known_reply_body_with_the_wrong_frames_is_refused(tensors: list[bytes], match: str) -> None:
    head = header({"outputs": [FP32_4]}, msg_type=MsgType.REPLY)
    decode_reply([head, bytes(16)])
    with pytest.raises(InvalidArgument, match=match):
        decode_reply([head, *tensors])


def test_a_known_reply_body_under_another_version_is_refused() -> None:
    body = {"outputs": [FP32_4]}
    decode_reply([header(body, msg_type=MsgType.REPLY), bytes(16)])
    with pytest.raises(InvalidArgument, match="version"):
        decode_reply([header(body, msg_type=MsgType.REPLY, version=VERSION + 1), bytes(16)])


@pytest.mark.parametrize("round_", [1, 2])  # the second round takes the remembered JSON
def test_reply_headers_match_the_generic_encoder(round_: int) -> None:
    outputs = {
        "a": np.zeros((2, 3), np.float32),
        "b": np.array(7, dtype=">i8"),  # big-endian: sent as little-endian INT64
        "c": np.zeros((0,), np.bool_),
    }
    frames = encode_reply(1 << 63, outputs)
    entries = [
        {"name": "a", "datatype": "FP32", "shape": [2, 3]},
        {"name": "b", "datatype": "INT64", "shape": []},
        {"name": "c", "datatype": "BOOL", "shape": [0]},
    ]
    assert frames[0] == encode_header(MsgType.REPLY, 1 << 63, {"outputs": entries})
    reply = decode_reply(frames)
    assert reply.outputs is not None and int(reply.outputs["b"]) == 7
    with pytest.raises(InvalidArgument):
        encode_reply(1 << 64, outputs)
