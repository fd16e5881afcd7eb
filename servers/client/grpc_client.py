"""Python clients of the gRPC front-end: `GrpcClient` (blocking) and `AsyncGrpcClient` (asyncio).

Both speak KServe v2 (``inference.GRPCInferenceService``) over the stubs in `protos`, so they work
against this engine and any other v2 server. Tensors travel as numpy arrays in
``raw_input_contents``; outputs come back as read-only arrays over the response bytes (no copy).

Scale-out: give several endpoints (``"host1:7212,host2:7212"`` or a list) and requests go round robin
across them (`servers.client.endpoints.EndpointPool`). An endpoint that answers UNAVAILABLE (refused
or dropped connection, draining server, worker down) is marked down for a cool-down and the request
is sent to the next one; RESOURCE_EXHAUSTED (an overloaded server) also moves the request on, without
marking the endpoint down. A request is tried at most once per endpoint, all within its timeout.
Inference is stateless, so a retried request computes the same answer. Other errors are raised at once
as the `engine.errors` class of their status code.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from engine.dtypes import kserve_name, numpy_dtype
from engine.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.client.endpoints import DEFAULT_COOLDOWN_S, EndpointPool
from servers.grpc_messages import TYPED_FIELDS

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Channel options: no client-side size cap (the server enforces its own ``max_message_mb``), and a
#: short reconnect backoff so an endpoint that comes back is used again within seconds (gRPC's
#: default backoff grows to two minutes).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

_ERRORS: dict[grpc.StatusCode, type[EngineError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
#: Codes that send the request on to the next endpoint; the first also marks the endpoint down.
_FAIL_OVER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_LITTLE = sys.byteorder == "little"


def encode_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``inputs`` as raw little-endian row-major bytes.

    Raises:
        InvalidArgument: an array whose dtype has no KServe datatype.
    """
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = kserve_name(array.dtype)
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
            array = array.astype(array.dtype.newbyteorder("<"))
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes(order="C"))
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def decode_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The outputs of a ModelInferResponse by name: read-only arrays over its raw bytes, or built
    from typed contents when the server sent no raw contents.

    Raises:
        InternalError: a response whose tensors do not match their bytes.
    """
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InternalError(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        try:
            dtype = numpy_dtype(tensor.datatype)
            if raw:
                array = np.frombuffer(raw[i], dtype=dtype.newbyteorder("<")).reshape(shape)
            else:
                field, _ = TYPED_FIELDS[tensor.datatype]
                array = np.asarray(getattr(tensor.contents, field), dtype=dtype).reshape(shape)
        except (InvalidArgument, KeyError, ValueError) as exc:
            raise InternalError(f"output {tensor.name!r} ({tensor.datatype} {list(shape)}): {exc}") from None
        result[tensor.name] = array
    return result


def engine_error(error: grpc.RpcError, endpoint: str) -> EngineError:
    """The `engine.errors` class of a failed RPC's status code, with the server's message."""
    code: grpc.StatusCode = error.code()
    details = error.details() or code.name
    return _ERRORS.get(code, InternalError)(f"{details} ({endpoint})")


def _timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return timeout_s


class _Policy:
    """What the sync and async clients share: the endpoint pool, the call metadata, deadlines and
    what a failed call means for the failover loop."""

    def __init__(
        self, endpoints: str | Sequence[str], timeout_s: float, token: str | None, cooldown_s: float
    ) -> None:
        self.timeout_s = _timeout(timeout_s)
        self.pool = EndpointPool(endpoints, cooldown_s=cooldown_s)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else _timeout(timeout_s))

    def remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{what}: no answer from {', '.join(self.pool.endpoints)} in time")
        return left

    def failed(self, index: int, error: grpc.RpcError, what: str) -> tuple[EngineError, bool]:
        """The error of a failed call, and whether the request moves on to another endpoint."""
        endpoint = self.pool.endpoints[index]
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_down(index)
        move_on = code in _FAIL_OVER
        if move_on:
            log.debug("grpc client: %s failed on %s (%s); trying another endpoint", what, endpoint, code.name)
        return engine_error(error, endpoint), move_on


class GrpcClient:
    """Blocking KServe v2 gRPC client over one or several endpoints; safe to share between threads.

    Args:
        endpoints: ``host:port``, a comma-separated list of them, or a sequence.
        timeout_s: default per-request timeout, covering every endpoint tried.
        token: bearer token sent with every call (when the server requires one).
        cooldown_s: how long an endpoint that failed is skipped while others are up.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self._policy = _Policy(endpoints, timeout_s, token, cooldown_s)
        self.endpoints = self._policy.pool.endpoints
        self.timeout_s = timeout_s
        self._channels = [grpc.insecure_channel(e, options=CHANNEL_OPTIONS) for e in self.endpoints]
        self._stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self._channels]

    @property
    def pool(self) -> EndpointPool:
        """The round-robin and cool-down state of the endpoints."""
        return self._policy.pool

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference and return its outputs by name.

        Raises:
            DeadlineExceeded: no answer within the timeout.
            EngineError: the server's error (InvalidArgument, NotFound, ...); Unavailable when every
                endpoint is down.
        """
        request = encode_infer_request(model, inputs, outputs)
        metadata = self._policy.metadata

        def rpc(stub: Any, timeout: float) -> pb.ModelInferResponse:
            return stub.ModelInfer(request, timeout=timeout, metadata=metadata)

        return decode_infer_response(self._call(rpc, timeout_s, f"infer {model!r}"))

    def is_ready(self, timeout_s: float | None = None) -> bool:
        """True when an endpoint answers that it is ready (tried in the pool's order); False when
        none does within the timeout."""
        deadline = self._policy.deadline(timeout_s)
        for index in self._policy.pool.candidates():
            try:
                left = self._policy.remaining(deadline, "is_ready")
                response = self._stubs[index].ServerReady(
                    pb.ServerReadyRequest(), timeout=left, metadata=self._policy.metadata
                )
            except DeadlineExceeded:
                return False
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._policy.pool.mark_down(index)
                continue
            if response.ready:
                return True
        return False

    def close(self) -> None:
        """Close every channel; safe to call twice."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: Callable[[Any, float], T], timeout_s: float | None, what: str) -> T:
        policy = self._policy
        deadline = policy.deadline(timeout_s)
        tried: list[int] = []
        last: EngineError = Unavailable(f"{what}: no endpoint")
        while candidates := policy.pool.candidates(exclude=tried):
            index = candidates[0]
            try:
                return rpc(self._stubs[index], policy.remaining(deadline, what))
            except grpc.RpcError as error:
                last, move_on = policy.failed(index, error, what)
                if not move_on:
                    raise last from None
                tried.append(index)
        raise last  # every endpoint answered UNAVAILABLE or RESOURCE_EXHAUSTED


class AsyncGrpcClient:
    """asyncio KServe v2 gRPC client (``grpc.aio``) over one or several endpoints; ``await infer``
    from any number of tasks at once. Create it in the event loop that uses it; ``await close()``.

    Args:
        endpoints: ``host:port``, a comma-separated list of them, or a sequence.
        timeout_s: default per-request timeout, covering every endpoint tried.
        token: bearer token sent with every call (when the server requires one).
        cooldown_s: how long an endpoint that failed is skipped while others are up.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self._policy = _Policy(endpoints, timeout_s, token, cooldown_s)
        self.endpoints = self._policy.pool.endpoints
        self.timeout_s = timeout_s
        self._channels = [grpc.aio.insecure_channel(e, options=CHANNEL_OPTIONS) for e in self.endpoints]
        self._stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in self._channels]

    @property
    def pool(self) -> EndpointPool:
        """The round-robin and cool-down state of the endpoints."""
        return self._policy.pool

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference and return its outputs by name (errors as in `GrpcClient.infer`)."""
        request = encode_infer_request(model, inputs, outputs)
        metadata = self._policy.metadata

        def rpc(stub: Any, timeout: float) -> Awaitable[pb.ModelInferResponse]:
            return stub.ModelInfer(request, timeout=timeout, metadata=metadata)

        return decode_infer_response(await self._call(rpc, timeout_s, f"infer {model!r}"))

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        """True when an endpoint answers that it is ready; False when none does within the timeout."""
        deadline = self._policy.deadline(timeout_s)
        for index in self._policy.pool.candidates():
            try:
                left = self._policy.remaining(deadline, "is_ready")
                response = await self._stubs[index].ServerReady(
                    pb.ServerReadyRequest(), timeout=left, metadata=self._policy.metadata
                )
            except DeadlineExceeded:
                return False
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._policy.pool.mark_down(index)
                continue
            if response.ready:
                return True
        return False

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled); safe to call twice."""
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: Callable[[Any, float], Awaitable[T]], timeout_s: float | None, what: str) -> T:
        policy = self._policy
        deadline = policy.deadline(timeout_s)
        tried: list[int] = []
        last: EngineError = Unavailable(f"{what}: no endpoint")
        while candidates := policy.pool.candidates(exclude=tried):
            index = candidates[0]
            try:
                return await rpc(self._stubs[index], policy.remaining(deadline, what))
            except grpc.RpcError as error:
                last, move_on = policy.failed(index, error, what)
                if not move_on:
                    raise last from None
                tried.append(index)
        raise last  # every endpoint answered UNAVAILABLE or RESOURCE_EXHAUSTED


__all__ = [
    "CHANNEL_OPTIONS",
    "AsyncGrpcClient",
    "GrpcClient",
    "decode_infer_response",
    "encode_infer_request",
    "engine_error",
]
