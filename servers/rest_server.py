"""The REST front-end: KServe v2 HTTP routes (plus Triton's binary tensors) on FastAPI and uvicorn.

`build_app` makes the FastAPI application over a `servers.gateway_api.Gateway`; `serve` runs it with
uvicorn (httptools) inside the caller's running event loop (uvloop in the front-end process) on a
socket it binds itself, so port 0 works and the bound port is reported through ``on_bound``.

The application `build_app` makes is ``BearerAuth`` (when tokens are set) -> the ``/infer`` fast
path of `servers.rest_fastpath` -> FastAPI: inference requests never reach FastAPI's routing and
middlewares; every other route does. The ``/infer`` route reads the raw body and decodes it with
`servers.rest_codec` (orjson, numpy). Every failure answers ``{"error": "..."}`` with the status of
its `engine.errors` class; only an unexpected exception (an engine bug) is a 500, logged with its
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import EngineError, InvalidArgument
from engine.stats import kserve_json
from servers.gateway_api import FrontendSettings, Gateway
from servers.metrics_http import status_document
from servers.observer import current as current_observer
from servers.observer import current_exposition
from servers.rest_codec import dumps
from servers.rest_fastpath import (
    HEADER_LENGTH,
    InferEndpoint,
    InferFastPath,
    PayloadTooLarge,
    Reply,
    engine_error_reply,
    model_spec,
    read_body,
)
from servers.rest_metadata import (
    SERVER_NAME,
    ModelDocuments,
    repository_index,
    server_metadata,
    server_version,
)

logger = logging.getLogger(__name__)

# HEADER_LENGTH and PayloadTooLarge live in servers.rest_fastpath; they stay importable from here.
__all__ = [
    "BACKLOG",
    "DRAIN_TIMEOUT_S",
    "HEADER_LENGTH",
    "BearerAuth",
    "PayloadTooLarge",
    "bind_socket",
    "build_app",
    "error_response",
    "serve",
]

#: Seconds `serve` lets in-flight requests finish after ``stop`` is set before cancelling them.
DRAIN_TIMEOUT_S = 10
#: listen() backlog of the bound socket.
BACKLOG = 2048

_JSON = "application/json"
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# /metrics over a gateway that is not the engine's (protocol unit tests): no board, no metrics files.
_METRICS_BODY = b"# HELP engine_up Whether the engine is up.\n# TYPE engine_up gauge\nengine_up 1\n"


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The body every failure carries: ``{"error": message}``."""
    return Response(orjson.dumps({"error": message}), status, headers=headers, media_type=_JSON)


def build_app(gateway: Gateway, settings: FrontendSettings) -> ASGIApp:
    """The ASGI application serving ``gateway`` over KServe v2 HTTP.

    Bearer authentication (when ``settings.auth_tokens`` is set) first, then the ``/infer`` fast
    path (`servers.rest_fastpath.InferFastPath`), then FastAPI for every other request.

    Args:
        gateway: where requests go and metadata comes from.
        settings: message size limit, bearer tokens and the instance index (for logs).
    """
    api = _RestApi(gateway, settings)
    app: ASGIApp = InferFastPath(_build_fastapi(api), api.endpoint)
    if settings.auth_tokens:
        app = BearerAuth(app, tokens=settings.auth_tokens, health_open=settings.auth_health_open)
    return app


def _build_fastapi(api: _RestApi) -> FastAPI:
    """The FastAPI application: every route, ``/infer`` included (its schema, and the odd path
    that FastAPI matches but the fast path does not)."""

    class GuardedRoute(APIRoute):
        """Turns every failure of a route into ``{"error": ...}`` with its status."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except EngineError as exc:
                    return api.engine_error(request, exc)
                except (HTTPException, RequestValidationError):
                    raise
                except ClientDisconnect:
                    # The client closed mid-body: its fault, and nobody is left to read an answer.
                    logger.debug("%s: %s %s: client disconnected", api.who, request.method, request.url.path)
                    return error_response(400, "client disconnected before the request body was complete")
                except Exception:
                    logger.exception("%s: %s %s failed", api.who, request.method, request.url.path)
                    return error_response(500, "internal error")

            return guarded

    app = FastAPI(title=SERVER_NAME, version=server_version())
    router = APIRouter(route_class=GuardedRoute)
    get, post = ["GET"], ["POST"]
    # The fast path answers POST on these two first; FastAPI keeps them for the OpenAPI schema and
    # the 405 on other methods. Routes are matched in order.
    router.add_api_route("/v2/models/{name}/infer", api.infer, methods=post)
    router.add_api_route("/v2/models/{name}/versions/{version}/infer", api.infer, methods=post)
    router.add_api_route("/v2", api.server_metadata, methods=get)
    router.add_api_route("/v2/health/live", api.live, methods=get)
    router.add_api_route("/v2/health/ready", api.ready, methods=get)
    router.add_api_route("/v2/repository/index", api.repository_index, methods=post)
    # Before /v2/models/{name}, which would take "stats" for a model name.
    router.add_api_route("/v2/models/stats", api.statistics, methods=get)
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(model, api.model_metadata, methods=get)
        router.add_api_route(f"{model}/ready", api.model_ready, methods=get)
        router.add_api_route(f"{model}/config", api.model_config, methods=get)
        router.add_api_route(f"{model}/stats", api.statistics, methods=get)
    router.add_api_route("/metrics", api.metrics, methods=get)
    router.add_api_route("/v2/status", api.status, methods=get)
    app.include_router(router)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown routes and wrong methods: the same error body as everything else.
        if isinstance(exc, HTTPException):
            return error_response(exc.status_code, str(exc.detail), exc.headers)
        return error_response(400, str(exc))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, http_error)
    return app


class BearerAuth:
    """ASGI middleware: requires ``Authorization: Bearer <token>`` except on ``/v2/health/*``.

    Health stays open (unless ``health_open`` is false) so that load balancers and orchestrators can
    probe without a secret.
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], health_open: bool = True) -> None:
        self.app = app
        self._tokens = [token.encode() for token in tokens]
        self._health_open = health_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or (self._health_open and scope["path"].startswith("/v2/health/"))
            or self._allowed(scope)
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                # compare_digest against every token: no early exit that times which one matched.
                return sum(hmac.compare_digest(token, known) for known in self._tokens) > 0
        return False


class _RestApi:
    """The route handlers, over one gateway."""

    def __init__(self, gateway: Gateway, settings: FrontendSettings) -> None:
        self._gateway = gateway
        self._max_bytes = settings.max_message_bytes
        self._models: dict[str, ModelDocuments] = {}
        self._server_metadata = dumps(server_metadata())
        self.who = f"frontend rest#{settings.instance}"
        observer = current_observer("rest", gateway.model_names())
        self.endpoint = InferEndpoint(gateway, settings.max_message_bytes, observer, self.who)
        self._exposition = current_exposition()

    def engine_error(self, request: Request, exc: EngineError) -> Response:
        """The response for an error of the engine's tree (logged when it is the server's fault)."""
        return _response(engine_error_reply(self.who, request.method, request.url.path, exc))

    def _documents(self, request: Request) -> ModelDocuments:
        """The named model's cached documents; NotFound for an unknown model or version."""
        params = request.path_params
        name = params["name"]
        spec = model_spec(self._gateway, name, params.get("version"))
        docs = self._models.get(name)
        if docs is None or docs.spec is not spec:
            docs = self._models[name] = ModelDocuments(spec)
        return docs

    async def server_metadata(self) -> Response:
        """Server name, version and extensions."""
        return Response(self._server_metadata, media_type=_JSON)

    async def live(self) -> Response:
        """200 while the server process is up."""
        if self._gateway.is_live():
            return Response(b'{"live":true}', media_type=_JSON)
        return Response(b'{"live":false,"error":"server is not live"}', 503, media_type=_JSON)

    async def ready(self) -> Response:
        """200 while the server admits requests, 503 during start-up and drain."""
        if self._gateway.is_ready():
            return Response(b'{"ready":true}', media_type=_JSON)
        return Response(b'{"ready":false,"error":"server is not ready"}', 503, media_type=_JSON)

    async def model_metadata(self, request: Request) -> Response:
        """Model inputs and outputs, with a -1 batch dimension when the model batches."""
        return Response(self._documents(request).metadata, media_type=_JSON)

    async def model_config(self, request: Request) -> Response:
        """Triton-style model configuration."""
        return Response(self._documents(request).config, media_type=_JSON)

    async def model_ready(self, request: Request) -> Response:
        """200 when a worker serving the model is up, else 503."""
        name = self._documents(request).spec.name
        if self._gateway.model_ready(name):
            return Response(dumps({"name": name, "ready": True}), media_type=_JSON)
        return error_response(503, f"model {name!r} is not ready")

    async def statistics(self, request: Request) -> Response:
        """Per-model statistics (all models, or the one named in the path)."""
        name = self._documents(request).spec.name if "name" in request.path_params else None
        stats = [kserve_json(s) for s in self._gateway.statistics(name)]
        return Response(dumps({"model_stats": stats}), media_type=_JSON)

    async def repository_index(self, request: Request) -> Response:
        """Models of the repository with their state; body ``{"ready": true}`` lists ready ones only."""
        body = await self._read_body(request)
        ready_only = False
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidArgument(f"malformed JSON in request body: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
                raise InvalidArgument('repository index body must be {"ready": true|false}')
            ready_only = doc.get("ready", False)
        return Response(dumps(repository_index(self._gateway, ready_only)), media_type=_JSON)

    async def metrics(self) -> Response:
        """Prometheus text exposition."""
        if self._exposition is None:
            return Response(_METRICS_BODY, media_type=_METRICS_TYPE)
        return Response(self._exposition.metrics(), media_type=_METRICS_TYPE)

    async def status(self) -> Response:
        """Processes, models, queues and latency percentiles (what ``python -m engine.status`` prints)."""
        if self._exposition is None:
            return Response(dumps(status_document(None, None)), media_type=_JSON)
        return Response(dumps(self._exposition.status()), media_type=_JSON)

    async def infer(self, request: Request) -> Response:
        """Run one inference: JSON tensors and/or binary tensors in, the same out.

        Only reached for paths FastAPI matches and `servers.rest_fastpath.match_infer_path` does
        not; the answer is the fast path's.
        """
        params = request.path_params
        reply = await self.endpoint.respond(
            params["name"], params.get("version"), request.scope["headers"], request.receive, request.url.path
        )
        return _response(reply)

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed ``max_message_bytes``."""
        return await read_body(request.receive, request.headers.get("content-length"), self._max_bytes)


def _response(reply: Reply) -> Response:
    """A Starlette response sending exactly the reply's status, raw headers and body."""
    status, headers, body = reply
    response = Response(body, status)
    response.raw_headers = headers
    return response


class _UvicornServer(uvicorn.Server):
    """uvicorn's server with a started event and without its signal handlers: the front-end
    process shell owns SIGTERM/SIGINT and tells us to stop through the ``stop`` event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.started_event.set()


def bind_socket(settings: FrontendSettings) -> socket.socket:
    """A listening, non-blocking TCP socket on ``settings.host:settings.port``.

    SO_REUSEADDR always (restarts do not wait for TIME_WAIT); SO_REUSEPORT when
    ``settings.reuse_port``, so several front-end processes share the port.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        settings.host or None, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    gateway: Gateway,
    settings: FrontendSettings,
    on_bound: Callable[[int], None],
    stop: asyncio.Event,
) -> None:
    """Serve the REST API in the running event loop until ``stop`` is set.

    Args:
        gateway: where requests go.
        settings: bind address, limits, tokens, instance index.
        on_bound: called once with the bound port when the server accepts connections.
        stop: set it to stop: no new connections, in-flight requests get ``DRAIN_TIMEOUT_S`` to finish.
    """
    config = uvicorn.Config(
        build_app(gateway, settings),
        loop="none",
        http="httptools",
        ws="none",
        lifespan="off",
        interface="asgi3",
        access_log=False,
        log_level="warning",
        log_config=None,
        proxy_headers=False,
        server_header=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
    )
    server = _UvicornServer(config)
    sock = bind_socket(settings)
    who = f"frontend rest#{settings.instance}"
    serving: asyncio.Task[None] | None = None
    try:
        serving = asyncio.create_task(server.serve(sockets=[sock]), name=f"{who} uvicorn")
        await _first(serving, server.started_event.wait())
        if serving.done():
            serving.result()
            raise RuntimeError(f"{who}: uvicorn stopped before it started")
        port = sock.getsockname()[1]
        logger.info("%s: listening on %s:%s", who, settings.host, port)
        on_bound(port)
        await _first(serving, stop.wait())
        server.should_exit = True
        await serving
        logger.info("%s: stopped", who)
    finally:
        if serving is not None and not serving.done():
            # Cancelled or failed in between: stop uvicorn without the graceful wait.
            server.should_exit = server.force_exit = True
            await asyncio.wait({serving}, timeout=DRAIN_TIMEOUT_S)
        sock.close()


async def _first(task: asyncio.Task[Any], waiter: Awaitable[Any]) -> None:
    """Wait until ``task`` or ``waiter`` finishes; the waiter is cancelled if still pending."""
    other = asyncio.ensure_future(waiter)
    try:
        await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        other.cancel()
