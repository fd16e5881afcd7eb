"""gRPC over HTTP/2 on the event loop itself (``grpc_transport: h2``), with `servers.http2` for HTTP/2.

Why: grpc.aio hands every call between grpc core's threads and the asyncio loop (its poller thread,
its event-engine threads, a socket to wake the loop): on a 2-core VM that is ~16 context switches and
~200 µs of kernel time per unary call, more than the engine's whole request path. Here one
`asyncio.Protocol` per connection parses frames (`servers.http2`) where the bytes arrive, runs each call's
handler as a task on the same loop (or, for a unary method with a `Starter`, starts its work at once
and answers from a done callback: no task), and writes every response finished in one loop iteration
with one ``write``, which also saves the client a wake-up per response.

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

Per-call state, the handler's context and the gRPC header formats: `servers.grpc_h2_call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, cast

import grpc

from servers import hpack_codec
from servers.deadlines import DeadlineHeap
from servers.grpc_h2_call import END, Abort, Call, H2Context, encode_message, metadata, parse_timeout
from servers.grpc_handlers import BearerAuth
from servers.grpc_message_buffer import MessageTooLarge
from servers.grpc_messages import ViewedMessage
from servers.held_writes import HeldWrites, Release, run_releases
from servers.http2 import ErrorCode, H2ProtocolError, ServerConnection, StreamClosedError
from servers.write_coalescing import CoalescedWrites

log = logging.getLogger("servers.grpc_h2")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
# the same header blocks every call: encoded once
_RESPONSE_BLOCK = hpack_codec.encode(_RESPONSE_HEADERS)
_OK_TRAILERS_BLOCK = hpack_codec.encode(((b"grpc-status", b"0"),))
_NOT_GRPC_BLOCK = hpack_codec.encode(((b":status", b"415"),))
#: inbound windows granted per stream (and added to the connection's); larger than 64 KiB so that a
#: multi-MiB request does not wait a round trip per 64 KiB
_WINDOW = 1 << 20
#: largest frame the peer may send (HTTP/2 default 16 KiB): fewer frames per large message
_MAX_FRAME = 1 << 20
#: seconds a connection we hang up on waits for the peer to close its side (it normally does as soon
#: as it reads our GOAWAY and end of stream) before it is closed anyway
FAREWELL_S = 0.5
#: bytes waiting in a connection's write buffer above which its peer is no longer read (until they
#: drain): a peer that sends without reading (a PING flood, requests it never collects) must not grow
#: this process's memory without bound
WRITE_BUFFER_HIGH = 4 << 20
#: a response message this large is not copied on its way out: its gRPC prefix goes in a DATA frame
#: of its own and the frames are written with one vectored write instead of joined first
VECTORED_MIN_BYTES = 64 << 10
#: calls a connection starts from what it read before it lets the loop run once, so that the
#: answers that came back meanwhile go out then, not after the whole read is parsed. One read holds
#: up to 256 KiB, ~230 small calls and ~10 ms of work (libuv reads again at once when a read fills
#: its buffer): in a 500-call burst, 87 answers ready at 16 ms waited for such a read until 33 ms.
#: 32 per turn cost the lean client's burst ~3 ms (the worker ran smaller batches between the
#: turns); 96 bounds the wait at ~4 ms (measured: BENCHMARKS.md, analysis §5).
CALLS_PER_TURN = 96


class Flight(Protocol):
    """A unary call answered without a task (`H2GrpcServer`'s ``starters``): its work was started
    when its request was complete, and it is answered from ``future``'s done callback. A task per
    call (its creation, its steps, the coroutines it awaits through) costs more than the rest of a
    small call's dispatch."""

    #: done when the answer can be built
    future: asyncio.Future[Any]

    def finish(self) -> Any:
        """The response message (``future`` is done); raises `Abort` for an error status."""
        ...

    def cancel(self) -> None:
        """The call ended before ``future`` was done (reset, deadline, stop): stop the work. The
        future's done callback follows, and with it `discard`."""
        ...

    def discard(self) -> None:
        """The call ended without an answer: give back what the answer holds (``future`` is done)."""
        ...


#: ``(request, deadline in time.monotonic() seconds or None) -> Flight``: raises `Abort` to refuse
Starter = Callable[[Any, float | None], Flight]


def _running(call: Call) -> bool:
    return not call.done


class Connection(CoalescedWrites, ServerConnection, asyncio.Protocol):
    """One client connection: HTTP/2 events (`ServerConnection`'s ``on_*``) to calls, each a `Call`
    whose handler runs as a task."""

    def __init__(self, server: H2GrpcServer) -> None:
        super().__init__(
            initial_window=_WINDOW,
            connection_window=16 * _WINDOW,
            max_frame_size=_MAX_FRAME,
            max_header_list_size=64 << 10,
        )
        self.server = server
        self.loop = server.loop
        self.calls: dict[int, Call] = {}
        #: calls with response data waiting for the peer's window
        self.blocked: set[Call] = set()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        #: a large DATA payload is queued: the next write is vectored
        self._vectored = False
        #: calls whose response views a result that is released once its bytes are written
        self._viewing: list[Call] = []
        #: those releases once written, until the transport has sent the bytes
        self._held = HeldWrites(self.loop, lambda: self.transport, "grpc h2")
        #: calls started in this turn of the loop (`CALLS_PER_TURN`), and whether `_parse_on` is due
        self._started = 0
        self._parse_scheduled = False
        #: the transport's write buffer is over its high mark (`pause_writing`)
        self._writes_backed_up = False
        #: the grpc-timeout of each call that sent one, on one timer (not a loop timer per call)
        self._deadlines: DeadlineHeap[Call] = DeadlineHeap(
            self.loop, self._expire, _running, self.calls.__len__
        )

    # ---- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            self.peer = f"{family}:{peer[0]}:{peer[1]}"  # grpc's spelling of context.peer()
        else:
            self.peer = str(peer)
        self.initiate()
        self.server.connections.add(self)
        self.transport.write(self.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._deadlines.close()
        for call in list(self.calls.values()):
            self._drop(call)
        self.transport = None
        for call in self._viewing:
            run_releases(call.releases, "grpc h2")
        self._viewing.clear()
        self._held.release_all()
        if not self.server.connections and self.server.all_closed is not None:
            self.server.all_closed.set()

    def pause_writing(self) -> None:
        # the peer reads slower than it is answered: read nothing more from it until it catches up
        self._writes_backed_up = True
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writes_backed_up = False
        if self.transport is not None and not self.closing and not self.parsing_paused:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # read only so that the socket is not closed with bytes in it
        self._started = 0
        self._parse(self.receive, data)

    def _parse(self, receive: Callable[..., None], *data: bytes) -> None:
        """``receive(*data)``, then write; when `on_end` paused parsing, read nothing more until
        `_parse_on` has parsed what is held back, one turn of the loop after this one."""
        try:
            receive(*data)
        except H2ProtocolError as exc:
            # a GOAWAY naming the error is queued: send it and hang up
            log.debug("grpc h2: closing %s: %s", self.peer, exc)
            self.hang_up()
            return
        self._write_now()
        if self.parsing_paused and not self._parse_scheduled and self.transport is not None:
            self._parse_scheduled = True
            self.transport.pause_reading()
            self.loop.call_soon(self._parse_on)

    def _parse_on(self) -> None:
        self._parse_scheduled = False
        if self.closing or self.transport is None:
            return
        self._started = 0
        self._parse(self.resume_parsing)
        if not self.parsing_paused and not self._writes_backed_up and not self.closing:
            self.transport.resume_reading()

    def on_reset(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is not None:
            self._drop(call)

    def on_goaway(self, code: int) -> None:
        self.hang_up()

    # ---- requests ------------------------------------------------------------------------------

    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
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
            self.send_headers(sid, _NOT_GRPC_BLOCK, end_stream=True)
            self.reset_stream(sid, ErrorCode.NO_ERROR)  # (when its request has not ended: it need not go on)
            self._schedule_flush()
            return
        server = self.server
        name = path.decode("latin-1")
        handler = server.handlers.get(name)
        call = Call(sid, name, handler, headers, self.server.max_message_bytes)
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
        if auth is not None and not exempt and not auth.authorized(metadata(headers)):
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
                now_ns = time.monotonic_ns()
                call.deadline = now_ns / 1e9 + seconds  # the same clock as time.monotonic()
                self._deadlines.watch(now_ns + int(seconds * 1e9), call)
        if handler.request_streaming:
            call.task = self.loop.create_task(self._run(call))

    def on_data(self, sid: int, data: memoryview, flow_len: int) -> None:
        call = self.calls.get(sid)
        if call is None or call.done:
            # an answered or refused call's leftovers: free the window, drop the bytes
            self.acknowledge(sid, flow_len)
            return
        buf = call.buf
        if not buf and len(data) >= 5 and len(data) == 5 + int.from_bytes(data[1:5], "big") <= 5 + buf.limit:
            # the common case: one whole message in one DATA frame
            self._take(call, data[0], data[5:])
        else:
            try:
                messages = buf.feed(data)
            except MessageTooLarge as exc:
                self.acknowledge(sid, flow_len)
                self._finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                return
            for flag, message in messages:
                self._take(call, flag, message)
                if call.done:
                    break
        if call.handler.request_streaming and not call.done and call.messages:
            # messages wait unread: the stream's window is granted as the handler reads them, so a
            # client streaming faster than it is answered waits (the connection's is granted now:
            # the other calls go on). Bytes of a message still arriving are granted at once: a
            # message larger than the window could never complete otherwise.
            self.acknowledge_connection(flow_len)
            call.unacked += flow_len
        else:
            self.acknowledge(sid, flow_len)

    def _take(self, call: Call, flag: int, message: bytes | memoryview) -> None:
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

    def on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        self._started += 1
        if self._started >= CALLS_PER_TURN:
            self.pause_parsing()
        call.request_closed = True
        if call.done:
            return
        if call.buf:
            self._finish(call, grpc.StatusCode.INTERNAL, "the request ended inside a message")
        elif call.handler.request_streaming:
            call.messages.append(END)
            self._wake_reader(call)
        elif len(call.messages) != 1:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "a unary call needs exactly one message")
        else:
            start = self.server.starters.get(call.path)
            if start is None:
                call.task = self.loop.create_task(self._run(call))
            else:
                self._start(call, start)

    def _start(self, call: Call, start: Starter) -> None:
        try:
            flight = start(self._deserialize(call, call.messages.popleft()), call.deadline)
        except Exception as exc:
            self._finish(call, *self._failure(call, exc))
            return
        call.flight = flight
        flight.future.add_done_callback(lambda _: self._landed(call))

    def _landed(self, call: Call) -> None:
        """A flight's future is done: answer its call, or give the answer back if the call ended."""
        flight = call.flight
        assert flight is not None
        if call.done:
            flight.discard()
            return
        try:
            message = flight.finish()
            if (
                type(message) is bytes
                and call.request_closed
                and not call.headers_sent
                and len(message) <= self.server.max_message_bytes
                and self.send_whole(
                    call.sid, _RESPONSE_BLOCK, (len(message).to_bytes(5, "big"), message), _OK_TRAILERS_BLOCK
                )
            ):
                # the common answer, whole: what _queue_response and _finish would do, in one go
                call.headers_sent = call.done = True
                self._retire(call)
                self.calls.pop(call.sid, None)
                self._schedule_flush()
                return
            self._queue_response(call, message)
        except asyncio.CancelledError:
            # the work was cancelled (not by this call), or the stream closed under us (dropped)
            if not call.done:
                self._finish(call, grpc.StatusCode.CANCELLED, "cancelled")
            return
        except Exception as exc:
            self._finish(call, *self._failure(call, exc))
            return
        self._finish(call, grpc.StatusCode.OK, "")

    def _failure(self, call: Call, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """The status a call ends with when its handler raised ``exc`` (an `Abort` names its own)."""
        if isinstance(exc, Abort):
            return exc.code, exc.details
        log.error("grpc h2: %s failed", call.path, exc_info=exc)
        return grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"

    def _wake_reader(self, call: Call) -> None:
        waiter = call.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_message(self, call: Call) -> Any:
        """The next request message of ``call`` (deserialized), or `END`."""
        while not call.messages:
            call.waiter = self.loop.create_future()
            await call.waiter
        raw = call.messages.popleft()
        if call.unacked and not call.done:
            self.acknowledge_stream(call.sid, call.unacked)
            call.unacked = 0
            self._schedule_flush()
        if raw is END:
            call.messages.appendleft(END)  # every later read is the end too
            return END
        return self._deserialize(call, raw)

    def _deserialize(self, call: Call, raw: bytes | memoryview) -> Any:
        parse = call.handler.request_deserializer
        if parse is None:
            return bytes(raw)
        try:
            return parse(raw)
        except Exception as exc:
            log.debug("grpc h2: %s: cannot parse the request: %s", call.path, exc)
            raise Abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!") from exc

    async def _requests(self, call: Call) -> AsyncIterator[Any]:
        while (message := await self.next_message(call)) is not END:
            yield message

    # ---- running a call --------------------------------------------------------------------------

    async def _run(self, call: Call) -> None:
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
        except asyncio.CancelledError:
            if call.done:
                return  # reset by the client, expired, or the server's stop: already answered
            code, details = grpc.StatusCode.CANCELLED, "cancelled"
        except Exception as exc:
            code, details = self._failure(call, exc)
        self._finish(call, code, details)

    async def _stream_out(self, call: Call, context: H2Context, result: Any) -> None:
        if hasattr(result, "__aiter__"):
            async for message in result:
                await self.send_message(call, message)
        else:
            await result

    async def send_message(self, call: Call, message: Any) -> None:
        """Queue one response message (`_queue_response`); wait while the peer's window holds it back."""
        self._queue_response(call, message)
        if call.pending:
            call.drained = self.loop.create_future()
            await call.drained

    def _queue_response(self, call: Call, message: Any) -> None:
        """Queue one response message (serialized unless it is wire bytes already, or a
        `ViewedMessage`, whose pieces are written as they are and released once sent). Raises
        `Abort` for one over the size limit, CancelledError when the call is gone."""
        if isinstance(message, ViewedMessage):
            try:
                self._start_message(call, message.nbytes)
            except BaseException:
                message.release()  # nothing viewing it was queued
                raise
            self._queue_viewed(call, message)
        else:
            self._queue_message(call, message)
        self._schedule_flush()

    def _queue_message(self, call: Call, message: Any) -> None:
        serialize = call.handler.response_serializer
        payload = message if serialize is None or isinstance(message, bytes) else serialize(message)
        self._start_message(call, len(payload))
        try:
            prefix = b"\0" + len(payload).to_bytes(4, "big")
            if len(payload) < VECTORED_MIN_BYTES:
                self._queue_data(call, memoryview(prefix + payload))
            else:
                self._queue_data(call, memoryview(prefix))
                self._queue_data(call, memoryview(payload))
        except StreamClosedError:
            self._drop(call)
            raise asyncio.CancelledError() from None

    def _queue_viewed(self, call: Call, message: ViewedMessage) -> None:
        # The pieces go into the frames (or the call's pending data) as views: the next write is
        # vectored, and the result is released once the transport holds none of their bytes. From
        # here on the release waits for a write, whatever happens (a dropped call schedules one).
        call.releases.append(message.release)
        if len(call.releases) == 1:
            self._viewing.append(call)
        self._vectored = True
        try:
            self._queue_data(call, memoryview(b"\0" + message.nbytes.to_bytes(4, "big")))
            for piece in message.pieces:
                self._queue_data(call, memoryview(piece).cast("B"))
        except StreamClosedError:
            self._drop(call)
            raise asyncio.CancelledError() from None

    def _start_message(self, call: Call, size: int) -> None:
        """Check that a response message of ``size`` bytes may go; send the headers first."""
        if call.done:
            raise asyncio.CancelledError()
        limit = self.server.max_message_bytes
        if size > limit:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"Sent message larger than max ({size} vs. {limit})"
            )
        if not call.headers_sent:
            call.headers_sent = True
            try:
                self.send_headers(call.sid, _RESPONSE_BLOCK)
            except StreamClosedError:
                self._drop(call)
                raise asyncio.CancelledError() from None

    def _queue_data(self, call: Call, data: memoryview) -> None:
        if call.pending:
            call.pending.append(data)
        else:
            self._send_data(call, data)

    def _send_data(self, call: Call, data: memoryview) -> bool:
        """Send what the windows allow; keep the rest at the head of ``call.pending`` until they
        open. False when the windows closed before all of ``data`` was sent."""
        sid = call.sid
        if len(data) >= VECTORED_MIN_BYTES:
            self._vectored = True
        while data:
            room = min(self.window(sid), self.max_outbound_frame_size)
            if room <= 0:
                call.pending.appendleft(data)
                self.blocked.add(call)
                return False
            self.send_data(sid, data[:room])
            data = data[room:]
        return True

    def on_window(self, sid: int) -> None:
        if not self.blocked:
            return
        if sid == 0:
            calls = list(self.blocked)
        else:
            one = self.calls.get(sid)
            calls = [one] if one is not None and one in self.blocked else []
        for call in calls:
            try:
                # every piece the windows now allow: a message waits as several pieces (a prefix,
                # a viewed answer's parts), and no further WINDOW_UPDATE need come for the rest
                while call.pending and self._send_data(call, call.pending.popleft()):
                    pass
            except StreamClosedError:
                self._drop(call)
                continue
            if not call.pending:
                self.blocked.discard(call)
                if call.drained is not None and not call.drained.done():
                    call.drained.set_result(None)
                if call.trailers is not None:
                    self._send_trailers(call)

    def _finish(self, call: Call, code: grpc.StatusCode, details: str) -> None:
        """Answer ``call`` with its status (after any data still waiting for window) and forget it."""
        if call.done:
            return
        call.done = True
        self._retire(call)
        if code is grpc.StatusCode.OK and not details:
            block = _OK_TRAILERS_BLOCK
        else:
            status = str(code.value[0]).encode()
            block = hpack_codec.encode(((b"grpc-status", status), (b"grpc-message", encode_message(details))))
        if not call.headers_sent:
            call.headers_sent = True
            block = _RESPONSE_BLOCK + block  # trailers-only answer
        call.trailers = block
        if not call.pending:
            self._send_trailers(call)
        self._schedule_flush()

    def _send_trailers(self, call: Call) -> None:
        block, call.trailers = call.trailers, None
        if block is None:
            return
        with contextlib.suppress(StreamClosedError):
            self.send_headers(call.sid, block, end_stream=True)
            if not call.request_closed:
                # answered before the client finished sending: it need not go on
                self.reset_stream(call.sid, ErrorCode.NO_ERROR)
        self.calls.pop(call.sid, None)

    def _drop(self, call: Call) -> None:
        """The stream is gone (reset, connection lost): stop the call without answering."""
        if not call.done:
            call.done = True
            self._retire(call)
        call.pending.clear()
        self.blocked.discard(call)
        self.calls.pop(call.sid, None)
        if call.releases:
            self._schedule_flush()  # what it viewed will not be sent: released after the next write
        if call.drained is not None and not call.drained.done():
            call.drained.cancel()
        self._wake_reader(call)
        if call.task is not None and not call.task.done():
            call.task.cancel()

    def _retire(self, call: Call) -> None:
        self.server.active -= 1
        if call.task is not None and not call.task.done() and call.task is not asyncio.current_task():
            call.task.cancel()
        if call.flight is not None and not call.flight.future.done():
            call.flight.cancel()
        if not self.server.active and self.server.idle is not None:
            self.server.idle.set()

    def _expire(self, call: Call) -> None:
        self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def cancel_all(self) -> None:
        for call in list(self.calls.values()):
            self._finish(call, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def goodbye(self) -> None:
        """GOAWAY, then hang up."""
        self.goaway()
        self.hang_up()

    def hang_up(self) -> None:
        """Send what is queued (a GOAWAY among it), end our side, and close once the peer has
        closed its side or after `FAREWELL_S`.

        A socket closed while the peer's bytes wait unread in it sends a reset, and the kernel then
        throws away what it had not sent yet: the peer could lose its last answers and the GOAWAY.
        So until the end, what the peer sends is read and dropped, and nothing more is written:
        calls still running are dropped now.
        """
        self._write_now()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.closing:
            return
        self.closing = True
        for call in list(self.calls.values()):
            self._drop(call)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # after the queued bytes; the peer reads them, then the end
        transport.resume_reading()
        self.loop.call_later(FAREWELL_S, transport.close)

    # ---- writing ---------------------------------------------------------------------------------

    def _write_now(self) -> None:
        if not self._vectored:
            data = self.data_to_send()
            if data and self.transport is not None and not self.closing and not self.transport.is_closing():
                self.transport.write(data)
        else:
            # the transport keeps references to what the kernel does not take at once (immutable
            # bytes, or results held until it has sent them)
            self._vectored = False
            frames = self.frames_to_send()
            if frames and self.transport is not None and not self.closing and not self.transport.is_closing():
                self.transport.writelines(frames)
        if self._viewing:
            self._written()

    def _written(self) -> None:
        """Hand the releases of the calls whose viewed responses are all written (or dropped) to
        `_held`, which runs them once the transport has sent the bytes."""
        ready: list[Release] = []
        still = []
        for call in self._viewing:
            if call.pending:
                still.append(call)  # waiting for window: its views are not written yet
            else:
                ready += call.releases
                call.releases.clear()
        self._viewing = still
        self._held.written(ready)


class H2GrpcServer:
    """A gRPC server on the running loop for the method table ``handlers`` (full path -> handler).

    Args:
        handlers: ``"/package.Service/Method"`` -> `grpc.RpcMethodHandler`.
        max_message_bytes: largest message accepted and sent.
        max_inflight: calls held at once; more are refused RESOURCE_EXHAUSTED.
        auth: checks bearer tokens when set (health exempt when ``health_open``).
        starters: full path -> `Starter` for unary methods answered without a task (their
            ``handlers`` entry still gives the request's deserializer).
    """

    def __init__(
        self,
        handlers: Mapping[str, grpc.RpcMethodHandler],
        *,
        max_message_bytes: int,
        max_inflight: int,
        auth: BearerAuth | None = None,
        health_open: bool = True,
        starters: Mapping[str, Starter] | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.starters = dict(starters or {})
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.auth = auth
        self.health_open = health_open
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.active = 0
        self.stopping = False
        self.idle: asyncio.Event | None = None
        #: set when the last connection is gone, once a stop has hung up on them
        self.all_closed: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port``; returns the bound port. Raises OSError when it cannot bind."""
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
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
        self.all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.cancel_all()
            conn.goodbye()
        if self.connections:
            # each connection closes itself within FAREWELL_S; the margin covers the close callbacks
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), FAREWELL_S + 0.5)
        if self._server is not None:
            await self._server.wait_closed()
