"""One gRPC call on the `h2` transport (`servers.grpc_h2`): its state (`Call`), the context its
handler gets (`H2Context`, the part of `grpc.aio.ServicerContext` the servicers use), and the wire
details of gRPC over HTTP/2 that are not HTTP/2's own (``grpc-timeout``, ``grpc-message``, metadata).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from servers.grpc_message_buffer import MessageBuffer

if TYPE_CHECKING:
    from servers.grpc_h2 import Connection, Flight

#: headers that are transport, not metadata, in `H2Context.invocation_metadata`
_NOT_METADATA = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"user-agent"}
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
#: what a request-streaming call's message queue holds after its last message
END = object()


class Abort(Exception):
    """Ends a call with ``code`` and ``details`` (raised by `H2Context.abort`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def parse_timeout(value: bytes) -> float | None:
    """Seconds in a ``grpc-timeout`` header (``"100m"`` = 0.1), None when it is not one."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def encode_message(details: str) -> bytes:
    """``grpc-message`` value: UTF-8, percent-encoding what is not printable ASCII and ``%``."""
    raw = details.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def _metadata_value(key: bytes, value: bytes) -> tuple[str, str | bytes]:
    name = key.decode("latin-1")
    if name.endswith("-bin"):
        with contextlib.suppress(ValueError):
            return name, base64.b64decode(value + b"=" * (-len(value) % 4))
    return name, value.decode("latin-1")


def metadata(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(_metadata_value(k, v) for k, v in headers if k[:1] != b":" and k not in _NOT_METADATA)


class Call:
    """One RPC: its stream, handler, request bytes and the state of its answer."""

    __slots__ = (
        "buf", "code", "deadline", "details", "done", "drained", "encoding", "flight", "handler",
        "headers", "headers_sent", "messages", "path", "pending", "releases", "request_closed", "sid",
        "task", "trailers", "unacked", "waiter",
    )  # fmt: skip

    def __init__(
        self,
        sid: int,
        path: str,
        handler: grpc.RpcMethodHandler,
        headers: list[tuple[bytes, bytes]],
        max_message_bytes: int,
    ) -> None:
        self.sid = sid
        self.path = path
        self.handler = handler
        self.headers = headers
        self.deadline: float | None = None
        #: the request message being received, when it spans DATA frames
        self.buf = MessageBuffer(max_message_bytes)
        self.messages: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.unacked = 0
        self.request_closed = False
        self.task: asyncio.Task[None] | None = None
        #: the work of a call answered without a task (`servers.grpc_h2.Flight`)
        self.flight: Flight | None = None
        self.headers_sent = False
        self.pending: deque[memoryview] = deque()
        #: releases of the results its response views (`servers.grpc_messages.ViewedMessage`)
        self.releases: list[Callable[[], None]] = []
        #: the trailers' header block, once the call is answered
        self.trailers: bytes | None = None
        self.drained: asyncio.Future[None] | None = None
        self.done = False
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.encoding = b""


class H2Context:
    """What a handler gets in place of `grpc.aio.ServicerContext` (the parts the servicers use)."""

    __slots__ = ("_call", "_conn")

    #: handlers may answer with a `servers.grpc_messages.ViewedMessage` (not so on grpc.aio)
    sends_views = True

    def __init__(self, call: Call, conn: Connection) -> None:
        self._call = call
        self._conn = conn

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._call.code = code

    def set_details(self, details: str) -> None:
        self._call.details = details

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return metadata(self._call.headers)

    def peer(self) -> str:
        return self._conn.peer

    def cancelled(self) -> bool:
        """Asked by a running handler: its call was ended (client reset, deadline, server stop)."""
        return self._call.done

    def done(self) -> bool:
        return self._call.done

    async def write(self, message: Any) -> None:
        """Send one response message of a response-streaming call (waits while the peer's window is full)."""
        await self._conn.send_message(self._call, message)

    async def read(self) -> Any:
        """The next request message of a request-streaming call, or `grpc.aio.EOF`."""
        message = await self._conn.next_message(self._call)
        return grpc.aio.EOF if message is END else message
