"""The gRPC front-end: KServe v2 / Triton ``inference.GRPCInferenceService`` plus ``grpc.health.v1``.

`serve` runs one front-end process's server (the caller provides the event loop, uvloop in
production); `InferenceServicer` answers each RPC from a `servers.gateway_api.Gateway`. The HTTP/2
under it is `servers.grpc_h2` (``grpc_transport: h2``, the default) or grpc.aio (``grpcio``): the
same method table, the same statuses.

Request path of ModelInfer: protobuf parses the request (the transport refuses one larger than
``max_message_bytes`` with RESOURCE_EXHAUSTED before we see it), the raw input bytes go to the gateway
as they are (its copy into shared memory is the one copy), and each output is copied once out of
shared memory into the response's wire bytes (`servers.grpc_messages.encode_infer_response`) before
the result is released; except on the `servers.grpc_h2` transport, whose context `sends_views`: a
response with outputs of `VIEWED_MIN_BYTES` or more goes to it as a `ViewedMessage` (pieces viewing
the outputs where they lie) and the transport releases the result once it has sent them. Engine
errors map to their gRPC status (`engine.errors.EngineError.grpc_code`); anything else is logged and
answered INTERNAL "internal error".

Registration and malformed messages: `servers.grpc_handlers` (generic handlers, no interceptor
unless bearer tokens are configured); ModelInfer and the stream reader check for `Malformed` requests
themselves.

ModelStreamInfer reads requests in a loop and starts each as a task, so many are in flight on one
stream; responses are written in completion order by one writer, each carrying its request's ``id``;
a failed request answers with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, NoReturn, cast

import grpc

from engine import logs
from engine.errors import EngineError, InternalError, NotFound
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers import grpc_health
from servers.gateway_api import FrontendSettings, Gateway, InferResult
from servers.grpc_h2 import Flight
from servers.grpc_h2_call import Abort
from servers.grpc_handlers import BearerAuth, Malformed, generic_handlers, method_table, refuse
from servers.grpc_infer_wire import InferRequestViews
from servers.grpc_messages import (
    ModelCache,
    ModelEntry,
    ViewedMessage,
    index_response,
    infer_response_pieces,
    pieces_nbytes,
    request_inputs,
    statistics_message,
)
from servers.observer import current as current_observer

log = logging.getLogger(__name__)

#: Reported by ServerMetadata.
SERVER_NAME = "shm-inference-engine"
#: Triton extensions this server implements (ServerMetadata.extensions).
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
#: ModelInfer's full path: answered without a task on the h2 transport (`InferenceServicer.start_model_infer`)
MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
#: Seconds in-flight RPCs get to finish once `stop` is set; then they are cancelled.
GRACE_S = 2.0
#: Requests of one stream being computed or awaiting their write. Past this the stream stops reading,
#: so a client that sends without reading responses is held back by flow control, not by our memory.
STREAM_MAX_IN_FLIGHT = 1024
#: ModelInfer responses whose outputs hold at least this many bytes are written from shared memory
#: where the transport can (`servers.grpc_h2`), not copied out first; smaller ones cost less copied
#: into the loop's one write.
VIEWED_MIN_BYTES = 64 << 10
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


def _response(
    entry: ModelEntry, request_id: str, result: InferResult, *, stream: bool, views: bool
) -> bytes | ViewedMessage:
    """The response to one request from its result: wire bytes (the result released), or with
    ``views`` and outputs of at least `VIEWED_MIN_BYTES`, a `ViewedMessage` whose release is the
    result's. The result is released when this raises."""
    try:
        pieces, data_bytes = infer_response_pieces(entry, request_id, result.outputs, stream=stream)
        if views and data_bytes >= VIEWED_MIN_BYTES:
            return ViewedMessage(pieces, pieces_nbytes(pieces, data_bytes), result.release)
        response = b"".join(pieces)
    except BaseException:
        result.release()
        raise
    result.release()
    return response


class _ModelInferFlight:
    """One ModelInfer answered without a task (`InferenceServicer.start_model_infer`)."""

    __slots__ = ("_entry", "_name", "_request_id", "_servicer", "_started", "_ticket", "future")

    def __init__(
        self,
        servicer: InferenceServicer,
        name: str,
        request_id: str,
        entry: ModelEntry,
        started: float,
        ticket: int,
        future: asyncio.Future[Any],
    ) -> None:
        self._servicer = servicer
        self._name = name
        self._request_id = request_id
        self._entry = entry
        self._started = started
        self._ticket = ticket
        self.future = future

    def finish(self) -> bytes | ViewedMessage:
        observer = self._servicer._observer
        future = self.future
        if future.cancelled():
            observer.end(self._name, self._started, asyncio.CancelledError())
            raise asyncio.CancelledError()
        try:
            response = _response(self._entry, self._request_id, future.result(), stream=False, views=True)
        except Exception as exc:
            observer.end(self._name, self._started, exc)
            raise self._servicer._abort(exc) from None
        observer.end(self._name, self._started)
        return response

    def cancel(self) -> None:
        self._servicer._gateway.abandon(self._ticket)

    def discard(self) -> None:
        future = self.future
        if not future.cancelled() and future.exception() is None:
            future.result().release()  # answered as the call ended: nobody will send it
        self._servicer._observer.end(self._name, self._started, asyncio.CancelledError())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` answered from a gateway.

    Register it with `generic_handlers` (ModelInfer and ModelStreamInfer answer wire bytes, and
    check for `Malformed` requests themselves).

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
        self,
        request: pb.ModelInferRequest | InferRequestViews,
        deadline_ns: int | None,
        *,
        stream: bool = False,
        views: bool = False,
    ) -> bytes | ViewedMessage:
        """Run one request through the gateway; returns its response's wire bytes (wrapped in a
        ModelStreamInferResponse when ``stream``), or with ``views`` and outputs of at least
        `VIEWED_MIN_BYTES`, its pieces viewing the result, which the caller must release. Raises
        EngineError on failure."""
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
            response = _response(entry, request_id, result, stream=stream, views=views)
        except BaseException as exc:
            observer.end(name, started, exc)
            raise
        observer.end(name, started)
        return response

    def start_model_infer(self, request: InferRequestViews | Malformed, deadline_s: float | None) -> Flight:
        """ModelInfer without a task, for the h2 transport (`servers.grpc_h2.Starter`): the request
        is admitted now and answered when its gateway future is done. The same answers, statuses
        and metrics as `ModelInfer`; refusals raise `Abort`."""
        if isinstance(request, Malformed):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}")
        name = request.model_name
        request_id = request.id
        observer = self._observer
        # set even when empty: with no task per call, the request id of the last call must not
        # stay in the context (the done callback runs in a copy of it) and name this call's logs
        logs.request_id.set(request_id)
        started = observer.begin(name, request_id)
        try:
            entry = self._models.get(name, request.model_version)
            wanted = request.outputs
            ticket, future = self._gateway.admit(
                name,
                request_inputs(request),
                outputs=[o.name for o in wanted] if wanted else None,
                deadline_ns=None if deadline_s is None else int(deadline_s * 1e9),
            )
        except Exception as exc:
            observer.end(name, started, exc)
            raise self._abort(exc) from None
        return _ModelInferFlight(self, name, request_id, entry, started, ticket, future)

    def _abort(self, exc: BaseException) -> Abort:
        """The status `_fail` would answer for ``exc``, as an `Abort` (logged as `_fail` logs it)."""
        if isinstance(exc, EngineError):
            if isinstance(exc, InternalError):
                log.error("%s: %s", self._prefix, exc.message)
            return Abort(getattr(grpc.StatusCode, exc.grpc_code), exc.public_message())
        log.error("%s: unexpected error", self._prefix, exc_info=exc)
        return Abort(grpc.StatusCode.INTERNAL, "internal error")

    async def ModelInfer(
        self, request: pb.ModelInferRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> bytes | ViewedMessage:
        if isinstance(request, Malformed):
            await refuse(context, request)
        try:
            views = getattr(context, "sends_views", False)
            return await self.infer(request, _deadline_ns(context), views=views)
        except Exception as exc:
            await self._fail(context, exc)

    async def _stream_answer(self, request: pb.ModelInferRequest, deadline_ns: int | None) -> bytes:
        """One stream request's response (wire bytes); never raises (errors become ``error_message``)."""
        try:
            return cast(bytes, await self.infer(request, deadline_ns, stream=True))  # no views asked
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
        request_iterator: AsyncIterable[pb.ModelInferRequest | Malformed],
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
                    if isinstance(request, Malformed):
                        # ended by the writer: an abort here could race its write (grpc refuses
                        # two send operations at once and the stream would hang)
                        raise _StreamRefused(request)
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
        except _StreamRefused as refused:
            await refuse(context, refused.request)
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()


class _StreamRefused(Exception):
    """A stream's reader met a malformed message; the writer ends the stream with it."""

    def __init__(self, request: Malformed) -> None:
        super().__init__(request.reason)
        self.request = request


def _unimplemented(method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by this server")

    handler.__name__ = handler.__qualname__ = method
    return handler


for _method in UNIMPLEMENTED:
    setattr(InferenceServicer, _method, _unimplemented(_method))


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
        settings: address, message size limit, SO_REUSEPORT, bearer tokens, instance number, transport.
        on_bound: called once with the bound port, after the server has started.
        stop: set it to stop; in-flight RPCs get `GRACE_S` seconds to finish.

    Raises:
        OSError: the address could not be bound.
    """
    prefix = f"frontend grpc#{settings.instance}"
    start = _start_h2 if settings.grpc_transport == "h2" else _start_grpcio
    port, stop_server = await start(gateway, settings, prefix)
    try:
        log.info(
            "%s: serving on %s over %s (max message %d bytes%s)",
            prefix,
            _address(settings.host, port),
            settings.grpc_transport,
            settings.max_message_bytes,
            ", SO_REUSEPORT" if settings.reuse_port else "",
        )
        on_bound(port)
        await stop.wait()
        log.info("%s: stopping (grace %.1fs)", prefix, GRACE_S)
    finally:
        await stop_server(GRACE_S)


#: a started server: its bound port, and how to stop it with a grace period in seconds
Started = tuple[int, Callable[[float], Awaitable[None]]]


async def _start_grpcio(gateway: Gateway, settings: FrontendSettings, prefix: str) -> Started:
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
    return port, server.stop


async def _start_h2(gateway: Gateway, settings: FrontendSettings, prefix: str) -> Started:
    from servers.grpc_h2 import H2GrpcServer

    servicer = InferenceServicer(gateway, prefix)
    server = H2GrpcServer(
        method_table(servicer, grpc_health.HealthServicer(gateway)),
        starters={MODEL_INFER_PATH: servicer.start_model_infer},
        max_message_bytes=settings.max_message_bytes,
        max_inflight=settings.max_inflight,
        auth=BearerAuth(settings.auth_tokens, settings.auth_health_open) if settings.auth_tokens else None,
        health_open=settings.auth_health_open,
    )
    try:
        port = await server.start(settings.host, settings.port, settings.reuse_port)
    except OSError as exc:
        raise OSError(f"{prefix}: cannot bind {_address(settings.host, settings.port)}: {exc}") from exc
    return port, server.stop
