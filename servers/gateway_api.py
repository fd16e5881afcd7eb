"""What a front-end sees of the engine: the `Gateway` protocol and the request/result types.

Every protocol module (gRPC, REST, ZMQ) talks to the workers only through an object of this shape.
The shared-memory implementation is `servers.gateway.ShmGateway`; tests may pass any other object
that follows the protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.models.spec import ModelSpec

#: Anything exposing the buffer protocol with the tensor's raw C-order little-endian bytes.
Buffer = bytes | bytearray | memoryview | np.ndarray


@dataclass(slots=True)
class InferInput:
    """One input tensor of a request, as raw bytes plus its declared datatype and full shape.

    The shape includes the batch dimension when the model batches. The gateway checks datatype,
    shape and byte count against the model before touching shared memory. Treated as immutable; not
    a frozen dataclass because one of those costs twice as much to build, once per tensor per request.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Buffer


class InferResult(Protocol):
    """Outputs of one request. The arrays may be views into shared memory: call `release()`
    (or use the result as a context manager) once they have been sent; they are invalid after."""

    model: str
    request_id: str
    outputs: dict[str, np.ndarray]

    def release(self) -> None: ...

    def __enter__(self) -> InferResult: ...

    def __exit__(self, *exc: object) -> None: ...


class Gateway(Protocol):
    """Submit-and-await over shared memory, plus the metadata every protocol serves."""

    def model_names(self) -> list[str]:
        """Names of the models in the repository (ready or not)."""
        ...

    def model_spec(self, name: str) -> ModelSpec:
        """Metadata of one model; raises `engine.errors.NotFound` for an unknown name."""
        ...

    def is_live(self) -> bool: ...

    def is_ready(self) -> bool:
        """True while the server admits requests (false during start-up and drain)."""
        ...

    def model_ready(self, name: str) -> bool:
        """True when a worker serving the model is up; NotFound for an unknown name."""
        ...

    def model_load_errors(self) -> dict[str, str]:
        """Models of the repository that failed to load, with the reason."""
        ...

    async def infer(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        request_id: str = "",
    ) -> InferResult:
        """Run one request. ``deadline_ns`` is absolute, in ``time.monotonic_ns()``. Raises an
        `engine.errors.EngineError` subclass on failure (InvalidArgument, NotFound, ...)."""
        ...

    def submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        requests: int = 1,
    ) -> asyncio.Future[Any]:
        """`infer` without a task: admits the request (raising at once what admission refuses) and
        returns the future of its `InferResult`. For callers that answer from a done callback
        instead of awaiting (the ZMQ front-end). Cancelling the future abandons the request: its
        result, if one comes, is released by the gateway. ``requests``: how many client requests
        this one stands for (the ZMQ front-end's coalesced groups), for the model's statistics."""
        ...

    def admit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
    ) -> tuple[int, asyncio.Future[Any]]:
        """`submit`, also returning the request's ticket, for `abandon` (the gRPC front-end's
        ModelInfer, which answers from a done callback but must be able to cancel)."""
        ...

    def abandon(self, ticket: int) -> None:
        """The caller gave up on request ``ticket`` (from `admit`): its future is cancelled, the
        worker drops the request if it has not run it yet, and a result that comes anyway is
        released. Nothing happens for a request already answered."""
        ...

    def statistics(self, model: str | None = None) -> list[dict[str, Any]]:
        """KServe-style statistics per model: name, version, inference_count, execution_count,
        success/fail counts and durations (ns), and batch-size counts."""
        ...


@dataclass(frozen=True)
class FrontendSettings:
    """What one front-end process needs to know besides the gateway.

    Attributes:
        host: address to bind.
        port: port to bind (0 = any free port; the bound one is reported through ``on_bound``).
        max_message_bytes: largest request accepted (and reply sent); larger ones get a clear error.
        reuse_port: bind with SO_REUSEPORT so several processes share the port.
        auth_tokens: accepted bearer tokens (empty = no authentication).
        instance: index of this process among the front-ends of its protocol (for logs).
        auth_health_open: health endpoints answer without a token (when ``auth_tokens`` is set).
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 64 * 1024 * 1024
    reuse_port: bool = False
    auth_tokens: tuple[str, ...] = ()
    instance: int = 0
    #: calls a protocol server holds at once (gRPC RPCs, ZMQ requests) before refusing more with
    #: RESOURCE_EXHAUSTED itself, so that overload never queues without bound below the gateway
    max_inflight: int = 4096
    auth_health_open: bool = True
    #: ``grpcio`` (grpc.aio) or ``h2`` (`servers.grpc_h2`); gRPC only
    grpc_transport: str = "h2"
