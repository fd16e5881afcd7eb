"""Python clients of the ZMQ front-end: `ZmqClient` (blocking) and `AsyncZmqClient` (asyncio).

Both use one DEALER socket, so any number of requests may be in flight on it: every request gets a
fresh id and replies are matched by id, in whatever order they come back. Tensors travel as numpy
arrays: inputs are sent without a copy when large (keep them unchanged until their reply is in) and
outputs are read-only arrays over the received frames (``np.frombuffer``, no copy).

Errors come back as the `engine.errors` classes the server raised (`servers.zmq_protocol` rebuilds
them). A request that gets no reply within its timeout raises `DeadlineExceeded`; the timeout is also
sent to the server as the request's deadline. A reply that comes after its request timed out is
dropped. Reconnection is ZMQ's own: a DEALER reconnects by itself and queues sends meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import weakref
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from engine.errors import DeadlineExceeded, InternalError, InvalidArgument, Unavailable
from servers.zmq_protocol import (
    MAX_REQUEST_ID,
    Frames,
    MsgType,
    Reply,
    decode_reply,
    encode_metadata_request,
    encode_ping,
    encode_request,
    peek_request_id,
)

log = logging.getLogger(__name__)

#: Send/receive high-water mark of the client socket, in messages.
HIGH_WATER_MARK = 10_000


def _timeout_us(timeout_s: float) -> int:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return math.ceil(timeout_s * 1_000_000)


def _unpack(reply: Reply, expected: MsgType) -> Any:
    """The payload of a reply of the expected type; raises the error an ERROR reply carries."""
    if reply.error is not None:
        raise reply.error
    if reply.msg_type is not expected:
        raise InternalError(f"expected a {expected.name} reply, got {reply.msg_type.name}")
    return reply.outputs if expected is MsgType.REPLY else reply.body


def _configure(sock: zmq.Socket[Any], endpoint: str) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.connect(endpoint)


def _close(sock: zmq.Socket[Any], ctx: zmq.Context[Any]) -> None:
    sock.close(linger=0)
    ctx.term()


class _Ids:
    """Request ids: 1, 2, ... wrapping inside u64 (0 is what unreadable-header errors carry)."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def next(self) -> int:
        return (next(self._count) - 1) % MAX_REQUEST_ID + 1


class ZmqFuture:
    """A request submitted by `ZmqClient.submit`: `result` blocks for its outputs. Collect every
    future you submit: a reply nobody takes stays in the client."""

    def __init__(self, client: ZmqClient, request_id: int, expected: MsgType, deadline: float) -> None:
        self._client = client
        self.request_id = request_id
        self._expected = expected
        self._deadline = deadline
        self._reply: Reply | None = None

    def done(self) -> bool:
        """True once the reply is in or the timeout passed, that is when `result` would not block
        (reads what has arrived; never waits)."""
        if self._reply is None and self._client._poll(self.request_id, self._deadline, block=False):
            self._reply = self._client._take(self.request_id)
        return self._reply is not None or time.monotonic() >= self._deadline

    def result(self) -> Any:
        """Wait for the reply (at most until the request's timeout) and return its payload: the
        outputs of an inference, the body of a PING or METADATA. May be called again.

        Raises:
            DeadlineExceeded: no reply within the timeout.
            EngineError: the error the server answered with.
        """
        if self._reply is None:
            self._client._poll(self.request_id, self._deadline, block=True)
            self._reply = self._client._take(self.request_id)
        return _unpack(self._reply, self._expected)


class ZmqClient:
    """Blocking client. Not thread-safe (neither are ZMQ sockets): one client per thread.

    Args:
        endpoint: server address, e.g. ``tcp://127.0.0.1:7211``.
        timeout_s: default per-request timeout.
        token: auth token sent with every request (when the server requires one).
    """

    def __init__(self, endpoint: str, timeout_s: float = 30.0, *, token: str | None = None) -> None:
        _timeout_us(timeout_s)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.token = token
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        _configure(self._sock, endpoint)
        self._ids = _Ids()
        #: request id -> its reply once in (None while waiting)
        self._pending: dict[int, Reply | None] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _close, self._sock, self._ctx)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> ZmqFuture:
        """Send one inference request without waiting; `ZmqFuture.result` gives its outputs."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        frames = encode_request(
            request_id, model, inputs, outputs=outputs, token=self.token, timeout_us=_timeout_us(timeout)
        )
        return self._submit(request_id, frames, MsgType.REPLY, timeout)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference and return its outputs by name.

        Raises:
            DeadlineExceeded: no reply within the timeout.
            EngineError: the server's error (InvalidArgument, NotFound, ModelError, ...).
        """
        result: dict[str, np.ndarray] = self.submit(model, inputs, outputs, timeout_s).result()
        return result

    def infer_many(
        self,
        model: str,
        batch: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Send every request at once, then collect the outputs in order."""
        futures = [self.submit(model, inputs, outputs, timeout_s) for inputs in batch]
        return [f.result() for f in futures]

    def ping(self, timeout_s: float | None = None) -> bool:
        """True when the server answers and is ready; raises DeadlineExceeded when it does not answer."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        body = self._submit(request_id, encode_ping(request_id, self.token), MsgType.PONG, timeout).result()
        return bool(body.get("ready"))

    def metadata(self, model: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's metadata (name, versions, platform, inputs, outputs, max_batch_size, ready)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        frames = encode_metadata_request(request_id, model, self.token)
        body: dict[str, Any] = self._submit(request_id, frames, MsgType.METADATA_REPLY, timeout).result()
        return body

    def close(self) -> None:
        """Close the socket; pending requests are abandoned. Safe to call twice."""
        self._closed = True
        self._pending.clear()
        self._finalizer()

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _submit(self, request_id: int, frames: Frames, expected: MsgType, timeout: float) -> ZmqFuture:
        if self._closed:
            raise Unavailable("client is closed")
        deadline = time.monotonic() + timeout
        self._pending[request_id] = None
        try:
            self._sock.send_multipart(frames, copy=False)
        except BaseException:
            del self._pending[request_id]
            raise
        return ZmqFuture(self, request_id, expected, deadline)

    def _poll(self, request_id: int, deadline: float, *, block: bool) -> bool:
        """Read replies until this one is in (True), or the deadline passes: DeadlineExceeded when
        blocking, False when not."""
        if self._closed:
            raise Unavailable("client is closed")
        while self._pending.get(request_id, False) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not block:
                    return False
                self._pending.pop(request_id, None)  # a late reply is then ignored
                raise DeadlineExceeded(f"no reply to request {request_id} from {self.endpoint} in time")
            if not self._sock.poll(math.ceil(remaining * 1000) if block else 0, zmq.POLLIN):
                if not block:
                    return False
                continue
            self._read_available()
        if request_id not in self._pending:
            # dropped by an earlier blocking wait that ran out of time
            raise DeadlineExceeded(f"request {request_id} to {self.endpoint} timed out")
        return True

    def _read_available(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = _decode([f.buffer for f in frames], self._pending, self.endpoint)
            if reply is not None:
                self._pending[reply.request_id] = reply

    def _take(self, request_id: int) -> Reply:
        reply = self._pending.pop(request_id)
        assert reply is not None  # _poll returned True
        return reply


def _decode(frames: list[memoryview], pending: Container[int], endpoint: str) -> Reply | None:
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


class AsyncZmqClient:
    """asyncio client: ``await infer(...)`` from any number of tasks at once; one background reader
    task hands each reply to its request. Use it from one event loop; ``await close()`` at the end.

    Args:
        endpoint: server address, e.g. ``tcp://127.0.0.1:7211``.
        timeout_s: default per-request timeout.
        token: auth token sent with every request (when the server requires one).
    """

    def __init__(self, endpoint: str, timeout_s: float = 30.0, *, token: str | None = None) -> None:
        _timeout_us(timeout_s)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.token = token
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket = self._ctx.socket(zmq.DEALER)
        _configure(self._sock, endpoint)
        self._ids = _Ids()
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _close, self._sock, self._ctx)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference and return its outputs by name.

        Raises:
            DeadlineExceeded: no reply within the timeout.
            EngineError: the server's error (InvalidArgument, NotFound, ModelError, ...).
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        frames = encode_request(
            request_id, model, inputs, outputs=outputs, token=self.token, timeout_us=_timeout_us(timeout)
        )
        result: dict[str, np.ndarray] = await self._call(request_id, frames, MsgType.REPLY, timeout)
        return result

    async def infer_many(
        self,
        model: str,
        batch: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run many inferences concurrently; outputs in the order of ``batch``."""
        return list(await asyncio.gather(*(self.infer(model, x, outputs, timeout_s) for x in batch)))

    async def ping(self, timeout_s: float | None = None) -> bool:
        """True when the server answers and is ready; raises DeadlineExceeded when it does not answer."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        body = await self._call(request_id, encode_ping(request_id, self.token), MsgType.PONG, timeout)
        return bool(body.get("ready"))

    async def metadata(self, model: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's metadata (name, versions, platform, inputs, outputs, max_batch_size, ready)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self._ids.next()
        frames = encode_metadata_request(request_id, model, self.token)
        body: dict[str, Any] = await self._call(request_id, frames, MsgType.METADATA_REPLY, timeout)
        return body

    async def close(self) -> None:
        """Stop the reader, fail pending requests with Unavailable, close the socket. Safe twice."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._fail_pending(Unavailable("client closed"))
        self._finalizer()

    async def __aenter__(self) -> AsyncZmqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------------

    async def _call(self, request_id: int, frames: Frames, expected: MsgType, timeout: float) -> Any:
        if self._closed:
            raise Unavailable("client is closed")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._sock.send_multipart(frames, copy=False)
                reply = await future
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply to request {request_id} from {self.endpoint} within {timeout} s"
            ) from None
        finally:
            # dropped on every path, so a late reply finds nothing and is ignored
            self._pending.pop(request_id, None)
        return _unpack(reply, expected)

    async def _read_loop(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart(copy=False)
                reply = _decode([f.buffer for f in frames], self._pending, self.endpoint)
                if reply is not None:
                    future = self._pending[reply.request_id]
                    if not future.done():
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("zmq client %s: reader stopped", self.endpoint)
            self._fail_pending(Unavailable(f"zmq client reader stopped: {exc}"))

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
