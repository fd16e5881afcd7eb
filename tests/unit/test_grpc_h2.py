"""`servers.grpc_h2.H2GrpcServer` with a small method table of its own, against grpc.aio clients (grpc
core's HTTP/2) and a raw `h2` client: statuses and their messages, deadlines, client cancels,
flow control of large answers, size and concurrency limits, compression, streaming both ways, bearer
tokens, a graceful stop, and bytes that are not HTTP/2. (The engine's own servicers on this transport:
tests/unit/test_grpc_server.py and tests/integration/test_frontends_grpc.py run on both transports.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import uvloop

from servers import grpc_h2, http2
from servers.grpc_h2 import H2GrpcServer
from servers.grpc_h2_call import encode_message, parse_timeout
from servers.grpc_handlers import BearerAuth
from servers.grpc_messages import ViewedMessage

MAX = 1 << 20
TIMEOUT_S = 20.0


class Handlers:
    """The method table under test, and what its handlers saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0
        self.started = 0
        self.releases = 0

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def big(self, request: bytes, context: Any) -> bytes:
        n = int(request)
        return bytes(i % 251 for i in range(n))

    async def block(self, request: bytes, context: Any) -> bytes:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"released"

    async def abort(self, request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())
        raise AssertionError("abort returned")

    async def fail(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("boom")

    async def viewed(self, request: bytes, context: Any) -> ViewedMessage:
        # an answer viewing memory that is scribbled over the moment it is released, as the
        # engine's shared memory is reused: a release before the bytes are sent corrupts the answer
        n = int(request)
        memory = bytearray(i % 251 for i in range(n))

        def release() -> None:
            memory[:] = b"\xee" * n
            self.releases += 1

        return ViewedMessage([b"head", memoryview(memory)], 4 + n, release)

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message.upper())

    async def stall(self, requests: AsyncIterator[bytes], context: Any) -> None:
        await context.read()
        self.started += 1
        await self.release.wait()

    async def metadata(self, request: bytes, context: Any) -> bytes:
        return repr(sorted(context.invocation_metadata())).encode()

    def table(self) -> dict[str, grpc.RpcMethodHandler]:
        unary = grpc.unary_unary_rpc_method_handler
        return {
            "/t.T/Echo": unary(self.echo),
            "/t.T/Big": unary(self.big),
            "/t.T/Viewed": unary(self.viewed),
            "/t.T/Block": unary(self.block),
            "/t.T/Abort": unary(self.abort),
            "/t.T/Fail": unary(self.fail),
            "/t.T/Metadata": unary(self.metadata),
            "/t.T/Count": grpc.unary_stream_rpc_method_handler(self.count),
            "/t.T/Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "/t.T/Stall": grpc.stream_stream_rpc_method_handler(self.stall),
            "/grpc.health.v1.Health/Check": unary(self.echo),
        }


Scenario = Callable[[H2GrpcServer, Handlers, grpc.aio.Channel], Awaitable[None]]


def run(scenario: Scenario, channel_options: list[tuple[str, Any]] | None = None, **server_args: Any) -> None:
    """Serve the table on an ephemeral port, run ``scenario`` with a channel to it, stop the server."""

    async def main() -> None:
        handlers = Handlers()
        args: dict[str, Any] = {"max_message_bytes": MAX, "max_inflight": 1000}
        args.update(server_args)
        server = H2GrpcServer(handlers.table(), **args)
        port = await server.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options) as channel:
                await asyncio.wait_for(scenario(server, handlers, channel), TIMEOUT_S)
        finally:
            handlers.release.set()
            await server.stop(1.0)
        assert server.active == 0

    uvloop.run(main())


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_parse_timeout_and_message_encoding() -> None:
    assert parse_timeout(b"100m") == pytest.approx(0.1)
    assert parse_timeout(b"2S") == 2.0
    assert parse_timeout(b"5u") == pytest.approx(5e-6)
    assert parse_timeout(b"") is None
    assert parse_timeout(b"12x") is None
    assert parse_timeout(b"123456789S") is None  # more than 8 digits
    assert encode_message("plain text") == b"plain text"
    assert encode_message("100% ü") == b"100%25 %C3%BC"


def test_many_concurrent_unary_calls_on_one_connection() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        echo = channel.unary_unary("/t.T/Echo")
        payloads = [b"request %d " % i * (i % 7 + 1) for i in range(300)]
        answers = await asyncio.gather(*(echo(p, timeout=TIMEOUT_S) for p in payloads))
        assert answers == payloads
        assert await echo(b"", timeout=TIMEOUT_S) == b""

    run(scenario)


def test_statuses_unknown_method_abort_and_exception() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        assert (await status_of(channel.unary_unary("/t.T/Nope")(b"")))[0] == grpc.StatusCode.UNIMPLEMENTED
        details = "no such thing: 100% ü"
        assert await status_of(channel.unary_unary("/t.T/Abort")(details.encode())) == (
            grpc.StatusCode.NOT_FOUND,
            details,
        )
        code, message = await status_of(channel.unary_unary("/t.T/Fail")(b""))
        assert code == grpc.StatusCode.UNKNOWN
        assert "boom" in message

    run(scenario)


def test_deadline_ends_a_call_and_cancels_its_handler() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        code, _ = await status_of(channel.unary_unary("/t.T/Block")(b"", timeout=0.3))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: handlers.cancelled == 1 and server.active == 0)

    run(scenario)


def test_client_cancel_cancels_the_handler() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary("/t.T/Block")(b"", timeout=TIMEOUT_S)
        await until(lambda: handlers.started == 1)
        call.cancel()
        await until(lambda: handlers.cancelled == 1 and server.active == 0)
        assert await channel.unary_unary("/t.T/Echo")(b"still serving", timeout=TIMEOUT_S) == b"still serving"

    run(scenario)


def test_large_answers_wait_for_the_peers_flow_control_window() -> None:
    # without BDP probing the client's windows stay at 64 KiB: a 900 KiB answer needs ~14 window updates
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        big = channel.unary_unary("/t.T/Big")
        sizes = [900_000, 70_000, 65_535, 65_536, 1]
        answers = await asyncio.gather(*(big(b"%d" % n, timeout=TIMEOUT_S) for n in sizes))
        for n, answer in zip(sizes, answers, strict=True):
            assert answer == bytes(i % 251 for i in range(n))

    run(scenario, channel_options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", MAX)])


def test_messages_over_the_limit_are_resource_exhausted() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        code, message = await status_of(channel.unary_unary("/t.T/Echo")(b"x" * (MAX + 1), timeout=TIMEOUT_S))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in message
        code, message = await status_of(channel.unary_unary("/t.T/Big")(b"%d" % (MAX + 1), timeout=TIMEOUT_S))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await channel.unary_unary("/t.T/Echo")(b"ok", timeout=TIMEOUT_S) == b"ok"

    run(scenario, channel_options=[("grpc.max_receive_message_length", 4 * MAX)])


def test_a_small_request_over_the_limit_is_refused_and_the_connection_serves_on() -> None:
    # the whole message and END_STREAM in one DATA frame: answered from inside the frame's handling
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        echo = channel.unary_unary("/t.T/Echo")
        for _ in range(3):
            code, message = await status_of(echo(b"x" * 5000, timeout=TIMEOUT_S))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in message
            assert await echo(b"ok", timeout=TIMEOUT_S) == b"ok"
        assert len(server.connections) == 1

    run(scenario, max_message_bytes=1000)


def test_calls_over_max_inflight_are_refused() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        block = channel.unary_unary("/t.T/Block")
        held = [block(b"", timeout=TIMEOUT_S) for _ in range(2)]
        await until(lambda: handlers.started == 2)
        code, message = await status_of(block(b"", timeout=TIMEOUT_S))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in message
        handlers.release.set()
        assert await asyncio.gather(*held) == [b"released", b"released"]

    run(scenario, max_inflight=2)


def test_compressed_requests_are_accepted() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        payload = b"compressible " * 1000
        echo = channel.unary_unary("/t.T/Echo")
        assert await echo(payload, timeout=TIMEOUT_S, compression=grpc.Compression.Gzip) == payload
        assert await echo(payload, timeout=TIMEOUT_S, compression=grpc.Compression.Deflate) == payload

    run(scenario)


def test_streaming_both_ways() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        answers = [m async for m in channel.unary_stream("/t.T/Count")(b"5", timeout=TIMEOUT_S)]
        assert answers == [b"0", b"1", b"2", b"3", b"4"]

        async def words() -> AsyncIterator[bytes]:
            for word in (b"a", b"bc", b"", b"def"):
                yield word

        chat = channel.stream_stream("/t.T/Chat")(words(), timeout=TIMEOUT_S)
        assert [m async for m in chat] == [b"A", b"BC", b"", b"DEF"]
        assert await chat.code() == grpc.StatusCode.OK

    run(scenario)


def test_stream_messages_larger_than_the_stream_window_arrive() -> None:
    # a stream's window is 1 MiB and is granted as the handler reads: the bytes of a message still
    # arriving must be granted before it is whole, or a larger message never completes
    sizes = [(5 << 20) // 2, 3 << 20, 100, (1 << 20) + 7]

    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        async def messages() -> AsyncIterator[bytes]:
            for i, n in enumerate(sizes):
                yield bytes([97 + i]) * n

        chat = channel.stream_stream("/t.T/Chat")(messages(), timeout=TIMEOUT_S)
        answers = [m async for m in chat]
        assert [len(m) for m in answers] == sizes
        assert all(m == bytes([65 + i]) * len(m) for i, m in enumerate(answers))

    run(scenario, max_message_bytes=4 << 20)


def test_a_stream_handler_that_does_not_read_holds_the_client_back() -> None:
    # The handler reads one message and then waits. A raw client sends 256 KiB messages, 8 MiB in
    # all, as fast as the windows allow: it must be stopped at about two stream windows (1 MiB
    # each: the one in flight, and the one granted when the handler took its message), not at 8 MiB.
    message = framed(bytes(256 << 10))
    total = 32 * len(message)

    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        client, reader, writer = await raw_client(channel_port(server), window=1 << 16)
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Stall"), (":authority", "x")]
        client.send_headers(1, [*headers, ("content-type", "application/grpc")])
        sent = 0
        while sent < total:
            while (room := client.local_flow_control_window(1)) > 0 and sent < total:
                offset = sent % len(message)
                n = min(room, client.max_outbound_frame_size, len(message) - offset)
                client.send_data(1, message[offset : offset + n])
                sent += n
            writer.write(client.data_to_send())
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                if handlers.started:
                    break  # the windows stay shut
                continue
            assert data, "the server hung up"
            client.receive_data(data)
        assert handlers.started == 1
        assert sent <= 2 * (1 << 20) + 2 * len(message), sent
        writer.close()

    run(scenario)


def test_streams_that_are_not_read_do_not_hold_up_other_calls() -> None:
    # Forty streams whose handler reads one message and stops each hold back what their stream's
    # window allows: more than the connection's 16 MiB window in all. Only their streams' windows
    # may stay shut; were the connection's shut too, the streams behind them could not even send
    # their first message, nor any other call on the connection its request.
    chunk = framed(bytes(256 << 10))
    stall = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", "/t.T/Stall")]

    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        client, reader, writer = await raw_client(channel_port(server), window=1 << 16)
        stalled = list(range(1, 81, 2))
        for sid in stalled:
            client.send_headers(sid, [*stall, ("content-type", "application/grpc")])
        sent = dict.fromkeys(stalled, 0)
        for _ in range(400):  # send what the windows allow until they stay shut
            for sid in stalled:
                while (room := client.local_flow_control_window(sid)) > 0:
                    offset = sent[sid] % len(chunk)
                    n = min(room, client.max_outbound_frame_size, len(chunk) - offset)
                    client.send_data(sid, chunk[offset : offset + n])
                    sent[sid] += n
            writer.write(client.data_to_send())
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                if handlers.started == len(stalled) and sum(sent.values()) > 17 << 20:
                    break  # every stream took its message, past the connection's window
                continue
            assert data, "the server hung up"
            client.receive_data(data)
        assert handlers.started == len(stalled)
        # a unary call on the same connection must still get its request through, and an answer
        assert client.outbound_flow_control_window > 0, "the connection's window stayed shut"
        send_call(client, 81, "/t.T/Echo", b"still here")
        writer.write(client.data_to_send())
        assert await read_until(client, reader, 81, len(framed(b"still here"))) == framed(b"still here")
        writer.close()

    run(scenario)


def test_bearer_tokens_and_metadata() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        echo = channel.unary_unary("/t.T/Echo")
        refused = grpc.StatusCode.UNAUTHENTICATED
        assert (await status_of(echo(b"", timeout=TIMEOUT_S)))[0] == refused
        bad = (("authorization", "Bearer wrong"),)
        assert (await status_of(echo(b"", timeout=TIMEOUT_S, metadata=bad)))[0] == refused
        good = (("authorization", "Bearer s3cret"), ("x-trace", "abc"), ("x-blob-bin", b"\x00\xff"))
        assert await echo(b"in", timeout=TIMEOUT_S, metadata=good) == b"in"
        seen = await channel.unary_unary("/t.T/Metadata")(b"", timeout=TIMEOUT_S, metadata=good)
        assert b"('x-trace', 'abc')" in seen
        assert b"('x-blob-bin', b'\\x00\\xff')" in seen
        # health checks are open to orchestrator probes
        assert await channel.unary_unary("/grpc.health.v1.Health/Check")(b"h", timeout=TIMEOUT_S) == b"h"

    run(scenario, auth=BearerAuth(("s3cret",)), health_open=True)


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    async def main() -> None:
        handlers = Handlers()
        server = H2GrpcServer(handlers.table(), max_message_bytes=MAX, max_inflight=100)
        port = await server.start("127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            block = channel.unary_unary("/t.T/Block")
            held = block(b"", timeout=TIMEOUT_S)
            await until(lambda: handlers.started == 1)
            stopping = asyncio.create_task(server.stop(TIMEOUT_S))
            await until(lambda: server.stopping)
            code, _ = await status_of(channel.unary_unary("/t.T/Echo")(b"", timeout=TIMEOUT_S))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert not stopping.done()
            handlers.release.set()
            assert await held == b"released"
            await asyncio.wait_for(stopping, TIMEOUT_S)
            # a call still running when the grace period ends is answered, not left hanging
        handlers2 = Handlers()
        server2 = H2GrpcServer(handlers2.table(), max_message_bytes=MAX, max_inflight=100)
        port2 = await server2.start("127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port2}") as channel:
            held = channel.unary_unary("/t.T/Block")(b"", timeout=TIMEOUT_S)
            await until(lambda: handlers2.started == 1)
            await server2.stop(0.2)
            assert (await status_of(held))[0] == grpc.StatusCode.UNAVAILABLE
            assert handlers2.cancelled == 1

    uvloop.run(main())


def test_bytes_that_are_not_http2_close_only_that_connection() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        port = channel_port(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        while await reader.read(65536):  # the server's SETTINGS and GOAWAY, then EOF
            pass
        writer.close()
        assert await channel.unary_unary("/t.T/Echo")(b"fine", timeout=TIMEOUT_S) == b"fine"

    run(scenario)


@pytest.mark.parametrize("request_ended", [True, False])
def test_a_foreign_content_type_is_answered_415(request_ended: bool) -> None:
    # a request still open when answered is reset (NO_ERROR): its stream is not kept for the peer
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel_port(server))
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        client = h2.connection.H2Connection(config)
        client.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.T/Echo"),
            (":authority", "x"),
            ("content-type", "text/plain"),
        ]
        client.send_headers(1, headers, end_stream=request_ended)
        writer.write(client.data_to_send())
        status = None
        reset = None
        while status is None or not (request_ended or reset is not None):
            data = await reader.read(65536)
            assert data, "the server hung up without answering"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[":status"]
                elif isinstance(event, h2.events.StreamReset):
                    reset = event.error_code
            writer.write(client.data_to_send())
        assert status == "415"
        assert reset in (None if request_ended else h2.errors.ErrorCodes.NO_ERROR,)
        (conn,) = server.connections
        assert conn.streams == {}
        writer.close()

    run(scenario)


def channel_port(server: H2GrpcServer) -> int:
    assert server._server is not None
    return int(server._server.sockets[0].getsockname()[1])


def test_finished_calls_leave_nothing_behind_on_a_long_lived_connection() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        echo = channel.unary_unary("/t.T/Echo")
        for _ in range(20):
            await asyncio.gather(*(echo(b"x" * 100, timeout=TIMEOUT_S) for _ in range(100)))
        (conn,) = server.connections
        assert conn.calls == {}
        assert not conn.blocked
        assert server.active == 0
        # every stream is forgotten once both sides have ended it
        assert conn.streams == {}

    run(scenario)


def test_client_keepalive_pings_are_answered() -> None:
    # a client pinging every 100 ms (grpc's own keepalive) keeps its connection and its calls work
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        echo = channel.unary_unary("/t.T/Echo")
        for i in range(8):
            assert await echo(b"%d" % i, timeout=TIMEOUT_S) == b"%d" % i
            await asyncio.sleep(0.15)
        assert len(server.connections) == 1

    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    run(scenario, channel_options=options)


def test_an_answer_blocked_on_the_window_resumes_when_settings_widen_it() -> None:
    # the peer's INITIAL_WINDOW_SIZE of 100 bytes stops a 1,000-byte answer; a SETTINGS frame that
    # widens it (no WINDOW_UPDATE at all) must let the rest go
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel_port(server))
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        client = h2.connection.H2Connection(config)
        client.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}
        )
        client.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.T/Big"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
        client.send_headers(1, headers)
        client.send_data(1, b"\0\0\0\0\x041000", end_stream=True)
        writer.write(client.data_to_send())
        body = b""
        widened = False
        trailers: dict[str, str] = {}
        while not trailers:
            data = await reader.read(65536)
            assert data, "the server hung up"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
            if not widened and len(body) == 100:
                client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
                widened = True
            writer.write(client.data_to_send())
        writer.close()
        assert widened
        assert trailers["grpc-status"] == "0"
        assert body == b"\0" + (1000).to_bytes(4, "big") + bytes(i % 251 for i in range(1000))

    run(scenario)


def framed(message: bytes) -> bytes:
    """``message`` with its gRPC prefix (not compressed, big-endian length)."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def viewed_body(n: int) -> bytes:
    return framed(b"head" + bytes(i % 251 for i in range(n)))


def test_a_viewed_answer_is_released_only_once_the_transport_has_sent_it() -> None:
    # larger than the client's first window: parts wait for WINDOW_UPDATEs, in the call's pending
    # data and then in the transport; each answer must still arrive as it was before its release
    n = 900_000

    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        method = channel.unary_unary("/t.T/Viewed")
        answers = await asyncio.gather(*(method(b"%d" % n) for _ in range(4)))
        want = viewed_body(n)[5:]
        assert all(answer == want for answer in answers), "an answer was sent after its release"
        await until(lambda: handlers.releases == 4)

    run(scenario)


async def raw_client(port: int, window: int) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """An `h2` client connection whose streams open with a window of ``window`` bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    client.initiate_connection()
    writer.write(client.data_to_send())
    return client, reader, writer


def send_call(client: Any, sid: int, path: str, message: bytes) -> None:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")]
    client.send_headers(sid, [*headers, ("content-type", "application/grpc")])
    client.send_data(sid, framed(message), end_stream=True)


async def read_until(client: Any, reader: asyncio.StreamReader, sid: int, nbytes: int) -> bytes:
    """Read until stream ``sid`` has brought ``nbytes`` of DATA; returns them."""
    body = b""
    while len(body) < nbytes:
        data = await reader.read(65536)
        assert data, "the server hung up"
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                body += event.data
    return body


@pytest.mark.parametrize(
    ("path", "n", "window"),
    [("/t.T/Viewed", 50_000, 5), ("/t.T/Viewed", 50_000, 7), ("/t.T/Big", 70_000, 3)],
    ids=["viewed, blocked after the prefix", "viewed, blocked in a part", "bytes, blocked in the prefix"],
)
def test_an_answer_waiting_as_several_pieces_is_all_sent_when_the_window_opens(
    path: str, n: int, window: int
) -> None:
    # The peer's window closes at a boundary between the pieces of an answer (a prefix, a viewed
    # answer's parts) or inside one: one WINDOW_UPDATE that opens room for everything must let every
    # piece go, not only the first (the peer has nothing left to acknowledge, so none would follow).
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        client, reader, writer = await raw_client(channel_port(server), window=window)
        send_call(client, 1, path, b"%d" % n)
        writer.write(client.data_to_send())
        want = viewed_body(n) if path == "/t.T/Viewed" else framed(bytes(i % 251 for i in range(n)))
        assert await read_until(client, reader, 1, window) == want[:window]
        await asyncio.sleep(0.05)  # the rest waits for the window
        client.increment_flow_control_window(1 << 20)
        client.increment_flow_control_window(1 << 20, stream_id=1)
        writer.write(client.data_to_send())
        rest = await read_until(client, reader, 1, len(want) - window)
        assert want[:window] + rest == want
        writer.close()

    run(scenario)


@pytest.mark.parametrize("how", ["reset", "hang up"])
def test_a_viewed_answer_that_will_not_be_sent_is_released(how: str) -> None:
    # the peer's 100-byte window holds the rest of the answer back; the peer then resets the call
    # or goes away: nothing more is sent, and the memory must not stay held
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        client, reader, writer = await raw_client(channel_port(server), window=100)
        send_call(client, 1, "/t.T/Viewed", b"50000")
        writer.write(client.data_to_send())
        assert await read_until(client, reader, 1, 100) == viewed_body(50_000)[:100]
        await asyncio.sleep(0.05)
        assert handlers.releases == 0, "released while its answer waits for the window"
        if how == "reset":
            client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            writer.write(client.data_to_send())
            await until(lambda: handlers.releases == 1)
            send_call(client, 3, "/t.T/Echo", b"still here")  # the connection serves on
            writer.write(client.data_to_send())
            assert await read_until(client, reader, 3, 15) == framed(b"still here")
        else:
            writer.close()
            await until(lambda: handlers.releases == 1)
        writer.close()

    run(scenario)


def test_stop_hangs_up_without_a_reset_when_the_peer_sent_more() -> None:
    # A socket closed with unread bytes in it makes the kernel send a reset and throw away what was
    # not sent yet (the last answers, the GOAWAY). Bytes the peer sends just before the stop must be
    # read, and the connection half-closed, so the peer sees the GOAWAY and an orderly end.
    async def main() -> None:
        handlers = Handlers()
        server = H2GrpcServer(handlers.table(), max_message_bytes=MAX, max_inflight=100)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        writer.write(client.data_to_send())
        await until(lambda: len(server.connections) == 1)
        client.receive_data(await reader.read(65536))  # the server's SETTINGS
        (conn,) = server.connections
        assert conn.transport is not None
        conn.transport.pause_reading()  # the next bytes wait, unread, in the server's socket
        client.ping(b"12345678")
        writer.write(client.data_to_send())
        await writer.drain()
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.stop(1.0))
        events = []
        while data := await reader.read(65536):  # ConnectionResetError on a reset
            events += client.receive_data(data)
        writer.close()
        await asyncio.wait_for(stopping, TIMEOUT_S)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        assert not server.connections

    uvloop.run(main())


def test_a_peer_that_sends_without_reading_is_not_buffered_for_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every PING is answered; a peer that floods PINGs and reads nothing would otherwise have the
    # answers pile up in the server's write buffer for as long as it keeps sending
    monkeypatch.setattr(grpc_h2, "WRITE_BUFFER_HIGH", 64 << 10)

    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        assert await channel.unary_unary("/t.T/Echo")(b"up", timeout=TIMEOUT_S) == b"up"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", channel_port(server)))
        _reader, writer = await asyncio.open_connection(sock=sock)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        writer.write(client.data_to_send())
        await until(lambda: len(server.connections) == 2)
        (conn,) = (c for c in server.connections if c.peer.endswith(f":{sock.getsockname()[1]}"))
        assert conn.transport is not None
        pings = b"".join(http2.frame(http2.PING, 0, 0, b"%08d" % i) for i in range(4096))  # 68 KiB
        sent = 0
        while sent < 12 << 20:
            writer.write(pings)
            sent += len(pings)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break  # the server stopped reading us
        assert conn.transport.get_write_buffer_size() < 1 << 20
        writer.close()
        # the other connection was never held up
        assert await channel.unary_unary("/t.T/Echo")(b"fine", timeout=TIMEOUT_S) == b"fine"

    run(scenario)


def test_a_peer_goaway_drops_its_calls_and_ends_the_connection() -> None:
    async def scenario(server: H2GrpcServer, handlers: Handlers, channel: grpc.aio.Channel) -> None:
        assert await channel.unary_unary("/t.T/Echo")(b"up", timeout=TIMEOUT_S) == b"up"
        reader, writer = await asyncio.open_connection("127.0.0.1", channel_port(server))
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.T/Block"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
        client.send_headers(1, headers)
        client.send_data(1, b"\0\0\0\0\0", end_stream=True)  # one empty message
        writer.write(client.data_to_send())
        await until(lambda: handlers.started == 1)
        client.close_connection()
        writer.write(client.data_to_send())
        await until(lambda: handlers.cancelled == 1)  # nobody is left to answer
        while await reader.read(65536):  # then an orderly end
            pass
        writer.close()
        await until(lambda: len(server.connections) == 1)  # only the channel's own
        handlers.release.set()
        assert await channel.unary_unary("/t.T/Echo")(b"fine", timeout=TIMEOUT_S) == b"fine"

    run(scenario)


# ---- many calls in one read ---------------------------------------------------------------------


class FakeTransport:
    """What a `grpc_h2.Connection` uses of its transport, recording writes and read pauses."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.log: list[str] = []

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data
        self.log.append("write")

    def writelines(self, pieces: list[bytes]) -> None:
        self.write(b"".join(pieces))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def on_fake_transport(handlers: Handlers) -> tuple[H2GrpcServer, grpc_h2.Connection, FakeTransport]:
    """A server of ``handlers``' table (not listening) and one connection of it on a `FakeTransport`."""
    server = H2GrpcServer(handlers.table(), max_message_bytes=MAX, max_inflight=1000)
    conn = grpc_h2.Connection(server)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return server, conn, transport


def client_calls_bytes(n: int, path: str = "/t.T/Echo") -> tuple[Any, bytes]:
    """An `h2` client and what it sends for ``n`` calls of ``path`` (call i sends ``call i``):
    preface, SETTINGS and the calls."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    for i in range(n):
        send_call(client, 1 + 2 * i, path, b"call %d" % i)
    return client, client.data_to_send()


def data_frames(data: bytes | bytearray) -> int:
    """How many DATA frames the server's bytes ``data`` hold."""
    count = pos = 0
    while pos + 9 <= len(data):
        count += data[pos + 3] == http2.DATA
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    return count


def answers(client: Any, data: bytes) -> dict[int, bytes]:
    """The DATA each stream of ``client`` got in ``data``, per stream."""
    got: dict[int, bytes] = {}
    for event in client.receive_data(bytes(data)):
        if isinstance(event, h2.events.DataReceived):
            got[event.stream_id] = got.get(event.stream_id, b"") + event.data
    return got


def test_a_read_of_many_calls_starts_them_a_turn_at_a_time_and_answers_in_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One read may hold hundreds of calls; the answers that come back while it is parsed must not
    # wait for the whole read: the connection starts CALLS_PER_TURN calls per turn of the loop.
    monkeypatch.setattr(grpc_h2, "CALLS_PER_TURN", 4)
    n = 20

    async def main() -> None:
        handlers = Handlers()
        server, conn, transport = on_fake_transport(handlers)
        started = conn.on_end

        answered_at_start: dict[int, int] = {}

        def on_end(sid: int) -> None:
            transport.log.append(f"start {sid}")
            answered_at_start[sid] = data_frames(transport.written)
            started(sid)

        monkeypatch.setattr(conn, "on_end", on_end)
        client, wire = client_calls_bytes(n)
        conn.data_received(wire)
        assert transport.log.count("start 1") == 1 and "start 9" not in transport.log  # 4 of 20
        assert not transport.reading  # nothing more is read while calls wait in this read
        for _ in range(100):
            await asyncio.sleep(0)
            if len(conn.calls) == 0 and transport.reading:
                break
        got = answers(client, transport.written)
        assert {sid: body for sid, body in got.items()} == {
            1 + 2 * i: framed(b"call %d" % i) for i in range(n)
        }
        assert transport.reading
        assert answered_at_start[1] == 0
        assert answered_at_start[2 * n - 1] >= 4  # the first turn's calls were answered by then
        await server.stop(0.1)

    uvloop.run(main())


def test_a_connection_backed_up_on_writes_reads_on_only_once_both_let_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(grpc_h2, "CALLS_PER_TURN", 2)

    async def main() -> None:
        handlers = Handlers()
        server, conn, transport = on_fake_transport(handlers)
        client, wire = client_calls_bytes(6)
        conn.data_received(wire)
        conn.pause_writing()  # the peer stopped reading our answers
        conn.resume_writing()  # ... and caught up, while this read's calls still wait
        assert not transport.reading
        conn.pause_writing()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not conn.parsing_paused
        assert not transport.reading  # every held call started, but the writes are still backed up
        conn.resume_writing()
        assert transport.reading
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(answers(client, transport.written)) == 6
        await server.stop(0.1)

    uvloop.run(main())


def test_calls_held_in_a_read_are_dropped_with_their_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_h2, "CALLS_PER_TURN", 3)

    async def main() -> None:
        handlers = Handlers()
        server, conn, _transport = on_fake_transport(handlers)
        _client, wire = client_calls_bytes(9, "/t.T/Block")
        conn.data_received(wire)
        assert conn.parsing_paused and len(conn.calls) == 3
        conn.connection_lost(None)  # the peer is gone with six calls not started yet
        for _ in range(20):
            await asyncio.sleep(0)
        assert handlers.started <= 3 and not conn.calls  # the held six never start
        await until(lambda: server.active == 0)
        await server.stop(0.1)

    uvloop.run(main())
