"""The KServe v2 HTTP tensor codec (servers.rest_codec) and the REST metadata documents, without a server."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import orjson
import pytest

from engine.errors import InvalidArgument
from servers.rest_codec import (
    InferRequest,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
)
from servers.rest_metadata import model_config, model_metadata, repository_index, triton_type
from tests.fakes import SPECS, FakeGateway


def _json(doc: Any) -> bytes:
    return orjson.dumps(doc)


def _tensor(name: Any, datatype: str, shape: Any, data: Any = None, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        entry["data"] = data
    if params:
        entry["parameters"] = params
    return entry


def _binary_body(doc: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    header = _json(doc)
    return header + b"".join(blobs), len(header)


# ---- requests: JSON tensors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT32", [[1, 2, 3], [4, 5, 6]], np.arange(1, 7, dtype=np.int32).reshape(2, 3)),
        ("INT32", [1, 2, 3, 4, 5, 6], np.arange(1, 7, dtype=np.int32).reshape(2, 3)),
        ("FP32", [1, 2.5, 3, 4, 5, 6], np.array([1, 2.5, 3, 4, 5, 6], np.float32).reshape(2, 3)),
        ("FP16", [0.5] * 6, np.full((2, 3), 0.5, np.float16)),
        ("BOOL", [True, False] * 3, np.array([True, False] * 3).reshape(2, 3)),
        ("UINT64", [2**64 - 1] * 6, np.full((2, 3), 2**64 - 1, np.uint64)),
        ("INT8", [-128, 127] * 3, np.array([-128, 127] * 3, np.int8).reshape(2, 3)),
    ],
)
def test_json_tensor_flat_or_nested(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    body = _json({"id": "r1", "inputs": [_tensor("X", datatype, [2, 3], data)]})
    request = parse_infer_request(body)
    assert request.id == "r1"
    (item,) = request.inputs
    assert (item.name, item.datatype, item.shape) == ("X", datatype, (2, 3))
    assert isinstance(item.data, np.ndarray)
    assert item.data.dtype == expected.dtype
    assert item.data.flags.c_contiguous
    np.testing.assert_array_equal(item.data, expected)


def test_empty_tensor() -> None:
    request = parse_infer_request(_json({"inputs": [_tensor("X", "INT32", [0, 4], [])]}))
    assert isinstance(request.inputs[0].data, np.ndarray)
    assert request.inputs[0].data.shape == (0, 4)


def test_defaults_without_outputs_or_parameters() -> None:
    request = parse_infer_request(_json({"inputs": [_tensor("X", "FP32", [1], [1.0])]}))
    assert request.id == ""
    assert request.outputs is None
    assert request.timeout_us is None
    assert not request.wants_binary("anything")


def test_outputs_and_binary_flags() -> None:
    doc = {
        "parameters": {"binary_data_output": True, "timeout": 1500},
        "inputs": [_tensor("X", "FP32", [1], [1.0])],
        "outputs": [{"name": "A", "parameters": {"binary_data": False}}, {"name": "B"}],
    }
    request = parse_infer_request(_json(doc))
    assert request.outputs == ["A", "B"]
    assert request.timeout_us == 1500
    assert not request.wants_binary("A")
    assert request.wants_binary("B")


# ---- requests: binary tensors --------------------------------------------------------------------


def test_binary_inputs_are_views_of_the_body() -> None:
    a = np.arange(16, dtype=np.int32)
    b = np.ones((2, 3), dtype=np.float64)
    doc = {
        "inputs": [
            _tensor("A", "INT32", [1, 16], binary_data_size=a.nbytes),
            _tensor("J", "BOOL", [2], [True, False]),
            _tensor("B", "FP64", [2, 3], binary_data_size=b.nbytes),
        ]
    }
    body, length = _binary_body(doc, a.tobytes(), b.tobytes())
    request = parse_infer_request(body, length)
    got = {item.name: item for item in request.inputs}
    assert isinstance(got["A"].data, memoryview)
    assert got["A"].data.obj is body  # no copy of the payload
    np.testing.assert_array_equal(np.frombuffer(got["A"].data, np.int32), a)
    np.testing.assert_array_equal(np.frombuffer(got["B"].data, np.float64).reshape(2, 3), b)
    np.testing.assert_array_equal(got["J"].data, [True, False])


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [(None, 10, None), ("0", 10, 0), ("10", 10, 10), (" 7 ", 10, 7)],
)
def test_header_length(value: str | None, size: int, expected: int | None) -> None:
    assert parse_header_length(value, size) == expected


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "11", "", "\u0661"])
def test_bad_header_length(value: str) -> None:
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length"):
        parse_header_length(value, 10)


def _bad_binary(case: str) -> tuple[bytes, int | None]:
    a = np.arange(4, dtype=np.int32).tobytes()
    doc = {"inputs": [_tensor("A", "INT32", [4], binary_data_size=16)]}
    if case == "size_vs_shape":
        doc = {"inputs": [_tensor("A", "INT32", [5], binary_data_size=16)]}
        return _binary_body(doc, a)
    if case == "short_body":
        return _binary_body(doc, a[:8])
    if case == "trailing_bytes":
        return _binary_body(doc, a, b"xx")
    if case == "no_header_length":
        return _binary_body(doc, a)[0], None
    if case == "data_and_binary":
        doc = {"inputs": [_tensor("A", "INT32", [4], [1, 2, 3, 4], binary_data_size=16)]}
        return _binary_body(doc, a)
    if case == "negative_size":
        doc = {"inputs": [_tensor("A", "INT32", [4], binary_data_size=-16)]}
        return _binary_body(doc, a)
    if case == "size_not_int":
        doc = {"inputs": [_tensor("A", "INT32", [4], binary_data_size="16")]}
        return _binary_body(doc, a)
    if case == "overflow_shape":
        doc = {"inputs": [_tensor("A", "INT32", [2**62, 2**62], binary_data_size=16)]}
        return _binary_body(doc, a)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "size_vs_shape",
        "short_body",
        "trailing_bytes",
        "no_header_length",
        "data_and_binary",
        "negative_size",
        "size_not_int",
        "overflow_shape",
    ],
)
def test_binary_mismatches(case: str) -> None:
    body, length = _bad_binary(case)
    with pytest.raises(InvalidArgument):
        parse_infer_request(body, length)


# ---- requests: malformed -------------------------------------------------------------------------

_OK = _tensor("X", "INT32", [2], [1, 2])

MALFORMED: list[tuple[str, Any, str]] = [
    ("not_json", b"{inputs:", "malformed JSON"),
    ("truncated", b'{"inputs": [', "malformed JSON"),
    ("not_utf8", b'{"id": "\xff"}', "malformed JSON"),
    ("empty", b"", "malformed JSON"),
    ("list", [1, 2], "JSON object"),
    ("no_inputs", {"id": "x"}, "'inputs'"),
    ("empty_inputs", {"inputs": []}, "'inputs'"),
    ("inputs_object", {"inputs": {"X": 1}}, "'inputs'"),
    ("input_not_object", {"inputs": [3]}, "inputs[0]"),
    ("id_number", {"id": 3, "inputs": [_OK]}, "'id'"),
    ("parameters_list", {"parameters": [], "inputs": [_OK]}, "parameters"),
    (
        "binary_output_string",
        {"parameters": {"binary_data_output": "yes"}, "inputs": [_OK]},
        "binary_data_output",
    ),
    ("timeout_negative", {"parameters": {"timeout": -1}, "inputs": [_OK]}, "timeout"),
    ("timeout_float", {"parameters": {"timeout": 1.5}, "inputs": [_OK]}, "timeout"),
    ("no_name", {"inputs": [{"datatype": "INT32", "shape": [1], "data": [1]}]}, "name"),
    ("name_number", {"inputs": [_tensor(3, "INT32", [1], [1])]}, "name"),
    ("duplicate_input", {"inputs": [_OK, _OK]}, "twice"),
    ("no_datatype", {"inputs": [{"name": "X", "shape": [1], "data": [1]}]}, "datatype"),
    ("unknown_datatype", {"inputs": [_tensor("X", "INT33", [1], [1])]}, "unknown datatype"),
    ("bytes", {"inputs": [_tensor("X", "BYTES", [1], ["a"])]}, "BYTES"),
    ("shape_missing", {"inputs": [{"name": "X", "datatype": "INT32", "data": [1]}]}, "shape"),
    ("shape_string", {"inputs": [_tensor("X", "INT32", "2", [1, 2])]}, "shape"),
    ("shape_float", {"inputs": [_tensor("X", "INT32", [2.0], [1, 2])]}, "integers"),
    ("shape_bool", {"inputs": [_tensor("X", "INT32", [True], [1])]}, "integers"),
    ("negative_dim", {"inputs": [_tensor("X", "INT32", [-1, 2], [1, 2])]}, "negative"),
    ("rank_too_high", {"inputs": [_tensor("X", "INT32", [1] * 9, [1])]}, "rank"),
    ("dim_over_int64", {"inputs": [_tensor("X", "INT32", [0, 2**63], [])]}, "2**63"),
    ("overflow_count", {"inputs": [_tensor("X", "INT32", [2**32, 2**32], [1, 2])]}, "elements"),
    ("wrong_count", {"inputs": [_tensor("X", "INT32", [3], [1, 2])]}, "elements"),
    ("no_data", {"inputs": [_tensor("X", "INT32", [2])]}, "'data'"),
    ("data_scalar", {"inputs": [_tensor("X", "INT32", [1], 5)]}, "list"),
    ("data_strings", {"inputs": [_tensor("X", "INT32", [2], ["1", "2"])]}, "not valid for INT32"),
    ("data_null", {"inputs": [_tensor("X", "FP32", [2], [1.0, None])]}, "not numbers"),
    ("data_objects", {"inputs": [_tensor("X", "FP32", [1], [{"a": 1}])]}, "not numbers"),
    ("ragged", {"inputs": [_tensor("X", "INT32", [2, 2], [[1, 2], [3]])]}, "evenly nested"),
    ("float_for_int", {"inputs": [_tensor("X", "INT32", [2], [1.5, 2])]}, "floats"),
    ("number_for_bool", {"inputs": [_tensor("X", "BOOL", [2], [1, 0])]}, "integers"),
    ("bool_for_float", {"inputs": [_tensor("X", "FP32", [2], [True, False])]}, "booleans"),
    ("int_out_of_range", {"inputs": [_tensor("X", "INT8", [2], [1, 300])]}, "out of range"),
    ("negative_unsigned", {"inputs": [_tensor("X", "UINT8", [2], [1, -1])]}, "out of range"),
    ("huge_int", {"inputs": [_tensor("X", "INT64", [1], [2**64])]}, "INT64"),
    ("outputs_object", {"inputs": [_OK], "outputs": {"name": "Y"}}, "'outputs'"),
    ("output_no_name", {"inputs": [_OK], "outputs": [{}]}, "outputs[0].name"),
    ("output_twice", {"inputs": [_OK], "outputs": [{"name": "Y"}, {"name": "Y"}]}, "twice"),
    (
        "output_binary_string",
        {"inputs": [_OK], "outputs": [{"name": "Y", "parameters": {"binary_data": 1}}]},
        "binary_data",
    ),
    (
        "classification",
        {"inputs": [_OK], "outputs": [{"name": "Y", "parameters": {"classification": 3}}]},
        "classification",
    ),
]


@pytest.mark.parametrize(("case", "doc", "message"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_requests_are_invalid_argument(case: str, doc: Any, message: str) -> None:
    body = doc if isinstance(doc, bytes) else _json(doc) if case != "huge_int" else _huge_int_body()
    with pytest.raises(InvalidArgument, match=re.escape(message)) as info:
        parse_infer_request(body)
    assert info.value.http_status == 400


def _huge_int_body() -> bytes:
    # orjson refuses to write ints over 64 bits, so spell it out.
    return b'{"inputs": [{"name": "X", "datatype": "INT64", "shape": [1], "data": [18446744073709551616]}]}'


# ---- responses -----------------------------------------------------------------------------------


def _request(
    outputs: list[str] | None = None,
    binary: dict[str, bool] | None = None,
    default: bool = False,
    request_id: str = "",
) -> InferRequest:
    return InferRequest(request_id, [], outputs, binary or {}, default, None)


def test_json_response_is_flat() -> None:
    arrays = {
        "A": np.arange(6, dtype=np.int32).reshape(2, 3),
        "B": np.array([[True], [False]]),
        "C": np.array([0.5, 1.5], dtype=np.float16),
    }
    body, length = encode_infer_response("m", "1", _request(request_id="7"), arrays, 1 << 20)
    assert length is None
    doc = orjson.loads(body)
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "1"
    assert doc["id"] == "7"
    assert doc["outputs"] == [
        {"name": "A", "datatype": "INT32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]},
        {"name": "B", "datatype": "BOOL", "shape": [2, 1], "data": [True, False]},
        {"name": "C", "datatype": "FP16", "shape": [2], "data": [0.5, 1.5]},
    ]


def test_non_contiguous_output() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    body, _ = encode_infer_response("m", "1", _request(), {"A": array}, 1 << 20)
    assert orjson.loads(body)["outputs"][0]["data"] == array.ravel().tolist()


def test_binary_response_layout() -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.linspace(0, 1, 5, dtype=np.float32)
    request = _request(outputs=["B", "A"], binary={"A": True}, default=False)
    body, length = encode_infer_response("m", "1", request, {"A": a, "B": b}, 1 << 20)
    assert length is not None
    header = orjson.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == ["B", "A"]
    assert header["outputs"][0]["data"] == pytest.approx(b.tolist())
    assert header["outputs"][1]["parameters"] == {"binary_data_size": a.nbytes}
    assert "data" not in header["outputs"][1]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.int32).reshape(1, 16), a)


def test_binary_default_covers_unnamed_outputs() -> None:
    a = np.ones(3, np.uint8)
    body, length = encode_infer_response("m", "1", _request(default=True), {"A": a}, 1 << 20)
    assert length is not None
    assert body[length:] == a.tobytes()


def test_response_over_the_limit() -> None:
    big = np.zeros(1000, np.float64)
    for binary in (False, True):
        with pytest.raises(InvalidArgument, match="max_message_bytes"):
            encode_infer_response("m", "1", _request(default=binary), {"A": big}, 4000)


def test_roundtrip_random_tensors() -> None:
    seed = 20240611
    rng = np.random.default_rng(seed)
    for datatype, dtype in [("FP32", np.float32), ("INT64", np.int64), ("UINT16", np.uint16)]:
        shape = tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(1, 4)))
        array = (rng.standard_normal(shape) * 100).astype(dtype)
        json_body = _json({"inputs": [_tensor("X", datatype, list(shape), array.tolist())]})
        bin_body, length = _binary_body(
            {"inputs": [_tensor("X", datatype, list(shape), binary_data_size=array.nbytes)]}, array.tobytes()
        )
        via_json = parse_infer_request(json_body).inputs[0]
        via_binary = parse_infer_request(bin_body, length).inputs[0]
        np.testing.assert_array_equal(np.asarray(via_json.data), array, err_msg=f"seed={seed}")
        np.testing.assert_array_equal(
            np.frombuffer(via_binary.data, dtype).reshape(shape), array, err_msg=f"seed={seed}"
        )


# ---- metadata documents --------------------------------------------------------------------------


def test_model_metadata_has_batch_dim() -> None:
    doc = model_metadata(SPECS["simple"])
    assert doc["name"] == "simple"
    assert doc["versions"] == ["1"]
    assert doc["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert doc["outputs"][1] == {"name": "OUTPUT1", "datatype": "INT32", "shape": [-1, 16]}


def test_model_config_is_triton_style() -> None:
    doc = model_config(SPECS["identity"])
    assert doc["max_batch_size"] == 64
    assert doc["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 200
    assert triton_type("BYTES") == "TYPE_STRING"


def test_repository_index_states() -> None:
    gateway = FakeGateway()
    assert {e["name"]: e["state"] for e in repository_index(gateway)} == dict.fromkeys(SPECS, "READY")
    gateway.ready = False
    index = repository_index(gateway)
    assert all(e["state"] == "UNAVAILABLE" and e["reason"] for e in index)
    assert repository_index(gateway, ready_only=True) == []
