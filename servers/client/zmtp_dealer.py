"""A ZMQ DEALER spoken by hand on asyncio: ZMTP 3.1 through `servers.zmtp`, no libzmq.

Used by `servers.client.zmq_async_client` and by the load generator (`bench.load_targets`). pyzmq's
DEALER cost a client ~30 µs of CPU per request at 64 in flight (a ``send`` per frame, ``recv_multipart``,
the ``ZMQ_FD`` edge dance, and libzmq's I/O thread, which adds a thread hand-off each way). This one
queues each message's frames and writes every message of one loop iteration in one ``write``, and
parses replies where the bytes arrive, as the engine's ZMQ front-end does.

It is the peer side of the same sans-IO connection the front-end uses (`servers.zmtp`, with
``socket_type`` DEALER, talking only to a ROUTER): the 64-byte greeting, NULL security, READY, short
and long frames, PING answered. Over TCP only; reconnecting is the caller's (one connection per
`DealerConnection`).

Flow control, in place of libzmq's high-water mark: `can_send` is false while the bytes queued and
not yet taken by the kernel reach `HIGH_WATER_BYTES`; ``on_writable`` is called once there is room
again after a refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

from servers.gateway_api import Buffer
from servers.write_coalescing import CoalescedWrites
from servers.zmtp import ServerConnection, ZmtpError

#: replies larger than this end the connection
MAX_FRAME_BYTES = 1 << 30
#: bytes queued on one connection (not yet taken by the kernel) from which `can_send` refuses
HIGH_WATER_BYTES = 8 << 20


class DealerZmtp(ServerConnection):
    """`servers.zmtp`'s sans-IO connection as a DEALER that talks only to a ROUTER, with a client's
    limits (both clients' connections build on it)."""

    def __init__(self) -> None:
        super().__init__(
            max_frame_bytes=MAX_FRAME_BYTES,
            max_message_bytes=MAX_FRAME_BYTES,
            max_frames=1 << 16,
            socket_type=b"DEALER",
            accepts=frozenset((b"ROUTER",)),
        )


class _Dealer(DealerZmtp):
    def __init__(self, owner: DealerConnection) -> None:
        super().__init__()
        self._owner = owner

    def on_ready(self) -> None:
        if not self._owner.ready.done():
            self._owner.ready.set_result(None)

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self._owner.on_message(frames)


def _nothing() -> None:
    pass


class DealerConnection(CoalescedWrites, asyncio.Protocol):
    """One DEALER connection to a ROUTER. Messages come out through ``on_message`` (frames as
    views that stay valid while referenced); `send` queues one, and everything queued in one loop
    iteration leaves in one write.

    Args:
        on_message: called with each reply's frames.
        on_writable: called when the connection takes messages again after `can_send` refused.
    """

    def __init__(
        self, on_message: Callable[[list[memoryview]], None], on_writable: Callable[[], None] = _nothing
    ) -> None:
        self.on_message = on_message
        self.on_writable = on_writable
        loop = asyncio.get_running_loop()
        self.loop = loop
        #: done when the handshake is complete, or failed with the reason the connection ended
        self.ready: asyncio.Future[None] = loop.create_future()
        #: done (with the reason the connection ended) once it has ended
        self.closed: asyncio.Future[BaseException] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._zmtp = _Dealer(self)
        self._queued = 0  # bytes of messages queued since the last write
        self._paused = False  # the transport holds more than HIGH_WATER_BYTES
        self._refused = False  # can_send said no since there was last room

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)
        self._write_now()

    def data_received(self, data: bytes) -> None:
        try:
            self._zmtp.receive(data)
        except ZmtpError as exc:
            self._write_now()  # an ERROR command, when the peer broke the protocol
            self._end(exc)
            return
        if self._zmtp.has_output():  # a PONG
            self._write_now()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._end(exc or ConnectionResetError("the server closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._room()

    def can_send(self) -> bool:
        """Whether the connection is up and takes a message now (else ``on_writable`` tells when)."""
        transport = self.transport
        if transport is None or transport.is_closing() or not self.ready.done() or self.closed.done():
            return False
        if self._paused or self._queued >= HIGH_WATER_BYTES:
            self._refused = True
            return False
        return True

    def send(self, frames: Sequence[Buffer]) -> None:
        """Queue one message; it is written at the end of this loop iteration."""
        self._queued += self._zmtp.send_message(frames)
        self._schedule_flush()

    def close(self) -> None:
        """Close the connection (queued messages are written first)."""
        if self.transport is not None:
            self._write_now()
            self.transport.close()

    def _write_now(self) -> None:
        out = self._zmtp.data_to_send()
        self._queued = 0
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(cast(list[bytes], out)))  # the frames we queued: bytes-like
        if not self._paused:
            self._room()

    def _room(self) -> None:
        if self._refused and not self.closed.done():
            self._refused = False
            self.on_writable()

    def _end(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: a failed handshake is reported through `connect`
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.transport is not None:
            self.transport.close()


async def connect(
    host: str,
    port: int,
    on_message: Callable[[list[memoryview]], None],
    timeout_s: float = 10.0,
    on_writable: Callable[[], None] = _nothing,
) -> DealerConnection:
    """Connect to the ROUTER at ``host:port`` and wait for the handshake.

    Raises:
        OSError: the connection failed; TimeoutError: no handshake within ``timeout_s``;
        ZmtpError: the peer is not a ZMTP 3 ROUTER.
    """
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: DealerConnection(on_message, on_writable), host, port), timeout_s
    )
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout_s)
    except BaseException:
        conn.close()
        raise
    return conn


def tcp_address(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` (``tcp://[::1]:port`` for IPv6) as ``(host, port)``.

    Raises:
        ValueError: not a ``tcp://`` endpoint with a port.
    """
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a ZMQ endpoint tcp://host:port, got {endpoint!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


__all__ = ["HIGH_WATER_BYTES", "DealerConnection", "DealerZmtp", "ZmtpError", "connect", "tcp_address"]
