"""The REST ``/infer`` fast path: KServe v2 inference served by a raw ASGI callable.

`InferFastPath` sits in front of the FastAPI application (behind `servers.rest_server.BearerAuth`)
and answers ``POST /v2/models/<name>[/versions/<v>]/infer`` itself, straight from uvicorn's
``receive``/``send``; every other request (other paths, other methods on the infer path) goes on to
FastAPI unchanged. Routing, Request/Response objects, dependency solving and the exception
middlewares cost several times the codec's CPU per request, and this route is the one that carries
the load.

`InferEndpoint` holds the route's semantics, framework-free, so that the FastAPI ``/infer`` routes
(kept for the OpenAPI schema and any path FastAPI matches that `match_infer_path` does not) answer
exactly the same. A reply is ``(status, raw headers, body)`` with the headers Starlette's
``Response`` would send, in its order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import (
    Cancelled,
    EngineError,
    InternalError,
    InvalidArgument,
    ModelError,
    NotFound,
    ResourceExhausted,
)
from engine.logs import request_id
from engine.models.spec import ModelSpec
from servers.gateway_api import Gateway
from servers.observer import RequestObserver
from servers.rest_codec import encode_infer_response, parse_header_length, parse_infer_request

# The REST front-end's one logger, shared with `servers.rest_server`.
logger = logging.getLogger("servers.rest_server")

#: Header of Triton's binary tensor extension: size of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: ``(status, raw headers, body)``: what `InferEndpoint` answers.
Reply = tuple[int, list[tuple[bytes, bytes]], bytes]

_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_JSON_TYPE = (b"content-type", b"application/json")
_OCTETS_TYPE = (b"content-type", b"application/octet-stream")
_RETRY_AFTER = (b"retry-after", b"1")
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()


class PayloadTooLarge(InvalidArgument):
    """The request body is larger than ``max_message_bytes`` (HTTP 413)."""

    http_status = 413


def match_infer_path(path: str) -> tuple[str, str | None] | None:
    """``(name, version)`` of an infer path (version None when unversioned), else None.

    Stricter than the FastAPI routes (``[^/]+`` per parameter): whatever this refuses goes to
    FastAPI, which then answers as it always did.
    """
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    middle = path[len(_PREFIX) : -len(_SUFFIX)]
    if not middle:  # "/v2/models/infer": prefix and suffix overlap
        return None
    if "/" not in middle:
        return middle, None
    parts = middle.split("/")
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def model_spec(gateway: Gateway, name: str, version: str | None) -> ModelSpec:
    """The named model's spec; NotFound for an unknown model or a version it does not have."""
    spec = gateway.model_spec(name)
    if version is not None and version != spec.version:
        raise NotFound(f"model {name!r} has no version {version!r}; versions: {spec.version}")
    return spec


def error_reply(status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> Reply:
    """The reply every failure carries: ``{"error": message}``."""
    body = orjson.dumps({"error": message})
    return status, [*headers, (b"content-length", str(len(body)).encode()), _JSON_TYPE], body


def engine_error_reply(who: str, method: str, path: str, exc: EngineError) -> Reply:
    """The reply for an error of the engine's tree, logged when it is the server's fault."""
    # Client errors and overload answers (429/503/504) can come by the thousand: debug only.
    if isinstance(exc, InternalError):
        logger.error("%s: %s %s: %s", who, method, path, exc.message)
    elif isinstance(exc, ModelError):
        logger.warning("%s: %s %s: %s", who, method, path, exc.message)
    else:
        logger.debug("%s: %s %s: %s", who, method, path, exc.message)
    # No "Connection: close" after a 413: uvicorn reads and drops the rest of the body, and
    # closing with unread data would reset the connection before the client reads the answer.
    headers = (_RETRY_AFTER,) if isinstance(exc, ResourceExhausted) else ()
    return error_reply(exc.http_status, exc.public_message(), headers)


def too_large(size: int, limit: int) -> str:
    """The message of `PayloadTooLarge`."""
    return f"request body of {size}+ bytes is over max_message_bytes={limit}"


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The request body from ASGI ``receive``, refused (413) once known to exceed ``limit``.

    A declared Content-Length over the limit is refused before reading; a chunked body is counted
    while it arrives, so an endless one cannot grow memory.

    Raises:
        PayloadTooLarge: over ``limit``.
        InvalidArgument: a Content-Length that is not a number.
        ClientDisconnect: the client went away before the body was complete.
    """
    counted = content_length is None
    if content_length is not None:
        if not content_length.isdigit():
            raise InvalidArgument(f"bad Content-Length {content_length!r}")
        if int(content_length) > limit:
            raise PayloadTooLarge(too_large(int(content_length), limit))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                if counted:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(too_large(size, limit))
                chunks.append(chunk)
            if not message.get("more_body", False):
                # One chunk (the usual case): join hands back the same bytes object, no copy.
                return b"".join(chunks)
        elif kind == "http.disconnect":
            raise ClientDisconnect()


def deadline(arrived_ns: int, timeout_ms: str | None, timeout_us: int | None) -> int | None:
    """Absolute deadline (``time.monotonic_ns()``) from the ``Timeout-Ms`` header and the request's
    ``timeout`` parameter (microseconds, as tritonclient sends it); the earlier one wins, 0 = none."""
    result: int | None = None
    if timeout_ms is not None:
        text = timeout_ms.strip()
        if not text.isdigit() or not text.isascii():
            raise InvalidArgument(f"Timeout-Ms must be a non-negative integer, got {timeout_ms!r}")
        if int(text):
            result = arrived_ns + int(text) * 1_000_000
    if timeout_us:
        by_param = arrived_ns + timeout_us * 1_000
        result = by_param if result is None else min(result, by_param)
    return result


class InferEndpoint:
    """The semantics of ``/infer`` over ASGI headers and ``receive``, for any caller.

    Args:
        gateway: where requests go.
        max_bytes: largest request body accepted and response sent (``max_message_bytes``).
        observer: counts and logs each request.
        who: the role prefix of log lines (``frontend rest#0``).
    """

    def __init__(self, gateway: Gateway, max_bytes: int, observer: RequestObserver, who: str) -> None:
        self._gateway = gateway
        self._max_bytes = max_bytes
        self._observer = observer
        self.who = who

    async def respond(
        self,
        name: str,
        version: str | None,
        headers: Iterable[tuple[bytes, bytes]],
        receive: Receive,
        path: str,
    ) -> Reply:
        """Run one inference and answer it; never raises but for `BaseException` (cancellation).

        Args:
            name: the model named in the path.
            version: the version named in the path, None when unversioned.
            headers: the request's raw headers (lower-case names, as uvicorn gives them).
            receive: where the body comes from.
            path: the request path (for logs).
        """
        observer = self._observer
        started = observer.begin(name)
        try:
            reply = await self._infer(name, version, headers, receive)
        except EngineError as exc:
            observer.end(name, started, exc)
            return engine_error_reply(self.who, "POST", path, exc)
        except ClientDisconnect:
            observer.end(name, started, Cancelled("client disconnected"))
            # The client closed mid-body: its fault, and nobody is left to read an answer.
            logger.debug("%s: POST %s: client disconnected", self.who, path)
            return error_reply(400, "client disconnected before the request body was complete")
        except Exception as exc:
            observer.end(name, started, exc)
            logger.exception("%s: POST %s failed", self.who, path)
            return error_reply(500, "internal error")
        except BaseException as exc:
            observer.end(name, started, exc)
            raise
        observer.end(name, started)
        return reply

    async def _infer(
        self, name: str, version: str | None, headers: Iterable[tuple[bytes, bytes]], receive: Receive
    ) -> Reply:
        arrived_ns = time.monotonic_ns()
        spec = model_spec(self._gateway, name, version)
        # The first of each header wins, as with Starlette's Headers.get.
        content_length = timeout_ms = header_length = None
        for key, value in headers:
            if key == b"content-length":
                if content_length is None:
                    content_length = value.decode("latin-1")
            elif key == _HEADER_LENGTH_KEY:
                if header_length is None:
                    header_length = value.decode("latin-1")
            elif key == b"timeout-ms" and timeout_ms is None:
                timeout_ms = value.decode("latin-1")
        body = await read_body(receive, content_length, self._max_bytes)
        parsed = parse_infer_request(body, parse_header_length(header_length, len(body)))
        if parsed.id:
            request_id.set(parsed.id)
        deadline_ns = deadline(arrived_ns, timeout_ms, parsed.timeout_us)
        result = await self._gateway.infer(
            spec.name, parsed.inputs, outputs=parsed.outputs, deadline_ns=deadline_ns, request_id=parsed.id
        )
        try:
            content, json_length = encode_infer_response(
                spec.name, spec.version, parsed, result.outputs, self._max_bytes
            )
        finally:
            result.release()
        size = (b"content-length", str(len(content)).encode())
        if json_length is None:
            return 200, [size, _JSON_TYPE], content
        return 200, [(_HEADER_LENGTH_KEY, str(json_length).encode()), size, _OCTETS_TYPE], content


class InferFastPath:
    """ASGI middleware: answers ``POST`` on the infer paths with `InferEndpoint`, passes the rest on.

    Args:
        app: the application for everything else (the FastAPI app).
        endpoint: the infer semantics.
    """

    def __init__(self, app: ASGIApp, endpoint: InferEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            target = match_infer_path(path)
            if target is not None:
                status, headers, body = await self.endpoint.respond(
                    target[0], target[1], scope["headers"], receive, path
                )
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
