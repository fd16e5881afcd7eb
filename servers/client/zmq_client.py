"""Python clients of the ZMQ front-end: `ZmqClient` (blocking) and `AsyncZmqClient` (asyncio).

Each endpoint gets one DEALER socket, so any number of requests may be in flight on it: every request
gets a fresh id and replies are matched by id, in whatever order they come back. Tensors travel as
numpy arrays: inputs are sent without a copy when large (keep them unchanged until their reply is in)
and outputs are read-only arrays over the received frames (``np.frombuffer``, no copy).

Errors come back as the `engine.errors` classes the server raised (`servers.zmq_protocol` rebuilds
them). A request that gets no reply within its timeout raises `DeadlineExceeded`; the timeout is also
sent to the server as the request's deadline. A reply that comes after its request timed out is
dropped. Reconnection is ZMQ's own: a DEALER reconnects by itself.

Scale-out: give several endpoints (``"tcp://a:7211,tcp://b:7211"`` or a list) and requests go round
robin across them (`servers.client.endpoints.EndpointPool`). The sockets set ``ZMQ_IMMEDIATE``, so a
message is only ever queued on a live connection: a send to an endpoint that is not connected fails
at once and goes to the next one, and a request waits (within its timeout) only while no endpoint is
connected. A socket monitor tells each connect and disconnect. A request is moved to another endpoint,
each endpoint tried at most once, when its endpoint answers UNAVAILABLE (draining, worker down; the
endpoint is then marked down for a cool-down) or RESOURCE_EXHAUSTED, and when the connection it was
sent on drops before the reply (the endpoint is marked down). Inference is stateless, so a request
moved after its connection dropped may have been computed twice; only its last answer is returned.
With one endpoint nothing is moved: errors are raised and a dropped request times out, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from engine.errors import DeadlineExceeded, InternalError, InvalidArgument, ResourceExhausted, Unavailable
from servers.client.endpoints import DEFAULT_COOLDOWN_S, EndpointPool
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

#: Send/receive high-water mark of each client socket, in messages.
HIGH_WATER_MARK = 10_000
#: Socket monitor events the clients act on.
MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED

#: Builds a request's frames for one attempt: (request id, timeout in microseconds) -> frames.
Build = Callable[[int, int], Frames]


def _timeout_us(timeout_s: float) -> int:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return math.ceil(timeout_s * 1_000_000)


def _remaining_us(deadline: float) -> int:
    # A resend near the deadline still tells the server a (tiny) positive deadline, never "none" (0).
    return max(1, math.ceil((deadline - time.monotonic()) * 1_000_000))


def _unpack(reply: Reply, expected: MsgType) -> Any:
    """The payload of a reply of the expected type; raises the error an ERROR reply carries."""
    if reply.error is not None:
        raise reply.error
    if reply.msg_type is not expected:
        raise InternalError(f"expected a {expected.name} reply, got {reply.msg_type.name}")
    return reply.outputs if expected is MsgType.REPLY else reply.body


def _moves_on(reply: Reply) -> bool:
    """Whether an answer sends its request to another endpoint (when one is left to try)."""
    return isinstance(reply.error, Unavailable | ResourceExhausted)


def _open(ctx: zmq.Context[Any], endpoint: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A connected DEALER for ``endpoint`` and the PAIR socket of its monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    # Queue only on completed connections: a send to a down endpoint fails (EAGAIN) instead of
    # waiting in a pipe for a server that may never come back.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    monitor = sock.get_monitor_socket(MONITOR_EVENTS)
    sock.connect(endpoint)
    return sock, monitor


def _close(pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]], ctx: zmq.Context[Any]) -> None:
    for sock, monitor in pairs:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    ctx.term()


def _can_move(pool: EndpointPool, tried: Container[int], current: int) -> bool:
    """Whether an endpoint other than ``current`` is left that has not failed this request."""
    return any(i != current and i not in tried for i in range(len(pool)))


class _Ids:
    """Request ids: 1, 2, ... wrapping inside u64 (0 is what unreadable-header errors carry)."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def next(self) -> int:
        return (next(self._count) - 1) % MAX_REQUEST_ID + 1


@dataclass(eq=False)
class _Request:
    """One request of the blocking client across its attempts (one attempt per endpoint at most)."""

    build: Build
    expected: MsgType
    deadline: float
    request_id: int = 0  # of the current attempt
    endpoint: int = -1  # of the current attempt; -1 while waiting for a connected endpoint
    tried: list[int] = field(default_factory=list)  # endpoints that failed it
    reply: Reply | None = None
    dropped: bool = False  # a blocking wait for it ran out of time


class ZmqFuture:
    """A request submitted by `ZmqClient.submit`: `result` blocks for its outputs."""

    def __init__(self, client: ZmqClient, request: _Request) -> None:
        self._client = client
        self._request = request

    @property
    def request_id(self) -> int:
        """The id of the request's current attempt (a request moved to another endpoint gets a new
        one, so a late answer of the first attempt is dropped)."""
        return self._request.request_id

    def done(self) -> bool:
        """True once the reply is in or the timeout passed, that is when `result` would not block
        (reads what has arrived; never waits)."""
        request = self._request
        if request.reply is None and not request.dropped:
            self._client._poll(request, block=False)
        return request.reply is not None or time.monotonic() >= request.deadline

    def result(self) -> Any:
        """Wait for the reply (at most until the request's timeout) and return its payload: the
        outputs of an inference, the body of a PING or METADATA. May be called again.

        Raises:
            DeadlineExceeded: no reply within the timeout.
            EngineError: the error the server answered with.
        """
        request = self._request
        if request.reply is None:
            self._client._poll(request, block=True)
        assert request.reply is not None  # _poll returns only once it is in (or raises)
        return _unpack(request.reply, request.expected)


class ZmqClient:
    """Blocking client over one or several endpoints. Not thread-safe (neither are ZMQ sockets): one
    client per thread.

    Args:
        endpoint: server address, e.g. ``tcp://127.0.0.1:7211``; several as a comma-separated list
            or a sequence of addresses.
        timeout_s: default per-request timeout, covering every endpoint tried.
        token: auth token sent with every request (when the server requires one).
        cooldown_s: how long an endpoint that failed is skipped while others are up.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        _timeout_us(timeout_s)
        self.pool = EndpointPool(endpoint, cooldown_s=cooldown_s)
        self.endpoints = self.pool.endpoints
        self.endpoint = ",".join(self.endpoints)
        self.timeout_s = timeout_s
        self.token = token
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]] = []
        self._finalizer = weakref.finalize(self, _close, pairs, self._ctx)
        try:
            for address in self.endpoints:
                pairs.append(_open(self._ctx, address))
        except BaseException:
            self._finalizer()  # a bad address: close what was opened
            raise
        self._socks = [sock for sock, _ in pairs]
        self._monitors = [monitor for _, monitor in pairs]
        self._sock = self._socks[0]  # the first endpoint's socket (tests poll it)
        self._poller = zmq.Poller()
        for sock in (*self._socks, *self._monitors):
            self._poller.register(sock, zmq.POLLIN)
        self._polling_out = [False] * len(self._socks)  # per socket: POLLOUT registered
        self._ids = _Ids()
        #: current attempt's request id -> its request, while its reply is awaited
        self._inflight: dict[int, _Request] = {}
        #: requests waiting for an endpoint to be connected (and have room)
        self._unsent: list[_Request] = []
        self._closed = False

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> ZmqFuture:
        """Send one inference request without waiting; `ZmqFuture.result` gives its outputs."""
        token = self.token

        def build(request_id: int, timeout_us: int) -> Frames:
            return encode_request(
                request_id, model, inputs, outputs=outputs, token=token, timeout_us=timeout_us
            )

        return self._submit(build, MsgType.REPLY, timeout_s)

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
        """True when a server (the next endpoint that answers) is ready; raises DeadlineExceeded when
        none answers."""
        token = self.token
        body = self._submit(lambda rid, _: encode_ping(rid, token), MsgType.PONG, timeout_s).result()
        return bool(body.get("ready"))

    def metadata(self, model: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's metadata (name, versions, platform, inputs, outputs, max_batch_size, ready)."""
        token = self.token
        future = self._submit(
            lambda rid, _: encode_metadata_request(rid, model, token), MsgType.METADATA_REPLY, timeout_s
        )
        body: dict[str, Any] = future.result()
        return body

    def close(self) -> None:
        """Close the sockets; pending requests are abandoned. Safe to call twice."""
        self._closed = True
        self._inflight.clear()
        self._unsent.clear()
        self._finalizer()

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _submit(self, build: Build, expected: MsgType, timeout_s: float | None) -> ZmqFuture:
        if self._closed:
            raise Unavailable("client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        _timeout_us(timeout)
        request = _Request(build, expected, time.monotonic() + timeout)
        self._dispatch(request)
        return ZmqFuture(self, request)

    def _dispatch(self, request: _Request) -> None:
        """Send the request's next attempt to the first candidate endpoint that takes it now, or
        park it until one is connected."""
        request_id = self._ids.next()
        frames = request.build(request_id, _remaining_us(request.deadline))
        request.request_id = request_id
        for index in self.pool.candidates(exclude=request.tried):
            try:
                self._socks[index].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue  # not connected (or full): the next one
            request.endpoint = index
            self._inflight[request_id] = request
            return
        request.endpoint = -1
        self._unsent.append(request)
        self._update_pollout()

    def _update_pollout(self) -> None:
        # Watch for room only on sockets a parked request may use: one it already failed on may be
        # writable all along and would wake every poll at once.
        wanted = {i for r in self._unsent for i in range(len(self._socks)) if i not in r.tried}
        for index, sock in enumerate(self._socks):
            on = index in wanted
            if on != self._polling_out[index]:
                self._polling_out[index] = on
                self._poller.register(sock, zmq.POLLIN | (zmq.POLLOUT if on else 0))

    def _poll(self, request: _Request, *, block: bool) -> bool:
        """Read replies until this request's is in (True), or its deadline passes: DeadlineExceeded
        when blocking, False when not."""
        if self._closed:
            raise Unavailable("client is closed")
        while request.reply is None:
            if request.dropped:
                # dropped by an earlier blocking wait that ran out of time
                raise DeadlineExceeded(f"request {request.request_id} to {self.endpoint} timed out")
            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                if not block:
                    return False
                self._drop(request)  # a late reply is then ignored
                raise DeadlineExceeded(
                    f"no reply to request {request.request_id} from {self.endpoint} in time"
                )
            self._pump(math.ceil(remaining * 1000) if block else 0)
            if not block and request.reply is None:
                return False
        return True

    def _pump(self, timeout_ms: int) -> None:
        """One poll of every socket: take monitor events and replies, send what was waiting."""
        events = dict(self._poller.poll(timeout_ms))
        for index, monitor in enumerate(self._monitors):
            if monitor in events:
                self._read_monitor(index)
        writable = False
        for index, sock in enumerate(self._socks):
            flags = events.get(sock, 0)
            if flags & zmq.POLLIN:
                self._read_replies(index)
            writable = writable or bool(flags & zmq.POLLOUT)
        if writable and self._unsent:
            waiting, self._unsent = self._unsent, []
            now = time.monotonic()
            for request in waiting:
                if now >= request.deadline:
                    request.dropped = True  # never sent: its result() raises DeadlineExceeded
                else:
                    self._dispatch(request)
            self._update_pollout()

    def _read_monitor(self, index: int) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitors[index], zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                self.pool.mark_up(index)
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost(index)

    def _lost(self, index: int) -> None:
        """The connection to endpoint ``index`` dropped: move its unanswered requests elsewhere."""
        self.pool.mark_down(index)
        self._read_replies(index)  # answers that made it before the drop are not resent
        moved = [
            r for r in self._inflight.values() if r.endpoint == index and _can_move(self.pool, r.tried, index)
        ]
        if moved:
            log.warning(
                "zmq client: connection to %s lost; moving %d requests", self.endpoints[index], len(moved)
            )
        for request in moved:
            del self._inflight[request.request_id]
            request.tried.append(index)
            self._dispatch(request)

    def _read_replies(self, index: int) -> None:
        sock = self._socks[index]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = _decode([f.buffer for f in frames], self._inflight, self.endpoints[index])
            if reply is None:
                continue
            request = self._inflight.pop(reply.request_id)
            if _moves_on(reply) and _can_move(self.pool, request.tried, index):
                if isinstance(reply.error, Unavailable):
                    self.pool.mark_down(index)
                request.tried.append(index)
                self._dispatch(request)
            else:
                request.reply = reply

    def _drop(self, request: _Request) -> None:
        request.dropped = True
        self._inflight.pop(request.request_id, None)
        if request in self._unsent:
            self._unsent.remove(request)
            self._update_pollout()


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


class _Lost(Exception):
    """The connection an attempt was sent on dropped before its reply (another endpoint is left)."""


@dataclass(eq=False)
class _Attempt:
    """One attempt of an asyncio request: where it went and the request's failed endpoints."""

    future: asyncio.Future[Reply]
    endpoint: int
    tried: list[int]


class AsyncZmqClient:
    """asyncio client over one or several endpoints: ``await infer(...)`` from any number of tasks at
    once; one background reader task per endpoint hands each reply to its request. Use it from one
    event loop; ``await close()`` at the end.

    Args:
        endpoint: server address, e.g. ``tcp://127.0.0.1:7211``; several as a comma-separated list
            or a sequence of addresses.
        timeout_s: default per-request timeout, covering every endpoint tried.
        token: auth token sent with every request (when the server requires one).
        cooldown_s: how long an endpoint that failed is skipped while others are up.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        _timeout_us(timeout_s)
        self.pool = EndpointPool(endpoint, cooldown_s=cooldown_s)
        self.endpoints = self.pool.endpoints
        self.endpoint = ",".join(self.endpoints)
        self.timeout_s = timeout_s
        self.token = token
        self._ctx = zmq.asyncio.Context()
        pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]] = []
        self._finalizer = weakref.finalize(self, _close, pairs, self._ctx)
        try:
            for address in self.endpoints:
                pairs.append(_open(self._ctx, address))
        except BaseException:
            self._finalizer()  # a bad address: close what was opened
            raise
        self._socks: list[zmq.asyncio.Socket] = [sock for sock, _ in pairs]  # type: ignore[misc]
        self._monitors: list[zmq.asyncio.Socket] = [monitor for _, monitor in pairs]  # type: ignore[misc]
        self._ids = _Ids()
        self._pending: dict[int, _Attempt] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False  # reader and monitor tasks all up
        self._closed = False

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
        token = self.token

        def build(request_id: int, timeout_us: int) -> Frames:
            return encode_request(
                request_id, model, inputs, outputs=outputs, token=token, timeout_us=timeout_us
            )

        result: dict[str, np.ndarray] = await self._call(build, MsgType.REPLY, timeout_s)
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
        """True when a server (the next endpoint that answers) is ready; raises DeadlineExceeded when
        none answers."""
        token = self.token
        body = await self._call(lambda rid, _: encode_ping(rid, token), MsgType.PONG, timeout_s)
        return bool(body.get("ready"))

    async def metadata(self, model: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's metadata (name, versions, platform, inputs, outputs, max_batch_size, ready)."""
        token = self.token
        body: dict[str, Any] = await self._call(
            lambda rid, _: encode_metadata_request(rid, model, token), MsgType.METADATA_REPLY, timeout_s
        )
        return body

    async def close(self) -> None:
        """Stop the readers, fail pending requests with Unavailable, close the sockets. Safe twice."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_pending(Unavailable("client closed"))
        self._finalizer()

    async def __aenter__(self) -> AsyncZmqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._running:
            return
        self._running = True
        for task in self._tasks:
            task.cancel()
        self._tasks = [asyncio.create_task(self._read_loop(i)) for i in range(len(self._socks))]
        self._tasks += [asyncio.create_task(self._monitor_loop(i)) for i in range(len(self._monitors))]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A reader or monitor that stopped (an error) is restarted, with the others, by the next call.
        if task in self._tasks:
            self._running = False

    async def _call(self, build: Build, expected: MsgType, timeout_s: float | None) -> Any:
        if self._closed:
            raise Unavailable("client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        _timeout_us(timeout)
        self._start()
        deadline = time.monotonic() + timeout
        tried: list[int] = []
        request_id = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    request_id = self._ids.next()
                    attempt = await self._send(request_id, build(request_id, _remaining_us(deadline)), tried)
                    try:
                        reply = await attempt.future
                    except _Lost:
                        tried.append(attempt.endpoint)
                        continue
                    finally:
                        # dropped on every path, so a late reply finds nothing and is ignored
                        self._pending.pop(request_id, None)
                        if attempt.future.done() and not attempt.future.cancelled():
                            attempt.future.exception()  # retrieved: asyncio logs none as lost
                    if _moves_on(reply) and _can_move(self.pool, tried, attempt.endpoint):
                        if isinstance(reply.error, Unavailable):
                            self.pool.mark_down(attempt.endpoint)
                        tried.append(attempt.endpoint)
                        continue
                    return _unpack(reply, expected)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply to request {request_id} from {self.endpoint} within {timeout} s"
            ) from None

    async def _send(self, request_id: int, frames: Frames, tried: list[int]) -> _Attempt:
        """Send to the first candidate endpoint that takes the message now; when none does (none is
        connected, or all are full), wait until one can."""
        while True:
            candidates = self.pool.candidates(exclude=tried)
            for index in candidates:
                attempt = _Attempt(asyncio.get_running_loop().create_future(), index, tried)
                self._pending[request_id] = attempt  # before the send: the reply may beat us to it
                try:
                    await self._socks[index].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    del self._pending[request_id]
                    continue
                return attempt
            poller = zmq.asyncio.Poller()
            for index in candidates:
                poller.register(self._socks[index], zmq.POLLOUT)
            await poller.poll()  # bounded by the caller's timeout

    async def _read_loop(self, index: int) -> None:
        sock, endpoint = self._socks[index], self.endpoints[index]
        try:
            while True:
                frames = await sock.recv_multipart(copy=False)
                reply = _decode([f.buffer for f in frames], self._pending, endpoint)
                if reply is not None:
                    future = self._pending[reply.request_id].future
                    if not future.done():
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("zmq client %s: reader stopped", endpoint)
            self._fail_pending(Unavailable(f"zmq client reader stopped: {exc}"))

    async def _monitor_loop(self, index: int) -> None:
        monitor = self._monitors[index]
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_CONNECTED:
                    self.pool.mark_up(index)
                elif event == zmq.EVENT_DISCONNECTED:
                    self._lost(index)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zmq client %s: monitor stopped", self.endpoints[index])

    def _lost(self, index: int) -> None:
        """The connection to endpoint ``index`` dropped: its unanswered requests move elsewhere."""
        self.pool.mark_down(index)
        moved = 0
        for attempt in self._pending.values():
            mine = attempt.endpoint == index and not attempt.future.done()
            if mine and _can_move(self.pool, attempt.tried, index):
                attempt.future.set_exception(_Lost())
                moved += 1
        if moved:
            log.warning("zmq client: connection to %s lost; moving %d requests", self.endpoints[index], moved)

    def _fail_pending(self, error: Exception) -> None:
        for attempt in self._pending.values():
            if not attempt.future.done():
                attempt.future.set_exception(error)
        self._pending.clear()


__all__ = ["AsyncZmqClient", "ZmqClient", "ZmqFuture"]
