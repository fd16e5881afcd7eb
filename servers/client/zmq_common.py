"""Pieces shared by the ZMQ clients (`ZmqClient`, `AsyncZmqClient`): sockets, request ids, replies.

- `open_endpoint` / `close_endpoints`: one DEALER per endpoint (``ZMQ_IMMEDIATE``, high-water marks)
  with the PAIR socket of its monitor, and their teardown;
- `RequestIds`: request ids 1, 2, ... wrapping inside u64;
- `to_timeout_us` / `remaining_us`: a request's timeout, and what is left of it, as the deadline sent;
- `decode_pending`, `unpack_reply`, `moves_on`, `can_move`: what to do with a reply: drop it (late,
  unknown), return its payload or raise its error, or move its request to another endpoint;
- `connection_lost`: the error of a request whose connection dropped with no endpoint left to try.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Container
from typing import Any

import zmq

from engine.errors import InternalError, InvalidArgument, ResourceExhausted, Unavailable
from servers.client.endpoints import EndpointPool
from servers.zmq_protocol import MAX_REQUEST_ID, Frames, MsgType, Reply, decode_reply, peek_request_id

#: Both clients log under the name of the public module, whichever module holds the code.
log = logging.getLogger("servers.client.zmq_client")

#: Send/receive high-water mark of each client socket, in messages.
HIGH_WATER_MARK = 10_000
#: How long a dropped connection waits before it reconnects (libzmq's default, set explicitly: the
#: sync client relies on it to read connection news only every half of it).
RECONNECT_IVL_MS = 100
#: Socket monitor events the clients act on. libzmq reports a drop before the socket has let go of
#: the dropped connection's pipe, and a message sent in between goes into that pipe and is lost
#: without a trace: so after a DISCONNECTED an endpoint is *stale*, and nothing is sent on it until
#: its next CONNECTED (one reconnect interval later, long after the pipe is gone).
MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED

#: Builds a request's frames for one attempt: (request id, timeout in microseconds) -> frames.
Build = Callable[[int, int], Frames]


def to_timeout_us(timeout_s: float) -> int:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return math.ceil(timeout_s * 1_000_000)


def remaining_us(deadline: float) -> int:
    # A resend near the deadline still tells the server a (tiny) positive deadline, never "none" (0).
    return max(1, math.ceil((deadline - time.monotonic()) * 1_000_000))


def connection_lost(request_id: int, endpoint: str) -> Unavailable:
    """The error of a request whose connection dropped before its reply, no other endpoint left.

    A DEALER's reconnection is a new connection to the server's ROUTER: an answer addressed to the
    old one is never delivered, so waiting out the timeout would gain nothing.
    """
    return Unavailable(
        f"connection to {endpoint} closed before the reply to request {request_id} (the server "
        "stopped, or dropped a message holding a frame over its max_message_bytes)"
    )


def unpack_reply(reply: Reply, expected: MsgType) -> Any:
    """The payload of a reply of the expected type; raises the error an ERROR reply carries."""
    if reply.error is not None:
        raise reply.error
    if reply.msg_type is not expected:
        raise InternalError(f"expected a {expected.name} reply, got {reply.msg_type.name}")
    return reply.outputs if expected is MsgType.REPLY else reply.body


def moves_on(reply: Reply) -> bool:
    """Whether an answer sends its request to another endpoint (when one is left to try)."""
    return isinstance(reply.error, Unavailable | ResourceExhausted)


def open_endpoint(ctx: zmq.Context[Any], endpoint: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A connected DEALER for ``endpoint`` and the PAIR socket of its monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    # Queue only on completed connections: a send to a down endpoint fails (EAGAIN) instead of
    # waiting in a pipe for a server that may never come back.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    monitor = sock.get_monitor_socket(MONITOR_EVENTS)
    sock.connect(endpoint)
    return sock, monitor


def close_endpoints(pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]], ctx: zmq.Context[Any]) -> None:
    for sock, monitor in pairs:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    ctx.term()


def can_move(pool: EndpointPool, tried: Container[int], current: int) -> bool:
    """Whether an endpoint other than ``current`` is left that has not failed this request."""
    return any(i != current and i not in tried for i in range(len(pool)))


class RequestIds:
    """Request ids: 1, 2, ... wrapping inside u64 (0 is what unreadable-header errors carry)."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def next(self) -> int:
        return (next(self._count) - 1) % MAX_REQUEST_ID + 1


def decode_pending(frames: list[memoryview], pending: Container[int], endpoint: str) -> Reply | None:
    """The reply to a pending request, or None when it is dropped (late, unknown or unreadable)."""
    try:
        reply = decode_reply(frames)
    except InvalidArgument as exc:
        request_id = peek_request_id(frames[0]) if frames else 0
        if request_id not in pending:
            log.warning("zmq client %s: unreadable reply dropped: %s", endpoint, exc.message)
            return None
        return Reply(MsgType.ERROR, request_id, error=InternalError(f"unreadable reply: {exc.message}"))
    if reply.request_id not in pending:
        log.debug("zmq client %s: reply to request %d dropped (timed out)", endpoint, reply.request_id)
        return None
    return reply


__all__ = [
    "HIGH_WATER_MARK",
    "MONITOR_EVENTS",
    "Build",
    "RequestIds",
    "can_move",
    "close_endpoints",
    "decode_pending",
    "moves_on",
    "open_endpoint",
    "remaining_us",
    "to_timeout_us",
    "unpack_reply",
]
