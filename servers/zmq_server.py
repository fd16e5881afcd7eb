"""The ZMQ front-end: a ROUTER socket that speaks `servers.zmq_protocol` to a `Gateway`.

The socket is a plain (not zmq.asyncio) one driven by the event loop: a reader on its ``ZMQ_FD``
takes every message waiting (non-blocking, up to `RECV_BATCH` per turn of the loop), and replies are
sent at once with ``NOBLOCK`` (a ROUTER never blocks: a peer past its high-water mark loses the
reply). zmq.asyncio's futures, per-call event registration and flag enums cost a third of this
process's CPU per request. ``ZMQ_FD`` is edge-triggered, so after every send the pending events are
looked at again (`_rearm`). Messages are read without copying (``copy=False``: tensor data stay in
the frames ZMQ received and reach the gateway as memoryviews). PING and METADATA are answered inline;
each inference runs in its own task, so any number of requests from any number of DEALER clients are
in flight at once, bounded by ``max_inflight`` (beyond it: an immediate RESOURCE_EXHAUSTED reply).

Limits and their failure modes:

- ``MAXMSGSIZE`` is set to ``settings.max_message_bytes``. libzmq applies it to each *frame* and, when
  a peer sends a larger one, drops that peer's connection without a reply (our clients see the drop
  and fail that request, and any other in flight on the connection, with UNAVAILABLE; the socket
  reconnects by itself). The server also sums the frames of every message it does receive and
  answers an over-size message with RESOURCE_EXHAUSTED.
- At stop, requests in flight get `DRAIN_TIMEOUT_S` to finish, and the socket stays open
  `FAREWELL_S` after the last reply: a DEALER with ``ZMQ_IMMEDIATE`` discards the replies it has not
  read when its connection drops.
- A malformed message of any kind gets an ERROR reply (request id 0 when even the header is
  unreadable) and the loop goes on. Only DEALER-style peers (no empty delimiter frame) are supported.
- Auth: with ``settings.auth_tokens`` set, REQUEST and METADATA must carry one of them
  (constant-time compare) or get UNAUTHENTICATED (code 16). PING needs no token (health probes
  learn only readiness) unless ``settings.auth_health_open`` is false.
- ``settings.reuse_port`` cannot apply: libzmq has no SO_REUSEPORT option, so one process owns the port.

Replies: output arrays may be views into shared memory that stay valid only until
``result.release()``. Replies under `ZERO_COPY_THRESHOLD` bytes are copied into ZMQ by the send
itself and released right after it. Larger outputs are sent zero-copy in tracked frames and released once
ZMQ's ``MessageTracker`` reports it no longer needs the memory (polled by `_Releaser`). A peer that
never reads keeps those results (at most its send high-water mark worth) until it disconnects.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from engine.errors import EngineError, InternalError, ResourceExhausted
from servers.gateway_api import Buffer, FrontendSettings, Gateway, InferResult
from servers.observer import current as current_observer
from servers.zmq_protocol import (
    MsgType,
    Request,
    Unauthenticated,
    decode_request,
    encode_error,
    encode_metadata_reply,
    encode_pong,
    encode_reply,
    frames_nbytes,
    model_metadata,
    peek_request_id,
)

log = logging.getLogger(__name__)

#: In-flight inference requests per front-end process when the settings name no other bound.
DEFAULT_MAX_INFLIGHT = 4096
#: Replies smaller than this are copied into ZMQ: pyzmq copies frames under its own
#: ``zmq.COPY_THRESHOLD`` (64 KiB) even when asked not to, and below it a memcpy costs less than a
#: tracker plus the deferred release.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Send/receive high-water mark in messages per peer: bounds what a slow or flooding peer can queue.
HIGH_WATER_MARK = 10_000
#: Longest relative deadline honoured (about 11.6 days); larger ones are clamped so that the
#: absolute deadline stays a small int64.
MAX_TIMEOUT_US = 10**12
#: How long `serve` lets in-flight requests finish after ``stop`` is set.
DRAIN_TIMEOUT_S = 5.0
#: How long the socket stays open after the last reply before it closes at stop. A client DEALER
#: with ZMQ_IMMEDIATE (ours) discards the replies it has not read yet when the connection drops,
#: so closing right after the drain lost answers of drained requests (8 of 20 in a unit test).
FAREWELL_S = 0.1
#: Messages taken per turn of the event loop before the rest wait for the next turn: the loop must
#: also run the completions that answer them.
RECV_BATCH = 256

_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)


async def serve(
    gateway: Gateway,
    settings: FrontendSettings,
    on_bound: Callable[[int], None],
    stop: asyncio.Event,
) -> None:
    """Serve ZMQ on ``settings.host:settings.port`` until ``stop`` is set.

    Args:
        gateway: where requests go.
        settings: bind address, limits (``max_inflight`` bounds concurrent requests), auth tokens,
            instance index.
        on_bound: called once with the bound port (the chosen one when ``settings.port`` is 0).
        stop: set it to stop; in-flight requests get `DRAIN_TIMEOUT_S` to finish.
    """
    max_inflight = settings.max_inflight
    await ZmqFrontend(gateway, settings, max_inflight=max_inflight).run(on_bound, stop)


class ZmqFrontend:
    """The ROUTER socket, its receive loop and the per-request tasks (see the module docstring).

    Args:
        gateway: where requests go.
        settings: bind address, limits, auth tokens, instance index.
        max_inflight: concurrent inference requests before the busy reply.
    """

    def __init__(
        self, gateway: Gateway, settings: FrontendSettings, *, max_inflight: int = DEFAULT_MAX_INFLIGHT
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.gateway = gateway
        self.settings = settings
        self.max_inflight = max_inflight
        self.prefix = f"frontend zmq#{settings.instance}"
        self._tokens = tuple(t.encode() for t in settings.auth_tokens)
        self._tasks: set[asyncio.Task[None]] = set()
        self._releaser = _Releaser(self.prefix)
        self._sock: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_scheduled = False
        self._replied_at = 0.0  # time.monotonic() of the last reply sent
        self._observer = current_observer("zmq", gateway.model_names())

    async def run(self, on_bound: Callable[[int], None], stop: asyncio.Event) -> None:
        """Bind, report the port, serve until ``stop`` is set, then drain and close everything."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        loop = asyncio.get_running_loop()
        fd: int | None = None
        try:
            port = self._bind(sock)
            self._sock = sock
            self._loop = loop
            log.info("%s: listening on tcp://%s:%d", self.prefix, self.settings.host, port)
            if self.settings.reuse_port:
                log.warning("%s: reuse_port ignored: libzmq has no SO_REUSEPORT", self.prefix)
            fd = int(sock.getsockopt(zmq.FD))
            loop.add_reader(fd, self._on_readable)
            self._on_readable()  # messages that arrived before the reader was registered
            on_bound(port)
            await stop.wait()
        finally:
            if fd is not None:
                loop.remove_reader(fd)
            self._read_scheduled = True  # a pending call_soon(_on_readable) must not read any more
            await self._drain()
            wait = self._replied_at + FAREWELL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._sock = None
            sock.close(linger=0)
            # term() waits for ZMQ to free every message, so every tracked frame is done after it
            ctx.term()
            await self._releaser.close()
            log.info("%s: stopped", self.prefix)

    def _bind(self, sock: zmq.Socket[bytes]) -> int:
        host = self.settings.host
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unreachable peers: drop the reply, never block
        sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{host}:{self.settings.port or '*'}")
        # "tcp://127.0.0.1:54321" or "tcp://[::1]:54321": the port follows the last colon
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("%s: waiting for %d in-flight requests", self.prefix, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%s: cancelled %d requests still running at stop", self.prefix, len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    def _on_readable(self) -> None:
        """Take the messages waiting on the socket (at most `RECV_BATCH`, then yield the loop)."""
        self._read_scheduled = False
        sock = self._sock
        if sock is None:
            return
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", self.prefix, exc)
                return
            try:
                self._dispatch(frames)
            except Exception:
                # one bad message must never stop the loop
                log.exception("%s: unexpected error handling a message", self.prefix)
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled and self._loop is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _rearm(self) -> None:
        """After a send: ZMQ_FD is edge-triggered and a send can consume the edge of a message that
        arrived meanwhile, so look at the pending events and read if something waits."""
        sock = self._sock
        if sock is not None and not self._read_scheduled and int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            self._schedule_read()

    # -- per message ---------------------------------------------------------------------------

    def _dispatch(self, frames: Sequence[zmq.Frame]) -> None:
        """Handle one message: routing id, then the client's frames."""
        received_ns = time.monotonic_ns()
        if len(frames) < 2:
            return  # a ROUTER always prepends the routing id; nothing to answer
        peer = frames[0].bytes
        parts = [f.buffer for f in frames[1:]]
        request_id = peek_request_id(parts[0])
        size = sum(p.nbytes for p in parts)
        if size > self.settings.max_message_bytes:
            self._send_error(
                peer,
                request_id,
                ResourceExhausted(
                    f"message of {size} bytes exceeds max_message_bytes ({self.settings.max_message_bytes})"
                ),
            )
            return
        try:
            request = decode_request(parts)
            if request.msg_type is MsgType.PING:
                # health probes need no token (unless auth_health_open is off): the answer reveals
                # only readiness
                if not self.settings.auth_health_open:
                    self._authenticate(request)
                ready = self.gateway.is_ready()
                self._send(peer, [encode_pong(request_id, ready=ready, live=self.gateway.is_live())])
                return
            self._authenticate(request)
            if request.msg_type is MsgType.METADATA:
                spec = self.gateway.model_spec(request.model)
                meta = model_metadata(spec, ready=self.gateway.model_ready(request.model))
                self._send(peer, [encode_metadata_reply(request_id, meta)])
                return
            if len(self._tasks) >= self.max_inflight:
                busy = ResourceExhausted(
                    f"server busy: {len(self._tasks)} requests in flight (max_inflight {self.max_inflight})"
                )
                self._observer.record(request.model, busy, str(request_id))
                raise busy
            task = asyncio.create_task(self._infer(peer, request, received_ns))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        except EngineError as exc:
            self._send_error(peer, request_id, exc)
        except Exception as exc:
            log.exception("%s: unexpected error handling request %d", self.prefix, request_id)
            self._send_error(peer, request_id, InternalError(f"{type(exc).__name__}: {exc}"), logged=True)

    def _authenticate(self, request: Request) -> None:
        if not self._tokens:
            return
        given = (request.token or "").encode()
        # compare against every token so the time taken does not tell which one nearly matched
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(given, token)
        if not ok:
            raise Unauthenticated("missing or invalid auth token")

    async def _infer(self, peer: bytes, request: Request, received_ns: int) -> None:
        deadline_ns = None
        if request.timeout_us:
            deadline_ns = received_ns + min(request.timeout_us, MAX_TIMEOUT_US) * 1000
        started = self._observer.begin(request.model, str(request.request_id))
        try:
            result = await self.gateway.infer(
                request.model,
                request.inputs,
                outputs=request.outputs,
                deadline_ns=deadline_ns,
                request_id=str(request.request_id),
            )
        except asyncio.CancelledError as exc:
            self._observer.end(request.model, started, exc)
            raise
        except EngineError as exc:
            self._observer.end(request.model, started, exc)
            self._send_error(peer, request.request_id, exc)
        except Exception as exc:
            self._observer.end(request.model, started, exc)
            log.exception(
                "%s: request %d for model %r failed", self.prefix, request.request_id, request.model
            )
            self._send_error(
                peer, request.request_id, InternalError(f"{type(exc).__name__}: {exc}"), logged=True
            )
        else:
            self._observer.end(request.model, started)
            self._send_result(peer, request.request_id, result)

    def _send_result(self, peer: bytes, request_id: int, result: InferResult) -> None:
        try:
            frames = encode_reply(request_id, result.outputs)
            size = frames_nbytes(frames)
            if size > self.settings.max_message_bytes:
                raise ResourceExhausted(
                    f"reply of {size} bytes exceeds max_message_bytes ({self.settings.max_message_bytes})"
                )
        except EngineError as exc:
            result.release()
            self._send_error(peer, request_id, exc)
            return
        except Exception as exc:
            result.release()
            log.exception("%s: cannot encode the reply to request %d", self.prefix, request_id)
            self._send_error(peer, request_id, InternalError(f"{type(exc).__name__}: {exc}"), logged=True)
            return
        if size < ZERO_COPY_THRESHOLD:
            try:
                self._send(peer, frames)  # copies the frames into ZMQ before it returns
            finally:
                result.release()
            return
        tracked = [zmq.Frame(f, copy=False, track=True) for f in frames[1:]]
        self._send(peer, [frames[0], *tracked])
        self._releaser.add(zmq.MessageTracker(*tracked), result)

    def _send_error(self, peer: bytes, request_id: int, error: EngineError, *, logged: bool = False) -> None:
        """Reply ERROR. Internal errors go to the log (unless ``logged`` already), the client sees
        only their public message."""
        if isinstance(error, InternalError):
            if not logged:
                log.error("%s: request %d: %s", self.prefix, request_id, error.message)
        else:
            log.debug("%s: request %d: %s: %s", self.prefix, request_id, error.grpc_code, error.message)
        self._send(peer, [encode_error(request_id, error)])

    def _send(self, peer: bytes, frames: Sequence[Buffer | zmq.Frame]) -> None:
        sock = self._sock
        if sock is None:
            log.warning("%s: reply not sent: the socket is closed", self.prefix)
            return
        self._replied_at = time.monotonic()
        try:
            # send_multipart, without its per-frame enum arithmetic (zmq.SNDMORE | flags builds a
            # Flag each time: ~1 us a frame, 4-6 frames a reply)
            send = sock.send
            parts: tuple[Any, ...] = (peer, *frames)
            for i in range(len(parts) - 1):
                send(parts[i], _MORE_NOBLOCK, copy=True)
            send(parts[-1], _NOBLOCK, copy=True)
        except zmq.ZMQError as exc:
            log.warning("%s: reply not sent: %s", self.prefix, exc)
        self._rearm()


class _Releaser:
    """Releases results whose zero-copy frames ZMQ has finished with.

    pyzmq's ``MessageTracker`` offers only a blocking wait or a ``done`` flag, so one task polls the
    flags, backing off from 0.2 ms to 10 ms while nothing completes; it exits when nothing is pending.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._pending: deque[tuple[zmq.MessageTracker, InferResult]] = deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, tracker: zmq.MessageTracker, result: InferResult) -> None:
        self._pending.append((tracker, result))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        delay = 0.0002
        while self._pending:
            kept: deque[tuple[zmq.MessageTracker, InferResult]] = deque()
            for tracker, result in self._pending:
                if tracker.done:
                    _release(result, self.prefix)
                else:
                    kept.append((tracker, result))
            delay = 0.0002 if len(kept) < len(self._pending) else min(delay * 2, 0.01)
            self._pending = kept
            if kept:
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """At shutdown, after the ZMQ context is terminated: nothing references the memory any more."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._pending:
            _release(self._pending.popleft()[1], self.prefix)


def _release(result: InferResult, prefix: str) -> None:
    try:
        result.release()
    except Exception:
        log.exception("%s: releasing a result failed", prefix)
