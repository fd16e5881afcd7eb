"""gRPC over HTTP/2 on the event loop itself (``grpc_transport: h2``), with `h2` for the HTTP/2 layer.

Why: grpc.aio hands every call between grpc core's threads and the asyncio loop (its poller thread,
its event-engine threads, a socket to wake the loop): on a 2-core VM that is ~16 context switches and
~200 µs of kernel time per unary call, more than the engine's whole request path. Here one
`asyncio.Protocol` per connection parses frames with `h2` where the bytes arrive, runs each call's
handler as a task on the same loop, and writes every response finished in one loop iteration with one
``write``, which also saves the client a wake-up per response.

It serves the same method table as the grpc.aio server (`servers.grpc_handlers.method_table`:
`grpc.RpcMethodHandler` objects with their (de)serializers) and gives handlers the part of
`grpc.aio.ServicerContext` the servicers use: ``abort``, ``time_remaining``, ``invocation_metadata``,
``write``, ``peer``, ``cancelled``, ``set_code``/``set_details``. What it does, as grpc core does:
``grpc-timeout`` deadlines (DEADLINE_EXCEEDED when the handler has not finished), client resets cancel
the handler's task, messages over ``max_message_bytes`` both ways are RESOURCE_EXHAUSTED, more than
``max_inflight`` calls at once are RESOURCE_EXHAUSTED, unknown methods UNIMPLEMENTED, gzip/deflate
request compression is accepted (answers are not compressed), bearer tokens are checked before a
request is parsed, and a stop lets calls in flight finish for the grace period while new calls are
refused UNAVAILABLE. Outbound data respects the peer's flow-control windows; inbound windows are
granted as data is taken (for streams, as the handler reads each message).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NoReturn, cast

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from servers.grpc_handlers import BearerAuth

log = logging.getLogger("servers.grpc_h2")
# hpack logs every decoded header at DEBUG, bearer tokens included: never let it
logging.getLogger("hpack").setLevel(logging.WARNING)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: headers that are transport, not metadata, in `H2Context.invocation_metadata`
_NOT_METADATA = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"user-agent"}
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)
#: inbound windows granted per stream (and added to the connection's); larger than 64 KiB so that a
#: multi-MiB request does not wait a round trip per 64 KiB
_WINDOW = 1 << 20
_END = object()
#: largest frame the peer may send (HTTP/2 default 16 KiB): fewer frames per large message
_MAX_FRAME = 1 << 20


class _Abort(Exception):
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


def _metadata(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(_metadata_value(k, v) for k, v in headers if k[:1] != b":" and k not in _NOT_METADATA)


class _Call:
    """One RPC: its stream, handler, request bytes and the state of its answer."""

    __slots__ = (
        "buf", "code", "deadline", "details", "done", "drained", "encoding", "handler", "headers",
        "headers_sent", "messages", "path", "pending", "request_closed", "sid", "task", "timer",
        "trailers", "unacked", "waiter",
    )  # fmt: skip

    def __init__(
        self, sid: int, path: str, handler: grpc.RpcMethodHandler, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.sid = sid
        self.path = path
        self.handler = handler
        self.headers = headers
        self.deadline: float | None = None
        self.buf = bytearray()
        self.messages: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.unacked = 0
        self.request_closed = False
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.pending: deque[memoryview] = deque()
        self.trailers: tuple[tuple[bytes, bytes], ...] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.encoding = b""


class H2Context:
    """What a handler gets in place of `grpc.aio.ServicerContext` (the parts the servicers use)."""

    __slots__ = ("_call", "_conn")

    def __init__(self, call: _Call, conn: _Connection) -> None:
        self._call = call
        self._conn = conn

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._call.code = code

    def set_details(self, details: str) -> None:
        self._call.details = details

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return _metadata(self._call.headers)

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
        return grpc.aio.EOF if message is _END else message


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.loop = server.loop
        self.calls: dict[int, _Call] = {}
        #: calls with response data waiting for the peer's window
        self.blocked: set[_Call] = set()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._flush_scheduled = False
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            # h2's per-header checks cost ~10% of the front-end; what this server reads of the
            # headers (:path, content-type, grpc-timeout, grpc-encoding, authorization) it checks
            # itself, and HPACK decoding stays strict
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1 << 20,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 << 10,
            },
        )
        # values given at construction count as agreed, so h2 does not apply this one on the
        # peer's ACK; the peer sends frames this large only after it has our SETTINGS
        self.h2.max_inbound_frame_size = _MAX_FRAME

    # ---- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            self.peer = f"{family}:{peer[0]}:{peer[1]}"  # grpc's spelling of context.peer()
        else:
            self.peer = str(peer)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * _WINDOW)
        self.server.connections.add(self)
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            self._drop(call)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued a GOAWAY naming the error; send it and hang up
            log.debug("grpc h2: closing %s: %s", self.peer, exc)
            self._write_now()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                call = self.calls.get(event.stream_id)
                if call is not None:
                    self._drop(call)
            elif isinstance(event, h2.events.WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                # a larger INITIAL_WINDOW_SIZE opens every stream's window without a WINDOW_UPDATE
                self._on_window(0)
            elif isinstance(event, h2.events.ConnectionTerminated) and self.transport is not None:
                self._write_now()
                self.transport.close()
                return
        self._write_now()

    # ---- requests ------------------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        headers = event.headers or []
        path = method = content_type = b""
        timeout = encoding = None
        for k, v in headers:
            if k == b":path":
                path = v
            elif k == b":method":
                method = v
            elif k == b"content-type":
                content_type = v
            elif k == b"grpc-timeout":
                timeout = v
            elif k == b"grpc-encoding":
                encoding = v
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            # not a gRPC request (gRPC over HTTP/2: 415 for a foreign content type)
            self._send(lambda: self.h2.send_headers(sid, ((b":status", b"415"),), end_stream=True))
            return
        server = self.server
        name = path.decode("latin-1")
        handler = server.handlers.get(name)
        call = _Call(sid, name, handler, headers)
        self.calls[sid] = call
        server.active += 1
        if handler is None:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        if server.stopping:
            self._finish(call, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            return
        if server.active > server.max_inflight:
            self._finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
            return
        auth = server.auth
        exempt = server.health_open and name.startswith(HEALTH_PREFIX)
        if auth is not None and not exempt and not auth.authorized(_metadata(headers)):
            self._finish(call, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            return
        if encoding is not None and encoding != b"identity":
            if encoding not in (b"gzip", b"deflate"):
                self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {encoding!r}")
                return
            call.encoding = encoding
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                call.deadline = time.monotonic() + seconds
                call.timer = self.loop.call_later(seconds, self._expire, call)
        if handler.request_streaming:
            call.task = self.loop.create_task(self._run(call))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        call = self.calls.get(sid)
        if call is None or call.done:
            # an answered or refused call's leftovers: free the window, drop the bytes
            self._ack(sid, event.flow_controlled_length)
            return
        data = event.data
        buf = call.buf
        limit = self.server.max_message_bytes
        if not buf and len(data) >= 5 and len(data) == 5 + int.from_bytes(data[1:5], "big") <= 5 + limit:
            # the common case: one whole message in one DATA frame
            self._take(call, data[0], data[5:])
        else:
            buf += data
            while len(buf) >= 5:
                size = int.from_bytes(buf[1:5], "big")
                if size > limit:
                    self._ack(sid, event.flow_controlled_length)
                    self._finish(
                        call,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"Received message larger than max ({size} vs. {limit})",
                    )
                    return
                if len(buf) < 5 + size:
                    break
                flag = buf[0]
                message = bytes(buf[5 : 5 + size])
                del buf[: 5 + size]
                self._take(call, flag, message)
                if call.done:
                    break
        if call.handler.request_streaming and not call.done:
            # granted as the handler reads: a client streaming faster than it is answered waits
            call.unacked += event.flow_controlled_length
        else:
            self._ack(sid, event.flow_controlled_length)

    def _take(self, call: _Call, flag: int, message: bytes) -> None:
        if flag:
            if not call.encoding:
                self._finish(call, grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
                return
            try:
                wbits = 31 if call.encoding == b"gzip" else 15
                message = zlib.decompressobj(wbits).decompress(message, self.server.max_message_bytes + 1)
            except zlib.error as exc:
                self._finish(call, grpc.StatusCode.INTERNAL, f"cannot decompress the message: {exc}")
                return
            if len(message) > self.server.max_message_bytes:
                self._finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max")
                return
        if call.handler.request_streaming:
            call.messages.append(message)
            self._wake_reader(call)
        elif call.messages:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "more than one message for a unary call")
        else:
            call.messages.append(message)

    def _on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.request_closed = True
        if call.done:
            return
        if call.buf:
            self._finish(call, grpc.StatusCode.INTERNAL, "the request ended inside a message")
        elif call.handler.request_streaming:
            call.messages.append(_END)
            self._wake_reader(call)
        elif len(call.messages) != 1:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "a unary call needs exactly one message")
        else:
            call.task = self.loop.create_task(self._run(call))

    def _ack(self, sid: int, size: int) -> None:
        if size:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, sid)

    def _wake_reader(self, call: _Call) -> None:
        waiter = call.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_message(self, call: _Call) -> Any:
        """The next request message of ``call`` (deserialized), or `_END`."""
        while not call.messages:
            call.waiter = self.loop.create_future()
            await call.waiter
        raw = call.messages.popleft()
        if call.unacked and not call.done:
            self._ack(call.sid, call.unacked)
            call.unacked = 0
            self._schedule_flush()
        if raw is _END:
            call.messages.appendleft(_END)  # every later read is the end too
            return _END
        return self._deserialize(call, raw)

    def _deserialize(self, call: _Call, raw: bytes) -> Any:
        parse = call.handler.request_deserializer
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception as exc:
            log.debug("grpc h2: %s: cannot parse the request: %s", call.path, exc)
            raise _Abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!") from exc

    async def _requests(self, call: _Call) -> AsyncIterator[Any]:
        while (message := await self.next_message(call)) is not _END:
            yield message

    # ---- running a call --------------------------------------------------------------------------

    async def _run(self, call: _Call) -> None:
        handler = call.handler
        context = H2Context(call, self)
        code, details = grpc.StatusCode.OK, ""
        try:
            if handler.unary_unary is not None:
                request = self._deserialize(call, call.messages.popleft())
                await self.send_message(call, await handler.unary_unary(request, context))
            elif handler.unary_stream is not None:
                request = self._deserialize(call, call.messages.popleft())
                await self._stream_out(call, context, handler.unary_stream(request, context))
            elif handler.stream_stream is not None:
                await self._stream_out(call, context, handler.stream_stream(self._requests(call), context))
            elif handler.stream_unary is not None:
                await self.send_message(call, await handler.stream_unary(self._requests(call), context))
            if call.code is not None:
                code, details = call.code, call.details
        except _Abort as abort:
            code, details = abort.code, abort.details
        except asyncio.CancelledError:
            if call.done:
                return  # reset by the client, expired, or the server's stop: already answered
            code, details = grpc.StatusCode.CANCELLED, "cancelled"
        except Exception as exc:
            log.exception("grpc h2: %s failed", call.path)
            code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        self._finish(call, code, details)

    async def _stream_out(self, call: _Call, context: H2Context, result: Any) -> None:
        if hasattr(result, "__aiter__"):
            async for message in result:
                await self.send_message(call, message)
        else:
            await result

    async def send_message(self, call: _Call, message: Any) -> None:
        """Queue one response message (serialized unless it is wire bytes already)."""
        if call.done:
            raise asyncio.CancelledError()
        serialize = call.handler.response_serializer
        payload = message if serialize is None or isinstance(message, bytes) else serialize(message)
        limit = self.server.max_message_bytes
        if len(payload) > limit:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(payload)} vs. {limit})",
            )
        try:
            if not call.headers_sent:
                call.headers_sent = True
                self.h2.send_headers(call.sid, _RESPONSE_HEADERS)
            frame = b"\0" + len(payload).to_bytes(4, "big") + payload
            if call.pending:
                call.pending.append(memoryview(frame))
            else:
                self._send_data(call, memoryview(frame))
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._drop(call)
            raise asyncio.CancelledError() from None
        self._schedule_flush()
        if call.pending:
            call.drained = self.loop.create_future()
            await call.drained

    def _send_data(self, call: _Call, data: memoryview) -> None:
        """Send what the windows allow; keep the rest in ``call.pending`` until they open."""
        sid = call.sid
        while data:
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if room <= 0:
                call.pending.appendleft(data)
                self.blocked.add(call)
                return
            self.h2.send_data(sid, data[:room].tobytes())
            data = data[room:]

    def _on_window(self, sid: int) -> None:
        if not self.blocked:
            return
        if sid == 0:
            calls = list(self.blocked)
        else:
            one = self.calls.get(sid)
            calls = [one] if one is not None and one in self.blocked else []
        for call in calls:
            try:
                while call.pending:
                    self._send_data(call, call.pending.popleft())
                    if call.pending:
                        break
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._drop(call)
                continue
            if not call.pending:
                self.blocked.discard(call)
                if call.drained is not None and not call.drained.done():
                    call.drained.set_result(None)
                if call.trailers is not None:
                    self._send_trailers(call)

    def _finish(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """Answer ``call`` with its status (after any data still waiting for window) and forget it."""
        if call.done:
            return
        call.done = True
        self._retire(call)
        status = str(code.value[0]).encode()
        trailers: tuple[tuple[bytes, bytes], ...]
        if code is grpc.StatusCode.OK and not details:
            trailers = _OK_TRAILERS
        else:
            trailers = ((b"grpc-status", status), (b"grpc-message", encode_message(details)))
        if not call.headers_sent:
            call.headers_sent = True
            trailers = _RESPONSE_HEADERS + trailers  # trailers-only answer
        call.trailers = trailers
        if not call.pending:
            self._send_trailers(call)
        self._schedule_flush()

    def _send_trailers(self, call: _Call) -> None:
        trailers, call.trailers = call.trailers, None
        if trailers is None:
            return
        try:
            self.h2.send_headers(call.sid, trailers, end_stream=True)
            if not call.request_closed:
                # answered before the client finished sending: it need not go on
                self.h2.reset_stream(call.sid, h2.errors.ErrorCodes.NO_ERROR)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.calls.pop(call.sid, None)

    def _drop(self, call: _Call) -> None:
        """The stream is gone (reset, connection lost): stop the call without answering."""
        if not call.done:
            call.done = True
            self._retire(call)
        call.pending.clear()
        self.blocked.discard(call)
        self.calls.pop(call.sid, None)
        if call.drained is not None and not call.drained.done():
            call.drained.cancel()
        self._wake_reader(call)
        if call.task is not None and not call.task.done():
            call.task.cancel()

    def _retire(self, call: _Call) -> None:
        self.server.active -= 1
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.task is not None and not call.task.done() and call.task is not asyncio.current_task():
            call.task.cancel()
        if not self.server.active and self.server.idle is not None:
            self.server.idle.set()

    def _expire(self, call: _Call) -> None:
        call.timer = None
        self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def cancel_all(self) -> None:
        for call in list(self.calls.values()):
            self._finish(call, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def goaway(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self._write_now()
        if self.transport is not None:
            self.transport.close()

    # ---- writing ---------------------------------------------------------------------------------

    def _send(self, action: Callable[[], None]) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            action()
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # every answer finished in this loop iteration goes out in one write
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_now()

    def _write_now(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class H2GrpcServer:
    """A gRPC server on the running loop for the method table ``handlers`` (full path -> handler).

    Args:
        handlers: ``"/package.Service/Method"`` -> `grpc.RpcMethodHandler`.
        max_message_bytes: largest message accepted and sent.
        max_inflight: calls held at once; more are refused RESOURCE_EXHAUSTED.
        auth: checks bearer tokens when set (health exempt when ``health_open``).
    """

    def __init__(
        self,
        handlers: Mapping[str, grpc.RpcMethodHandler],
        *,
        max_message_bytes: int,
        max_inflight: int,
        auth: BearerAuth | None = None,
        health_open: bool = True,
    ) -> None:
        self.handlers = dict(handlers)
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.auth = auth
        self.health_open = health_open
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.active = 0
        self.stopping = False
        self.idle: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port``; returns the bound port. Raises OSError when it cannot bind."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stop listening, refuse new calls, give calls in flight ``grace_s`` to finish, then hang up."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.active:
            self.idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace_s)
        for conn in list(self.connections):
            conn.cancel_all()
            conn.goaway()
        if self._server is not None:
            await self._server.wait_closed()
