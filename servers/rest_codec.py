"""The KServe v2 HTTP tensor codec: JSON tensors and Triton's binary-tensor extension, both ways.

Pure functions over bytes, numpy and `servers.gateway_api.InferInput`; no web framework here, so the
codec is tested on its own and the REST routes stay thin.

Wire layout (https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md)::

    body = [ JSON header: L bytes ][ tensor 0 raw bytes ][ tensor 1 raw bytes ] ...
           L = header ``Inference-Header-Content-Length``; absent: the whole body is JSON.

In a request, the inputs carrying ``parameters.binary_data_size`` own the raw tails, in the order of
``inputs``; the tails must cover the rest of the body exactly. A response uses the same layout for the
outputs asked for with ``parameters.binary_data: true`` (or the request-wide ``binary_data_output``).
Raw bytes are C-order, little-endian, BOOL one byte per element.

Every malformed request raises `engine.errors.InvalidArgument` with a message naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.dtypes import KSERVE_TO_NUMPY, kserve_name
from engine.errors import InvalidArgument
from engine.models.spec import MAX_RANK
from servers.gateway_api import InferInput

#: Largest dimension a shape may name (KServe shapes are int64).
MAX_DIM = 2**63 - 1

#: numpy dtype kinds that JSON data may parse to, per target kind. JSON ints are fine for float
#: tensors; floats are refused for integer tensors and numbers for BOOL, as Triton does.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded ``/infer`` request body.

    Attributes:
        id: the client's request id ("" when absent); echoed in the response.
        inputs: the input tensors, data either a numpy array (JSON) or a view of the body (binary).
        outputs: requested output names in request order; None asks for every output.
        binary_outputs: the outputs that named ``parameters.binary_data`` explicitly.
        binary_default: ``parameters.binary_data_output`` of the request (for all other outputs).
        timeout_us: ``parameters.timeout`` in microseconds (Triton's unit); None when absent or 0.
    """

    id: str
    inputs: list[InferInput]
    outputs: list[str] | None
    binary_outputs: dict[str, bool]
    binary_default: bool
    timeout_us: int | None

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` goes into the binary tail of the response."""
        return self.binary_outputs.get(output, self.binary_default)


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int in ``[0, body_size]``, or None."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidArgument(
            f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}"
        )
    length = int(text)
    if length > body_size:
        raise InvalidArgument(
            f"Inference-Header-Content-Length {length} is larger than the request body ({body_size} bytes)"
        )
    return length


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode an ``/infer`` body (JSON, optionally followed by binary tensors).

    Args:
        body: the whole request body.
        header_length: the JSON part's size from ``Inference-Header-Content-Length`` (see
            `parse_header_length`); None means the body is all JSON.

    Raises:
        InvalidArgument: malformed JSON, wrong field types, bad shapes, or data that does not
            match its shape and datatype.
    """
    view = memoryview(body)
    json_part = view if header_length is None else view[:header_length]
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"request body must be a JSON object, got {_json_type(doc)}")

    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {_json_type(request_id)}")
    params = _object(doc.get("parameters"), "parameters")
    binary_default = _flag(params, "binary_data_output", "parameters")
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise InvalidArgument(
            f"parameters.timeout must be a non-negative integer (microseconds), got {timeout!r}"
        )

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    offset = len(view) if header_length is None else header_length
    inputs: list[InferInput] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_inputs):
        item, offset = _parse_input(raw, index, view, offset)
        if item.name in seen:
            raise InvalidArgument(f"input {item.name!r} is given twice")
        seen.add(item.name)
        inputs.append(item)
    if offset != len(view):
        raise InvalidArgument(
            f"request body has {len(view) - offset} bytes after the binary inputs; the inputs' "
            "binary_data_size values must add up to the body size minus Inference-Header-Content-Length"
        )

    outputs, binary_outputs = _parse_outputs(doc.get("outputs"))
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
        timeout_us=timeout or None,
    )


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    arrays: Mapping[str, np.ndarray],
    max_bytes: int,
) -> tuple[bytes, int | None]:
    """Encode the outputs of ``request``.

    Returns:
        ``(body, header_length)``: header_length is None for a pure JSON body, else the size of the
        JSON part before the binary outputs.

    Raises:
        InvalidArgument: the response would exceed ``max_bytes``.
    """
    names: Sequence[str] = request.outputs if request.outputs is not None else list(arrays)
    entries: list[dict[str, Any]] = []
    blobs: list[np.ndarray] = []
    blob_bytes = 0
    for name in names:
        array = np.ascontiguousarray(arrays[name])
        entry: dict[str, Any] = {"name": name, "datatype": kserve_name(array.dtype), "shape": array.shape}
        if request.wants_binary(name):
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array)
            blob_bytes += array.nbytes
        else:
            # orjson writes numpy arrays natively; flat, as Triton answers.
            entry["data"] = array.reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id:
        doc["id"] = request.id
    if blob_bytes > max_bytes:
        raise _too_large(blob_bytes, max_bytes)
    header = dumps(doc)
    size = len(header) + blob_bytes
    if size > max_bytes:
        raise _too_large(size, max_bytes)
    if not blobs:
        return header, None
    # One copy of each output, straight from (shared) memory into the response bytes.
    return b"".join([header, *(blob.data for blob in blobs)]), len(header)


def dumps(obj: Any) -> bytes:
    """orjson with numpy support; arrays orjson cannot write natively fall back to ``tolist``."""
    return orjson.dumps(obj, default=_default, option=_DUMPS_OPTIONS)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _too_large(size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"the response would be {size} bytes, over max_message_bytes={limit}; ask for fewer outputs "
        "or a smaller batch, or raise the front-end's max_message_bytes"
    )


def _parse_input(raw: Any, index: int, body: memoryview, offset: int) -> tuple[InferInput, int]:
    """One entry of ``inputs``; returns it and the offset of the next binary tail."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"inputs[{index}] must be an object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"inputs[{index}].name must be a non-empty string, got {name!r}")
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{where}: 'datatype' must be a string, got {_json_type(datatype)}")
    dtype = KSERVE_TO_NUMPY.get(datatype)
    if dtype is None:
        if datatype == "BYTES":
            raise InvalidArgument(f"{where}: datatype BYTES is not supported by this server")
        raise InvalidArgument(
            f"{where}: unknown datatype {datatype!r}; supported: {', '.join(KSERVE_TO_NUMPY)}"
        )
    shape = _parse_shape(raw.get("shape"), where)
    count = math.prod(shape)
    params = _object(raw.get("parameters"), f"{where}: parameters")
    binary_size = params.get("binary_data_size")
    data = raw.get("data")

    if binary_size is None:
        if data is None:
            raise InvalidArgument(f"{where}: needs 'data' or parameters.binary_data_size")
        array = _json_array(data, dtype, shape, count, where)
        return InferInput(name, datatype, shape, array), offset

    if type(binary_size) is not int or binary_size < 0:
        raise InvalidArgument(
            f"{where}: parameters.binary_data_size must be a non-negative integer, got {binary_size!r}"
        )
    if data is not None:
        raise InvalidArgument(f"{where}: give either 'data' or parameters.binary_data_size, not both")
    needed = count * dtype.itemsize
    if binary_size != needed:
        raise InvalidArgument(
            f"{where}: binary_data_size is {binary_size} bytes but shape {list(shape)} of {datatype} "
            f"needs {needed}"
        )
    end = offset + binary_size
    if end > len(body):
        raise InvalidArgument(
            f"{where}: binary data runs past the end of the body ({binary_size} bytes declared, "
            f"{len(body) - offset} left); was Inference-Header-Content-Length sent?"
        )
    return InferInput(name, datatype, shape, body[offset:end]), end


def _parse_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}: 'shape' must be a list of integers, got {_json_type(raw)}")
    if len(raw) > MAX_RANK:
        raise InvalidArgument(f"{where}: shape {raw} has rank {len(raw)}, more than the {MAX_RANK} supported")
    for dim in raw:
        # bool is an int subclass in Python but not an integer in JSON.
        if type(dim) is not int:
            raise InvalidArgument(f"{where}: shape {raw} must hold integers only")
        if dim < 0:
            raise InvalidArgument(f"{where}: shape {raw} has a negative dimension")
        if dim > MAX_DIM:
            raise InvalidArgument(f"{where}: shape {raw} has a dimension over 2**63-1")
    return tuple(raw)


def _json_array(data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int, where: str) -> np.ndarray:
    """JSON ``data`` (flat or nested list) as a C-contiguous array of ``shape`` and ``dtype``."""
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}: 'data' must be a list, got {_json_type(data)}")
    try:
        # Let numpy infer first so strings, nulls and objects are refused rather than coerced.
        parsed = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"{where}: 'data' must be a list of numbers, evenly nested") from None
    if parsed.size != count:
        raise InvalidArgument(
            f"{where}: shape {list(shape)} needs {count} elements, 'data' has {parsed.size}"
        )
    if count == 0:
        return np.empty(shape, dtype)
    if parsed.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        raise InvalidArgument(
            f"{where}: 'data' holds {_kind_name(parsed.dtype)}, not valid for {kserve_name(dtype)}"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = parsed.min(), parsed.max()
        if low < info.min or high > info.max:
            raise InvalidArgument(
                f"{where}: value {low if low < info.min else high} is out of range for {kserve_name(dtype)}"
            )
    with np.errstate(over="ignore"):
        # FP16 overflow becomes inf, as a cast in the model would.
        return parsed.astype(dtype, copy=False).reshape(shape)


def _parse_outputs(raw: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, list):
        raise InvalidArgument(f"'outputs' must be a list, got {_json_type(raw)}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{index}] must be an object, got {_json_type(item)}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{index}].name must be a non-empty string, got {name!r}")
        if name in binary or name in names:
            raise InvalidArgument(f"output {name!r} is requested twice")
        params = _object(item.get("parameters"), f"output {name!r}: parameters")
        if params.get("classification"):
            raise InvalidArgument(f"output {name!r}: the classification extension is not supported")
        if "binary_data" in params:
            binary[name] = _flag(params, "binary_data", f"output {name!r}: parameters")
        names.append(name)
    return (names or None), binary


def _object(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must be an object, got {_json_type(raw)}")
    return raw


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats"}.get(
        dtype.kind, "values that are not numbers"
    )
