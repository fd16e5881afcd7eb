"""`bench.grpc_h2_client`: the lean gRPC load client, against grpc core's server (grpc.aio) and
against scripted server bytes (every frame type it handles, answers split at every byte)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from bench.grpc_h2_client import (
    Answer,
    GrpcH2Connection,
    connect,
    framed,
    request_header_block,
)
from servers import hpack_codec
from servers.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    WINDOW_UPDATE,
    ErrorCode,
    frame,
)

_HEAD = struct.Struct(">HBBBL")

# ---- against grpc core (grpc.aio server, same event loop) -------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    raise AssertionError("abort returns only by raising")


async def _slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(30)
    return request


def _with_grpc_server(scenario: Callable[[int, grpc.aio.Server], Awaitable[Any]]) -> Any:
    """Run ``scenario(port, server)`` beside a grpc.aio server on the same loop; stops it after."""

    async def main() -> Any:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("Echo", _echo), ("Fail", _fail), ("Slow", _slow))
        }
        server = grpc.aio.server(
            handlers=[grpc.method_handlers_generic_handler("t.T", handlers)],
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await scenario(port, server)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_many_concurrent_calls_and_a_large_message_against_grpc_core() -> None:
    # 500 calls of 2 KiB at once are 1 MiB, over grpc core's first 64 KiB windows: the client must
    # wait for its WINDOW_UPDATEs; 4 MiB each way is split into frames of the peer's size
    async def scenario(port: int, server: grpc.aio.Server) -> None:
        connection = await connect("127.0.0.1", port, timeout_s=30.0)
        block = request_header_block("/t.T/Echo", f"127.0.0.1:{port}", 30.0)
        try:
            bodies = [bytes([i % 251]) * 2048 + str(i).encode() for i in range(500)]
            answers = await asyncio.gather(*(connection.unary(block, framed(b), keep=True) for b in bodies))
            assert [a.code for a in answers] == [0] * 500
            assert [a.message for a in answers] == bodies
            big = bytes(range(256)) * (16 << 10)
            answer = await connection.unary(block, framed(big), keep=True)
            assert answer == Answer(0, "", big)
            assert (await connection.unary(block, framed(b"x"))) == Answer(0, "", b"")  # not kept
        finally:
            connection.close()

    _with_grpc_server(scenario)


def test_status_codes_from_grpc_core() -> None:
    async def scenario(port: int, server: grpc.aio.Server) -> list[Answer]:
        connection = await connect("127.0.0.1", port, timeout_s=30.0)
        try:
            authority = f"127.0.0.1:{port}"
            return [
                await connection.unary(request_header_block(path, authority, timeout), framed(b"x"))
                for path, timeout in (("/t.T/Fail", 30.0), ("/t.T/Nothing", 30.0), ("/t.T/Slow", 0.3))
            ]
        finally:
            connection.close()

    fail, unknown, slow = _with_grpc_server(scenario)
    assert (fail.code, fail.details) == (3, "bad input")  # INVALID_ARGUMENT
    assert unknown.code == 12  # UNIMPLEMENTED
    assert slow.code == 4  # DEADLINE_EXCEEDED: the server enforces the grpc-timeout sent


def test_calls_fail_when_the_server_goes_away() -> None:
    async def scenario(port: int, server: grpc.aio.Server) -> tuple[Any, bool]:
        connection = await connect("127.0.0.1", port, timeout_s=30.0)
        slow = connection.unary(request_header_block("/t.T/Slow", f"127.0.0.1:{port}", 30.0), framed(b"x"))
        await asyncio.sleep(0.2)
        await server.stop(None)
        outcome: Any
        try:
            outcome = await asyncio.wait_for(slow, 10)
        except ConnectionError as exc:
            outcome = exc
        later = connection.unary(request_header_block("/t.T/Echo", "x", 1.0), framed(b"x"))
        with pytest.raises(ConnectionError):
            await later
        return outcome, connection.closed

    outcome, closed = _with_grpc_server(scenario)
    # cancelled by the server's shutdown (RST_STREAM or GOAWAY), or the connection's loss
    assert isinstance(outcome, ConnectionError) or outcome.code in (1, 14), outcome
    assert closed


# ---- scripted server bytes --------------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in ``data`` (after the client preface)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE) :]
    out, pos = [], 0
    while pos < len(data):
        hi, lo, ftype, flags, sid = _HEAD.unpack_from(data, pos)
        n = hi << 8 | lo
        out.append((ftype, flags, sid, bytes(data[pos + 9 : pos + 9 + n])))
        pos += 9 + n
    return out


def _settings(**values: int) -> bytes:
    keys = {"window": SETTINGS_INITIAL_WINDOW_SIZE, "streams": SETTINGS_MAX_CONCURRENT_STREAMS}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", keys[k], v) for k, v in values.items()))


def _answer(sid: int, message: bytes, status: int = 0) -> bytes:
    head = hpack_codec.encode([(b":status", b"200"), (b"content-type", b"application/grpc")])
    trailers = hpack_codec.encode([(b"grpc-status", str(status).encode()), (b"grpc-message", b"")])
    return (
        frame(HEADERS, END_HEADERS, sid, head)
        + frame(DATA, 0, sid, framed(message))
        + frame(HEADERS, END_HEADERS | END_STREAM, sid, trailers)
    )


def _scripted(
    scenario: Callable[[GrpcH2Connection, _Transport], Awaitable[Any]], timeout_s: float | None = None
) -> Any:
    async def main() -> Any:
        connection = GrpcH2Connection(timeout_s)
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        return await scenario(connection, transport)

    return asyncio.run(main())


_BLOCK = request_header_block("/t.T/Echo", "h:1", 5.0)


async def _sent(connection: GrpcH2Connection, transport: _Transport) -> list[tuple[int, int, int, bytes]]:
    await asyncio.sleep(0)  # the write happens once per loop iteration
    connection._flush()
    frames = _frames(bytes(transport.written))
    transport.written.clear()
    return frames


def test_opening_frames_and_requests_on_the_wire() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        assert bytes(transport.written).startswith(PREFACE)
        opening = _frames(bytes(transport.written))
        assert [f[0] for f in opening] == [SETTINGS, WINDOW_UPDATE]
        transport.written.clear()
        connection.data_received(_settings())
        assert connection.ready.done()
        first = connection.unary(_BLOCK, framed(b"one"))
        second = connection.unary(_BLOCK, framed(b"two"))
        sent = await _sent(connection, transport)
        assert (sent[0][0], sent[0][1]) == (SETTINGS, ACK)
        requests = [f for f in sent if f[0] in (HEADERS, DATA)]
        assert [(t, fl, s) for t, fl, s, _ in requests] == [
            (HEADERS, END_HEADERS, 1),
            (DATA, END_STREAM, 1),
            (HEADERS, END_HEADERS, 3),
            (DATA, END_STREAM, 3),
        ]
        headers = dict(hpack_codec.Decoder().decode(requests[0][3]))
        assert headers[b":path"] == b"/t.T/Echo" and headers[b"te"] == b"trailers"
        assert headers[b"grpc-timeout"] == b"5000m"
        assert requests[1][3] == framed(b"one")
        connection.data_received(_answer(3, b"TWO") + _answer(1, b"ONE"))
        assert first.result() == second.result() == Answer(0, "", b"")

    _scripted(scenario)


def test_answers_split_at_every_byte_with_continuation_and_padding() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> Answer:
        connection.data_received(_settings())
        future = connection.unary(_BLOCK, framed(b"q"), keep=True)
        head = hpack_codec.encode([(b":status", b"200"), (b"content-type", b"application/grpc")])
        body = framed(b"answer")
        trailers = hpack_codec.encode([(b"grpc-status", b"0")])
        wire = (
            frame(HEADERS, 0, 1, head[:3])
            + frame(CONTINUATION, END_HEADERS, 1, head[3:])
            # the message over two DATA frames, the first of them padded
            + frame(DATA, PADDED, 1, bytes([4]) + body[:5] + b"\0" * 4)
            + frame(DATA, 0, 1, body[5:])
            + frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers)
        )
        for i in range(len(wire)):
            connection.data_received(wire[i : i + 1])
        return await future

    answer = _scripted(scenario)
    assert answer.code == 0 and answer.message == b"answer"


def test_ping_settings_and_window_updates() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        transport.written.clear()
        connection.data_received(_settings(window=10))
        connection.data_received(frame(PING, 0, 0, b"12345678"))
        future = connection.unary(_BLOCK, framed(b"x" * 30), keep=True)
        sent = await _sent(connection, transport)
        assert (SETTINGS, ACK, 0, b"") in sent and (PING, ACK, 0, b"12345678") in sent
        data = [f for f in sent if f[0] == DATA]
        assert [(len(f[3]), f[1]) for f in data] == [(10, 0)]  # the stream's window: 10 bytes
        connection.data_received(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)))
        data = [f for f in await _sent(connection, transport) if f[0] == DATA]
        assert [(len(f[3]), f[1]) for f in data] == [(25, END_STREAM)]
        connection.data_received(_answer(1, b"ok"))
        assert (await future).message == b"ok"

    _scripted(scenario)


def test_max_concurrent_streams_queues_calls() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        connection.data_received(_settings(streams=1))
        first = connection.unary(_BLOCK, framed(b"1"))
        second = connection.unary(_BLOCK, framed(b"2"))
        assert [f[2] for f in await _sent(connection, transport) if f[0] == HEADERS] == [1]
        connection.data_received(_answer(1, b""))
        assert first.done() and not second.done()
        assert [f[2] for f in await _sent(connection, transport) if f[0] == HEADERS] == [3]
        connection.data_received(_answer(3, b""))
        assert second.result().code == 0

    _scripted(scenario)


def test_error_answers_resets_and_goaway() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        connection.data_received(_settings())
        futures = [connection.unary(_BLOCK, framed(b"x")) for _ in range(5)]  # streams 1..9
        trailers_only = hpack_codec.encode(
            [(b":status", b"200"), (b"grpc-status", b"5"), (b"grpc-message", b"no")]
        )
        http_error = hpack_codec.encode([(b":status", b"503")])
        connection.data_received(
            frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers_only)
            + frame(HEADERS, END_HEADERS | END_STREAM, 3, http_error)
            + frame(RST_STREAM, 0, 5, struct.pack(">L", ErrorCode.REFUSED_STREAM))
            + frame(GOAWAY, 0, 0, struct.pack(">LL", 7, 0) + b"bye")
        )
        assert futures[0].result() == Answer(5, "no", b"")  # NOT_FOUND
        assert futures[1].result().code == 14  # HTTP 503: UNAVAILABLE
        assert futures[2].result().code == 14  # refused stream: UNAVAILABLE
        assert futures[4].result().code == 14 and "bye" in futures[4].result().details  # over the GOAWAY
        assert not futures[3].done()  # stream 7 is still answered
        with pytest.raises(ConnectionError):
            await connection.unary(_BLOCK, framed(b"x"))
        connection.data_received(_answer(7, b""))
        assert futures[3].result().code == 0
        assert transport.closed  # nothing left in flight after a GOAWAY

    _scripted(scenario)


def test_client_timeout_resets_the_stream_and_connection_loss_fails_calls() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        connection.data_received(_settings())
        late = connection.unary(_BLOCK, framed(b"x"))
        answer = await asyncio.wait_for(late, 2)
        assert answer.code == 4  # DEADLINE_EXCEEDED
        assert any(f[0] == RST_STREAM and f[2] == 1 for f in _frames(bytes(transport.written)))
        lost = connection.unary(_BLOCK, framed(b"x"))
        connection.connection_lost(None)
        with pytest.raises(ConnectionError):
            await lost
        assert connection.closed

    _scripted(scenario, timeout_s=0.2)


def test_a_broken_frame_closes_the_connection_with_goaway() -> None:
    async def scenario(connection: GrpcH2Connection, transport: _Transport) -> None:
        connection.data_received(_settings())
        future = connection.unary(_BLOCK, framed(b"x"))
        await _sent(connection, transport)
        connection.data_received(frame(HEADERS, 0, 1, b"\x82") + frame(DATA, 0, 1, b"x"))  # no CONTINUATION
        assert transport.closed and connection.closed
        assert any(f[0] == GOAWAY for f in _frames(bytes(transport.written)))
        with pytest.raises(ConnectionError):
            await future

    _scripted(scenario)
