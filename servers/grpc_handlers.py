"""How the gRPC front-end registers its services: generic handlers with lenient request parsing,
and the bearer-token interceptor.

`generic_handlers` builds every method of the inference and health services into generic handlers
from the generated method tables (same full method names, same (de)serializers but for the hot
methods' requests, see `servers.grpc_infer_wire`), not grpc's
registered methods (with those, grpc.aio's accept loop waits on one pending call per method, ~24,
for every RPC: ~15 us each time) and not through an interceptor (grpc.aio then runs an interceptor
coroutine chain per RPC). A request message that does not parse deserializes to `Malformed` and is
answered INVALID_ARGUMENT "malformed request message: ..." (left to grpc it is UNKNOWN plus a logged
traceback, a log flood any client could cause): inline in the hot methods (`HOT_METHODS`, which
check for it themselves), in a wrapper for the other unary methods. Only bearer-token
authentication (`BearerAuth`) uses an interceptor.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from protos import grpc_service_pb2_grpc as pb_grpc
from servers.grpc_infer_wire import parse_infer_request


class Malformed:
    """What a request message that protobuf cannot parse deserializes to (see `lenient`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer``, answering `Malformed` where it would raise DecodeError."""

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Malformed(str(exc))

    return parse


async def refuse(context: grpc.aio.ServicerContext, request: Malformed) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}")
    raise AssertionError("context.abort returned")


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses RPCs without an ``authorization: Bearer <token>`` header naming an accepted token.

    Health checks are exempt unless ``health_open`` is false: orchestrator probes carry no
    credentials and reveal nothing.
    """

    def __init__(self, tokens: tuple[str, ...], health_open: bool = True) -> None:
        self._accepted = tuple(f"Bearer {t}".encode() for t in tokens)
        self._health_open = health_open

    def authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                offered = value.encode() if isinstance(value, str) else bytes(value)
                # Compare against every token so timing does not reveal which one nearly matched.
                return sum(hmac.compare_digest(offered, t) for t in self._accepted) > 0
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (self._health_open and method.startswith("/grpc.health.v1.Health/")):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        # Same kind of handler as the method's, and no deserializer: a refused request is not parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


#: Methods whose servicer method checks for `Malformed` requests itself and answers wire bytes.
HOT_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})


class _TableRecorder:
    """Stands in for a server to read the method table a generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same table again, behind a generic handler

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.tables[service] = dict(handlers)


def _generated_table(
    add_to_server: Callable[[Any, Any], None], servicer: Any
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The service name and method name -> handler table of a generated ``add_*_to_server``."""
    recorder = _TableRecorder()
    add_to_server(servicer, recorder)
    if len(recorder.tables) != 1:
        raise RuntimeError(f"{add_to_server.__qualname__} registered {len(recorder.tables)} services, not 1")
    return next(iter(recorder.tables.items()))


def _checked(
    unary: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await refuse(context, request)
        return await unary(request, context)

    return checked


def _lenient_handler(handler: grpc.RpcMethodHandler, hot: bool) -> grpc.RpcMethodHandler:
    """``handler`` with a lenient deserializer and the `Malformed` check (inline when ``hot``).

    Methods that are neither unary nor hot (Health.Watch) keep grpc's behaviour.
    """
    if handler.request_deserializer is None:
        return handler
    # ModelInfer and ModelStreamInfer carry tensors: their large raw contents stay where they arrived
    parse = lenient(parse_infer_request if hot else handler.request_deserializer)
    if hot and handler.unary_unary is not None:
        # no response serializer: the servicer answers wire bytes, which grpc sends as they are
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, request_deserializer=parse)
    if hot and handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, request_deserializer=parse)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _checked(handler.unary_unary),
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    return handler


def method_table(servicer: Any, health: Any) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of both services by full path (``/inference.GRPCInferenceService/ModelInfer``).

    ``servicer`` is a `servers.grpc_server.InferenceServicer` (its `HOT_METHODS` answer wire bytes
    and check for `Malformed` themselves), ``health`` a `servers.grpc_health.HealthServicer`.

    Built from the generated method tables (same full method names, same (de)serializers), with
    lenient deserializers: a malformed request message is answered INVALID_ARGUMENT.
    """
    table = {}
    for add_to_server, target in (
        (pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer),
        (health_pb2_grpc.add_HealthServicer_to_server, health),
    ):
        service, methods = _generated_table(add_to_server, target)
        hot = HOT_METHODS if target is servicer else frozenset()
        for method, handler in methods.items():
            table[f"/{service}/{method}"] = _lenient_handler(handler, method in hot)
    return table


def generic_handlers(servicer: Any, health: Any) -> tuple[grpc.GenericRpcHandler, ...]:
    """`method_table` as generic handlers, for ``server.add_generic_rpc_handlers`` (an unknown
    method is then answered UNIMPLEMENTED by grpc)."""
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path, handler in method_table(servicer, health).items():
        service, method = path[1:].split("/")
        services.setdefault(service, {})[method] = handler
    return tuple(grpc.method_handlers_generic_handler(s, methods) for s, methods in services.items())
