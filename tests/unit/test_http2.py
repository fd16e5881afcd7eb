"""`servers.http2.ServerConnection`, the sans-IO server side of HTTP/2, in memory: against the `h2`
library as a well-formed client (settings, headers through HPACK's dynamic table, padding, trailers,
CONTINUATION, flow control both ways), against hand-built frames for what a hostile or broken peer
sends (each connection error's GOAWAY code, each stream error's RST_STREAM code), fed whole, a byte
at a time and in random chunks, and a small seeded fuzz. The gRPC layer on top: test_grpc_h2.py.
"""

from __future__ import annotations

import random
import struct
from typing import NamedTuple, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

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
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    ErrorCode,
    H2ProtocolError,
    ServerConnection,
    StreamClosedError,
    frame,
)

Headers = list[tuple[bytes, bytes]]
Event = tuple[object, ...]
E = TypeVar("E", bound=h2.events.Event)

REQUEST: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/t.T/Echo"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
REQUEST_BLOCK = hpack_codec.encode(REQUEST)
RESPONSE: Headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
RESPONSE_BLOCK = hpack_codec.encode(RESPONSE)
TRAILERS: Headers = [(b"grpc-status", b"0")]
TRAILERS_BLOCK = hpack_codec.encode(TRAILERS)
#: the first index past HPACK's static table: the newest dynamic table entry
FIRST_DYNAMIC = len(hpack_codec.STATIC_TABLE) + 1
#: a connection error's GOAWAY: last stream id, error code
_GOAWAY = struct.Struct(">LL")


class Recorder(ServerConnection):
    """A server connection that only records its events, in order."""

    def __init__(self, **settings: int) -> None:
        super().__init__(**settings)
        self.events: list[Event] = []

    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("request", sid, headers))

    def on_data(self, sid: int, data: bytes, flow_len: int) -> None:
        self.events.append(("data", sid, data, flow_len))

    def on_end(self, sid: int) -> None:
        self.events.append(("end", sid))

    def on_reset(self, sid: int) -> None:
        self.events.append(("reset", sid))

    def on_window(self, sid: int) -> None:
        self.events.append(("window", sid))

    def on_goaway(self, code: int) -> None:
        self.events.append(("goaway", code))


class Frame(NamedTuple):
    type: int
    flags: int
    sid: int
    payload: bytes


def parse_frames(data: bytes) -> list[Frame]:
    """The frames in ``data`` (whole frames only: a torn one fails the test)."""
    frames = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype, flags, sid = data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5 : pos + 9], "big")
        frames.append(Frame(ftype, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data), "output ends inside a frame"
    return frames


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", key, value) for key, value in pairs))


def headers_frame(sid: int, block: bytes = REQUEST_BLOCK, *, end_stream: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block)


def data_frame(sid: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, sid, payload)


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, u32(increment))


def literal_indexed(name: bytes, value: bytes) -> bytes:
    """An HPACK literal with incremental indexing and a new name (RFC 7541 §6.2.1); short strings only."""
    assert len(name) < 127 and len(value) < 127
    return b"\x40" + bytes((len(name),)) + name + bytes((len(value),)) + value


def opened(**settings: int) -> Recorder:
    """A server past the client's preface and (empty) SETTINGS, its own output drained."""
    server = Recorder(**settings)
    server.initiate()
    server.receive(PREFACE + settings_frame())
    server.data_to_send()
    return server


def connection_error(server: Recorder, data: bytes) -> ErrorCode:
    """Feed ``data``, which must end the connection: the error's code, checked against the GOAWAY
    that closes the server's output."""
    with pytest.raises(H2ProtocolError) as info:
        server.receive(data)
    last = parse_frames(server.data_to_send())[-1]
    assert last.type == GOAWAY and last.sid == 0
    last_sid, code = _GOAWAY.unpack_from(last.payload)
    assert last_sid == server.last_sid
    assert code == info.value.code
    return info.value.code


def resets(data: bytes) -> list[tuple[int, int]]:
    """(stream, error code) of each RST_STREAM in ``data``."""
    return [(f.sid, int.from_bytes(f.payload, "big")) for f in parse_frames(data) if f.type == RST_STREAM]


def window_updates(data: bytes) -> list[tuple[int, int]]:
    """(stream, increment) of each WINDOW_UPDATE in ``data``."""
    return [(f.sid, int.from_bytes(f.payload, "big")) for f in parse_frames(data) if f.type == WINDOW_UPDATE]


class Pair:
    """A `Recorder` server and an `h2` client, connected by `pump`."""

    def __init__(self, **settings: int) -> None:
        self.server = Recorder(**settings)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.server.initiate()

    def pump(self) -> list[h2.events.Event]:
        """Move bytes both ways until neither side has more to send; the client's events."""
        events: list[h2.events.Event] = []
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                self.server.receive(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return events

    def request(self, sid: int, *, end_stream: bool = False, extra: Headers | None = None) -> None:
        self.client.send_headers(sid, REQUEST + (extra or []), end_stream=end_stream)


def of_type(events: list[h2.events.Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


# ---- conformance with the h2 client ----------------------------------------------------------------


def test_settings_exchange_with_h2_client() -> None:
    pair = Pair(initial_window=1 << 20, connection_window=1 << 22, max_frame_size=1 << 18)
    events = pair.pump()
    (changed,) = of_type(events, h2.events.RemoteSettingsChanged)
    settings = changed.changed_settings
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value == 1 << 20
    assert settings[h2.settings.SettingCodes.MAX_FRAME_SIZE].new_value == 1 << 18
    # our ACK of the client's SETTINGS, and the connection window raised at once
    assert of_type(events, h2.events.SettingsAcknowledged)
    assert pair.client.outbound_flow_control_window == 1 << 22
    assert pair.server.events == []


def test_request_headers_through_hpack_dynamic_table() -> None:
    """h2's encoder Huffman-codes literals and indexes them: later requests are mostly references
    to its dynamic table, which the server's decoder must mirror."""
    pair = Pair()
    pair.pump()
    blocks = []
    for i, sid in enumerate((1, 3, 5, 7)):
        pair.request(sid, end_stream=True, extra=[(b"x-fixed", b"same every time"), (b"x-n", b"%d" % i)])
        sent = pair.client.data_to_send()
        blocks.append(next(f.payload for f in parse_frames(sent) if f.type == HEADERS))
        pair.server.receive(sent)
    assert b"x-fixed" not in blocks[0]  # Huffman-coded
    assert len(blocks[1]) < len(blocks[0]) // 2  # indexed
    requests = [e for e in pair.server.events if e[0] == "request"]
    assert [(e[1], e[2]) for e in requests] == [
        (sid, [*REQUEST, (b"x-fixed", b"same every time"), (b"x-n", b"%d" % i)])
        for i, sid in enumerate((1, 3, 5, 7))
    ]


def test_padded_data_counts_padding_in_flow_len() -> None:
    pair = Pair()
    pair.pump()
    pair.request(1)
    pair.client.send_data(1, b"hello", pad_length=10)
    pair.pump()
    # 5 data + 10 padding + the pad length octet
    assert pair.server.events[1:] == [("data", 1, b"hello", 16)]


def test_headers_with_end_stream_then_on_end() -> None:
    pair = Pair()
    pair.request(1, end_stream=True)
    pair.pump()
    assert pair.server.events == [("request", 1, REQUEST), ("end", 1)]


def test_data_with_end_stream_then_on_end() -> None:
    pair = Pair()
    pair.request(1)
    pair.client.send_data(1, b"abc", end_stream=True)
    pair.pump()
    assert pair.server.events == [("request", 1, REQUEST), ("data", 1, b"abc", 3), ("end", 1)]


def test_client_trailers_end_the_stream() -> None:
    pair = Pair()
    pair.request(1)
    pair.client.send_data(1, b"abc")
    pair.client.send_headers(1, [(b"x-trailer", b"t")], end_stream=True)
    pair.pump()
    assert pair.server.events == [("request", 1, REQUEST), ("data", 1, b"abc", 3), ("end", 1)]
    assert pair.server.streams[1].remote_closed


def test_response_as_the_h2_client_sees_it() -> None:
    pair = Pair()
    pair.request(1, end_stream=True)
    pair.pump()
    pair.server.send_headers(1, RESPONSE_BLOCK)
    pair.server.send_data(1, b"payload")
    pair.server.send_headers(1, TRAILERS_BLOCK, end_stream=True)
    events = [e for e in pair.pump() if not isinstance(e, h2.events.SettingsAcknowledged)]
    kinds = [type(e) for e in events]
    assert kinds == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.TrailersReceived,
        h2.events.StreamEnded,
    ]
    response, data, trailers, _ = events
    assert isinstance(response, h2.events.ResponseReceived) and response.headers == RESPONSE
    assert isinstance(data, h2.events.DataReceived) and data.data == b"payload"
    assert isinstance(trailers, h2.events.TrailersReceived) and trailers.headers == TRAILERS
    assert pair.server.streams == {}


def test_send_whole_writes_what_the_three_calls_would() -> None:
    # the same bytes as send_headers + send_data + send_headers(end_stream), the table-size update
    # of a connection's first block included, and the same state after
    whole, apart = Pair(), Pair()
    for pair in (whole, apart):
        pair.request(1, end_stream=True)
        pair.request(3, end_stream=True)
        pair.pump()
    for sid in (1, 3):
        assert whole.server.send_whole(sid, RESPONSE_BLOCK, (b"\0\0\0\0\x03", b"abc"), TRAILERS_BLOCK)
        apart.server.send_headers(sid, RESPONSE_BLOCK)
        apart.server.send_data(sid, b"\0\0\0\0\x03abc")
        apart.server.send_headers(sid, TRAILERS_BLOCK, end_stream=True)
    out = whole.server.data_to_send()
    assert out == apart.server.data_to_send()
    assert whole.server.send_window == apart.server.send_window == DEFAULT_WINDOW - 16
    assert whole.server.streams == {}
    events = whole.client.receive_data(out)
    assert [e.data for e in of_type(events, h2.events.DataReceived)] == [b"\0\0\0\0\x03abc"] * 2
    assert [t.headers for t in of_type(events, h2.events.TrailersReceived)] == [TRAILERS] * 2
    assert len(of_type(events, h2.events.StreamEnded)) == 2


def test_send_whole_keeps_a_stream_the_peer_has_not_ended() -> None:
    pair = Pair()
    pair.request(1)
    pair.pump()
    assert pair.server.send_whole(1, RESPONSE_BLOCK, (b"x",), TRAILERS_BLOCK)
    assert pair.server.streams[1].local_closed  # the peer may still send; its data is refused
    with pytest.raises(StreamClosedError):
        pair.server.send_data(1, b"y")


@pytest.mark.parametrize("case", ["stream window", "connection window", "frame size", "closed", "unknown"])
def test_send_whole_sends_nothing_when_the_answer_does_not_fit(case: str) -> None:
    # the caller then goes the general way (frames as the windows allow, the rest waiting)
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    pair.request(1, end_stream=True)
    pair.request(3, end_stream=True)
    pair.pump()
    server = pair.server
    server.data_to_send()
    body: tuple[bytes, ...] = (b"x" * 50, b"y" * 50)
    sid = 1
    if case == "stream window":
        body = (b"x" * 101,)
    elif case == "connection window":
        server.send_window = 60
    elif case == "frame size":
        pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        pair.client.increment_flow_control_window(1 << 20)
        pair.pump()
        server.data_to_send()
        body = (b"x" * (DEFAULT_MAX_FRAME + 1),)
    elif case == "closed":
        server.send_headers(1, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
        server.data_to_send()
    else:
        sid = 5
    windows = (server.send_window, {s: st.send_window for s, st in server.streams.items()})
    assert not server.send_whole(sid, RESPONSE_BLOCK, body, TRAILERS_BLOCK)
    assert server.data_to_send() == b""
    assert (server.send_window, {s: st.send_window for s, st in server.streams.items()}) == windows


def test_response_header_block_over_max_frame_size_goes_in_continuations() -> None:
    pair = Pair()
    pair.request(1, end_stream=True)
    pair.pump()
    big = [*RESPONSE, (b"x-big", b"b" * 40000)]
    pair.server.send_headers(1, hpack_codec.encode(big), end_stream=True)
    out = pair.server.data_to_send()
    frames = parse_frames(out)
    assert [f.type for f in frames] == [HEADERS, CONTINUATION, CONTINUATION]
    assert all(len(f.payload) <= DEFAULT_MAX_FRAME for f in frames)
    # END_STREAM rides on HEADERS, END_HEADERS on the last CONTINUATION only
    assert [f.flags for f in frames] == [END_STREAM, 0, END_HEADERS]
    events = pair.client.receive_data(out)
    response = of_type(events, h2.events.ResponseReceived)
    assert [r.headers for r in response] == [big]
    assert of_type(events, h2.events.StreamEnded)


def test_request_header_block_in_headers_and_continuations() -> None:
    server = opened()
    block = hpack_codec.encode([*REQUEST, (b"x-long", b"v" * 100)])
    a, b, c = block[:10], block[10:50], block[50:]
    server.receive(frame(HEADERS, END_STREAM, 1, a))
    server.receive(frame(CONTINUATION, 0, 1, b))
    assert server.events == []  # nothing until END_HEADERS
    server.receive(frame(CONTINUATION, END_HEADERS, 1, c))
    assert server.events == [("request", 1, [*REQUEST, (b"x-long", b"v" * 100)]), ("end", 1)]


# ---- flow control ------------------------------------------------------------------------------------


def test_outbound_window_follows_window_updates() -> None:
    pair = Pair()
    pair.request(1)
    pair.pump()
    assert pair.server.window(1) == DEFAULT_WINDOW
    pair.client.increment_flow_control_window(1000, stream_id=1)
    pair.pump()
    assert pair.server.events[-1] == ("window", 1)
    assert pair.server.window(1) == DEFAULT_WINDOW  # the connection's window is the limit
    pair.client.increment_flow_control_window(5000)
    pair.pump()
    assert pair.server.events[-1] == ("window", 0)
    assert pair.server.window(1) == DEFAULT_WINDOW + 1000
    pair.server.send_data(1, b"x" * 300)
    assert pair.server.window(1) == DEFAULT_WINDOW + 700


def test_outbound_window_follows_initial_window_size_changes() -> None:
    pair = Pair()
    pair.request(1)
    pair.pump()
    pair.server.send_headers(1, RESPONSE_BLOCK)
    pair.server.send_data(1, b"x" * 1000)
    pair.server.events.clear()
    # a larger INITIAL_WINDOW_SIZE widens open streams by the difference
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    pair.pump()
    assert pair.server.streams[1].send_window == 100_000 - 1000
    assert pair.server.window(1) == DEFAULT_WINDOW - 1000  # the connection's window is unchanged
    assert pair.server.events == [("window", 0)]
    # a smaller one narrows them, below zero even, and wakes no one
    pair.server.events.clear()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 500})
    pair.pump()
    assert pair.server.streams[1].send_window == 500 - 1000
    assert pair.server.window(1) == -500
    assert pair.server.events == []
    pair.request(3)
    pair.pump()
    assert pair.server.window(3) == 500


def test_acknowledge_grants_stream_window_at_half() -> None:
    pair = Pair(initial_window=1000)
    pair.request(1)
    pair.pump()
    pair.client.send_data(1, b"x" * 600)
    pair.pump()
    assert pair.client.local_flow_control_window(1) == 400
    pair.server.acknowledge(1, 400)
    assert pair.server.data_to_send() == b""  # 400 < 1000 / 2
    pair.server.acknowledge(1, 200)
    out = pair.server.data_to_send()
    assert window_updates(out) == [(1, 600)]  # the connection's quarter is not reached
    pair.client.receive_data(out)
    assert pair.client.local_flow_control_window(1) == 1000


def test_acknowledge_grants_connection_window_at_a_quarter() -> None:
    pair = Pair(initial_window=1 << 20)
    pair.request(1)
    pair.pump()
    chunk = DEFAULT_WINDOW // 4  # 16383
    pair.client.send_data(1, b"x" * chunk)
    pair.pump()
    assert pair.client.outbound_flow_control_window == DEFAULT_WINDOW - chunk
    pair.server.acknowledge(1, chunk - 1)
    assert pair.server.data_to_send() == b""
    pair.server.acknowledge(1, 1)
    out = pair.server.data_to_send()
    assert window_updates(out) == [(0, chunk)]  # the stream's half (512 KiB) is far off
    pair.client.receive_data(out)
    assert pair.client.outbound_flow_control_window == DEFAULT_WINDOW


def test_acknowledge_grants_no_stream_window_once_the_peer_ended() -> None:
    pair = Pair(initial_window=40_000)
    pair.request(1)
    pair.client.send_data(1, b"x" * 10_000)
    pair.client.send_data(1, b"x" * 10_000, end_stream=True)
    pair.pump()
    pair.server.acknowledge(1, 20_000)
    assert window_updates(pair.server.data_to_send()) == [(0, 20_000)]


def test_data_beyond_the_connection_window_is_a_connection_error() -> None:
    server = opened(initial_window=1 << 20)  # the stream's window is not the limit
    server.receive(headers_frame(1))
    for _ in range(3):
        server.receive(data_frame(1, b"x" * 16384))
    # 4 * 16384 = 65536: one byte over the 65535 the connection started with
    assert connection_error(server, data_frame(1, b"x" * 16384)) == ErrorCode.FLOW_CONTROL_ERROR


def test_data_beyond_a_stream_window_resets_only_that_stream() -> None:
    server = opened(initial_window=100)
    server.receive(frame(SETTINGS, ACK, 0))  # the window is 100 bytes once the client has it
    server.receive(headers_frame(1))
    server.receive(data_frame(1, b"x" * 101))
    assert resets(server.data_to_send()) == [(1, ErrorCode.FLOW_CONTROL_ERROR)]
    assert server.events[-1] == ("reset", 1)
    assert 1 not in server.streams
    server.receive(headers_frame(3, end_stream=True))
    assert server.events[-2:] == [("request", 3, REQUEST), ("end", 3)]


def test_window_update_overflowing_the_connection_window() -> None:
    server = opened()
    server.receive(window_update(0, MAX_WINDOW - DEFAULT_WINDOW))  # exactly 2^31-1: fine
    assert server.send_window == MAX_WINDOW
    assert connection_error(server, window_update(0, 1)) == ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflowing_a_stream_window() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(window_update(1, MAX_WINDOW - DEFAULT_WINDOW))
    server.receive(window_update(1, 1))
    assert resets(server.data_to_send()) == [(1, ErrorCode.FLOW_CONTROL_ERROR)]
    assert server.events[-1] == ("reset", 1)
    assert server.streams == {}


def test_a_small_window_counts_only_once_the_client_acknowledged_it() -> None:
    # before its ACK the client may still count on the default 64 KiB
    server = opened(initial_window=100)
    server.receive(headers_frame(1))
    server.receive(data_frame(1, b"x" * 101))
    assert resets(server.data_to_send()) == []
    assert server.events[-1] == ("data", 1, b"x" * 101, 101)


def test_initial_window_size_overflowing_a_stream_window() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(window_update(1, MAX_WINDOW - DEFAULT_WINDOW))
    code = connection_error(server, settings_frame((SETTINGS_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW + 1)))
    assert code == ErrorCode.FLOW_CONTROL_ERROR


def test_zero_window_increment_on_the_connection() -> None:
    assert connection_error(opened(), window_update(0, 0)) == ErrorCode.PROTOCOL_ERROR


def test_zero_window_increment_on_a_stream_resets_it() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(window_update(1, 0))
    assert resets(server.data_to_send()) == [(1, ErrorCode.PROTOCOL_ERROR)]
    assert server.events[-1] == ("reset", 1)


def test_data_on_a_closed_stream_still_returns_connection_window() -> None:
    """Bytes the client sent before it saw our reset count against the connection window: they
    must be given back, or the connection slowly starves."""
    server = opened()
    server.receive(headers_frame(1))
    server.receive(frame(RST_STREAM, 0, 1, u32(ErrorCode.CANCEL)))
    server.receive(data_frame(1, b"x" * 16384))
    assert window_updates(server.data_to_send()) == [(0, 16384)]
    assert server.recv_window == DEFAULT_WINDOW
    assert server.events == [("request", 1, REQUEST), ("reset", 1)]


# ---- the preface ------------------------------------------------------------------------------------


def test_http1_request_instead_of_the_preface() -> None:
    server = Recorder()
    server.initiate()
    server.data_to_send()
    code = connection_error(server, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert code == ErrorCode.PROTOCOL_ERROR


def test_short_wrong_preface_fails_at_once() -> None:
    server = Recorder()
    assert connection_error(server, b"GET /") == ErrorCode.PROTOCOL_ERROR


def test_preface_a_byte_at_a_time() -> None:
    server = Recorder()
    server.initiate()
    server.data_to_send()
    for byte in PREFACE + settings_frame():
        server.receive(bytes((byte,)))
    assert parse_frames(server.data_to_send()) == [Frame(SETTINGS, ACK, 0, b"")]


@pytest.mark.parametrize(
    "first",
    [
        frame(PING, 0, 0, b"12345678"),
        headers_frame(1),
        data_frame(1, b"x"),
        window_update(0, 1),
        frame(0x42, 0, 0, b""),
    ],
    ids=["ping", "headers", "data", "window_update", "unknown"],
)
def test_first_frame_must_be_settings(first: bytes) -> None:
    server = Recorder()
    assert connection_error(server, PREFACE + first) == ErrorCode.PROTOCOL_ERROR


# ---- connection errors ----------------------------------------------------------------------------


# short names for the table below
_PROTOCOL = ErrorCode.PROTOCOL_ERROR
_FRAME_SIZE = ErrorCode.FRAME_SIZE_ERROR
_FLOW = ErrorCode.FLOW_CONTROL_ERROR
_HEADERS_OPEN = frame(HEADERS, 0, 1, REQUEST_BLOCK)  # a header block still open (no END_HEADERS)

CONNECTION_ERRORS = {
    # frame sizes: only a frame's header is needed to refuse it
    "frame over max_frame_size": (frame(DATA, 0, 1, b"x" * (DEFAULT_MAX_FRAME + 1))[:9], _FRAME_SIZE),
    # stream ids
    "headers on stream 0": (headers_frame(0), _PROTOCOL),
    "even stream id": (headers_frame(2), _PROTOCOL),
    "data on idle stream": (data_frame(1, b"x"), _PROTOCOL),
    "data on stream 0": (data_frame(0, b"x"), _PROTOCOL),
    "rst_stream on idle stream": (frame(RST_STREAM, 0, 1, u32(0)), _PROTOCOL),
    "rst_stream on stream 0": (frame(RST_STREAM, 0, 0, u32(0)), _PROTOCOL),
    "rst_stream of 3 bytes": (frame(RST_STREAM, 0, 1, b"\0\0\0"), _FRAME_SIZE),
    "window_update on idle stream": (window_update(1, 1), _PROTOCOL),
    "window_update of 5 bytes": (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0\1"), _FRAME_SIZE),
    # header blocks
    "continuation without headers": (frame(CONTINUATION, END_HEADERS, 1, REQUEST_BLOCK), _PROTOCOL),
    "ping inside a header block": (_HEADERS_OPEN + frame(PING, 0, 0, b"12345678"), _PROTOCOL),
    "data inside a header block": (_HEADERS_OPEN + data_frame(1, b"x"), _PROTOCOL),
    "continuation of another stream": (_HEADERS_OPEN + frame(CONTINUATION, END_HEADERS, 3, b""), _PROTOCOL),
    "headers padding longer than the frame": (
        frame(HEADERS, END_HEADERS | PADDED, 1, bytes((len(REQUEST_BLOCK) + 1,)) + REQUEST_BLOCK),
        _PROTOCOL,
    ),
    "headers too short for its priority": (
        frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, b"\0"),
        _PROTOCOL,
    ),
    # SETTINGS
    "settings of 5 bytes": (frame(SETTINGS, 0, 0, b"\0\4\0\0\0"), _FRAME_SIZE),
    "settings ack with payload": (frame(SETTINGS, ACK, 0, struct.pack(">HL", 4, 1)), _FRAME_SIZE),
    "settings on a stream": (frame(SETTINGS, 0, 1, b""), _PROTOCOL),
    "initial_window_size 2^31": (settings_frame((SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31)), _FLOW),
    "max_frame_size 16383": (settings_frame((SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME - 1)), _PROTOCOL),
    "max_frame_size 2^24": (settings_frame((SETTINGS_MAX_FRAME_SIZE, 1 << 24)), _PROTOCOL),
    "enable_push 2": (settings_frame((SETTINGS_ENABLE_PUSH, 2)), _PROTOCOL),
    # the rest
    "ping of 7 bytes": (frame(PING, 0, 0, b"1234567"), _FRAME_SIZE),
    "ping on a stream": (frame(PING, 0, 1, b"12345678"), _PROTOCOL),
    "push_promise from a client": (frame(PUSH_PROMISE, END_HEADERS, 1, u32(2) + RESPONSE_BLOCK), _PROTOCOL),
    "priority on stream 0": (frame(PRIORITY, 0, 0, b"\0\0\0\1\x10"), _PROTOCOL),
    "goaway on a stream": (frame(GOAWAY, 0, 1, u32(0) + u32(0)), _PROTOCOL),
}


@pytest.mark.parametrize(("data", "code"), list(CONNECTION_ERRORS.values()), ids=list(CONNECTION_ERRORS))
def test_connection_error(data: bytes, code: ErrorCode) -> None:
    assert connection_error(opened(), data) == code


def test_connection_error_names_the_last_stream_opened() -> None:
    server = opened()
    server.receive(headers_frame(1) + headers_frame(5))
    connection_error(server, frame(PING, 0, 1, b"12345678"))  # checks GOAWAY's last stream id: 5
    assert server.last_sid == 5


def test_padded_data_longer_than_its_frame() -> None:
    server = opened()
    server.receive(headers_frame(1))
    bad = frame(DATA, PADDED, 1, bytes((4,)) + b"abc")  # 4 octets of padding in 3
    assert connection_error(server, bad) == ErrorCode.PROTOCOL_ERROR


def test_endless_continuation_is_refused() -> None:
    """CONTINUATION frames are not bounded by a frame's size: the block's total is."""
    server = opened(max_header_list_size=1000)
    server.receive(frame(HEADERS, 0, 1, REQUEST_BLOCK))
    with pytest.raises(H2ProtocolError) as info:
        for _ in range(100):
            server.receive(frame(CONTINUATION, 0, 1, b"\x82" * 500))
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert parse_frames(server.data_to_send())[-1].type == GOAWAY


HPACK_ERRORS = {
    # 62: the first dynamic index, with the table empty
    "index out of range": bytes((0x80 | FIRST_DYNAMIC,)),
    "index 0": b"\x80",
    "truncated integer": b"\xff\x80",
    "integer too long": b"\xff\xff\xff\xff\xff\xff\x01",
    # :path (4) with a value whose Huffman code stops short of a symbol (padding not all ones)
    "invalid Huffman": b"\x04\x81\x18",
    "string longer than its block": b"\x04\x05ab",
    "table size update over 4096": hpack_codec.table_size_update(4097),
    "table size update after a field": b"\x82" + hpack_codec.table_size_update(0),
}


@pytest.mark.parametrize("block", list(HPACK_ERRORS.values()), ids=list(HPACK_ERRORS))
def test_hpack_error_is_a_compression_error(block: bytes) -> None:
    assert connection_error(opened(), headers_frame(1, block)) == ErrorCode.COMPRESSION_ERROR


def test_table_size_update_at_the_start_is_fine() -> None:
    server = opened()
    server.receive(headers_frame(1, hpack_codec.table_size_update(0) + REQUEST_BLOCK))
    assert server.events == [("request", 1, REQUEST)]


def test_header_list_over_max_header_list_size() -> None:
    server = opened(max_header_list_size=200)
    block = hpack_codec.encode([*REQUEST, (b"x-big", b"v" * 200)])
    assert connection_error(server, headers_frame(1, block)) == ErrorCode.COMPRESSION_ERROR
    assert server.events == []


# ---- stream errors and frames for closed streams ---------------------------------------------------


def test_data_after_the_peer_ended_the_stream() -> None:
    server = opened()
    server.receive(headers_frame(1, end_stream=True))
    server.receive(data_frame(1, b"late"))
    assert resets(server.data_to_send()) == [(1, ErrorCode.STREAM_CLOSED)]
    assert server.events == [("request", 1, REQUEST), ("end", 1), ("reset", 1)]
    server.receive(headers_frame(3))  # the connection goes on
    assert server.events[-1] == ("request", 3, REQUEST)


def test_headers_after_the_peer_ended_the_stream() -> None:
    server = opened()
    server.receive(headers_frame(1, end_stream=True))
    server.receive(headers_frame(1, TRAILERS_BLOCK, end_stream=True))
    assert resets(server.data_to_send()) == [(1, ErrorCode.STREAM_CLOSED)]
    assert server.events[-1] == ("reset", 1)


def test_trailers_without_end_stream_reset_the_stream() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(headers_frame(1, TRAILERS_BLOCK))
    assert resets(server.data_to_send()) == [(1, ErrorCode.PROTOCOL_ERROR)]
    assert server.events == [("request", 1, REQUEST), ("reset", 1)]


def test_rst_stream_from_the_peer() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(frame(RST_STREAM, 0, 1, u32(ErrorCode.CANCEL)))
    assert server.events[-1] == ("reset", 1)
    assert server.streams == {}
    assert server.data_to_send() == b""  # a reset is not answered
    server.receive(frame(RST_STREAM, 0, 1, u32(ErrorCode.CANCEL)))  # a closed stream's: ignored
    assert server.data_to_send() == b""


def test_late_headers_on_a_closed_stream_keep_hpack_in_step() -> None:
    """A closed stream's late header block changes nothing, but it is still decoded: its
    incremental-indexing literal is in the client's dynamic table, and the next block refers to it."""
    server = opened()
    server.receive(headers_frame(1, end_stream=True))
    server.send_headers(1, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
    assert server.streams == {}
    server.data_to_send()
    server.events.clear()
    server.receive(headers_frame(1, literal_indexed(b"x-late", b"v"), end_stream=True))
    assert server.events == []
    assert server.data_to_send() == b""
    server.receive(headers_frame(3, REQUEST_BLOCK + bytes((0x80 | FIRST_DYNAMIC,)), end_stream=True))
    assert server.events == [("request", 3, [*REQUEST, (b"x-late", b"v")]), ("end", 3)]


def test_ping_is_answered_with_its_payload() -> None:
    server = opened()
    server.receive(frame(PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    assert parse_frames(server.data_to_send()) == [Frame(PING, ACK, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    server.receive(frame(PING, ACK, 0, b"12345678"))  # an answer to ours: not answered
    assert server.data_to_send() == b""


def test_goaway_from_the_peer() -> None:
    server = opened()
    server.receive(frame(GOAWAY, 0, 0, u32(0) + u32(ErrorCode.ENHANCE_YOUR_CALM) + b"debug data"))
    assert server.events == [("goaway", ErrorCode.ENHANCE_YOUR_CALM)]


def test_unknown_frame_types_are_ignored() -> None:
    server = opened()
    server.receive(frame(0x42, 0xFF, 0, b"whatever") + frame(0xFA, 0, 7, b""))
    server.receive(headers_frame(1, end_stream=True))
    assert server.data_to_send() == b""
    assert server.events == [("request", 1, REQUEST), ("end", 1)]


def test_priority_is_ignored() -> None:
    server = opened()
    server.receive(frame(PRIORITY, 0, 9, u32(1) + b"\x10"))  # on an idle stream: allowed
    server.receive(headers_frame(1))
    server.receive(frame(PRIORITY, 0, 1, u32(0) + b"\xff"))
    # HEADERS with the PRIORITY flag: its 5 octets are not part of the header block
    server.receive(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 3, u32(1) + b"\x10" + REQUEST_BLOCK))
    assert server.data_to_send() == b""
    assert server.events == [("request", 1, REQUEST), ("request", 3, REQUEST)]


def test_priority_of_the_wrong_length_resets_the_stream() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.receive(frame(PRIORITY, 0, 1, u32(0)))
    assert resets(server.data_to_send()) == [(1, ErrorCode.FRAME_SIZE_ERROR)]
    assert server.events[-1] == ("reset", 1)


# ---- the same bytes, cut anywhere -----------------------------------------------------------------


def client_conversation() -> bytes:
    """What an h2 client sends for several requests with data, padding, trailers, a ping, a window
    update and a settings change: every byte, to be fed to fresh servers."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server = Recorder()
    server.initiate()
    client.receive_data(server.data_to_send())  # so the client ACKs our SETTINGS too
    for n, sid in enumerate((1, 3, 5, 7)):
        client.send_headers(sid, [*REQUEST, (b"x-n", b"%d" % n)])
        client.send_data(sid, bytes(range(256)) * (n + 1), pad_length=n * 3)
        client.send_data(sid, b"tail")
        if n % 2:
            client.send_headers(sid, [(b"x-trailer", b"%d" % n)], end_stream=True)
        else:
            client.end_stream(sid)
    client.ping(b"pingpong")
    client.increment_flow_control_window(1 << 20)
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    return client.data_to_send()


def feed(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    server = Recorder()
    server.initiate()
    for chunk in chunks:
        server.receive(chunk)
    return server.events, server.data_to_send()


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    data = client_conversation()
    whole = feed([data])
    assert [e[0] for e in whole[0]].count("request") == 4
    assert [e[0] for e in whole[0]].count("end") == 4
    assert feed([data[i : i + 1] for i in range(len(data))]) == whole


def test_random_chunks_are_the_same_as_all_at_once(seed: int) -> None:
    rng = random.Random(seed)
    data = client_conversation()
    whole = feed([data])
    for _ in range(20):
        chunks = []
        pos = 0
        while pos < len(data):
            size = rng.choice((1, 2, 8, 9, 10, rng.randint(1, 3000)))
            chunks.append(data[pos : pos + size])
            pos += size
        assert feed(chunks) == whole


def test_fuzz_only_protocol_errors(seed: int) -> None:
    """Mutated client bytes after a valid preface and SETTINGS: receive() either takes them or raises
    H2ProtocolError with a GOAWAY as the last frame queued, never any other exception."""
    rng = random.Random(seed)
    data = client_conversation()
    head = len(PREFACE) + 9 + int.from_bytes(data[len(PREFACE) : len(PREFACE) + 3], "big")
    prefix, body = data[:head], data[head:]
    errors = 0
    for _ in range(300):
        mutated = bytearray(body)
        kind = rng.randrange(4)
        if kind == 0:  # bit flips
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncated
            del mutated[rng.randrange(len(mutated)) :]
        elif kind == 2:  # random bytes inserted
            at = rng.randrange(len(mutated))
            mutated[at:at] = rng.randbytes(rng.randint(1, 32))
        else:  # random bytes only
            mutated = bytearray(rng.randbytes(rng.randint(1, 256)))
        server = Recorder(initial_window=rng.choice((100, DEFAULT_WINDOW, 1 << 20)))
        server.initiate()
        server.receive(prefix)
        server.data_to_send()
        try:
            server.receive(bytes(mutated))
        except H2ProtocolError:
            errors += 1
            assert parse_frames(server.data_to_send())[-1].type == GOAWAY
        else:
            parse_frames(server.data_to_send())  # whole frames only
    assert errors  # the fuzz reached the error paths at all


# ---- stream bookkeeping -----------------------------------------------------------------------------


def test_stream_forgotten_once_both_sides_ended() -> None:
    pair = Pair()
    pair.request(1)
    pair.client.send_data(1, b"x", end_stream=True)
    pair.pump()
    pair.server.send_headers(1, RESPONSE_BLOCK)
    assert 1 in pair.server.streams
    pair.server.send_headers(1, TRAILERS_BLOCK, end_stream=True)
    assert pair.server.streams == {}


def test_stream_forgotten_when_the_peer_ends_after_us() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.send_headers(1, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
    assert server.streams[1].local_closed
    assert server.window(1) == 0
    server.receive(data_frame(1, b"x", end_stream=True))
    assert server.streams == {}
    assert server.events[-1] == ("end", 1)


def test_reset_stream() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.reset_stream(1)
    assert resets(server.data_to_send()) == [(1, ErrorCode.CANCEL)]
    assert server.streams == {}
    server.reset_stream(1)  # closed already: nothing more
    server.reset_stream(99)
    assert server.data_to_send() == b""


def test_sending_on_a_closed_stream_raises() -> None:
    server = opened()
    server.receive(headers_frame(1))
    server.send_headers(1, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)  # our side ended
    with pytest.raises(StreamClosedError):
        server.send_data(1, b"x")
    with pytest.raises(StreamClosedError):
        server.send_headers(1, TRAILERS_BLOCK)
    for sid in (3, 99):  # never opened
        with pytest.raises(StreamClosedError):
            server.send_headers(sid, RESPONSE_BLOCK)
        with pytest.raises(StreamClosedError):
            server.send_data(sid, b"x")


def test_the_first_block_empties_the_peers_table_and_no_later_one_needs_to() -> None:
    """Our blocks never add to the peer's dynamic table: the first announces size 0 (RFC 7541 §4.2),
    so no later SETTINGS_HEADER_TABLE_SIZE, smaller or larger, requires another update; h2's decoder
    accepts both."""
    pair = Pair()
    pair.request(1, end_stream=True)
    pair.request(3, end_stream=True)
    pair.pump()
    pair.server.send_headers(1, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
    pair.server.send_headers(3, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
    out = pair.server.data_to_send()
    first, second = (f.payload for f in parse_frames(out) if f.type == HEADERS)
    assert first == hpack_codec.table_size_update(0) + RESPONSE_BLOCK + TRAILERS_BLOCK
    assert second == RESPONSE_BLOCK + TRAILERS_BLOCK  # once only
    responses = of_type(pair.client.receive_data(out), h2.events.ResponseReceived)
    assert [r.headers for r in responses] == [RESPONSE + TRAILERS] * 2
    for size in (100, 8192):
        pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: size})
        sid = pair.client.get_next_available_stream_id()
        pair.request(sid, end_stream=True)
        pair.pump()
        pair.server.send_headers(sid, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
        out = pair.server.data_to_send()
        (headers,) = (f for f in parse_frames(out) if f.type == HEADERS)
        assert headers.payload == RESPONSE_BLOCK + TRAILERS_BLOCK
        responses = of_type(pair.client.receive_data(out), h2.events.ResponseReceived)
        assert [r.headers for r in responses] == [RESPONSE + TRAILERS]


# ---- bugs these tests found (fixed) -----------------------------------------------------------


class AnswersInOnData(Recorder):
    """Answers and resets a stream from `on_data`, as servers.grpc_h2 does for a message over its
    size limit (`_finish` -> `_send_trailers`: trailers with END_STREAM, then RST_STREAM NO_ERROR
    because the request has not ended yet)."""

    def on_data(self, sid: int, data: bytes, flow_len: int) -> None:
        super().on_data(sid, data, flow_len)
        self.send_headers(sid, RESPONSE_BLOCK + TRAILERS_BLOCK, end_stream=True)
        self.reset_stream(sid, ErrorCode.NO_ERROR)


def test_stream_reset_by_on_data_of_a_frame_with_end_stream() -> None:
    server = AnswersInOnData()
    server.initiate()
    server.receive(PREFACE + settings_frame() + headers_frame(1))
    server.data_to_send()
    server.receive(data_frame(1, b"too big", end_stream=True))  # was a KeyError
    assert resets(server.data_to_send()) == [(1, ErrorCode.NO_ERROR)]
    assert server.streams == {}


def test_even_stream_id_below_the_last_one() -> None:
    server = opened()
    server.receive(headers_frame(3))
    assert connection_error(server, headers_frame(2)) == ErrorCode.PROTOCOL_ERROR


def test_goaway_too_short() -> None:
    assert connection_error(opened(), frame(GOAWAY, 0, 0, u32(0))) == ErrorCode.FRAME_SIZE_ERROR


# ---- large DATA frames, passed on as they arrive ---------------------------------------------------


BIG = 1 << 20


def big_server() -> Recorder:
    """A server that takes 1 MiB frames and windows, with stream 1 open."""
    server = opened(max_frame_size=BIG, initial_window=4 * BIG, connection_window=4 * BIG)
    server.receive(headers_frame(1))
    return server


def data_events(server: Recorder, sid: int = 1) -> list[Event]:
    return [e for e in server.events if e[0] == "data" and e[1] == sid]


def test_a_large_data_frame_is_passed_on_in_the_pieces_it_arrives_in() -> None:
    payload = bytes(range(256)) * 400  # 100 KiB
    wire = data_frame(1, payload, end_stream=True) + frame(PING, 0, 0, b"8 bytes!")
    server = big_server()
    for i in range(0, len(wire), 7000):
        server.receive(wire[i : i + 7000])
    pieces = data_events(server)
    assert len(pieces) == -(-(len(payload) + 9) // 7000)  # one per chunk: nothing waited for the rest
    assert b"".join(bytes(e[2]) for e in pieces) == payload
    assert sum(e[3] for e in pieces) == len(payload)  # each piece's flow control, nothing twice
    assert server.events[-1] == ("end", 1)  # END_STREAM once the last piece is in, not before
    assert [f.payload for f in parse_frames(server.data_to_send()) if f.type == PING] == [b"8 bytes!"]


def test_random_cuts_of_large_frames_give_the_same_bytes_and_events(seed: int) -> None:
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randint(16 << 10, 200_000)) for _ in range(3)]
    wire = b"".join(data_frame(1, p) for p in payloads) + data_frame(1, b"end", end_stream=True)
    whole = big_server()
    whole.receive(wire)
    expected = b"".join(bytes(e[2]) for e in data_events(whole))
    assert len(data_events(whole)) == 4 and expected == b"".join(payloads) + b"end"
    for _ in range(10):
        server = big_server()
        pos = 0
        while pos < len(wire):
            size = rng.choice((1, 9, 10, rng.randint(1, 70_000)))
            server.receive(wire[pos : pos + size])
            pos += size
        assert b"".join(bytes(e[2]) for e in data_events(server)) == expected
        assert sum(e[3] for e in data_events(server)) == len(expected)
        assert [e for e in server.events if e[0] != "data"] == [e for e in whole.events if e[0] != "data"]


def test_a_padded_large_frame_is_still_passed_on_whole() -> None:
    payload = b"p" * (40 << 10)
    padded = frame(DATA, PADDED | END_STREAM, 1, bytes([10]) + payload + b"\0" * 10)
    server = big_server()
    for i in range(0, len(padded), 5000):
        server.receive(padded[i : i + 5000])
    assert [(bytes(e[2]), e[3]) for e in data_events(server)] == [(payload, len(payload) + 11)]
    assert server.events[-1] == ("end", 1)


def test_the_rest_of_a_large_frame_on_a_stream_reset_meanwhile_is_only_acknowledged() -> None:
    class Resetting(Recorder):
        def on_data(self, sid: int, data: bytes, flow_len: int) -> None:
            super().on_data(sid, data, flow_len)
            self.reset_stream(sid)  # as a call answered early does

    # the connection's window is the default 64 KiB: 300 KB get through only if the pieces nobody
    # takes are given back to it as they arrive
    server = Resetting(max_frame_size=BIG, initial_window=4 * BIG)
    server.initiate()
    server.receive(PREFACE + settings_frame() + headers_frame(1))
    server.data_to_send()
    wire = data_frame(1, b"x" * 300_000) + headers_frame(3, end_stream=True)
    for i in range(0, len(wire), 10_000):
        server.receive(wire[i : i + 10_000])
    assert len(data_events(server)) == 1
    assert server.events[-2][:2] == ("request", 3) and server.events[-1] == ("end", 3)
    returned = sum(n for sid, n in window_updates(server.data_to_send()) if sid == 0)
    assert returned >= 300_000 - 10_000 - DEFAULT_WINDOW // 4


def test_a_large_frame_past_the_connection_window_is_refused_as_its_pieces_arrive() -> None:
    server = opened(max_frame_size=BIG, initial_window=4 * BIG)  # connection window 64 KiB
    server.receive(headers_frame(1))
    wire = data_frame(1, b"x" * 200_000)
    server.receive(wire[:30_000])
    with pytest.raises(H2ProtocolError, match="FLOW_CONTROL_ERROR"):
        server.receive(wire[30_000:90_000])
    assert [f.type for f in parse_frames(server.data_to_send())][-1] == GOAWAY
    assert sum(e[3] for e in data_events(server)) <= DEFAULT_WINDOW


# ---- parsing paused by an event -----------------------------------------------------------------


class Pausing(Recorder):
    """Pauses parsing at every END_STREAM, as the gRPC layer does once it has started its quota of
    calls for one turn of the loop."""

    def on_end(self, sid: int) -> None:
        super().on_end(sid)
        self.pause_parsing()


def test_a_pause_holds_the_frames_after_it_until_resumed() -> None:
    server = Pausing()
    server.initiate()
    server.receive(PREFACE + settings_frame())
    server.data_to_send()
    calls = [headers_frame(sid) + data_frame(sid, b"m%d" % sid, end_stream=True) for sid in (1, 3, 5)]
    server.receive(b"".join(calls) + frame(PING, 0, 0, b"pingpong"))
    assert server.parsing_paused
    assert server.events[-1] == ("end", 1)
    assert [e[1] for e in server.events if e[0] == "request"] == [1]
    assert server.data_to_send() == b""  # the PING waits with the rest
    server.receive(headers_frame(7, end_stream=True))  # bytes that come while paused wait too
    assert [e[1] for e in server.events if e[0] == "end"] == [1]
    server.resume_parsing()
    assert server.events[-1] == ("end", 3)
    server.resume_parsing()
    assert server.events[-1] == ("end", 5)
    assert server.data_to_send() == b""
    server.resume_parsing()  # the PING, then stream 7's HEADERS, which ends it
    assert [f.payload for f in parse_frames(server.data_to_send()) if f.type == PING] == [b"pingpong"]
    assert server.events[-2:] == [("request", 7, REQUEST), ("end", 7)]
    server.resume_parsing()
    assert not server.parsing_paused
    server.resume_parsing()  # nothing held: nothing happens
    assert server.events[-1] == ("end", 7)


def test_a_pause_before_a_torn_frame_keeps_its_start_for_the_rest() -> None:
    server = Pausing()
    server.initiate()
    server.receive(PREFACE + settings_frame())
    second = headers_frame(3) + data_frame(3, b"second", end_stream=True)
    server.receive(headers_frame(1, end_stream=True) + second[:20])
    assert server.events[-1] == ("end", 1)
    server.resume_parsing()  # only 20 bytes of stream 3: nothing whole yet
    assert not server.parsing_paused and server.events[-1] == ("end", 1)
    server.receive(second[20:])
    assert server.events[-3:] == [("request", 3, REQUEST), ("data", 3, b"second", 6), ("end", 3)]


def test_pauses_anywhere_give_the_same_events_and_output(seed: int) -> None:
    rng = random.Random(seed)
    data = client_conversation()
    whole = feed([data])
    for _ in range(20):
        server = Pausing()
        server.initiate()
        pos = 0
        while pos < len(data):
            size = rng.choice((1, 9, 10, rng.randint(1, 3000)))
            server.receive(data[pos : pos + size])
            pos += size
            while server.parsing_paused and rng.random() < 0.5:
                assert server.events[-1][0] == "end"  # it stopped right after the frame that paused
                server.resume_parsing()
        while server.parsing_paused:
            server.resume_parsing()
        assert (server.events, server.data_to_send()) == whole


def test_a_large_data_frame_that_ends_a_stream_pauses_after_its_last_piece() -> None:
    payload = bytes(range(256)) * 200  # 50 KiB: passed on in pieces
    wire = data_frame(1, payload, end_stream=True) + headers_frame(3, end_stream=True)
    server = Pausing(max_frame_size=BIG, initial_window=4 * BIG)
    server.initiate()
    server.receive(PREFACE + settings_frame() + headers_frame(1))
    for i in range(0, len(wire), 20_000):
        server.receive(wire[i : i + 20_000])
    assert server.events[-1] == ("end", 1)
    assert b"".join(bytes(e[2]) for e in data_events(server)) == payload
    server.resume_parsing()
    assert server.events[-2:] == [("request", 3, REQUEST), ("end", 3)]
