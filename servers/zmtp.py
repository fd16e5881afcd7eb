"""ZMTP 3.x (RFC 23 and RFC 37), the server side of a ROUTER socket, sans-IO (with another
``socket_type``, the same connection is the DEALER our clients speak: `servers.client.zmtp_dealer`).

Why our own: with libzmq the front-end paid for its I/O thread (~25 µs of CPU per request at
concurrency 64), a ``send`` per reply frame through pyzmq, ``recv_multipart`` and the edge-triggered
``ZMQ_FD`` dance (~45 µs more). Parsed where the bytes arrive on the event loop, a message costs a
few slices, and every reply finished in one loop iteration leaves in one ``write``.

What it speaks: the 64-byte greeting (version 3.0 or 3.1 peers, older ones are refused), the NULL
security mechanism only, the READY handshake (``Socket-Type`` must be one a ROUTER talks to: DEALER,
REQ or ROUTER; a REQ peer's empty delimiter frame is taken off its messages and put back on the
replies), message frames (short and long), and in traffic the PING command (answered with PONG for
3.1 peers); other commands are ignored, an ERROR command ends the connection. Like a ROUTER it never
blocks and routes by connection: the caller keeps one `ServerConnection` per TCP connection.

Limits, checked before anything is buffered: a frame over ``max_frame_bytes`` or a message of more
than ``max_frames`` frames is a `ZmtpError` (the connection is dropped, as libzmq drops a peer over
``ZMQ_MAXMSGSIZE``); a message whose frames add up to more than ``max_message_bytes`` is still
delivered, with only its first frame kept and its true size, so that the caller can answer it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from servers.gateway_api import Buffer

SIGNATURE = b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f"
GREETING_SIZE = 64
#: our greeting: signature, version 3.1, NULL, as-server 0, filler
GREETING = SIGNATURE + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
ACCEPTED_PEERS = frozenset((b"DEALER", b"REQ", b"ROUTER"))
#: commands larger than this (READY with metadata is the largest we expect) are refused
MAX_COMMAND_BYTES = 64 << 10

MORE = 0x01
LONG = 0x02
COMMAND = 0x04
_RESERVED = 0xF8
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_LONG_HEAD = struct.Struct(">BQ")
#: the header of every short frame, by size: [last frame, more frames follow]
_SHORT_LAST = [bytes((0, n)) for n in range(256)]
_SHORT_MORE = [bytes((MORE, n)) for n in range(256)]


class ZmtpError(Exception):
    """The peer broke the protocol or a limit; the connection must be closed after
    `ServerConnection.data_to_send` (which may hold an ERROR command for the peer) is written."""


def command(name: bytes, body: bytes = b"") -> bytes:
    """One command frame: name and body."""
    payload = bytes((len(name),)) + name + body
    if len(payload) < 256:
        return bytes((COMMAND, len(payload))) + payload
    return _LONG_HEAD.pack(COMMAND | LONG, len(payload)) + payload


def ready(properties: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A READY command carrying ``properties`` (name, value) as metadata."""
    body = b"".join(bytes((len(k),)) + k + _U32.pack(len(v)) + v for k, v in properties)
    return command(b"READY", body)


def parse_metadata(body: memoryview | bytes) -> dict[bytes, bytes]:
    """READY's properties, names lower-cased (they are case-insensitive)."""
    props: dict[bytes, bytes] = {}
    pos, end = 0, len(body)
    while pos < end:
        size = body[pos]
        if size == 0 or pos + 1 + size + 4 > end:
            raise ZmtpError("malformed metadata in READY")
        name = bytes(body[pos + 1 : pos + 1 + size]).lower()
        pos += 1 + size
        (vsize,) = _U32.unpack_from(body, pos)
        pos += 4
        if pos + vsize > end:
            raise ZmtpError("malformed metadata in READY")
        props[name] = bytes(body[pos : pos + vsize])
        pos += vsize
    return props


def frame_head(size: int, more: bool) -> bytes:
    """The flags and size that go before a message frame's body."""
    if size < 256:
        return (_SHORT_MORE if more else _SHORT_LAST)[size]
    return _LONG_HEAD.pack((MORE if more else 0) | LONG, size)


_GREETING_STATE, _HANDSHAKE_STATE, _TRAFFIC_STATE = 0, 1, 2


class ServerConnection:
    """One ZMTP connection, server side: feed it bytes with `receive`, take what to write with
    `data_to_send`; complete messages come out through `on_message` (override it).

    Args:
        max_frame_bytes: largest frame accepted (larger: `ZmtpError`).
        max_message_bytes: messages larger than this are delivered truncated to their first frame.
        max_frames: most frames in one message (more: `ZmtpError`).
        socket_type: the socket type our READY announces (a load client speaks as a DEALER).
        accepts: the peer socket types we talk to.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int,
        max_message_bytes: int,
        max_frames: int,
        socket_type: bytes = b"ROUTER",
        accepts: frozenset[bytes] = ACCEPTED_PEERS,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self.max_frames = max_frames
        #: (minor) version the peer announced: 0 for ZMTP 3.0, 1 for 3.1
        self.peer_minor = -1
        self.peer_type = b""
        self.peer_identity = b""
        #: REQ peers put an empty delimiter frame before their message and expect one on replies
        self.envelope = False
        self._state = _GREETING_STATE
        self._buf: bytearray | bytes = b""
        self._frames: list[memoryview] = []
        self._msg_bytes = 0
        self._msg_frames = 0
        self._accepts = accepts
        self._out: list[Buffer] = [GREETING + ready([(b"Socket-Type", socket_type)])]

    # -- events (override) ------------------------------------------------------------------------

    def on_ready(self) -> None:
        """The handshake is complete: messages may flow."""

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        """A complete message; when ``nbytes`` exceeds ``max_message_bytes``, ``frames`` holds its
        first frame only. The views stay valid as long as they are referenced."""

    # -- input -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the handshake is complete."""
        return self._state == _TRAFFIC_STATE

    def receive(self, data: bytes) -> None:
        """Take bytes from the peer; raises `ZmtpError` when the connection must end."""
        if self._buf:
            buf = self._buf
            if isinstance(buf, bytes):
                buf = self._buf = bytearray(buf)
            buf += data
        else:
            buf = data
        pos = 0
        if self._state != _TRAFFIC_STATE:
            pos = self._handshake(buf)
            if self._state != _TRAFFIC_STATE:
                self._keep(buf, pos)
                return
        pos = self._traffic(buf, pos)
        self._keep(buf, pos)

    def _keep(self, buf: bytearray | bytes, pos: int) -> None:
        # a fresh buffer each time something was taken: views of frames delivered from the old one
        # stay valid (a bytearray with views cannot grow)
        if pos >= len(buf):
            self._buf = b""
        elif pos or buf is not self._buf:
            self._buf = bytes(memoryview(buf)[pos:])

    def _handshake(self, buf: bytearray | bytes) -> int:
        if self._state == _GREETING_STATE:
            n = len(buf)
            if (n >= 1 and buf[0] != 0xFF) or (n >= 10 and buf[9] != 0x7F):
                raise ZmtpError("not a ZMTP peer (bad signature)")
            if n >= 11 and buf[10] < 3:
                raise ZmtpError(f"ZMTP version {buf[10]} not supported (3.x needed)")
            if n < GREETING_SIZE:
                return 0
            self.peer_minor = buf[11] if buf[10] == 3 else 1
            mechanism = bytes(buf[12:32]).rstrip(b"\0")
            if mechanism != b"NULL":
                self._error(b"security mechanism not supported")
                raise ZmtpError(f"security mechanism {mechanism!r} not supported (NULL only)")
            self._state = _HANDSHAKE_STATE
            pos = GREETING_SIZE
        else:
            pos = 0
        frame = self._next_frame(buf, pos)
        if frame is None:
            return pos
        flags, body, pos = frame
        if not flags & COMMAND:
            raise ZmtpError("message before the handshake")
        name, data = _split_command(body)
        if name == b"ERROR":
            raise ZmtpError(f"peer error: {_reason(data)}")
        if name != b"READY":
            raise ZmtpError(f"expected READY, got {name!r}")
        props = parse_metadata(data)
        peer_type = props.get(b"socket-type", b"")
        if peer_type not in self._accepts:
            self._error(b"invalid socket type")
            raise ZmtpError(f"socket type {peer_type!r} is not one we talk to")
        self.peer_type = peer_type
        self.peer_identity = props.get(b"identity", b"")
        self.envelope = peer_type == b"REQ"
        self._state = _TRAFFIC_STATE
        self.on_ready()
        return pos

    def _next_frame(self, buf: bytearray | bytes, pos: int) -> tuple[int, memoryview, int] | None:
        """A whole frame at ``pos`` (flags, body, next position) or None when it has not all come."""
        n = len(buf)
        if n - pos < 2:
            return None
        flags = buf[pos]
        if flags & _RESERVED:
            raise ZmtpError(f"reserved frame flags set: {flags:#04x}")
        if flags & LONG:
            if n - pos < 9:
                return None
            size = _U64.unpack_from(buf, pos + 1)[0]
            start = pos + 9
        else:
            size = buf[pos + 1]
            start = pos + 2
        limit = MAX_COMMAND_BYTES if flags & COMMAND else self.max_frame_bytes
        if size > limit:
            raise ZmtpError(f"frame of {size} bytes over the limit ({limit})")
        if flags & COMMAND and flags & MORE:
            raise ZmtpError("command frame with the MORE flag")
        if n - start < size:
            return None
        return flags, memoryview(buf)[start : start + size], start + size

    def _traffic(self, buf: bytearray | bytes, pos: int) -> int:
        # the hot path: one iteration per frame, no calls for message frames
        n = len(buf)
        frames = self._frames
        view = memoryview(buf)
        max_frame = self.max_frame_bytes
        while n - pos >= 2:
            flags = buf[pos]
            if flags & LONG:
                if n - pos < 9:
                    break
                size = _U64.unpack_from(buf, pos + 1)[0]
                start = pos + 9
            else:
                size = buf[pos + 1]
                start = pos + 2
            if flags & (COMMAND | _RESERVED):
                frame = self._next_frame(buf, pos)
                if frame is None:
                    break
                pos = frame[2]
                self._command(frame[1])
                continue
            if size > max_frame:
                raise ZmtpError(f"frame of {size} bytes over max_frame_bytes ({max_frame})")
            end = start + size
            if end > n:
                break
            pos = end
            nbytes = self._msg_bytes + size
            self._msg_bytes = nbytes
            self._msg_frames += 1
            if self._msg_frames > self.max_frames:
                raise ZmtpError(f"message of more than {self.max_frames} frames")
            if nbytes <= self.max_message_bytes:
                frames.append(view[start:end])
            else:
                # over the limit: only the first frame (after a REQ peer's delimiter) is kept, so
                # that the caller can answer it
                keep = 2 if self.envelope else 1
                if len(frames) < keep:
                    frames.append(view[start:end])
                else:
                    del frames[keep:]
            if not flags & MORE:
                self._frames = []
                self._msg_bytes = 0
                self._msg_frames = 0
                if self.envelope:
                    if frames[0].nbytes:
                        raise ZmtpError("REQ message without its empty delimiter frame")
                    del frames[0]
                    if not frames:
                        raise ZmtpError("REQ message with no frame after the delimiter")
                self.on_message(frames, nbytes)
                frames = self._frames
        return pos

    def _command(self, body: memoryview) -> None:
        name, data = _split_command(body)
        if name == b"PING":
            if self.peer_minor >= 1 and len(data) >= 2:
                # PONG echoes the ping's context (at most 16 bytes)
                self._out.append(command(b"PONG", bytes(data[2:18])))
        elif name == b"ERROR":
            raise ZmtpError(f"peer error: {_reason(data)}")
        elif name == b"READY":
            raise ZmtpError("READY after the handshake")
        # PONG, SUBSCRIBE, CANCEL and commands we do not know: nothing to do for a ROUTER

    def _error(self, reason: bytes) -> None:
        self._out.append(command(b"ERROR", bytes((len(reason),)) + reason))

    # -- output ------------------------------------------------------------------------------------

    def send_message(self, frames: Sequence[Buffer]) -> int:
        """Queue one message (its frames are referenced, not copied, until `data_to_send`); returns
        the bytes of its frames."""
        if not frames:
            raise ValueError("a message has at least one frame")
        out = self._out
        if self.envelope:
            out.append(_SHORT_MORE[0])
        last = len(frames) - 1
        total = 0
        for i, frame in enumerate(frames):
            size = len(frame) if isinstance(frame, bytes) else memoryview(frame).nbytes  # type: ignore[arg-type]
            total += size
            if size < 256:
                out.append((_SHORT_MORE if i < last else _SHORT_LAST)[size])
            else:
                out.append(_LONG_HEAD.pack(LONG | (MORE if i < last else 0), size))
            out.append(frame)
        return total

    def has_output(self) -> bool:
        """Whether `data_to_send` has anything."""
        return bool(self._out)

    def data_to_send(self) -> list[Buffer]:
        """What to write, in order; taken (the connection forgets it)."""
        out, self._out = self._out, []
        return out


def _split_command(body: memoryview) -> tuple[bytes, memoryview]:
    if not len(body) or body[0] + 1 > len(body):
        raise ZmtpError("malformed command frame")
    size = body[0]
    return bytes(body[1 : 1 + size]), body[1 + size :]


def _reason(data: memoryview) -> str:
    if not len(data):
        return ""
    return bytes(data[1 : 1 + data[0]]).decode("utf-8", "replace")
