"""The one error tree: every error the engine raises to a client, with its wire codes.

Each class knows its gRPC status name, its HTTP status and its ZMQ code, so every protocol maps errors
the same way. Client errors carry their message to the client; `InternalError` messages go to the logs
and the client sees a generic text.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error a request can fail with."""

    grpc_code: str = "INTERNAL"
    http_status: int = 500
    zmq_code: int = 13
    #: numeric code carried in shared-memory completions (see `engine.shm`)
    wire_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def public_message(self) -> str:
        """The text a client may see."""
        return self.message


class InvalidArgument(EngineError):
    """Bad dtype, shape, byte count or malformed request."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    zmq_code = 3
    wire_code = 2


class NotFound(EngineError):
    """Unknown model (or model version)."""

    grpc_code = "NOT_FOUND"
    http_status = 404
    zmq_code = 5
    wire_code = 3


class ResourceExhausted(EngineError):
    """Admission refused: a bounded queue or arena budget is full. Retry later."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    zmq_code = 8
    wire_code = 4


class Unavailable(EngineError):
    """The model cannot be served right now: worker down, breaker open, shutting down."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    zmq_code = 14
    wire_code = 5


class WorkerDied(Unavailable):
    """The worker holding the request died before answering."""

    wire_code = 6


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it was computed."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    zmq_code = 4
    wire_code = 7


class Cancelled(EngineError):
    """The client cancelled or went away; the request was dropped from the queue."""

    grpc_code = "CANCELLED"
    http_status = 499
    zmq_code = 1
    wire_code = 9


class Unauthenticated(EngineError):
    """Missing or wrong bearer token."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    zmq_code = 16
    wire_code = 10


class ModelError(EngineError):
    """The model raised or returned something its config forbids; only its batch fails."""

    grpc_code = "INTERNAL"
    http_status = 500
    zmq_code = 13
    wire_code = 8


class InternalError(EngineError):
    """A bug or an unexpected condition in the engine itself."""

    def public_message(self) -> str:
        return "internal error"


_BY_WIRE: dict[int, type[EngineError]] = {
    cls.wire_code: cls
    for cls in (
        EngineError,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        WorkerDied,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        ModelError,
        InternalError,
    )
}


def from_wire(code: int, message: str) -> EngineError:
    """Rebuild the error a worker reported through shared memory."""
    return _BY_WIRE.get(code, InternalError)(message)
