"""`servers.grpc_infer_wire`: large ModelInferRequests keep their raw contents as views of the
received message, and parse to what protobuf itself makes of the same bytes."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from protos import grpc_service_pb2 as pb
from servers.grpc_infer_wire import (
    RAW_INPUT_CONTENTS,
    SCAN_MIN_BYTES,
    InferRequestViews,
    parse_infer_request,
    split_field,
)


def big_request(sizes: list[int], **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(**{"model_name": "identity", "id": "r-1", "model_version": "3", **fields})
    for i, size in enumerate(sizes):
        request.inputs.add(name=f"INPUT{i}", datatype="UINT8", shape=[1, size])
        request.raw_input_contents.append(bytes([i + 1]) * size)
    request.outputs.add(name="OUTPUT0")
    request.parameters["priority"].int64_param = 7
    return request


def assert_same(parsed: pb.ModelInferRequest | InferRequestViews, expected: pb.ModelInferRequest) -> None:
    assert parsed.model_name == expected.model_name
    assert parsed.model_version == expected.model_version
    assert parsed.id == expected.id
    assert list(parsed.inputs) == list(expected.inputs)
    assert list(parsed.outputs) == list(expected.outputs)
    assert dict(parsed.parameters) == dict(expected.parameters)
    assert [bytes(r) for r in parsed.raw_input_contents] == list(expected.raw_input_contents)


def test_a_large_request_keeps_its_raw_contents_as_views_of_the_message() -> None:
    expected = big_request([SCAN_MIN_BYTES, 3, 200_000])
    data = expected.SerializeToString()
    parsed = parse_infer_request(data)
    assert isinstance(parsed, InferRequestViews)
    assert all(isinstance(r, memoryview) and r.obj is data for r in parsed.raw_input_contents)
    assert_same(parsed, expected)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_message_may_be_any_buffer(kind: type) -> None:
    expected = big_request([SCAN_MIN_BYTES])
    data = expected.SerializeToString()
    buffer = kind(data) if kind is not memoryview else memoryview(bytearray(b"xx" + data))[2:]
    assert_same(parse_infer_request(buffer), expected)


def test_a_small_request_is_left_to_protobuf() -> None:
    expected = big_request([16, 16])
    parsed = parse_infer_request(expected.SerializeToString())
    assert isinstance(parsed, pb.ModelInferRequest)
    assert_same(parsed, expected)


def test_a_large_request_without_raw_contents_is_left_to_protobuf() -> None:
    expected = pb.ModelInferRequest(model_name="identity")
    tensor = expected.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 20_000])
    tensor.contents.fp32_contents.extend([1.5] * 20_000)
    data = expected.SerializeToString()
    assert len(data) >= SCAN_MIN_BYTES
    parsed = parse_infer_request(data)
    assert isinstance(parsed, pb.ModelInferRequest) and parsed == expected


def test_interleaved_and_unknown_fields_parse_as_protobuf_parses_them() -> None:
    # raw contents between other fields, fields repeated, and field numbers protobuf does not know
    # (each wire type): the scan keeps everything but field 7, in order
    first = big_request([SCAN_MIN_BYTES]).SerializeToString()
    second = pb.ModelInferRequest(id="r-2", raw_input_contents=[b"tail"]).SerializeToString()
    unknown = (
        bytes([(10 << 3) | 0]) + b"\x96\x01"  # varint
        + bytes([(11 << 3) | 1]) + b"\x01" * 8  # 64-bit
        + bytes([(12 << 3) | 5]) + b"\x02" * 4  # 32-bit
        + bytes([0xE8, 0x07]) + b"\x05"  # field 125 (a two-byte key), varint
        + bytes([(13 << 3) | 2]) + b"\x03abc"  # length-delimited
    )  # fmt: skip
    data = first + unknown + second
    expected = pb.ModelInferRequest.FromString(data)
    parsed = parse_infer_request(data)
    assert isinstance(parsed, InferRequestViews)
    assert_same(parsed, expected)
    assert [bytes(r)[:4] for r in parsed.raw_input_contents] == [b"\x01" * 4, b"tail"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:-1], id="truncated raw contents"),
        pytest.param(lambda d: d + b"\x0a", id="truncated length"),
        pytest.param(lambda d: d + b"\x0a\xff\xff", id="truncated varint"),
        pytest.param(lambda d: d + bytes([(RAW_INPUT_CONTENTS << 3) | 0, 1]), id="field 7 as a varint"),
        pytest.param(lambda d: d + b"\x00\x01", id="field 0"),
        pytest.param(lambda d: d + bytes([(9 << 3) | 3]), id="a group"),
        pytest.param(lambda d: d + b"\x0a" + b"\xff" * 11, id="an 11-byte varint"),
    ],
)
def test_what_the_scan_does_not_follow_gets_protobufs_verdict(damage: object) -> None:
    data = damage(big_request([SCAN_MIN_BYTES]).SerializeToString())  # type: ignore[operator]
    try:
        expected = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(data)
    else:
        assert_same(parse_infer_request(data), expected)


def test_split_field_against_protobuf_on_random_messages() -> None:
    rng = random.Random(7)
    for _ in range(200):
        sizes = [rng.choice([0, 1, 127, 128, 300, 16_384]) for _ in range(rng.randint(0, 4))]
        request = big_request(sizes, id="x" * rng.randint(0, 200))
        data = request.SerializeToString()
        split = split_field(data, RAW_INPUT_CONTENTS)
        assert split is not None
        rest, raw = split
        assert [bytes(r) for r in raw] == list(request.raw_input_contents)
        without = pb.ModelInferRequest()
        without.CopyFrom(request)
        del without.raw_input_contents[:]
        assert pb.ModelInferRequest.FromString(rest) == without
