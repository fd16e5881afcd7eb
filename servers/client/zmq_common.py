"""Pieces shared by the ZMQ clients (`ZmqClient`, `AsyncZmqClient`): request ids, timeouts, replies.

- `RequestIds`: request ids 1, 2, ... wrapping inside u64;
- `to_timeout_us` / `remaining_us`: a request's timeout, and what is left of it, as the deadline sent;
- `decode_pending`, `unpack_reply`, `moves_on`, `can_move`: what to do with a reply: drop it (late,
  unknown), return its payload or raise its error, or move its request to another endpoint;
- `connection_lost`: the error of a request whose connection dropped with no endpoint left to try.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Container
from typing import Any

from engine.errors import InternalError, InvalidArgument, ResourceExhausted, Unavailable
from servers.client.endpoints import EndpointPool
from servers.zmq_protocol import MAX_REQUEST_ID, Frames, MsgType, Reply, decode_reply, peek_request_id

#: Both clients log under the name of the public module, whichever module holds the code.
log = logging.getLogger("servers.client.zmq_client")

#: How long a connection that failed waits before it tries again (libzmq's default interval).
RECONNECT_IVL_MS = 100

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
    "RECONNECT_IVL_MS",
    "Build",
    "RequestIds",
    "can_move",
    "decode_pending",
    "moves_on",
    "remaining_us",
    "to_timeout_us",
    "unpack_reply",
]
