"""A lean gRPC unary client on asyncio for load generation: HTTP/2 spoken by hand, requests pre-serialised.

Why: grpc.aio's client spends ~200 µs of CPU per call here (grpc core's threads, the completion
queue's hand-off to the event loop, a task per call): a third of the 2-core machine it shares with
the server at 64 calls in flight, so the server's figures measured the client as much as the server.
This one writes a prebuilt HEADERS block and the framed message per call, reads answers with one
`struct` unpack per frame, and sends every request of one loop iteration in one write.

It speaks plain HTTP/2 (RFC 9113) to any gRPC server, grpc core's included: SETTINGS both ways,
PING answered, flow control both ways (a request larger than the peer's windows waits for its
WINDOW_UPDATEs and goes out in frames of the peer's MAX_FRAME_SIZE), MAX_CONCURRENT_STREAMS (calls
over it wait their turn), GOAWAY (calls the server will not answer fail as UNAVAILABLE), RST_STREAM,
answers with trailers and Trailers-Only answers, a ``grpc-timeout`` sent with each call and
enforced here too (one sweep timer, not a timer per call). What it leaves out, because a load
generator does not need it: TLS, message compression, server push (refused in its SETTINGS),
streaming calls.

`GrpcH2Connection.unary` returns a future of `Answer` (the gRPC status code, its message, the
response message when asked for); `connect` opens a connection and waits for the server's SETTINGS.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import NamedTuple, cast

from servers import hpack_codec
from servers.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    ErrorCode,
    frame,
)

#: gRPC status codes by number (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE = 0, 1, 2, 4, 13, 14

_HEAD = struct.Struct(">HBBBL")  # as servers.http2: 24-bit length as 16 + 8, type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_PREFIX = struct.Struct(">BL")  # a gRPC message's compressed flag and length
#: connection-level bytes received before they are handed back to the server in one WINDOW_UPDATE
_REFILL = 1 << 24
#: HTTP status -> gRPC status when an answer carries no grpc-status (gRPC's http-grpc-status-mapping)
_HTTP_TO_GRPC = {
    b"400": INTERNAL,
    b"401": 16,
    b"403": 7,
    b"404": 12,
    b"429": 14,
    b"502": 14,
    b"503": 14,
    b"504": 14,
}


class Answer(NamedTuple):
    """One call's outcome: the gRPC status code (0 is OK), grpc-message, the response message (the
    bytes after the 5-byte prefix; empty unless the call asked to keep it)."""

    code: int
    details: str
    message: bytes


def request_header_block(path: str, authority: str, timeout_s: float | None = None) -> bytes:
    """The HPACK block of a unary call's request headers (left out of the peer's dynamic table, so
    the same bytes serve every call)."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if timeout_s is not None:
        # at most 8 digits (gRPC's TimeoutValue): milliseconds up to ~27 hours, seconds beyond
        millis = max(1, round(timeout_s * 1000))
        headers.append(
            (b"grpc-timeout", f"{millis}m".encode() if millis < 10**8 else f"{int(timeout_s)}S".encode())
        )
    return hpack_codec.encode(headers)


def framed(message: bytes) -> bytes:
    """``message`` with gRPC's length prefix (uncompressed): a request's DATA payload."""
    return _PREFIX.pack(0, len(message)) + message


class _Call:
    __slots__ = ("chunks", "future", "keep", "send_window", "sent_at", "status")

    def __init__(self, future: asyncio.Future[Answer], keep: bool, send_window: int, sent_at: float) -> None:
        self.future = future
        self.keep = keep
        self.send_window = send_window
        self.sent_at = sent_at
        self.chunks: list[bytes] = []
        self.status: bytes | None = None  # the response head's :status once it came


class GrpcH2Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server, carrying unary calls.

    Args:
        timeout_s: a call not answered this long after it was sent (or queued) fails with
            DEADLINE_EXCEEDED and its stream is reset; None: no client-side limit.
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.closed = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | memoryview] = []
        self._flush_scheduled = False
        self._buf = bytearray()
        self._need = 0  # bytes `_buf` must hold before a whole frame is there
        self._decoder = hpack_codec.Decoder()
        self._streams: dict[int, _Call] = {}
        self._next_sid = 1
        self._goaway = False
        # what the server allows us to send
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._peer_max_streams = 1 << 31
        #: request bodies (or their rest) waiting for window: (stream id, bytes left)
        self._blocked: deque[tuple[int, memoryview]] = deque()
        #: calls waiting for a stream (MAX_CONCURRENT_STREAMS): (header block, body, call)
        self._waiting: deque[tuple[bytes, bytes, _Call]] = deque()
        self._recv_unacked = 0
        #: a header block split over CONTINUATION frames: (stream id, END_STREAM, bytes so far)
        self._block: tuple[int, bool, bytearray] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods
        self._transport = cast(asyncio.Transport, transport)
        settings = _SETTING.pack(SETTINGS_ENABLE_PUSH, 0) + _SETTING.pack(
            SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW
        )
        # the largest windows there are: answers never wait for this client's WINDOW_UPDATEs
        grow = _U32.pack(MAX_WINDOW - DEFAULT_WINDOW)
        self._transport.write(PREFACE + frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))
        if self.timeout_s is not None:
            self._sweeper = self._loop.call_later(max(0.01, self.timeout_s / 8), self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut(f"connection lost: {exc}" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        try:
            self._receive(data)
        except (ValueError, hpack_codec.HPACKError, IndexError, struct.error) as exc:
            self._abort(ErrorCode.PROTOCOL_ERROR, f"bad frame from the server: {exc}")
        self._flush()

    # ---- calls -----------------------------------------------------------------------------------

    def unary(self, block: bytes, body: bytes, keep: bool = False) -> asyncio.Future[Answer]:
        """Send one call: ``block`` from `request_header_block`, ``body`` from `framed`. The future
        gives its `Answer` (with the response message when ``keep``), or raises ConnectionError
        when the connection failed or is going away before the server took the call."""
        future: asyncio.Future[Answer] = self._loop.create_future()
        if self.closed or self._goaway:
            future.set_exception(ConnectionError("the connection is closed or going away"))
            return future
        call = _Call(future, keep, self._peer_initial_window, self._loop.time())
        if len(self._streams) >= self._peer_max_streams:
            self._waiting.append((block, body, call))
        else:
            self._start(block, body, call)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return future

    def _start(self, block: bytes, body: bytes, call: _Call) -> None:
        sid = self._next_sid
        self._next_sid += 2
        call.send_window = self._peer_initial_window
        self._streams[sid] = call
        out = self._out
        n = len(block)
        out.append(_HEAD.pack(n >> 8, n & 0xFF, HEADERS, END_HEADERS, sid))
        out.append(block)
        n = len(body)
        if (
            not self._blocked
            and n <= self._send_window
            and n <= call.send_window
            and n <= self._peer_max_frame
        ):
            out.append(_HEAD.pack(n >> 8, n & 0xFF, DATA, END_STREAM, sid))
            out.append(body)
            self._send_window -= n
            call.send_window -= n
        else:
            self._blocked.append((sid, memoryview(body)))
            self._pump()

    def _pump(self) -> None:
        """Send what the windows allow of the bodies waiting, in order."""
        blocked, streams, out = self._blocked, self._streams, self._out
        while blocked:
            sid, rest = blocked[0]
            call = streams.get(sid)
            if call is None:  # answered or reset meanwhile: the rest is not wanted
                blocked.popleft()
                continue
            take = min(len(rest), self._send_window, call.send_window, self._peer_max_frame)
            if take <= 0:
                return
            last = take == len(rest)
            out.append(_HEAD.pack(take >> 8, take & 0xFF, DATA, END_STREAM if last else 0, sid))
            out.append(rest[:take])
            self._send_window -= take
            call.send_window -= take
            if last:
                blocked.popleft()
            else:
                blocked[0] = (sid, rest[take:])

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self.closed:
            out, self._out = self._out, []
            self._transport.write(b"".join(out))

    def _finish(self, sid: int, code: int, details: str = "") -> None:
        call = self._streams.pop(sid, None)
        if call is None:
            return
        if not call.future.done():
            message = b""
            if call.keep and code == OK:
                whole = b"".join(call.chunks)
                if len(whole) < 5 or whole[0] != 0 or _PREFIX.unpack_from(whole)[1] != len(whole) - 5:
                    code, details = INTERNAL, "response message not one uncompressed gRPC message"
                else:
                    message = whole[5:]
            call.future.set_result(Answer(code, details, message))
        while self._waiting and len(self._streams) < self._peer_max_streams:
            block, body, waiting = self._waiting.popleft()
            if not waiting.future.done():
                self._start(block, body, waiting)
        if self._goaway and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

    def reset(self, sid: int) -> None:
        """Cancel stream ``sid`` (RST_STREAM CANCEL)."""
        self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.CANCEL)))

    def _sweep(self) -> None:
        # streams are opened in id order, so the overdue ones are at the front of `_streams`
        self._sweeper = None
        if self.closed or self.timeout_s is None:
            return
        overdue = self._loop.time() - self.timeout_s
        late = []
        for sid, call in self._streams.items():
            if call.sent_at > overdue:
                break
            late.append(sid)
        for sid in late:
            self.reset(sid)
            self._finish(sid, DEADLINE_EXCEEDED, "deadline exceeded (client)")
        while self._waiting and self._waiting[0][2].sent_at <= overdue:
            waiting = self._waiting.popleft()[2]
            if not waiting.future.done():
                waiting.future.set_result(Answer(DEADLINE_EXCEEDED, "deadline exceeded (queued)", b""))
        self._flush()
        self._sweeper = self._loop.call_later(max(0.01, self.timeout_s / 8), self._sweep)

    # ---- reading ---------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        pos, end = 0, len(data)
        unpack = _HEAD.unpack_from
        streams = self._streams
        need = 9
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            stop = pos + 9 + (hi << 8 | lo)
            if stop > end:
                need = stop - pos
                break
            start = pos + 9
            pos = stop
            sid &= 0x7FFFFFFF
            if self._block is not None:
                self._continuation(ftype, flags, sid, data[start:stop])
            elif ftype == DATA:
                self._recv_unacked += stop - start
                call = streams.get(sid)
                if call is not None:
                    if call.keep:
                        call.chunks.append(_unpad(flags, data[start:stop]))
                    if flags & END_STREAM:
                        self._finish(sid, INTERNAL, "the answer ended without trailers")
            elif ftype == HEADERS:
                payload = _unpad(flags, data[start:stop])
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                if flags & END_HEADERS:
                    self._headers(sid, bool(flags & END_STREAM), payload)
                else:
                    self._block = (sid, bool(flags & END_STREAM), bytearray(payload))
            elif ftype == SETTINGS:
                if not flags & ACK:
                    self._settings(data[start:stop])
            elif ftype == PING:
                if not flags & ACK:
                    self._out.append(frame(PING, ACK, 0, data[start:stop]))
            elif ftype == WINDOW_UPDATE:
                self._window_update(sid, _U32.unpack_from(data, start)[0] & 0x7FFFFFFF)
            elif ftype == RST_STREAM:
                code = _U32.unpack_from(data, start)[0]
                grpc_code = UNAVAILABLE if code == ErrorCode.REFUSED_STREAM else CANCELLED
                if code not in (ErrorCode.REFUSED_STREAM, ErrorCode.CANCEL):
                    grpc_code = INTERNAL
                self._finish(sid, grpc_code, f"stream reset by the server ({code})")
            elif ftype == GOAWAY:
                self._on_goaway(_U32.unpack_from(data, start)[0] & 0x7FFFFFFF, data[start + 8 : stop])
            # PUSH_PROMISE cannot come (push is off); PRIORITY and extensions are ignored
        if pos < end:
            self._buf += data[pos:]
            self._need = need
        if self._recv_unacked >= _REFILL:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked)))
            self._recv_unacked = 0

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        assert self._block is not None
        block_sid, end_stream, block = self._block
        if ftype != CONTINUATION or sid != block_sid:
            raise ValueError("a header block interrupted by another frame")
        block += payload
        if flags & END_HEADERS:
            self._block = None
            self._headers(sid, end_stream, bytes(block))

    def _headers(self, sid: int, end_stream: bool, block: bytes) -> None:
        headers = self._decoder.decode(block)  # always: the dynamic table must stay in step
        call = self._streams.get(sid)
        if call is None:
            return
        if call.status is None:
            call.status = next((v for k, v in headers if k == b":status"), b"")
            if not end_stream:
                return
        elif not end_stream:
            raise ValueError("a third header block on a stream")
        code: int | None = None
        details = ""
        for name, value in headers:
            if name == b"grpc-status":
                code = int(value)
            elif name == b"grpc-message":
                details = value.decode(errors="replace")
        if call.status != b"200":
            code, details = _HTTP_TO_GRPC.get(call.status, UNKNOWN), f"HTTP status {call.status.decode()}"
        elif code is None:
            code, details = UNKNOWN, "an answer without grpc-status"
        self._finish(sid, code, details)

    def _settings(self, payload: bytes) -> None:
        for at in range(0, len(payload) - 5, 6):
            key, value = _SETTING.unpack_from(payload, at)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for call in self._streams.values():
                    call.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
        self._out.append(frame(SETTINGS, ACK, 0))
        self._pump()
        if not self.ready.done():
            self.ready.set_result(None)

    def _window_update(self, sid: int, increment: int) -> None:
        if sid == 0:
            self._send_window += increment
        else:
            call = self._streams.get(sid)
            if call is None:
                return
            call.send_window += increment
        self._pump()

    def _on_goaway(self, last_sid: int, debug: bytes) -> None:
        self._goaway = True
        why = f"GOAWAY from the server: {debug[:200].decode(errors='replace')}"
        for sid in [s for s in self._streams if s > last_sid]:
            self._finish(sid, UNAVAILABLE, why)
        self._fail_waiting(why)
        if not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

    @property
    def accepting(self) -> bool:
        """Whether new calls can go on this connection (not closed, no GOAWAY from the server)."""
        return not self.closed and not self._goaway

    # ---- closing ---------------------------------------------------------------------------------

    def _fail_waiting(self, why: str) -> None:
        while self._waiting:
            call = self._waiting.popleft()[2]
            if not call.future.done():
                call.future.set_exception(ConnectionError(why))

    def _shut(self, why: str) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        streams, self._streams = self._streams, {}
        for call in streams.values():
            if not call.future.done():
                call.future.set_exception(ConnectionError(why))
        self._fail_waiting(why)

    def _abort(self, code: ErrorCode, why: str) -> None:
        if self._transport is not None and not self.closed:
            self._out.append(frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(code) + why.encode()[:200]))
            self._flush()
            self._transport.close()
        self._shut(why)

    def close(self) -> None:
        """Close at once: calls in flight fail with ConnectionError."""
        if self._transport is not None and not self.closed:
            self._out.append(frame(GOAWAY, 0, 0, _U32.pack(0) + _U32.pack(ErrorCode.NO_ERROR)))
            self._flush()
            self._transport.close()
        self._shut("closed by the client")


def _unpad(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise ValueError("padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]
    return payload


async def connect(
    host: str, port: int, timeout_s: float | None = None, connect_timeout_s: float = 10.0
) -> GrpcH2Connection:
    """A connection to ``host:port`` once the server's SETTINGS came (raises OSError or TimeoutError)."""
    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(
        loop.create_connection(lambda: GrpcH2Connection(timeout_s), host, port), connect_timeout_s
    )
    try:
        await asyncio.wait_for(asyncio.shield(connection.ready), connect_timeout_s)
    except BaseException:
        connection.close()
        raise
    return connection
