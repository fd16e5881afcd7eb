"""`servers.zmtp.ServerConnection`, our sans-IO ZMTP 3.x server side of a ROUTER: against real libzmq
peers through pyzmq (DEALER, REQ and ROUTER clients, multipart messages short and long, heartbeats,
an incompatible socket type), against hand-built bytes for the greeting, the READY handshake,
commands, the limits and each protocol error, fed whole, a byte at a time and in random chunks, and
a small seeded fuzz. The front-end on top of it: test_zmq_server.py.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import pytest
import zmq

from servers import zmtp
from servers.gateway_api import Buffer

#: a ZMTP 3.1 client's greeting: signature, version 3.1, NULL, as-server 0, filler
CLIENT_GREETING = zmtp.SIGNATURE + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32
DEALER_READY = zmtp.ready([(b"Socket-Type", b"DEALER")])
REQ_READY = zmtp.ready([(b"Socket-Type", b"REQ")])
#: limits for the in-memory tests (small, so that the boundaries are cheap to reach)
LIMITS = {"max_frame_bytes": 1 << 16, "max_message_bytes": 1 << 17, "max_frames": 8}
#: limits for the libzmq interop tests (a 1 MiB frame must pass)
WIDE_LIMITS = {"max_frame_bytes": 4 << 20, "max_message_bytes": 8 << 20, "max_frames": 64}
_LONG_HEAD = struct.Struct(">BQ")
#: how long a libzmq client waits for a reply before the test fails (instead of hanging)
WAIT_S = 5.0


def greeting(major: int = 3, minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return zmtp.SIGNATURE + bytes((major, minor)) + mechanism.ljust(20, b"\0") + b"\0" * 32


def message(*frames: bytes) -> bytes:
    """A message's frames on the wire (short or long form by size)."""
    last = len(frames) - 1
    return b"".join(zmtp.frame_head(len(f), i < last) + f for i, f in enumerate(frames))


def long_frame(body: bytes, flags: int = 0) -> bytes:
    """A frame in long form whatever its size (legal for any size)."""
    return _LONG_HEAD.pack(flags | zmtp.LONG, len(body)) + body


def error_body(reason: bytes) -> bytes:
    return bytes((len(reason),)) + reason


class Frame(NamedTuple):
    flags: int
    body: bytes

    @property
    def command(self) -> tuple[bytes, bytes]:
        """(name, data) of a command frame."""
        assert self.flags & zmtp.COMMAND
        size = self.body[0]
        return self.body[1 : 1 + size], self.body[1 + size :]


def joined(out: Sequence[Buffer]) -> bytes:
    """What a transport would write for ``out`` (numpy's stubs do not declare the buffer protocol)."""
    return b"".join(bytes(memoryview(cast(Any, part)).cast("B")) for part in out)


def parse_frames(data: bytes) -> list[Frame]:
    """The frames in ``data`` (whole frames only: a torn one fails the test)."""
    frames = []
    pos = 0
    while pos < len(data):
        flags = data[pos]
        assert not flags & 0xF8, f"reserved flags in our output: {flags:#04x}"
        if flags & zmtp.LONG:
            size = int.from_bytes(data[pos + 1 : pos + 9], "big")
            assert size >= 256, "a long frame where a short one fits"
            pos += 9
        else:
            size = data[pos + 1]
            pos += 2
        assert pos + size <= len(data), "output ends inside a frame"
        frames.append(Frame(flags, data[pos : pos + size]))
        pos += size
    return frames


def parse_output(data: bytes) -> list[Frame]:
    """The server's whole output: our greeting, then frames."""
    assert data[: zmtp.GREETING_SIZE] == zmtp.GREETING
    return parse_frames(data[zmtp.GREETING_SIZE :])


def messages_of(frames: list[Frame]) -> list[list[bytes]]:
    """The message frames grouped into messages (commands left out)."""
    messages: list[list[bytes]] = []
    current: list[bytes] = []
    for frame in frames:
        if frame.flags & zmtp.COMMAND:
            continue
        current.append(frame.body)
        if not frame.flags & zmtp.MORE:
            messages.append(current)
            current = []
    assert not current, "output ends inside a message"
    return messages


def commands_of(frames: list[Frame]) -> list[tuple[bytes, bytes]]:
    return [frame.command for frame in frames if frame.flags & zmtp.COMMAND]


class Recorder(zmtp.ServerConnection):
    """A server connection that records what it delivers: a copy made at delivery and the views
    themselves (which must still hold the same bytes later)."""

    def __init__(self, **limits: int) -> None:
        super().__init__(**{**LIMITS, **limits})
        self.readies = 0
        self.messages: list[tuple[list[bytes], int]] = []
        self.views: list[list[memoryview]] = []

    def on_ready(self) -> None:
        self.readies += 1

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self.messages.append(([bytes(f) for f in frames], nbytes))
        self.views.append(frames)

    def delivered(self) -> list[list[bytes]]:
        return [frames for frames, _ in self.messages]

    def views_now(self) -> list[list[bytes]]:
        return [[bytes(v) for v in frames] for frames in self.views]


def opened(ready: bytes = DEALER_READY, hello: bytes = CLIENT_GREETING, **limits: int) -> Recorder:
    """A server past the client's greeting and READY, its own output drained."""
    conn = Recorder(**limits)
    conn.receive(hello + ready)
    assert conn.ready
    conn.data_to_send()
    return conn


def protocol_error(conn: Recorder, data: bytes, match: str) -> bytes:
    """Feed ``data``, which must end the connection with a `ZmtpError` matching ``match``; what the
    server queued (with the ERROR it sends, if any)."""
    with pytest.raises(zmtp.ZmtpError, match=match):
        conn.receive(data)
    return joined(conn.data_to_send())


# ---- a real libzmq peer ------------------------------------------------------------------------------


class EchoConnection(zmtp.ServerConnection):
    """Sends every message back as it came, from the delivered views themselves."""

    def __init__(self, **limits: int) -> None:
        super().__init__(**limits)
        self.messages: list[tuple[list[bytes], int]] = []

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self.messages.append(([bytes(f) for f in frames], nbytes))
        self.send_message(frames)


class EchoServer:
    """A TCP server on 127.0.0.1, one thread per connection, each an `EchoConnection` whose output is
    written after every ``receive`` (and recorded). ``hold_ready``: our READY waits for the peer's
    (or for an error), the greeting going out alone first."""

    def __init__(self, *, hold_ready: bool = False, **limits: int) -> None:
        self.limits = limits
        self.hold_ready = hold_ready
        self.connections: list[EchoConnection] = []
        self.written: list[bytearray] = []
        self.errors: list[zmtp.ZmtpError] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: connections whose thread is done (their output all written)
        self.finished = 0
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        try:
            self._acceptor.start()
        except BaseException:
            self._listener.close()
            raise

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            conn = EchoConnection(**self.limits)
            written = bytearray()
            thread = threading.Thread(target=self._serve, args=(sock, conn, written), daemon=True)
            with self._lock:
                self._socks.append(sock)
                self._threads.append(thread)
                self.connections.append(conn)
                self.written.append(written)
            thread.start()

    def _serve(self, sock: socket.socket, conn: EchoConnection, written: bytearray) -> None:
        held = b""

        def flush(release: bool = True) -> None:
            nonlocal held
            out = joined(conn.data_to_send())
            if self.hold_ready and not written:
                out, held = out[: zmtp.GREETING_SIZE], out[zmtp.GREETING_SIZE :]
            elif held and (release or conn.ready):
                out, held = held + out, b""
            written.extend(out)
            sock.sendall(out)

        try:
            flush()  # greeting and READY
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                try:
                    conn.receive(data)
                except zmtp.ZmtpError as exc:
                    with self._lock:
                        self.errors.append(exc)
                    flush()  # the ERROR command, if any
                    return
                flush(release=False)
        except OSError:
            pass  # the peer went away, or close() shut the socket down
        finally:
            sock.close()
            with self._lock:
                self.finished += 1

    def wait_for(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=WAIT_S)  # before the listener closes: no accept() on a closed fd
        self._listener.close()
        assert not self._acceptor.is_alive(), "the accept thread did not stop"
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks recv and sendall
        for thread in threads:
            thread.join(timeout=WAIT_S)
        assert not any(t.is_alive() for t in threads), "a server thread did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[..., EchoServer]]:
    """``serve(**limits)`` starts an `EchoServer`, stopped at teardown."""
    servers: list[EchoServer] = []

    def start(*, hold_ready: bool = False, **limits: int) -> EchoServer:
        server = EchoServer(hold_ready=hold_ready, **{**WIDE_LIMITS, **limits})
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def server(serve: Callable[..., EchoServer]) -> EchoServer:
    return serve()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)  # closes every socket made from it


def client(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str, **options: int | bytes
) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize(
    "frames",
    [
        [b"hello"],
        [b""],
        [b"", b"", b""],
        [b"head", b"", b"tail"],
        [b"x" * 255],
        [b"y" * 256],
        [b"a" * 255, b"b" * 256, b"c" * 257, b""],
        [bytes(range(256)) * 4096],  # 1 MiB
        [b"h", bytes(1 << 20), b"t"],
    ],
    ids=["one", "empty", "empties", "empty-inside", "255", "256", "boundaries", "1MiB", "1MiB-inside"],
)
def test_dealer_round_trip(
    server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]], frames: list[bytes]
) -> None:
    dealer = client(ctx, zmq.DEALER, server.endpoint)
    dealer.send_multipart(frames)
    assert dealer.recv_multipart() == frames
    (conn,) = server.connections
    assert conn.peer_type == b"DEALER" and conn.peer_minor == 1 and not conn.envelope
    assert conn.messages == [(frames, sum(map(len, frames)))]
    assert not server.errors


def test_dealer_pipelined_messages(server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Many messages sent before any reply is read: they arrive in TCP segments that cut frames
    anywhere, and come back whole and in order."""
    dealer = client(ctx, zmq.DEALER, server.endpoint)
    sent = [[b"%d" % i, bytes([i % 256]) * (i % 700), b""][: 1 + i % 3] for i in range(500)]
    for frames in sent:
        dealer.send_multipart(frames)
    assert [dealer.recv_multipart() for _ in sent] == sent
    assert len(server.connections) == 1 and not server.errors


def test_dealer_routing_id_is_the_peer_identity(
    server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    dealer = client(ctx, zmq.DEALER, server.endpoint, ROUTING_ID=b"worker-7")
    dealer.send(b"x")
    assert dealer.recv() == b"x"
    assert server.connections[0].peer_identity == b"worker-7"


def test_req_delimiter_is_stripped_and_put_back(
    server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    req = client(ctx, zmq.REQ, server.endpoint)
    for frames in ([b"ask"], [b"a", b"", b"c" * 300]):
        req.send_multipart(frames)
        assert req.recv_multipart() == frames  # REQ accepts only a reply after the delimiter
    (conn,) = server.connections
    assert conn.peer_type == b"REQ" and conn.envelope
    assert [frames for frames, _ in conn.messages] == [[b"ask"], [b"a", b"", b"c" * 300]]


def test_router_client(server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """A ROUTER that connects names our side with CONNECT_ROUTING_ID and sends to it once the
    handshake is done (ROUTER_MANDATORY: EHOSTUNREACH until then); our replies come back prefixed with
    that name."""
    router = client(ctx, zmq.ROUTER, server.endpoint, ROUTING_ID=b"me", CONNECT_ROUTING_ID=b"srv")
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            router.send_multipart([b"srv", b"one", b"two"])
            break
        except zmq.ZMQError as exc:
            assert exc.errno == zmq.EHOSTUNREACH and time.monotonic() < deadline
            time.sleep(0.005)
    assert router.recv_multipart() == [b"srv", b"one", b"two"]
    (conn,) = server.connections
    assert conn.peer_type == b"ROUTER" and conn.peer_identity == b"me" and not conn.envelope


INCOMPATIBLE = pytest.mark.parametrize(
    "kind", [zmq.PUSH, zmq.PUB, zmq.PAIR, zmq.REP], ids=["PUSH", "PUB", "PAIR", "REP"]
)


@INCOMPATIBLE
def test_incompatible_socket_type_is_refused(
    serve: Callable[..., EchoServer], ctx: zmq.Context[zmq.Socket[bytes]], kind: int
) -> None:
    """libzmq lets a ROUTER talk to DEALER, REQ and ROUTER only; we refuse the others with an ERROR
    command. (libzmq checks our type too: with our READY held back until its own is out, it is we who
    see the mismatch first.)"""
    server = serve(hold_ready=True)
    peer = client(ctx, kind, server.endpoint, RECONNECT_IVL=60_000)  # referenced: not collected
    server.wait_for(lambda: server.finished == 1)
    assert len(server.errors) == 1 and "socket type" in str(server.errors[0])
    written = parse_output(bytes(server.written[0]))
    assert commands_of(written)[-1] == (b"ERROR", error_body(b"invalid socket type"))
    assert not server.connections[0].ready and not server.connections[0].messages
    peer.close()


@INCOMPATIBLE
def test_incompatible_libzmq_peer_hangs_up(
    server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]], kind: int
) -> None:
    """With our greeting and READY in one write (as `servers.zmq_server` sends them), libzmq sees our
    ROUTER and hangs up, in practice before its own READY goes out (so we see no socket type, only
    the end): either way the connection ends, never ready."""
    peer = client(ctx, kind, server.endpoint, RECONNECT_IVL=60_000)
    server.wait_for(lambda: server.finished == 1)
    assert not server.connections[0].ready and not server.connections[0].messages
    peer.close()


def test_heartbeats_are_answered_and_the_connection_stays(
    server: EchoServer, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """libzmq PINGs an idle connection every HEARTBEAT_IVL and drops it when nothing comes back within
    HEARTBEAT_TIMEOUT: our PONGs keep it up (a DEALER would reconnect by itself, hence the count of
    connections)."""
    dealer = client(ctx, zmq.DEALER, server.endpoint, HEARTBEAT_IVL=50, HEARTBEAT_TIMEOUT=200)
    dealer.send(b"before")
    assert dealer.recv() == b"before"
    time.sleep(0.6)
    dealer.send_multipart([b"after", b"x" * 300])
    assert dealer.recv_multipart() == [b"after", b"x" * 300]
    assert len(server.connections) == 1 and not server.errors
    pongs = [c for c in commands_of(parse_output(bytes(server.written[0]))) if c[0] == b"PONG"]
    assert len(pongs) >= 3
    assert all(data == b"" for _, data in pongs)  # libzmq's PINGs carry no context


# ---- the handshake, in memory --------------------------------------------------------------------------


def test_output_starts_with_our_greeting_and_ready() -> None:
    conn = Recorder()
    assert conn.has_output() and not conn.ready
    out = joined(conn.data_to_send())
    assert not conn.has_output()
    hello = out[: zmtp.GREETING_SIZE]
    assert len(hello) == 64
    assert hello[0] == 0xFF and hello[9] == 0x7F
    assert hello[10:12] == b"\x03\x01"
    assert hello[12:32] == b"NULL".ljust(20, b"\0")
    assert hello[32] == 0  # as-server: NULL has no roles
    assert hello[33:] == bytes(31)
    (ready,) = parse_frames(out[zmtp.GREETING_SIZE :])
    name, data = ready.command
    assert name == b"READY"
    assert zmtp.parse_metadata(data) == {b"socket-type": b"ROUTER"}


def test_handshake_sets_peer_properties() -> None:
    conn = Recorder()
    conn.receive(CLIENT_GREETING)
    assert conn.peer_minor == 1 and not conn.ready and conn.readies == 0
    conn.receive(zmtp.ready([(b"socket-type", b"REQ"), (b"IDENTITY", b"abc"), (b"X-Other", b"1")]))
    assert conn.ready and conn.readies == 1
    assert conn.peer_type == b"REQ" and conn.peer_identity == b"abc" and conn.envelope
    assert conn.messages == []


def test_greeting_ready_and_messages_in_one_chunk() -> None:
    conn = Recorder()
    conn.receive(CLIENT_GREETING + DEALER_READY + message(b"a", b"bc") + message(b"") + message(b"z" * 300))
    assert conn.readies == 1
    assert conn.messages == [([b"a", b"bc"], 3), ([b""], 0), ([b"z" * 300], 300)]


def test_zmtp_30_peer_gets_no_pong() -> None:
    """PING/PONG came with ZMTP 3.1 (RFC 37): a 3.0 peer never asked for them."""
    conn = opened(hello=greeting(minor=0))
    assert conn.peer_minor == 0
    conn.receive(zmtp.command(b"PING", b"\x00\x64ctx") + message(b"m"))
    assert not conn.has_output()
    assert conn.delivered() == [[b"m"]]


def test_later_major_version_is_spoken_as_31() -> None:
    """RFC 23: a peer must accept higher versions; we answer as 3.1."""
    conn = opened(hello=greeting(major=4, minor=0))
    assert conn.peer_minor == 1
    conn.receive(zmtp.command(b"PING", b"\x00\x00"))
    assert commands_of(parse_frames(joined(conn.data_to_send()))) == [(b"PONG", b"")]


@pytest.mark.parametrize(
    ("context", "echoed"),
    [
        (b"", b""),
        (b"ctx", b"ctx"),
        (bytes(range(16)), bytes(range(16))),
        (bytes(range(20)), bytes(range(16))),
    ],
    ids=["none", "short", "16", "over-16"],
)
def test_ping_is_answered_with_its_context(context: bytes, echoed: bytes) -> None:
    conn = opened()
    conn.receive(zmtp.command(b"PING", b"\x00\x0a" + context))
    assert commands_of(parse_frames(joined(conn.data_to_send()))) == [(b"PONG", echoed)]


def test_ping_in_long_form_between_messages() -> None:
    conn = opened()
    ping = long_frame(b"\x04PING\x00\x01c", zmtp.COMMAND)
    conn.receive(message(b"1") + ping + message(b"2"))
    assert conn.delivered() == [[b"1"], [b"2"]]
    assert commands_of(parse_frames(joined(conn.data_to_send()))) == [(b"PONG", b"c")]


@pytest.mark.parametrize("name", [b"SUBSCRIBE", b"CANCEL", b"PONG", b"X-UNKNOWN", b""])
def test_other_commands_are_ignored(name: bytes) -> None:
    conn = opened()
    conn.receive(zmtp.command(name, b"whatever") + message(b"still", b"here"))
    assert conn.delivered() == [[b"still", b"here"]]
    assert not conn.has_output()


def test_command_of_max_command_bytes_is_accepted() -> None:
    conn = opened()
    body = b"x" * (zmtp.MAX_COMMAND_BYTES - 1 - len(b"X-BIG"))
    conn.receive(zmtp.command(b"X-BIG", body) + message(b"m"))
    assert conn.delivered() == [[b"m"]]


def test_long_form_frames_of_any_size() -> None:
    conn = opened()
    conn.receive(long_frame(b"a", zmtp.MORE) + long_frame(b"") + long_frame(b"b" * 300))
    assert conn.messages == [([b"a", b""], 1), ([b"b" * 300], 300)]


# ---- chunking and buffer lifetime ----------------------------------------------------------------------


def conversation(big: int = 200) -> bytes:
    """A client's bytes: greeting, READY, messages of all frame shapes (the last ``big`` * 256 bytes),
    a PING and a SUBSCRIBE."""
    return (
        CLIENT_GREETING
        + zmtp.ready([(b"Socket-Type", b"DEALER"), (b"Identity", b"me")])
        + message(b"first")
        + message(b"", b"a" * 255, b"b" * 256, b"")
        + zmtp.command(b"PING", b"\x00\x05ping")
        + long_frame(b"long-form-short", zmtp.MORE)
        + message(b"c" * 1000)
        + zmtp.command(b"SUBSCRIBE", b"topic")
        + message(*[b"%d" % i for i in range(8)])
        + message(bytes(range(256)) * big)
    )


def feed(chunks: Sequence[bytes]) -> tuple[list[tuple[list[bytes], int]], bytes, Recorder]:
    conn = Recorder()
    for chunk in chunks:
        conn.receive(chunk)
    return conn.messages, joined(conn.data_to_send()), conn


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 8, 9, 10, 63, 64, 65, rng.randint(1, 5000)))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def test_whole_conversation() -> None:
    messages, out, conn = feed([conversation()])
    assert conn.readies == 1 and conn.peer_identity == b"me"
    assert [frames for frames, _ in messages] == [
        [b"first"],
        [b"", b"a" * 255, b"b" * 256, b""],
        [b"long-form-short", b"c" * 1000],
        [b"%d" % i for i in range(8)],
        [bytes(range(256)) * 200],
    ]
    assert [n for _, n in messages] == [sum(map(len, frames)) for frames, _ in messages]
    (ready, pong) = commands_of(parse_output(out))
    assert ready[0] == b"READY" and zmtp.parse_metadata(ready[1]) == {b"socket-type": b"ROUTER"}
    assert pong == (b"PONG", b"ping")


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    data = conversation()
    messages, out, conn = feed([data[i : i + 1] for i in range(len(data))])
    assert (messages, out) == feed([data])[:2]
    assert conn.views_now() == conn.delivered()


def test_random_chunks_are_the_same_as_all_at_once(seed: int) -> None:
    rng = random.Random(seed)
    data = conversation()
    whole = feed([data])[:2]
    for _ in range(30):
        messages, out, conn = feed(random_chunks(data, rng))
        assert (messages, out) == whole
        # the views delivered earlier still hold their bytes after every later receive()
        assert conn.views_now() == conn.delivered()


def test_views_stay_valid_across_receives() -> None:
    """A frame that completes a buffered partial frame is a view of the connection's own buffer;
    later bytes must go to a fresh buffer, not overwrite (or resize) the one viewed."""
    conn = opened()
    first = message(b"A" * 300, b"B" * 10)
    second = message(b"C" * 40)
    data = first + second + message(b"D" * 5)
    # a frame torn over three receives, then a message's first frame ending a chunk, then the rest
    cuts = [5, 100, len(first) - 12, len(first) - 5, len(first) + 3, len(data)]
    pos = 0
    for cut in cuts:
        conn.receive(data[pos:cut])
        pos = cut
        assert conn.views_now() == conn.delivered()
    assert conn.views_now() == [[b"A" * 300, b"B" * 10], [b"C" * 40], [b"D" * 5]]


def test_partial_message_views_survive_more_receives() -> None:
    conn = opened()
    conn.receive(message(b"x" * 20, b"y" * 20)[:-5])  # frame 1 done, frame 2 torn
    conn.receive(b"y" * 2)
    conn.receive(b"y" * 3 + message(b"next"))
    conn.receive(b"")
    assert conn.views_now() == [[b"x" * 20, b"y" * 20], [b"next"]]


# ---- protocol errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00", "signature"),
        (b"GET / HTTP/1.1\r\n", "signature"),
        (zmtp.SIGNATURE[:9] + b"\x00", "signature"),
        (zmtp.SIGNATURE + b"\x02", "version 2"),
        (zmtp.SIGNATURE + b"\x01\x00", "version 1"),
    ],
    ids=["byte0", "http", "byte9", "v2", "v1"],
)
def test_bad_greeting_fails_as_soon_as_seen(data: bytes, match: str) -> None:
    """Decided from the bytes so far: no waiting for a whole greeting that an old peer never sends."""
    conn = Recorder()
    conn.data_to_send()
    assert protocol_error(conn, data, match) == b""


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"CURVE", b"GSSAPI", b"NUL", b"NULL\x00x"])
def test_other_security_mechanisms_are_refused(mechanism: bytes) -> None:
    conn = Recorder()
    conn.data_to_send()
    out = protocol_error(conn, greeting(mechanism=mechanism), "mechanism")
    assert commands_of(parse_frames(out)) == [(b"ERROR", error_body(b"security mechanism not supported"))]


def after_greeting() -> Recorder:
    conn = Recorder()
    conn.receive(CLIENT_GREETING)
    conn.data_to_send()
    return conn


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (message(b"hi"), "before the handshake"),
        (zmtp.command(b"PING", b"\x00\x01"), "expected READY"),
        (zmtp.command(b"ERROR", error_body(b"go away")), "peer error: go away"),
        (zmtp.command(b"ERROR"), "peer error"),
        (zmtp.command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x06DEA"), "malformed metadata"),
        (zmtp.command(b"READY", b"\x0bSocket-Type\x00\x00"), "malformed metadata"),
        (zmtp.command(b"READY", b"\x20Socket-Type"), "malformed metadata"),
        (zmtp.command(b"READY", b"\x00\x00\x00\x00\x00"), "malformed metadata"),
        (bytes((zmtp.COMMAND, 0)), "malformed command"),
        (bytes((zmtp.COMMAND, 3, 5)) + b"AB", "malformed command"),
        (bytes((zmtp.COMMAND | zmtp.MORE,)) + DEALER_READY[1:], "MORE"),
        (bytes((zmtp.COMMAND | 0x10,)) + DEALER_READY[1:], "reserved"),
        (_LONG_HEAD.pack(zmtp.COMMAND | zmtp.LONG, 1 << 40), "over the limit"),
        (_LONG_HEAD.pack(zmtp.LONG, 1 << 40), "over the limit"),
    ],
    ids=[
        "message",
        "ping",
        "error",
        "error-no-reason",
        "truncated-value",
        "truncated-size",
        "name-beyond-body",
        "empty-name",
        "empty-command",
        "name-beyond-command",
        "command-more",
        "reserved",
        "huge-command",
        "huge-message-frame",
    ],
)
def test_bad_handshake(data: bytes, match: str) -> None:
    conn = after_greeting()
    assert protocol_error(conn, data, match) == b""
    assert not conn.ready and conn.readies == 0


@pytest.mark.parametrize(
    "props",
    [[(b"Socket-Type", peer)] for peer in (b"PUB", b"SUB", b"PUSH", b"PULL", b"PAIR", b"REP", b"dealer", b"")]
    + [[(b"Identity", b"x")], []],
    ids=["PUB", "SUB", "PUSH", "PULL", "PAIR", "REP", "lower-case", "empty", "missing", "no-properties"],
)
def test_incompatible_socket_type_gets_an_error_command(props: list[tuple[bytes, bytes]]) -> None:
    """Socket types are case-sensitive (libzmq compares them exactly), unlike property names; none at
    all is no better."""
    conn = after_greeting()
    out = protocol_error(conn, zmtp.ready(props), "socket type")
    assert commands_of(parse_frames(out)) == [(b"ERROR", error_body(b"invalid socket type"))]
    assert not conn.ready


def test_huge_frame_header_fails_before_its_body() -> None:
    """Only the 9-byte header of a 1 TiB frame: refused there, nothing waits for (or buffers) the body."""
    conn = opened()
    protocol_error(conn, _LONG_HEAD.pack(zmtp.LONG | zmtp.MORE, 1 << 40), "over max_frame_bytes")


def test_huge_frame_header_torn_fails_when_whole() -> None:
    conn = opened()
    head = _LONG_HEAD.pack(zmtp.LONG, 1 << 40)
    conn.receive(head[:5])
    protocol_error(conn, head[5:], "over max_frame_bytes")


def test_frame_at_the_limit_and_one_over() -> None:
    limit = LIMITS["max_frame_bytes"]
    conn = opened()
    conn.receive(message(b"x" * limit))
    assert conn.messages == [([b"x" * limit], limit)]
    protocol_error(conn, message(b"x" * (limit + 1))[:9], "over max_frame_bytes")


def test_short_frame_over_a_small_limit() -> None:
    conn = opened(max_frame_bytes=10, max_message_bytes=100)
    conn.receive(message(b"x" * 10))
    protocol_error(conn, bytes((0, 11)), "over max_frame_bytes")


def test_command_over_max_command_bytes_from_its_header() -> None:
    conn = opened()
    head = _LONG_HEAD.pack(zmtp.COMMAND | zmtp.LONG, zmtp.MAX_COMMAND_BYTES + 1)
    protocol_error(conn, head, "over the limit")


def test_max_frames_and_one_more() -> None:
    n = LIMITS["max_frames"]
    conn = opened()
    conn.receive(message(*[b"f"] * n))
    assert conn.delivered() == [[b"f"] * n]
    protocol_error(conn, message(*[b"f"] * (n + 1)), f"more than {n} frames")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (DEALER_READY, "READY after the handshake"),
        (zmtp.command(b"ERROR", error_body(b"bye")), "peer error: bye"),
        (bytes((zmtp.COMMAND, 0)), "malformed command"),
        (bytes((zmtp.COMMAND, 2, 9, 0)), "malformed command"),
        (bytes((zmtp.COMMAND | zmtp.MORE, 5)) + b"\x04PING", "MORE"),
        (message(b"partial", b"msg")[:9] + zmtp.command(b"ERROR"), "peer error"),
    ],
    ids=["ready-again", "error", "empty-command", "name-beyond-command", "command-more", "mid-message"],
)
def test_bad_traffic(data: bytes, match: str) -> None:
    conn = opened()
    conn.receive(message(b"ok"))
    assert protocol_error(conn, data + message(b"never"), match) == b""
    assert conn.delivered() == [[b"ok"]]


@pytest.mark.parametrize("bit", [0x08, 0x10, 0x20, 0x40, 0x80])
@pytest.mark.parametrize("base", [0, zmtp.MORE, zmtp.LONG, zmtp.COMMAND])
def test_reserved_flag_bits(bit: int, base: int) -> None:
    conn = opened()
    protocol_error(conn, bytes((base | bit, 0)) + bytes(16), "reserved")


def test_req_message_without_its_delimiter() -> None:
    conn = opened(REQ_READY)
    conn.receive(message(b"", b"fine"))
    assert conn.delivered() == [[b"fine"]]
    protocol_error(conn, message(b"no", b"delimiter"), "delimiter")


def test_req_message_of_the_delimiter_alone() -> None:
    conn = opened(REQ_READY)
    protocol_error(conn, message(b""), "no frame after the delimiter")


def test_req_delimiter_counts_as_a_frame() -> None:
    n = LIMITS["max_frames"]
    conn = opened(REQ_READY)
    conn.receive(message(b"", *[b"f"] * (n - 1)))
    assert conn.delivered() == [[b"f"] * (n - 1)]
    protocol_error(conn, message(b"", *[b"f"] * n), "frames")


# ---- oversize messages -----------------------------------------------------------------------------------


def test_oversize_message_keeps_its_first_frame_and_true_size() -> None:
    conn = opened(max_frame_bytes=100, max_message_bytes=150)
    conn.receive(message(b"h" * 100, b"b" * 100, b"", b"t" * 7) + message(b"next", b"one"))
    assert conn.messages == [([b"h" * 100], 207), ([b"next", b"one"], 7)]
    assert conn.views_now() == conn.delivered()


def test_oversize_single_frame_is_delivered_whole() -> None:
    """A first frame over max_message_bytes (but within max_frame_bytes) is kept: the caller needs
    something to answer with."""
    conn = opened(max_frame_bytes=100, max_message_bytes=50)
    conn.receive(message(b"x" * 80) + message(b"y"))
    assert conn.messages == [([b"x" * 80], 80), ([b"y"], 1)]


def test_oversize_torn_across_receives() -> None:
    conn = opened(max_frame_bytes=100, max_message_bytes=150)
    data = message(b"h" * 100, b"b" * 100, b"c" * 100) + message(b"ok")
    for i in range(0, len(data), 7):
        conn.receive(data[i : i + 7])
    assert conn.messages == [([b"h" * 100], 300), ([b"ok"], 2)]


def test_oversize_message_keeps_only_its_first_frame_when_the_limit_falls_later() -> None:
    conn = opened(max_frame_bytes=100, max_message_bytes=150)
    conn.receive(message(b"a" * 60, b"b" * 60, b"c" * 60))
    assert conn.messages == [([b"a" * 60], 180)]


def test_oversize_req_message_is_delivered_truncated() -> None:
    conn = opened(REQ_READY, max_frame_bytes=100, max_message_bytes=50)
    conn.receive(message(b"", b"x" * 80) + message(b"", b"y"))
    assert conn.messages == [([b"x" * 80], 80), ([b"y"], 1)]


def test_oversize_message_still_limited_to_max_frames() -> None:
    n = LIMITS["max_frames"]
    conn = opened(max_frame_bytes=100, max_message_bytes=50)
    with pytest.raises(zmtp.ZmtpError, match="frames"):
        conn.receive(message(b"x" * 60, *[b""] * (n + 100)))


# ---- output ---------------------------------------------------------------------------------------------


def test_send_message_frames_short_and_long() -> None:
    conn = opened()
    frames: list[Buffer] = [b"", b"a" * 255, bytearray(b"b" * 256), memoryview(b"c" * 70000)]
    conn.send_message(frames)
    conn.send_message([b"solo"])
    out = parse_frames(joined(conn.data_to_send()))
    assert [f.flags for f in out] == [
        zmtp.MORE,
        zmtp.MORE,
        zmtp.MORE | zmtp.LONG,
        zmtp.LONG,
        0,
    ]
    assert messages_of(out) == [[b"", b"a" * 255, b"b" * 256, b"c" * 70000], [b"solo"]]


def test_send_message_references_without_copying() -> None:
    """The frames are queued as given (a view of a result stays a view until written)."""
    conn = opened()
    payload = memoryview(bytearray(b"p" * 1000))
    conn.send_message([b"head", payload])
    out = conn.data_to_send()
    assert any(part is payload for part in out)


def test_send_message_to_req_puts_the_delimiter_back() -> None:
    conn = opened(REQ_READY)
    conn.send_message([b"reply", b"x" * 300])
    out = parse_frames(joined(conn.data_to_send()))
    assert out[0] == Frame(zmtp.MORE, b"")
    assert messages_of(out) == [[b"", b"reply", b"x" * 300]]


def test_send_message_of_a_memoryview_with_wide_items() -> None:
    conn = opened()
    conn.send_message([np.arange(100, dtype=np.float64).data])  # a memoryview of format "d"
    (frame,) = parse_frames(joined(conn.data_to_send()))
    assert frame.body == np.arange(100, dtype=np.float64).tobytes()


def test_send_message_of_an_ndarray() -> None:
    conn = opened()
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    conn.send_message([array])
    (frame,) = parse_frames(joined(conn.data_to_send()))
    assert frame.body == array.tobytes()


def test_send_message_needs_a_frame() -> None:
    # a REQ peer would otherwise get a lone delimiter with MORE set and nothing after it
    conn = opened(REQ_READY)
    with pytest.raises(ValueError, match="at least one frame"):
        conn.send_message([])
    assert conn.data_to_send() == []


def test_command_and_metadata_helpers() -> None:
    assert zmtp.command(b"PING", b"\x00\x01") == b"\x04\x07\x04PING\x00\x01"
    big = zmtp.command(b"X", b"y" * 300)
    assert big[0] == zmtp.COMMAND | zmtp.LONG and int.from_bytes(big[1:9], "big") == 302
    assert parse_frames(big)[0].command == (b"X", b"y" * 300)
    props = [(b"Socket-Type", b"DEALER"), (b"Identity", b""), (b"X-Big", b"v" * 300)]
    name, body = parse_frames(zmtp.ready(props))[0].command
    assert name == b"READY"
    assert zmtp.parse_metadata(body) == {b"socket-type": b"DEALER", b"identity": b"", b"x-big": b"v" * 300}
    assert zmtp.parse_metadata(b"") == {}
    assert zmtp.frame_head(255, True) == b"\x01\xff"
    assert zmtp.frame_head(256, False) == _LONG_HEAD.pack(zmtp.LONG, 256)


# ---- fuzz ---------------------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # bytes overwritten anywhere past the greeting's signature
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(10, len(mutated))] = rng.randrange(256)
    elif kind == 2:  # truncated
        del mutated[rng.randrange(len(mutated)) :]
    elif kind == 3:  # random bytes inserted
        at = rng.randrange(len(mutated))
        mutated[at:at] = rng.randbytes(rng.randint(1, 32))
    else:  # a slice deleted
        at = rng.randrange(len(mutated))
        del mutated[at : at + rng.randint(1, 40)]
    return bytes(mutated)


@pytest.mark.timeout(30)
def test_fuzz_only_protocol_errors(seed: int) -> None:
    """Mutated client bytes in random chunks: receive() takes them or raises ZmtpError, never any
    other exception, and whatever it delivers stays within the limits."""
    rng = random.Random(seed)
    data = conversation(big=4)
    errors = 0
    for _ in range(300):
        # sometimes tight limits, so that the mutations also reach max_frames and oversize messages
        limits = {
            "max_frame_bytes": rng.choice((1100, 2000)),
            "max_message_bytes": rng.choice((500, 3000)),
            "max_frames": rng.choice((4, 10)),
        }
        conn = Recorder(**limits)
        out = joined(conn.data_to_send())
        try:
            for chunk in random_chunks(mutate(data, rng), rng):
                conn.receive(chunk)
        except zmtp.ZmtpError:
            errors += 1
        out += joined(conn.data_to_send())
        parse_output(out)  # whole frames only
        for frames, nbytes in conn.messages:
            assert 1 <= len(frames) <= limits["max_frames"]
            assert all(len(f) <= limits["max_frame_bytes"] for f in frames)
            assert nbytes >= sum(map(len, frames))
            assert sum(map(len, frames)) <= limits["max_message_bytes"] or len(frames) == 1
        assert conn.views_now() == conn.delivered()
    assert errors  # the fuzz reached the error paths at all
