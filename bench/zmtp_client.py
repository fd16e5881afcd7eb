"""A ZMQ DEALER spoken by hand on asyncio, for load generation: ZMTP 3.1 through `servers.zmtp`.

Why: pyzmq's DEALER costs the load client ~30 µs of CPU per request at 64 in flight (a ``send`` per
frame through pyzmq, ``recv_multipart``, the ``ZMQ_FD`` edge dance, and libzmq's I/O thread, which
adds a thread hand-off each way), a quarter of what the whole request costs the machine client and
server share. This one queues each message's frames and writes every message of one loop iteration
in one ``write``, and parses replies where the bytes arrive, as the engine's ZMQ front-end does.

It is the peer side of the same sans-IO connection the front-end uses (`servers.zmtp`, with
``socket_type`` DEALER, talking only to a ROUTER): the 64-byte greeting, NULL security, READY, short
and long frames, PING answered. A load generator needs no more: no reconnection, no CURVE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

from servers.gateway_api import Buffer
from servers.write_coalescing import CoalescedWrites
from servers.zmtp import ServerConnection, ZmtpError

#: replies larger than this end the connection (a load's replies are far smaller)
MAX_FRAME_BYTES = 1 << 30


class _Dealer(ServerConnection):
    def __init__(self, owner: DealerConnection) -> None:
        super().__init__(
            max_frame_bytes=MAX_FRAME_BYTES,
            max_message_bytes=MAX_FRAME_BYTES,
            max_frames=1 << 16,
            socket_type=b"DEALER",
            accepts=frozenset((b"ROUTER",)),
        )
        self._owner = owner

    def on_ready(self) -> None:
        if not self._owner.ready.done():
            self._owner.ready.set_result(None)

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self._owner.on_message(frames)


class DealerConnection(CoalescedWrites, asyncio.Protocol):
    """One DEALER connection to a ROUTER. Messages come out through ``on_message`` (frames as
    views that stay valid while referenced); `send` queues one, and everything queued in one loop
    iteration leaves in one write.

    Args:
        on_message: called with each reply's frames.
    """

    def __init__(self, on_message: Callable[[list[memoryview]], None]) -> None:
        self.on_message = on_message
        loop = asyncio.get_running_loop()
        self.loop = loop
        #: done when the handshake is complete, or failed with the reason the connection ended
        self.ready: asyncio.Future[None] = loop.create_future()
        #: done (with the reason, or None for a clean close) when the connection has ended
        self.closed: asyncio.Future[BaseException | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._zmtp = _Dealer(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
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

    def send(self, frames: Sequence[Buffer]) -> None:
        """Queue one message; it is written at the end of this loop iteration."""
        self._zmtp.send_message(frames)
        self._schedule_flush()

    def close(self) -> None:
        """Close the connection (queued messages are written first)."""
        if self.transport is not None:
            self._write_now()
            self.transport.close()

    def _write_now(self) -> None:
        out = self._zmtp.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(cast(list[bytes], out)))  # the frames we queued: bytes-like

    def _end(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.transport is not None:
            self.transport.close()


async def connect(
    host: str, port: int, on_message: Callable[[list[memoryview]], None], timeout_s: float = 10.0
) -> DealerConnection:
    """Connect to the ROUTER at ``host:port`` and wait for the handshake."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: DealerConnection(on_message), host, port), timeout_s
    )
    await asyncio.wait_for(asyncio.shield(conn.ready), timeout_s)
    return conn
