"""The server side of HTTP/2 (RFC 9113) as gRPC uses it, without I/O: bytes in, events out as method
calls, frames to send collected in `ServerConnection.data_to_send`.

Why not `h2`: it was half of the gRPC front-end's CPU per call (frame objects, a state machine per
stream with its event objects, header validation and a `repr` of every frame for its logger); this
is what a gRPC server needs of HTTP/2 and no more: one `struct` unpack per frame header, an event as
a method call, the server's header blocks encoded once. What it does not do, because a gRPC server
never needs it: server push, priorities (PRIORITY is read and ignored), HTTP/1.1 upgrade.

What it enforces, each a connection error (GOAWAY with the RFC's code, then `H2ProtocolError`) or a
stream error (RST_STREAM, then `ServerConnection.on_reset`): the client preface and SETTINGS first,
frame sizes, odd and increasing stream ids, header blocks not interleaved with other frames, HPACK
errors, header lists over the advertised limit, both inbound flow-control windows, window overflow,
frames on idle streams and data on streams the peer already ended. Frames for streams that are
closed are dropped (their header blocks still decoded, to keep HPACK's table in step; their data
still counted against and returned to the connection window).
"""

from __future__ import annotations

import enum
import struct
from typing import TypeVar

from servers import hpack_codec

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING = range(7)
GOAWAY, WINDOW_UPDATE, CONTINUATION = range(7, 10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1
MAX_FRAME_LIMIT = (1 << 24) - 1
#: the dynamic table size both sides assume until SETTINGS say otherwise
DEFAULT_TABLE_SIZE = 4096

_HEAD = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8, type, flags, stream id
_Payload = TypeVar("_Payload", bytes, bytearray, memoryview)
#: a DATA frame at least this long is passed on in the pieces it arrives in (smaller ones whole)
PARTIAL_DATA_MIN = 16 << 10
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class H2ProtocolError(Exception):
    """The peer broke HTTP/2; a GOAWAY with ``code`` is queued and the connection must end."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class StreamClosedError(Exception):
    """Sending on a stream that is closed or was reset."""


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header and ``payload``."""
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


class Stream:
    """What the connection keeps of one open stream: its windows and which sides have ended."""

    __slots__ = ("local_closed", "recv_consumed", "recv_window", "remote_closed", "send_window", "sid")

    def __init__(self, sid: int, send_window: int, recv_window: int, remote_closed: bool) -> None:
        self.sid = sid
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_consumed = 0
        self.remote_closed = remote_closed
        self.local_closed = False


class ServerConnection:
    """One connection's HTTP/2 state. Subclasses handle the events (the ``on_*`` methods).

    Args:
        initial_window: our SETTINGS_INITIAL_WINDOW_SIZE, each stream's inbound window.
        connection_window: the connection's inbound window (the default 64 KiB raised to it at once).
        max_frame_size: our SETTINGS_MAX_FRAME_SIZE, the largest frame the peer may send.
        max_header_list_size: our SETTINGS_MAX_HEADER_LIST_SIZE, enforced on decoded header blocks.
    """

    def __init__(
        self,
        *,
        initial_window: int = DEFAULT_WINDOW,
        connection_window: int = DEFAULT_WINDOW,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        max_header_list_size: int = 64 << 10,
    ) -> None:
        self.streams: dict[int, Stream] = {}
        #: the highest stream id the peer opened (GOAWAY's last stream id)
        self.last_sid = 0
        #: what the peer lets us send on the connection, and on a new stream
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        #: the largest frame the peer accepts
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        self.initial_window = initial_window
        self.connection_window = max(connection_window, DEFAULT_WINDOW)
        self.max_inbound_frame_size = max_frame_size
        self.max_header_list_size = max_header_list_size
        self.recv_window = DEFAULT_WINDOW
        self._recv_consumed = 0
        self._decoder = hpack_codec.Decoder(DEFAULT_TABLE_SIZE, max_header_list_size)
        # our blocks never add to the peer's dynamic table: the first one says so (size 0), and
        # then no SETTINGS_HEADER_TABLE_SIZE the peer sends can require an update (RFC 7541 §4.2)
        self._table_update = hpack_codec.table_size_update(0)
        self._out: list[bytes | memoryview] = []
        self._buf = bytearray()
        self._need = 0
        #: a large DATA frame whose payload is passed on as it arrives: its stream, flags and the
        #: payload bytes still to come (0: none)
        self._data_sid = 0
        self._data_flags = 0
        self._data_left = 0
        self._preface_seen = False
        self._settings_seen = False
        self._settings_acked = False
        # a header block being gathered from HEADERS + CONTINUATION frames
        self._block: bytearray | None = None
        self._block_sid = 0
        self._block_end_stream = False
        #: set when the connection is ending: frames after it are not read
        self.closing = False
        # `pause_parsing`: the frames after the one being handled wait, unparsed, for
        # `resume_parsing` (a view of what was received: not copied)
        self._parse_paused = False
        self._held_back: memoryview | None = None

    # ---- events, for subclasses ------------------------------------------------------------------

    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The peer opened stream ``sid`` with ``headers`` (an END_STREAM follows as `on_end`)."""

    def on_data(self, sid: int, data: memoryview, flow_len: int) -> None:
        """Data on an open stream; ``flow_len`` (padding included) is owed back via `acknowledge`.
        ``data`` views bytes nobody changes afterwards: a handler may keep it."""

    def on_end(self, sid: int) -> None:
        """The peer ended its side of stream ``sid`` (END_STREAM, or its trailers)."""

    def on_reset(self, sid: int) -> None:
        """Stream ``sid`` is gone: reset by the peer, or by us for a stream error."""

    def on_window(self, sid: int) -> None:
        """The peer's window for ``sid`` grew (0: the connection's, or every stream's)."""

    def on_goaway(self, code: int) -> None:
        """The peer sent GOAWAY: it opens no new streams."""

    # ---- sending ---------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our SETTINGS and the connection window's raise: the server's preface."""
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, 1 << 20),
                (SETTINGS_INITIAL_WINDOW_SIZE, self.initial_window),
                (SETTINGS_MAX_FRAME_SIZE, self.max_inbound_frame_size),
                (SETTINGS_MAX_HEADER_LIST_SIZE, self.max_header_list_size),
            )
        )
        self._out.append(frame(SETTINGS, 0, 0, settings))
        raise_by = self.connection_window - DEFAULT_WINDOW
        if raise_by:
            self.recv_window += raise_by
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(raise_by)))

    def data_to_send(self) -> bytes:
        """Every frame queued since the last call, as one string of bytes."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def frames_to_send(self) -> list[bytes | memoryview]:
        """Every frame queued since the last call, in the pieces they were queued as (headers,
        payload views): for a vectored write."""
        out, self._out = self._out, []
        return out

    def send_headers(self, sid: int, block: bytes, end_stream: bool = False) -> None:
        """Send the header block ``block`` (`hpack_codec.encode`) on ``sid``; END_STREAM closes our side."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {sid} is closed")
        if self._table_update:
            block = self._table_update + block
            self._table_update = b""
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            n = len(block)
            self._out.append(_HEAD.pack(n >> 8, n & 0xFF, HEADERS, flags | END_HEADERS, sid))
            self._out.append(block)
        else:
            chunks = [block[i : i + limit] for i in range(0, len(block), limit)]
            self._out.append(frame(HEADERS, flags, sid, chunks[0]))
            for i, chunk in enumerate(chunks[1:], 2):
                self._out.append(frame(CONTINUATION, END_HEADERS if i == len(chunks) else 0, sid, chunk))
        if end_stream:
            self._close_local(stream)

    def send_data(self, sid: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Send ``data`` on ``sid`` in one frame: the caller keeps it within `window` and the peer's
        frame size."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {sid} is closed")
        n = len(data)
        self.send_window -= n
        stream.send_window -= n
        self._out.append(_HEAD.pack(n >> 8, n & 0xFF, DATA, END_STREAM if end_stream else 0, sid))
        self._out.append(data)
        if end_stream:
            self._close_local(stream)

    def send_whole(self, sid: int, headers: bytes, body: tuple[bytes, ...], trailers: bytes) -> bool:
        """Answer ``sid`` in one go: HEADERS, one DATA frame of the ``body`` pieces, then trailers
        with END_STREAM. Only when nothing stands in the way (both blocks and the body each fit one
        frame and the windows): False, with nothing sent, otherwise.

        Why: most answers are small and whole; this is `send_headers`, `send_data` and
        `send_headers` without their checks and calls per frame (with the gRPC front-end's own path
        around them, 7% less of its CPU per call, measured)."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_closed:
            return False
        if self._table_update:
            headers = self._table_update + headers
        n = 0
        for piece in body:
            n += len(piece)
        limit = self.max_outbound_frame_size
        if n > limit or n > self.send_window or n > stream.send_window:
            return False
        h, t = len(headers), len(trailers)
        if h > limit or t > limit:
            return False
        self._table_update = b""
        self.send_window -= n
        stream.send_window -= n
        out = self._out
        out.append(_HEAD.pack(h >> 8, h & 0xFF, HEADERS, END_HEADERS, sid))
        out.append(headers)
        out.append(_HEAD.pack(n >> 8, n & 0xFF, DATA, 0, sid))
        out.extend(body)
        out.append(_HEAD.pack(t >> 8, t & 0xFF, HEADERS, END_STREAM | END_HEADERS, sid))
        out.append(trailers)
        self._close_local(stream)
        return True

    def window(self, sid: int) -> int:
        """Bytes the peer's windows let us send on ``sid`` now (0 for a closed stream)."""
        stream = self.streams.get(sid)
        return 0 if stream is None or stream.local_closed else min(self.send_window, stream.send_window)

    def reset_stream(self, sid: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """End stream ``sid`` with RST_STREAM (nothing when it is closed already)."""
        if self.streams.pop(sid, None) is not None:
            self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def acknowledge(self, sid: int, size: int) -> None:
        """``size`` inbound bytes of ``sid`` were taken: the peer may send them again, on the stream
        and on the connection. Window updates go out once a quarter of the window (the
        connection's) or half (a stream's) is owed."""
        self.acknowledge_connection(size)
        self.acknowledge_stream(sid, size)

    def acknowledge_connection(self, size: int) -> None:
        """The connection's part of `acknowledge` alone: a stream that holds its bytes back (its
        handler has not read them) must not hold up the connection's other streams."""
        self._recv_consumed += size
        if self._recv_consumed >= self.connection_window >> 2:
            self.recv_window += self._recv_consumed
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_consumed)))
            self._recv_consumed = 0

    def acknowledge_stream(self, sid: int, size: int) -> None:
        """The stream's part of `acknowledge` alone (its connection's part given already)."""
        stream = self.streams.get(sid)
        if stream is not None and not stream.remote_closed:
            stream.recv_consumed += size
            if stream.recv_consumed >= self.initial_window >> 1:
                stream.recv_window += stream.recv_consumed
                self._out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.recv_consumed)))
                stream.recv_consumed = 0

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, message: bytes = b"") -> None:
        """Queue a GOAWAY naming the last stream the peer opened."""
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code) + message))

    def _close_local(self, stream: Stream) -> None:
        if stream.remote_closed:
            del self.streams[stream.sid]
        else:
            stream.local_closed = True  # the peer may still send

    # ---- receiving -------------------------------------------------------------------------------

    def pause_parsing(self) -> None:
        """Called from an ``on_*`` event: stop after the frame being handled. What follows (and
        whatever `receive` takes meanwhile) is kept unparsed, in order, until `resume_parsing`."""
        self._parse_paused = True

    @property
    def parsing_paused(self) -> bool:
        """Whether received bytes wait for `resume_parsing`."""
        return self._parse_paused

    def resume_parsing(self) -> None:
        """Parse what `pause_parsing` held back (an event may pause again).

        Raises `H2ProtocolError` as `receive` does.
        """
        self._parse_paused = False
        held, self._held_back = self._held_back, None
        if held is not None:
            self.receive(held)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Take the bytes the peer sent; events arrive as ``on_*`` calls before it returns.

        Raises `H2ProtocolError` (a GOAWAY queued) when the peer broke the protocol.
        """
        if self._parse_paused:
            # more bytes while parsing waits (rare: the reader pauses its transport meanwhile)
            held = self._held_back
            self._held_back = memoryview(bytes(held) + bytes(data) if held is not None else bytes(data))
            return
        if self._data_left:
            data = self._rest_of_data(data)
            if not data:
                return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            # the buffer itself becomes the data (no copy); a new one takes what is left over, so
            # the views of DATA payloads handed on stay as they were
            data = buf
            self._buf = bytearray()
        try:
            self._receive(data)
        except H2ProtocolError as exc:
            self.goaway(exc.code, str(exc).encode()[:256])
            raise
        except hpack_codec.HPACKError as exc:
            self.goaway(ErrorCode.COMPRESSION_ERROR, str(exc).encode()[:256])
            raise H2ProtocolError(ErrorCode.COMPRESSION_ERROR, str(exc)) from None

    def _rest_of_data(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Pass on what ``data`` holds of the large DATA frame under way; returns what follows it."""
        view = memoryview(data)
        take = min(self._data_left, len(view))
        self._data_left -= take
        flags = self._data_flags if not self._data_left else self._data_flags & ~END_STREAM
        try:
            if not self.closing:
                self._data(flags, self._data_sid, view[:take])
        except H2ProtocolError as exc:
            self._data_left = 0
            self.goaway(exc.code, str(exc).encode()[:256])
            raise
        return view[take:]

    def _receive(self, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        end = len(data)
        if not self._preface_seen:
            if end < len(PREFACE):
                if not PREFACE.startswith(bytes(data)):
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "not the HTTP/2 client preface")
                self._buf += data
                self._need = len(PREFACE)
                return
            if bytes(data[: len(PREFACE)]) != PREFACE:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "not the HTTP/2 client preface")
            self._preface_seen = True
            pos = len(PREFACE)
        unpack = _HEAD.unpack_from
        while end - pos >= 9 and not self.closing and not self._parse_paused:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = hi << 8 | lo
            if length > self.max_inbound_frame_size:
                raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"a {length}-byte frame")
            stop = pos + 9 + length
            if stop > end:
                if (
                    ftype == DATA
                    and length >= PARTIAL_DATA_MIN
                    and not flags & PADDED
                    and self._block is None
                    and self._settings_seen
                ):
                    # a large DATA frame is passed on as it arrives, not buffered whole first: its
                    # payload is copied once, where its call assembles the message
                    self._data_sid = sid & 0x7FFFFFFF
                    self._data_flags = flags
                    self._data_left = stop - end
                    self._data(flags & ~END_STREAM, self._data_sid, memoryview(data)[pos + 9 : end])
                    return
                self._buf += memoryview(data)[pos:]
                self._need = stop - pos
                return
            start = pos + 9
            pos = stop
            sid &= 0x7FFFFFFF
            if not self._settings_seen and ftype != SETTINGS:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
            if ftype == DATA and self._block is None:
                # a view: a large request message is copied once, where its call assembles it
                self._data(flags, sid, memoryview(data)[start:stop])
                continue
            payload = bytes(data[start:stop])
            if self._block is not None:
                self._continuation(ftype, flags, sid, payload)
            elif ftype == HEADERS:
                self._headers(flags, sid, payload)
            elif ftype == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif ftype == SETTINGS:
                self._settings(flags, sid, payload)
            elif ftype == PING:
                self._ping(flags, sid, payload)
            elif ftype == RST_STREAM:
                self._rst_stream(sid, payload)
            elif ftype == GOAWAY:
                if sid:
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                self.on_goaway(_U32.unpack_from(payload, 4)[0])
            elif ftype == PRIORITY:
                if not sid:
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._stream_error(sid, ErrorCode.FRAME_SIZE_ERROR)
            elif ftype == PUSH_PROMISE:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "a client may not push")
            elif ftype == CONTINUATION:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            # other frame types are extensions: ignored (RFC 9113 §5.5)
        if pos < end and not self.closing:
            if self._parse_paused:
                self._held_back = memoryview(data)[pos:]
                return
            self._buf += memoryview(data)[pos:]
            self._need = 9

    def _unpad(self, flags: int, payload: _Payload) -> _Payload:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _data(self, flags: int, sid: int, payload: memoryview) -> None:
        flow_len = len(payload)
        self.recv_window -= flow_len
        if self.recv_window < 0:
            raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "data beyond the connection window")
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid == 0 or sid > self.last_sid:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self.acknowledge(0, flow_len)  # a closed stream's leftovers: the connection gets them back
            if stream is not None:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            return
        data = self._unpad(flags, payload)
        stream.recv_window -= flow_len
        if stream.recv_window < 0:
            self.acknowledge(0, flow_len)
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self.on_data(sid, data, flow_len)
        if flags & END_STREAM and sid in self.streams:  # (on_data may have answered and reset it)
            self._end_remote(sid)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(sid, block, bool(flags & END_STREAM))
        else:
            self._block = bytearray(block)
            self._block_sid = sid
            self._block_end_stream = bool(flags & END_STREAM)

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        block = self._block
        assert block is not None
        if ftype != CONTINUATION or sid != self._block_sid:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "a header block interrupted by another frame")
        block += payload
        if len(block) > 2 * self.max_header_list_size:
            raise H2ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(sid, bytes(block), self._block_end_stream)

    def _header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        headers = self._decoder.decode(block)  # always: HPACK's table must stay in step with the peer's
        stream = self.streams.get(sid)
        if stream is not None:  # trailers
            if stream.remote_closed:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            elif not end_stream:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            else:
                self._end_remote(sid)
            return
        if not sid & 1:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"client stream id {sid} is even")
        if sid <= self.last_sid:
            # a stream closed or reset already: its late headers change nothing (a lower id never
            # opened is not told apart: that would mean remembering every closed id)
            return
        self.last_sid = sid
        # until the peer acknowledges our SETTINGS it may count on the default window
        recv_window = self.initial_window
        if not self._settings_acked:
            recv_window = max(recv_window, DEFAULT_WINDOW)
        self.streams[sid] = Stream(sid, self.peer_initial_window, recv_window, end_stream)
        self.on_request(sid, headers)
        if end_stream:
            self.on_end(sid)

    def _end_remote(self, sid: int) -> None:
        stream = self.streams[sid]
        if stream.local_closed:  # our side ended already: the stream is closed
            del self.streams[sid]
        else:
            stream.remote_closed = True
        self.on_end(sid)

    def _stream_error(self, sid: int, code: ErrorCode) -> None:
        if sid in self.streams:
            self.reset_stream(sid, code)
            self.on_reset(sid)
        else:
            self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE is 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "a zero window increment")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self.on_window(0)
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not increment:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return
        if stream.local_closed:
            return  # our side ended: nothing left to send
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self.on_window(sid)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._settings_acked = True
            return
        if len(payload) % 6:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        self._settings_seen = True
        widened = False
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                widened = widened or delta > 0
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.max_outbound_frame_size = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        self._out.append(frame(SETTINGS, ACK, 0))
        if widened:
            self.on_window(0)

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING is 8 bytes")
        if not flags & ACK:
            self._out.append(frame(PING, ACK, 0, payload))

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes")
        if sid == 0 or sid > self.last_sid:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        if self.streams.pop(sid, None) is not None:
            self.on_reset(sid)
