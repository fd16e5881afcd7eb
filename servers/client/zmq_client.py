"""Python clients of the ZMQ front-end: `ZmqClient` (blocking) and `AsyncZmqClient` (asyncio).

Both speak ZMQ's wire protocol (ZMTP 3.1, `servers.zmtp`) themselves over TCP, without libzmq: one
DEALER connection per endpoint, ``tcp://host:port`` endpoints only. Any number of requests may be in
flight on a connection: every request gets a fresh id and replies are matched by id, in whatever order
they come back. Tensors travel as numpy arrays: inputs are sent without a copy (keep them unchanged
until their reply is in) and outputs are read-only arrays over the received frames (``np.frombuffer``,
no copy).

Errors come back as the `engine.errors` classes the server raised (`servers.zmq_protocol` rebuilds
them). A request that gets no reply within its timeout raises `DeadlineExceeded`; the timeout is also
sent to the server as the request's deadline. A reply that comes after its request timed out is
dropped. A dropped connection is made again by the client itself: at once when it had been up a while,
then every 100 ms while connects fail. The blocking client does so when it is used (it has no thread):
a request made after a pause first looks for news of its connections without waiting, so it is not
sent on one that ended meanwhile.

Scale-out: give several endpoints (``"tcp://a:7211,tcp://b:7211"`` or a list) and requests go round
robin across them (`servers.client.endpoints.EndpointPool`). A message is only ever queued on a
connection whose handshake is complete: an endpoint that is not connected is skipped, and a request
waits (within its timeout) only while no endpoint is connected, or all are full (8 MiB the kernel has
not taken). A request is moved to another endpoint, each endpoint tried at most once, when its
endpoint answers UNAVAILABLE (draining, worker down; the endpoint is then marked down for a cool-down)
or RESOURCE_EXHAUSTED, and when the connection it was sent on drops before the reply (the endpoint is
marked down). Inference is stateless, so a request moved after its connection dropped may have been
computed twice; only its last answer is returned. With one endpoint nothing is moved: errors are
raised, and a request whose connection drops before its reply fails at once with Unavailable (a
reconnected DEALER is a new connection to the server, which cannot answer on it), as it does once
every endpoint has been tried.

This module holds the blocking client (`ZmqClient`, `ZmqFuture`; its connections in
`servers.client.zmtp_blocking`); the asyncio one is in `servers.client.zmq_async_client` (on
`servers.client.zmtp_dealer`) and the pieces both use in `servers.client.zmq_common`.
"""

from __future__ import annotations

import math
import selectors
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from engine.errors import DeadlineExceeded, Unavailable
from servers.client.endpoints import DEFAULT_COOLDOWN_S, EndpointPool
from servers.client.zmq_async_client import AsyncZmqClient
from servers.client.zmq_common import (
    Build,
    RequestIds,
    can_move,
    connection_lost,
    decode_pending,
    log,
    moves_on,
    remaining_us,
    to_timeout_us,
    unpack_reply,
)
from servers.client.zmtp_blocking import DOWN, BlockingLink
from servers.client.zmtp_dealer import tcp_address
from servers.zmq_protocol import Frames, MsgType, Reply, encode_metadata_request, encode_ping, encode_request

#: A request sent longer than this after the last poll polls first (without waiting), so that it is
#: not sent on a connection whose end is waiting to be read.
NEWS_MAX_AGE_S = 0.05


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
    """Blocking client over one or several endpoints. Not thread-safe: one client per thread.

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
        addresses = [tcp_address(e) for e in self.endpoints]
        self._selector = selectors.DefaultSelector()
        self._links = [
            BlockingLink(
                host,
                port,
                self._selector,
                index,
                on_up=partial(self.pool.mark_up, index),
                on_message=partial(self._on_message, index),
                on_lost=partial(self._lost, index),
            )
            for index, (host, port) in enumerate(addresses)
        ]
        self._finalizer = weakref.finalize(self, _close_links, self._links, self._selector)
        self._ids = RequestIds()
        #: current attempt's request id -> its request, while its reply is awaited
        self._inflight: dict[int, _Request] = {}
        #: requests waiting for an endpoint to be connected (and have room)
        self._unsent: list[_Request] = []
        self._closed = False
        self._polled_at = time.monotonic()
        for link in self._links:
            link.start_connect()  # finished by the first poll

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
        """Send every request at once (in one write per endpoint), then collect the outputs in order."""
        token = self.token
        futures = []
        for inputs in batch:

            def build(request_id: int, timeout_us: int, inputs: Mapping[str, np.ndarray] = inputs) -> Frames:
                return encode_request(
                    request_id, model, inputs, outputs=outputs, token=token, timeout_us=timeout_us
                )

            futures.append(self._submit(build, MsgType.REPLY, timeout_s, flush=False))
        for link in self._links:
            link.flush()
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
        """Close the connections; pending requests are abandoned. Safe to call twice."""
        self._closed = True
        self._inflight.clear()
        self._unsent.clear()
        self._finalizer()

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _submit(
        self, build: Build, expected: MsgType, timeout_s: float | None, *, flush: bool = True
    ) -> ZmqFuture:
        if self._closed:
            raise Unavailable("client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        to_timeout_us(timeout)
        now = time.monotonic()
        request = _Request(build, expected, now + timeout)
        if now - self._polled_at > NEWS_MAX_AGE_S:
            # after a pause: a connection that ended meanwhile must be seen before a send on it,
            # or the request would go down with it
            self._pump(0.0)
        else:
            self._reconnect(now)
        self._dispatch(request, flush)
        return ZmqFuture(self, request)

    def _dispatch(self, request: _Request, flush: bool = True) -> None:
        """Send the request's next attempt to the first candidate endpoint that takes it now, or
        park it until one is connected (and has room)."""
        request_id = self._ids.next()
        frames = request.build(request_id, remaining_us(request.deadline))
        request.request_id = request_id
        for index in self.pool.candidates(exclude=request.tried):
            link = self._links[index]
            if not link.can_send():
                continue  # not connected (or full): the next one
            request.endpoint = index
            # recorded first: a failed write reports the loss, which must find the request
            self._inflight[request_id] = request
            link.send(frames, flush)
            return
        request.endpoint = -1
        self._unsent.append(request)

    def _reconnect(self, now: float) -> None:
        for link in self._links:
            if link.state == DOWN and now >= link.retry_at:
                link.start_connect()

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
            self._pump(remaining if block else 0.0)
            if not block and request.reply is None:
                return False
        return True

    def _pump(self, timeout_s: float) -> None:
        """One poll of every connection: finish connects and handshakes, take replies, write what
        waited for room, send the requests that waited for a connection."""
        now = self._polled_at = time.monotonic()
        self._reconnect(now)
        for link in self._links:
            if link.state == DOWN:  # wake for its next connect
                timeout_s = min(timeout_s, max(0.0, link.retry_at - now))
        for key, mask in self._selector.select(math.ceil(timeout_s * 1000) / 1000 if timeout_s else 0):
            link = self._links[key.data]
            if link.sock is not key.fileobj:
                continue  # closed by an earlier event of this poll
            if mask & selectors.EVENT_WRITE:
                link.on_writable()
            if mask & selectors.EVENT_READ:
                link.on_readable()
        if self._unsent and any(link.can_send() for link in self._links):
            waiting, self._unsent = self._unsent, []
            now = time.monotonic()
            for request in waiting:
                if now >= request.deadline:
                    request.dropped = True  # never sent: its result() raises DeadlineExceeded
                else:
                    self._dispatch(request)

    def _lost(self, index: int, reason: str) -> None:
        """The connection to endpoint ``index`` ended: move its unanswered requests elsewhere, or
        fail them with Unavailable when no endpoint is left to try (no answer can come any more)."""
        self.pool.mark_down(index)
        log.debug("zmq client: connection to %s ended: %s", self.endpoints[index], reason)
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

    def _on_message(self, index: int, frames: list[memoryview]) -> None:
        try:
            reply = decode_pending(frames, self._inflight, self.endpoints[index])
        except Exception as exc:
            # A reply the client cannot hand over: the requests waiting on this connection must not
            # wait out their timeouts for it. They fail, and the connection starts over.
            log.exception("zmq client %s: a reply could not be handled", self.endpoints[index])
            error = Unavailable(
                f"zmq client: a reply from {self.endpoints[index]} could not be handled: {exc}"
            )
            for request in [r for r in self._inflight.values() if r.endpoint == index]:
                del self._inflight[request.request_id]
                request.reply = Reply(MsgType.ERROR, request.request_id, error=error)
            self._links[index].fail(f"a reply could not be handled: {exc}")
            return
        if reply is None:
            return
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


def _close_links(links: list[BlockingLink], selector: selectors.BaseSelector) -> None:
    for link in links:
        link.close()
    selector.close()


__all__ = ["AsyncZmqClient", "ZmqClient", "ZmqFuture"]
