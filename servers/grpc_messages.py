"""Conversions between the engine's types and the KServe v2 / Triton protobuf messages.

Pure functions used by `servers.grpc_server`: request inputs to `InferInput`, typed tensor contents to
numpy, model specs to metadata and config responses, gateway statistics to `ModelStatistics`. The
per-model responses are built once per `ModelSpec` and cached by `ModelCache`.

`encode_infer_response` writes a ModelInferResponse's wire bytes directly (the bytes protobuf's own
serializer writes for the same message): the fields that repeat for every answer of a model are
encoded once per `ModelEntry`, and each output goes from shared memory straight into the answer,
without the ``tobytes()`` copy and the second copy of serializing a message holding it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.dtypes import kserve_name, numpy_dtype
from engine.errors import InvalidArgument, NotFound
from engine.models.spec import ModelSpec
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from servers.gateway_api import Gateway, InferInput
from servers.grpc_infer_wire import InferRequestViews

#: Typed-contents field and its natural numpy dtype, per KServe datatype. FP16 has no typed field in
#: the protocol (clients must send raw contents); BYTES is not served by the shared-memory path.
TYPED_FIELDS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}

#: Triton's platform names for our backends (clients such as perf_analyzer look at this field).
PLATFORMS: dict[str, str] = {"torchscript": "pytorch_libtorch", "torch": "pytorch", "python": "python"}


def typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    """The elements of an input sent as typed ``contents``, as a C-contiguous array of its datatype.

    Raises:
        InvalidArgument: no typed field for the datatype, a negative dimension, an element count that
            does not match the shape, or a value out of range of the datatype (e.g. 300 for INT8).
    """
    name, datatype = tensor.name, tensor.datatype
    try:
        field, natural = TYPED_FIELDS[datatype]
    except KeyError:
        numpy_dtype(datatype)  # raises the generic "unsupported datatype" error for unknown names
        raise InvalidArgument(
            f"input {name!r}: datatype {datatype} has no typed contents field; send raw_input_contents"
        ) from None
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: negative dimension in {list(shape)}")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: {len(values)} elements in contents.{field}, shape {list(shape)} needs {count}"
        )
    array = np.asarray(values, dtype=natural)
    target = numpy_dtype(datatype)
    if target != natural:
        narrowed = array.astype(target)
        if not np.array_equal(narrowed, array):
            raise InvalidArgument(
                f"input {name!r}: a value in contents.{field} is out of range for {datatype}"
            )
        array = narrowed
    return array


def request_inputs(request: pb.ModelInferRequest | InferRequestViews) -> list[InferInput]:
    """The inputs of a request, from ``raw_input_contents`` when present, else from typed contents.

    Raw contents are passed as protobuf's bytes objects, or for a large request as views of the
    received message (`InferRequestViews`): no copy here; the gateway copies them into shared memory.
    """
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw:
        if len(raw) != len(tensors):
            raise InvalidArgument(
                f"{len(raw)} raw_input_contents for {len(tensors)} inputs; give one per input, in order"
            )
        # shape[:] is a list built in C: tuple() of it costs half of tuple() over the repeated field
        return [InferInput(t.name, t.datatype, tuple(t.shape[:]), raw[i]) for i, t in enumerate(tensors)]
    return [InferInput(t.name, t.datatype, tuple(t.shape), typed_contents(t)) for t in tensors]


def data_type(datatype: str) -> str:
    """The model_config ``DataType`` name of a KServe datatype name (``FP32`` -> ``TYPE_FP32``)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    mc.DataType.Value(name)  # ValueError for a name Triton does not know
    return name


def metadata_response(spec: ModelSpec) -> pb.ModelMetadataResponse:
    """ModelMetadata for a spec: shapes as clients send them (leading -1 when the model batches)."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=[spec.version],
        platform=PLATFORMS.get(spec.backend, spec.backend),
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=spec.full_shape(t)) for t in spec.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=spec.full_shape(t)) for t in spec.outputs],
    )


def config_response(spec: ModelSpec) -> pb.ModelConfigResponse:
    """A Triton-style ModelConfig: dims exclude the batch dimension, as in Triton's config.pbtxt."""
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORMS.get(spec.backend, spec.backend),
        backend=spec.backend,
        max_batch_size=spec.max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[
            mc.ModelInput(name=t.name, data_type=data_type(t.datatype), dims=t.shape) for t in spec.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=data_type(t.datatype), dims=t.shape) for t in spec.outputs
        ],
    )
    if spec.max_batch_size > 0:
        batching = spec.dynamic_batching
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=batching.max_queue_delay_us,
            )
        )
    gpus = [int(d.split(":", 1)[1]) for d in spec.devices if d.startswith("cuda:")]
    if gpus:
        config.instance_group.add(name=spec.name, kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    if "cpu" in spec.devices or not spec.devices:
        config.instance_group.add(name=spec.name, kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return pb.ModelConfigResponse(config=config)


def _duration(count: Any, ns: Any) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count or 0), ns=int(ns or 0))


def statistics_message(stats: Mapping[str, Any]) -> pb.ModelStatistics:
    """One model's gateway statistics (see `Gateway.statistics`) as a Triton ``ModelStatistics``.

    ``batch_stats`` may map a batch size to a count, or to a mapping with ``count`` and ``compute_ns``
    (or ``ns``); absent keys read as zero.
    """
    success = stats.get("success_count", 0)
    message = pb.ModelStatistics(
        name=str(stats.get("name", "")),
        version=str(stats.get("version", "")),
        last_inference=int(stats.get("last_inference_ms", 0) or 0),
        inference_count=int(stats.get("inference_count", 0) or 0),
        execution_count=int(stats.get("execution_count", 0) or 0),
        inference_stats=pb.InferStatistics(
            success=_duration(success, stats.get("success_ns")),
            fail=_duration(stats.get("fail_count"), stats.get("fail_ns")),
            queue=_duration(success, stats.get("queue_ns")),
            compute_infer=_duration(success, stats.get("compute_ns")),
        ),
    )
    # Input and output copies are not timed by every gateway: report them only when they are.
    for key, attr in (("compute_input_ns", "compute_input"), ("compute_output_ns", "compute_output")):
        if key in stats:
            getattr(message.inference_stats, attr).CopyFrom(_duration(success, stats[key]))
    for size, entry in sorted((stats.get("batch_stats") or {}).items(), key=lambda kv: int(kv[0])):
        if isinstance(entry, Mapping):
            count, ns = entry.get("count", 0), entry.get("compute_ns", entry.get("ns", 0))
        else:
            count, ns = entry, 0
        message.batch_stats.add(batch_size=int(size), compute_infer=_duration(count, ns))
    return message


def index_response(gateway: Gateway, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every model of the repository with READY / UNAVAILABLE and, when not ready, why."""
    errors = gateway.model_load_errors()
    response = pb.RepositoryIndexResponse()
    names = gateway.model_names()
    for name in [*names, *sorted(errors.keys() - set(names))]:
        try:
            version = gateway.model_spec(name).version
            ready = gateway.model_ready(name)
        except NotFound:
            version, ready = "", False
        if ready_only and not ready:
            continue
        reason = "" if ready else errors.get(name, "no worker serving the model is up")
        state = "READY" if ready else "UNAVAILABLE"
        response.models.add(name=name, version=version, state=state, reason=reason)
    return response


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """What the server answers for one model, built once per `ModelSpec`."""

    spec: ModelSpec
    metadata: pb.ModelMetadataResponse
    config: pb.ModelConfigResponse
    #: output name -> KServe datatype, so responses need no dtype lookup per output
    output_types: Mapping[str, str]
    #: the wire bytes of ModelInferResponse.model_name and .model_version, the same in every answer
    response_head: bytes = b""
    #: (declared output name, shape) -> the wire bytes of that ``outputs`` entry; at most `TENSOR_FIELDS_MAX`
    tensor_fields: dict[tuple[str, tuple[int, ...]], bytes] = field(default_factory=dict)


class ModelCache:
    """Per-model responses, rebuilt only when the gateway hands out a different spec object."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._entries: dict[str, ModelEntry] = {}

    def get(self, name: str, version: str = "") -> ModelEntry:
        """The entry of a model; NotFound for an unknown name or a version the model does not have."""
        spec = self._gateway.model_spec(name)
        entry = self._entries.get(name)
        if entry is None or entry.spec is not spec:
            entry = ModelEntry(
                spec=spec,
                metadata=metadata_response(spec),
                config=config_response(spec),
                output_types={t.name: t.datatype for t in spec.outputs},
                response_head=_string_field(_MODEL_NAME, name) + _string_field(_MODEL_VERSION, spec.version),
            )
            self._entries[name] = entry
        if version and version != spec.version:
            raise NotFound(f"model {name!r} has no version {version!r}; versions: {spec.version}")
        return entry


# --- ModelInferResponse wire bytes -----------------------------------------------------------------
# Protobuf's encoding (https://protobuf.dev/programming-guides/encoding/): each field is its tag
# (field number << 3 | wire type) then, for strings, bytes, messages and packed repeated scalars
# (wire type 2), a varint length and the payload; fields in field-number order, proto3 fields that
# hold their default (empty string, empty list) left out. That is the order and the omissions of
# protobuf's serializer, so these bytes are the ones SerializeToString writes (tested field by field).

#: `ModelEntry.tensor_fields` stops growing here: shapes come from clients, memory must not.
TENSOR_FIELDS_MAX = 1024


def _tag(message: Any, name: str) -> bytes:
    """The one-byte tag of a length-delimited field (every field this encoder writes is one)."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    if not 0 < number < 16:
        raise RuntimeError(f"{message.DESCRIPTOR.full_name}.{name}: field number {number} needs a longer tag")
    return bytes(((number << 3) | 2,))


_MODEL_NAME = _tag(pb.ModelInferResponse, "model_name")
_MODEL_VERSION = _tag(pb.ModelInferResponse, "model_version")
_ID = _tag(pb.ModelInferResponse, "id")
_OUTPUTS = _tag(pb.ModelInferResponse, "outputs")
_RAW_OUTPUT = _tag(pb.ModelInferResponse, "raw_output_contents")
_TENSOR_NAME = _tag(pb.ModelInferResponse.InferOutputTensor, "name")
_TENSOR_DATATYPE = _tag(pb.ModelInferResponse.InferOutputTensor, "datatype")
_TENSOR_SHAPE = _tag(pb.ModelInferResponse.InferOutputTensor, "shape")
_STREAM_INFER_RESPONSE = _tag(pb.ModelStreamInferResponse, "infer_response")
_ONE_BYTE = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string_field(tag: bytes, value: str) -> bytes:
    if not value:
        return b""
    data = value.encode()
    return tag + _varint(len(data)) + data


def _tensor_field(entry: ModelEntry, name: str, array: np.ndarray) -> bytes:
    """The ``outputs`` entry of an output: name, datatype, shape (packed int64)."""
    shape = array.shape
    declared = entry.output_types.get(name)
    packed = b"".join(_varint(d) for d in shape)
    body = _string_field(_TENSOR_NAME, name) + _string_field(
        _TENSOR_DATATYPE, declared or kserve_name(array.dtype)
    )
    if packed:
        body += _TENSOR_SHAPE + _varint(len(packed)) + packed
    encoded = _OUTPUTS + _varint(len(body)) + body
    # an undeclared output's datatype follows its dtype, which the (name, shape) key does not hold
    if declared and len(entry.tensor_fields) < TENSOR_FIELDS_MAX:
        entry.tensor_fields[name, shape] = encoded
    return encoded


def encode_infer_response(
    entry: ModelEntry, request_id: str, outputs: Mapping[str, np.ndarray], *, stream: bool = False
) -> bytes:
    """The wire bytes of the ModelInferResponse answering a request of ``entry``'s model.

    The same bytes as ``pb.ModelInferResponse(model_name=..., model_version=entry.spec.version,
    id=request_id)`` with one ``outputs`` entry (name, datatype, shape) and one ``raw_output_contents``
    item per array, serialized. Each array is copied once, into the returned bytes, so arrays that
    are views into shared memory may be released as soon as this returns.

    Args:
        entry: the model's entry (its name and version and cached output fields).
        request_id: the request's ``id`` (echoed).
        outputs: output name -> array, in the order of the response.
        stream: wrap the response in a ModelStreamInferResponse (``infer_response``).
    """
    return b"".join(infer_response_pieces(entry, request_id, outputs, stream=stream)[0])


def infer_response_pieces(
    entry: ModelEntry, request_id: str, outputs: Mapping[str, np.ndarray], *, stream: bool = False
) -> tuple[list[Any], int]:
    """`encode_infer_response` before the join: the pieces (bytes, and the C-contiguous arrays as
    they are), and the arrays' bytes. Writing the pieces one after the other writes the response;
    `pieces_nbytes` is its size."""
    parts: list[Any] = [entry.response_head]
    if request_id:
        parts.append(_string_field(_ID, request_id))
    tensors = entry.tensor_fields
    contents: list[Any] = []
    data_bytes = 0
    for name, array in outputs.items():
        tensor = tensors.get((name, array.shape))
        parts.append(tensor if tensor is not None else _tensor_field(entry, name, array))
        nbytes = array.nbytes
        data_bytes += nbytes
        contents.append(_RAW_OUTPUT + _varint(nbytes))
        # as it is: a C-contiguous array's buffer holds exactly the bytes tobytes() would copy
        contents.append(array if array.flags.c_contiguous else np.ascontiguousarray(array))
    parts += contents
    if stream:
        parts[:0] = (_STREAM_INFER_RESPONSE, _varint(pieces_nbytes(parts, data_bytes)))
    return parts, data_bytes


def pieces_nbytes(pieces: list[Any], data_bytes: int) -> int:
    """The size of `infer_response_pieces`'s pieces whose arrays hold ``data_bytes``."""
    return data_bytes + sum(len(p) for p in pieces if type(p) is bytes)  # every piece but the arrays


@dataclass(slots=True)
class ViewedMessage:
    """A response message in pieces, some of them viewing a result's shared memory: the transport
    writes them as they are and calls `release` once it holds none of their bytes."""

    pieces: list[Any]
    nbytes: int
    release: Callable[[], None]
