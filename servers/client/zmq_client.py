"""Python clients of the ZMQ front-end: `ZmqClient` (blocking) and `AsyncZmqClient` (asyncio).

Each endpoint gets one DEALER socket, so any number of requests may be in flight on it: every request
gets a fresh id and replies are matched by id, in whatever order they come back. Tensors travel as
numpy arrays: inputs are sent without a copy when large (keep them unchanged until their reply is in)
and outputs are read-only arrays over the received frames (``np.frombuffer``, no copy).

Errors come back as the `engine.errors` classes the server raised (`servers.zmq_protocol` rebuilds
them). A request that gets no reply within its timeout raises `DeadlineExceeded`; the timeout is also
sent to the server as the request's deadline. A reply that comes after its request timed out is
dropped. A dropped connection is made again by itself, 100 ms later: by libzmq's DEALER in the
blocking client, by the asyncio client's own connection keeper (it speaks ZMTP itself, over TCP).

Scale-out: give several endpoints (``"tcp://a:7211,tcp://b:7211"`` or a list) and requests go round
robin across them (`servers.client.endpoints.EndpointPool`). A message is only ever queued on a live
connection (the blocking client's sockets set ``ZMQ_IMMEDIATE``): a send to an endpoint that is not
connected fails at once and goes to the next one, and a request waits (within its timeout) only while
no endpoint is connected. In the blocking client a socket monitor tells each connect and disconnect;
after a disconnect nothing is sent on that endpoint until its next connect is reported (libzmq tells
of the drop before its socket lets go of the dead connection, and a message sent in between would
vanish). A request is moved to another endpoint,
each endpoint tried at most once, when its endpoint answers UNAVAILABLE (draining, worker down; the
endpoint is then marked down for a cool-down) or RESOURCE_EXHAUSTED, and when the connection it was
sent on drops before the reply (the endpoint is marked down). Inference is stateless, so a request
moved after its connection dropped may have been computed twice; only its last answer is returned.
With one endpoint nothing is moved: errors are raised, and a request whose connection drops before
its reply fails at once with Unavailable (a reconnected DEALER is a new connection to the server,
which cannot answer on it), as it does once every endpoint has been tried.

This module holds the blocking client (`ZmqClient`, `ZmqFuture`); the asyncio one is in
`servers.client.zmq_async_client` and the pieces both use in `servers.client.zmq_common`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.errors import DeadlineExceeded, Unavailable
from servers.client.endpoints import DEFAULT_COOLDOWN_S, EndpointPool
from servers.client.zmq_async_client import AsyncZmqClient
from servers.client.zmq_common import (
    RECONNECT_IVL_MS,
    Build,
    RequestIds,
    can_move,
    close_endpoints,
    connection_lost,
    decode_pending,
    log,
    moves_on,
    open_endpoint,
    remaining_us,
    to_timeout_us,
    unpack_reply,
)
from servers.zmq_protocol import Frames, MsgType, Reply, encode_metadata_request, encode_ping, encode_request


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
        return unpack_reply(request.reply, request.expected)


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
        to_timeout_us(timeout_s)
        self.pool = EndpointPool(endpoint, cooldown_s=cooldown_s)
        self.endpoints = self.pool.endpoints
        self.endpoint = ",".join(self.endpoints)
        self.timeout_s = timeout_s
        self.token = token
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]] = []
        self._finalizer = weakref.finalize(self, close_endpoints, pairs, self._ctx)
        try:
            for address in self.endpoints:
                pairs.append(open_endpoint(self._ctx, address))
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
        #: per endpoint: its connection dropped and no new one is up yet (see `_read_monitor`)
        self._stale = [False] * len(self._socks)
        self._ids = RequestIds()
        #: current attempt's request id -> its request, while its reply is awaited
        self._inflight: dict[int, _Request] = {}
        #: requests waiting for an endpoint to be connected (and have room)
        self._unsent: list[_Request] = []
        self._news_read_at = float("-inf")  # time.monotonic() of the last look at the monitors
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
        to_timeout_us(timeout)
        now = time.monotonic()
        request = _Request(build, expected, now + timeout)
        if now - self._news_read_at > RECONNECT_IVL_MS / 2000:
            # A request sent on a connection that came back must not be counted among those lost
            # with the one before it (its drop not read yet). A reconnection takes RECONNECT_IVL_MS:
            # news read less than half of that ago cannot have missed one.
            self._news_read_at = now
            for index in range(len(self._monitors)):
                self._read_monitor(index)
        self._dispatch(request)
        return ZmqFuture(self, request)

    def _dispatch(self, request: _Request) -> None:
        """Send the request's next attempt to the first candidate endpoint that takes it now, or
        park it until one is connected."""
        request_id = self._ids.next()
        frames = request.build(request_id, remaining_us(request.deadline))
        request.request_id = request_id
        for index in self.pool.candidates(exclude=request.tried):
            if self._stale[index]:
                continue
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
        usable = [i for i in range(len(self._socks)) if not self._stale[i]]
        wanted = {i for r in self._unsent for i in usable if i not in r.tried}
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
        polled_at = time.monotonic()
        events = dict(self._poller.poll(timeout_ms))
        self._news_read_at = polled_at  # ready monitors are read below
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
        monitor = self._monitors[index]
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            # stale from a drop to the next connect: see zmq_common.MONITOR_EVENTS
            if event == zmq.EVENT_CONNECTED:
                self._stale[index] = False
                self.pool.mark_up(index)
            elif event == zmq.EVENT_DISCONNECTED:
                self._stale[index] = True
                self._lost(index)
            else:
                continue
            if self._unsent:
                self._update_pollout()

    def _lost(self, index: int) -> None:
        """The connection to endpoint ``index`` dropped: move its unanswered requests elsewhere, or
        fail them with Unavailable when no endpoint is left to try (no answer can come any more)."""
        self.pool.mark_down(index)
        self._read_replies(index)  # answers that made it before the drop are not resent
        lost = [r for r in self._inflight.values() if r.endpoint == index]
        moved = 0
        for request in lost:
            del self._inflight[request.request_id]
            if can_move(self.pool, request.tried, index):
                request.tried.append(index)
                self._dispatch(request)
                moved += 1
            else:
                error = connection_lost(request.request_id, self.endpoints[index])
                request.reply = Reply(MsgType.ERROR, request.request_id, error=error)
        if lost:
            log.warning(
                "zmq client: connection to %s lost; %d requests moved, %d failed",
                self.endpoints[index],
                moved,
                len(lost) - moved,
            )

    def _read_replies(self, index: int) -> None:
        sock = self._socks[index]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = decode_pending([f.buffer for f in frames], self._inflight, self.endpoints[index])
            if reply is None:
                continue
            request = self._inflight.pop(reply.request_id)
            if moves_on(reply) and can_move(self.pool, request.tried, index):
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


__all__ = ["AsyncZmqClient", "ZmqClient", "ZmqFuture"]
