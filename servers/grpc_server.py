"""The gRPC front-end: KServe v2 / Triton ``inference.GRPCInferenceService`` plus ``grpc.health.v1``.

`serve` runs one front-end process's server (the caller provides the event loop, uvloop in
production); `InferenceServicer` answers each RPC from a `servers.gateway_api.Gateway`.

Request path of ModelInfer: protobuf parses the request (grpc refuses one larger than
``max_message_bytes`` with RESOURCE_EXHAUSTED before we see it), the raw input bytes go to the gateway
as they are (its copy into shared memory is the one copy), and each output is copied once out of
shared memory into the response's wire bytes (`servers.grpc_messages.encode_infer_response`) before
the result is released. Engine errors map to their gRPC status
(`engine.errors.EngineError.grpc_code`); anything else is logged and answered INTERNAL "internal error".

Registration (`generic_handlers`): every method of both services goes into generic handlers built
from the generated method tables, not grpc's registered methods (with those, grpc.aio's accept loop
waits on one pending call per method, ~24, for every RPC: ~15 us each time) and not through an
interceptor (grpc.aio then runs an interceptor coroutine chain per RPC). A request message that does
not parse is answered INVALID_ARGUMENT "malformed request message: ..." (left to grpc it is UNKNOWN
plus a logged traceback, a log flood any client could cause): the deserializers are lenient
(`_Malformed` instead of an exception) and the check is inline in ModelInfer and the stream reader,
in a wrapper for the other unary methods. Only bearer-token authentication uses an interceptor.

ModelStreamInfer reads requests in a loop and starts each as a task, so many are in flight on one
stream; responses are written in completion order by one writer, each carrying its request's ``id``;
a failed request answers with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from engine.errors import EngineError, InternalError, NotFound
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers import grpc_health
from servers.gateway_api import FrontendSettings, Gateway
from servers.grpc_messages import (
    ModelCache,
    encode_infer_response,
    index_response,
    request_inputs,
    statistics_message,
)
from servers.observer import current as current_observer

log = logging.getLogger(__name__)

#: Reported by ServerMetadata.
SERVER_NAME = "shm-inference-engine"
#: Triton extensions this server implements (ServerMetadata.extensions).
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
#: Seconds in-flight RPCs get to finish once `stop` is set; then they are cancelled.
GRACE_S = 2.0
#: Requests of one stream being computed or awaiting their write. Past this the stream stops reading,
#: so a client that sends without reading responses is held back by flow control, not by our memory.
STREAM_MAX_IN_FLIGHT = 1024
#: RPCs of the service this engine does not serve (client-registered shared memory, model loading,
#: trace and log settings): answered UNIMPLEMENTED.
UNIMPLEMENTED = (
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def _version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _deadline_ns(context: grpc.aio.ServicerContext) -> int | None:
    """The RPC's deadline as an absolute ``time.monotonic_ns()``, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic_ns() + int(remaining * 1e9)


class _Malformed:
    """What a request message that protobuf cannot parse deserializes to (see `_lenient`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer``, answering `_Malformed` where it would raise DecodeError."""

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: _Malformed) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}")
    raise AssertionError("context.abort returned")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` answered from a gateway.

    Register it with `generic_handlers` (ModelInfer and ModelStreamInfer answer wire bytes, and
    check for `_Malformed` requests themselves).

    Args:
        gateway: where requests go and metadata comes from.
        prefix: log prefix naming this front-end (``frontend grpc#0``).
    """

    def __init__(self, gateway: Gateway, prefix: str = "frontend grpc") -> None:
        self._gateway = gateway
        self._models = ModelCache(gateway)
        self._prefix = prefix
        self._observer = current_observer("grpc", gateway.model_names())
        self._server_metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_version(), extensions=EXTENSIONS
        )

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        """Abort the RPC with the status of ``exc`` (called from an ``except`` block)."""
        if isinstance(exc, EngineError):
            if isinstance(exc, InternalError):
                log.error("%s: %s", self._prefix, exc.message)
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.public_message())
        log.error("%s: unexpected error", self._prefix, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("context.abort returned")  # it raises; this tells the type checker

    # --- health and metadata ---------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._gateway.is_live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._gateway.is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        # An unknown model is simply not ready, as Triton answers (clients expect a bool, not an error).
        try:
            self._models.get(request.name, request.version)
            ready = self._gateway.model_ready(request.name)
        except NotFound:
            ready = False
        except Exception as exc:
            await self._fail(context, exc)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            return self._models.get(request.name, request.version).metadata
        except Exception as exc:
            await self._fail(context, exc)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            return self._models.get(request.name, request.version).config
        except Exception as exc:
            await self._fail(context, exc)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                self._models.get(request.name, request.version)
            stats = self._gateway.statistics(request.name or None)
            return pb.ModelStatisticsResponse(model_stats=[statistics_message(s) for s in stats])
        except Exception as exc:
            await self._fail(context, exc)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        try:
            return index_response(self._gateway, request.ready)
        except Exception as exc:
            await self._fail(context, exc)

    # --- inference -------------------------------------------------------------------------------

    async def infer(
        self, request: pb.ModelInferRequest, deadline_ns: int | None, *, stream: bool = False
    ) -> bytes:
        """Run one request through the gateway; returns its response's wire bytes (wrapped in a
        ModelStreamInferResponse when ``stream``). Raises EngineError on failure."""
        name = request.model_name
        request_id = request.id
        observer = self._observer
        started = observer.begin(name, request_id)
        try:
            entry = self._models.get(name, request.model_version)
            inputs = request_inputs(request)
            wanted = request.outputs
            result = await self._gateway.infer(
                name,
                inputs,
                outputs=[o.name for o in wanted] if wanted else None,
                deadline_ns=deadline_ns,
                request_id=request_id,
            )
            try:
                response = encode_infer_response(entry, request_id, result.outputs, stream=stream)
            finally:
                result.release()
        except BaseException as exc:
            observer.end(name, started, exc)
            raise
        observer.end(name, started)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest | _Malformed, context: grpc.aio.ServicerContext
    ) -> bytes:
        if isinstance(request, _Malformed):
            await _refuse(context, request)
        try:
            return await self.infer(request, _deadline_ns(context))
        except Exception as exc:
            await self._fail(context, exc)

    async def _stream_answer(self, request: pb.ModelInferRequest, deadline_ns: int | None) -> bytes:
        """One stream request's response (wire bytes); never raises (errors become ``error_message``)."""
        try:
            return await self.infer(request, deadline_ns, stream=True)
        except EngineError as exc:
            if isinstance(exc, InternalError):
                log.error("%s: %s", self._prefix, exc.message)
            message = exc.public_message()
        except Exception:
            log.exception("%s: unexpected error in stream request %r", self._prefix, request.id)
            message = "internal error"
        echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo).SerializeToString()

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterable[pb.ModelInferRequest | _Malformed],
        context: grpc.aio.ServicerContext,
    ) -> None:
        done: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        reading = True
        deadline_ns = _deadline_ns(context)

        async def answer(request: pb.ModelInferRequest) -> None:
            done.put_nowait(await self._stream_answer(request, deadline_ns))

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not reading and not tasks:
                done.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for request in request_iterator:
                    if isinstance(request, _Malformed):
                        await _refuse(context, request)
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(finished)
            finally:
                reading = False
                if not tasks:
                    done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await done.get()) is not None:
                await context.write(response)
                slots.release()
            await reader  # re-raises a read error (the stream then ends with its status)
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()


def _unimplemented(method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by this server")

    handler.__name__ = handler.__qualname__ = method
    return handler


for _method in UNIMPLEMENTED:
    setattr(InferenceServicer, _method, _unimplemented(_method))


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


#: Methods whose servicer method checks for `_Malformed` requests itself and answers wire bytes.
_HOT_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})


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
        if isinstance(request, _Malformed):
            await _refuse(context, request)
        return await unary(request, context)

    return checked


def _lenient_handler(handler: grpc.RpcMethodHandler, hot: bool) -> grpc.RpcMethodHandler:
    """``handler`` with a lenient deserializer and the `_Malformed` check (inline when ``hot``).

    Methods that are neither unary nor hot (Health.Watch) keep grpc's behaviour.
    """
    if handler.request_deserializer is None:
        return handler
    parse = _lenient(handler.request_deserializer)
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


def generic_handlers(
    servicer: InferenceServicer, health: grpc_health.HealthServicer
) -> tuple[grpc.GenericRpcHandler, ...]:
    """The handlers of both services, for ``server.add_generic_rpc_handlers``.

    Built from the generated method tables (same full method names, same (de)serializers), with
    lenient deserializers: a malformed request message is answered INVALID_ARGUMENT, an unknown
    method UNIMPLEMENTED (by grpc).
    """
    handlers = []
    for add_to_server, target in (
        (pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer),
        (health_pb2_grpc.add_HealthServicer_to_server, health),
    ):
        service, table = _generated_table(add_to_server, target)
        hot = _HOT_METHODS if target is servicer else frozenset()
        lenient = {method: _lenient_handler(handler, method in hot) for method, handler in table.items()}
        handlers.append(grpc.method_handlers_generic_handler(service, lenient))
    return tuple(handlers)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    gateway: Gateway,
    settings: FrontendSettings,
    on_bound: Callable[[int], None],
    stop: asyncio.Event,
) -> None:
    """Serve gRPC on ``settings.host:settings.port`` until ``stop`` is set.

    Args:
        gateway: answers every RPC.
        settings: address, message size limit, SO_REUSEPORT, bearer tokens, instance number.
        on_bound: called once with the bound port, after the server has started.
        stop: set it to stop; in-flight RPCs get `GRACE_S` seconds to finish.

    Raises:
        OSError: the address could not be bound.
    """
    prefix = f"frontend grpc#{settings.instance}"
    options = [
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_tokens:
        # refused before anything is parsed
        interceptors.append(BearerAuth(settings.auth_tokens, settings.auth_health_open))
    # Past this many RPCs grpc refuses new ones with RESOURCE_EXHAUSTED instead of queueing them in
    # its core, where neither the gateway's admission control nor any deadline would see them.
    server = grpc.aio.server(
        options=options, interceptors=interceptors, maximum_concurrent_rpcs=settings.max_inflight
    )
    server.add_generic_rpc_handlers(
        generic_handlers(InferenceServicer(gateway, prefix), grpc_health.HealthServicer(gateway))
    )
    address = _address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"{prefix}: cannot bind {address}: {exc}") from exc
    await server.start()
    try:
        log.info(
            "%s: serving on %s (max message %d bytes%s)",
            prefix,
            _address(settings.host, port),
            settings.max_message_bytes,
            ", SO_REUSEPORT" if settings.reuse_port else "",
        )
        on_bound(port)
        await stop.wait()
        log.info("%s: stopping (grace %.1fs)", prefix, GRACE_S)
    finally:
        await server.stop(GRACE_S)
