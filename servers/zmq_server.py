"""The ZMQ front-end: a ROUTER that speaks `servers.zmq_protocol` to a `Gateway`, over our own ZMTP.

Any ZMQ DEALER (or REQ, or ROUTER) peer connects over TCP; `servers.zmtp` speaks ZMTP 3.x on the event
loop itself, one `asyncio.Protocol` per connection, with no libzmq: a message is parsed where its bytes
arrive and every reply finished in one loop iteration goes out in one ``write`` (libzmq's I/O thread,
pyzmq's per-frame sends and the edge-triggered ``ZMQ_FD`` cost ~70 of the ~190 µs of CPU this process
spent per request). Tensor frames reach the gateway as views of the received bytes, never copied
here. PING and METADATA are answered inline; an inference is admitted at once and answered from
its future's done callback, no task per request, so any number of requests from any number of peers
are in flight at once, bounded by ``max_inflight`` (beyond it: an immediate RESOURCE_EXHAUSTED
reply). Small requests for one batching model read in the same loop iteration go to the gateway as
one request of all their rows (`servers.zmq_coalescing`), each answered with its own rows. Replies go
back on the connection their request came in on.

Limits and their failure modes:

- A frame over ``settings.max_message_bytes`` drops the peer's connection without a reply, before
  any of it is buffered (as libzmq does with ``ZMQ_MAXMSGSIZE``; our clients see the drop and fail
  that request, and any other in flight on the connection, with UNAVAILABLE; a DEALER reconnects by
  itself). A message whose frames add up to more is answered RESOURCE_EXHAUSTED (only its first frame
  is kept). A message of more frames than any request has is a protocol error (dropped too).
- A peer that has not finished the ZMTP handshake within `HANDSHAKE_TIMEOUT_S` is dropped; one that
  sends without reading stops being read while `WRITE_BUFFER_HIGH` bytes of its replies wait.
- At stop, requests in flight get `DRAIN_TIMEOUT_S` to finish, and the connections stay open
  `FAREWELL_S` after the last reply: a DEALER with ``ZMQ_IMMEDIATE`` discards the replies it has not
  read when its connection drops.
- A malformed message of any kind gets an ERROR reply (request id 0 when even the header is
  unreadable) and the connection goes on; a ZMTP protocol error ends the connection.
- Auth: with ``settings.auth_tokens`` set, REQUEST and METADATA must carry one of them
  (constant-time compare) or get UNAUTHENTICATED (code 16). PING needs no token (health probes
  learn only readiness) unless ``settings.auth_health_open`` is false.
- ``settings.reuse_port`` binds with SO_REUSEPORT, so several front-end processes can share the port.

Replies: output arrays may be views into shared memory that stay valid only until
``result.release()``. Replies under `ZERO_COPY_THRESHOLD` bytes are copied into the loop iteration's
one write and released right after it. Larger ones go out in a vectored write without a copy, and
their result is released once the transport holds none of its bytes: right after the write when the
kernel took it all, else when the connection's write buffer has drained (a backing-off timer looks),
or when the connection is lost. A peer that never reads holds the results of the requests it had in
flight until it disconnects (reading it is paused, so it cannot add more).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from engine.errors import EngineError, InternalError, ResourceExhausted, Unavailable
from servers.gateway_api import Buffer, FrontendSettings, Gateway, InferResult
from servers.held_writes import HeldWrites, Release, run_releases
from servers.observer import current as current_observer
from servers.write_coalescing import CoalescedWrites
from servers.zmq_coalescing import Group, Member, SharedResult, group_key
from servers.zmq_protocol import (
    MAX_TENSORS,
    MsgType,
    Request,
    Unauthenticated,
    decode_request,
    encode_error,
    encode_metadata_reply,
    encode_pong,
    encode_replies,
    encode_reply,
    frames_nbytes,
    model_metadata,
    peek_request_id,
)
from servers.zmtp import ServerConnection, ZmtpError

log = logging.getLogger(__name__)

#: In-flight inference requests per front-end process when the settings name no other bound.
DEFAULT_MAX_INFLIGHT = 4096
#: Longest relative deadline honoured (about 11.6 days); larger ones are clamped so that the
#: absolute deadline stays a small int64.
MAX_TIMEOUT_US = 10**12
#: How long `serve` lets in-flight requests finish after ``stop`` is set.
DRAIN_TIMEOUT_S = 5.0
#: How long the connections stay open after the last reply before they close at stop. A client
#: DEALER with ZMQ_IMMEDIATE (ours) discards the replies it has not read yet when the connection
#: drops, so closing right after the drain lost answers of drained requests (8 of 20 in a unit test).
FAREWELL_S = 0.1
#: Replies of at least this many bytes are written without a copy (one vectored write of the
#: loop iteration's replies); smaller ones are copied into one buffer with the others, which costs
#: less than the transport keeping many small pieces.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Seconds a new connection has to complete the ZMTP greeting and READY handshake.
HANDSHAKE_TIMEOUT_S = 10.0
#: Bytes waiting in a connection's write buffer above which its peer is no longer read (until they
#: drain): a peer that sends without reading must not grow this process's memory without bound.
WRITE_BUFFER_HIGH = 4 << 20
#: Frames in one message beyond which the peer is dropped: the header, one per tensor, and a REQ
#: peer's delimiter.
MAX_FRAMES = MAX_TENSORS + 2
#: How long `run` waits for closed connections to say goodbye at stop.
CLOSE_WAIT_S = 1.0


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


def _deadline_ns(request: Request, received_ns: int) -> int:
    """The request's absolute deadline on the monotonic clock, 0 when it has none."""
    if not request.timeout_us:
        return 0
    return received_ns + min(request.timeout_us, MAX_TIMEOUT_US) * 1000


class Peer(CoalescedWrites, ServerConnection, asyncio.Protocol):
    """One peer's TCP connection: ZMTP (`ServerConnection`) on an asyncio transport. Messages go to
    the front-end's `ZmqFrontend.dispatch`; replies are queued by `send` and written once per loop
    iteration."""

    def __init__(self, frontend: ZmqFrontend) -> None:
        limit = frontend.settings.max_message_bytes
        super().__init__(max_frame_bytes=limit, max_message_bytes=limit, max_frames=MAX_FRAMES)
        self.frontend = frontend
        self.loop = frontend.loop
        self.transport: asyncio.Transport | None = None
        self.name = "?"
        self._handshake_timer: asyncio.TimerHandle | None = None
        #: releases of the results whose outputs are queued for the next write
        self._queued: list[Release] = []
        #: those whose outputs the transport may still hold (written, not yet sent)
        self._held = HeldWrites(self.loop, lambda: self.transport, frontend.prefix)
        self._large = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.name = f"{peername[0]}:{peername[1]}"
        self.frontend.peers.add(self)
        self._handshake_timer = self.loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_expired)
        self._write_now()  # greeting and READY

    def connection_lost(self, exc: Exception | None) -> None:
        self.frontend.peers.discard(self)
        self.transport = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.data_to_send()
        run_releases(self._queued, self.frontend.prefix)
        self._held.release_all()

    def data_received(self, data: bytes) -> None:
        try:
            self.receive(data)
        except ZmtpError as exc:
            log.warning("%s: dropping %s: %s", self.frontend.prefix, self.name, exc)
            self.hang_up()
            return
        if self.has_output():
            # the answers given inline (PING, METADATA, errors) to everything this chunk held: written
            # now, not at the end of the loop iteration, which a peer that floods us may hold off
            # for dozens of reads (and the write is what pauses reading a peer that does not read)
            self._write_now()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.frontend.stopping:
            self.transport.resume_reading()

    # -- ZMTP events --------------------------------------------------------------------------------

    def on_ready(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self.frontend.dispatch(self, frames, nbytes)

    # -- replies ------------------------------------------------------------------------------------

    def send(self, frames: Sequence[Buffer], release: Release | None = None, *, large: bool = False) -> bool:
        """Queue a reply; ``release`` (of the result whose outputs ``frames`` may view) runs once they
        are sent. ``large`` (at least `ZERO_COPY_THRESHOLD` bytes): written from where it lies instead
        of copied into one buffer with the other replies. False when the connection is gone (the
        release runs at once)."""
        if self.transport is None or self.transport.is_closing():
            if release is not None:
                run_releases([release], self.frontend.prefix)
            return False
        self.send_message(frames)
        if release is not None:
            self._queued.append(release)
        self._large |= large
        self._schedule_flush()
        return True

    def _write_now(self) -> None:
        transport = self.transport
        if transport is None:
            return
        out = self.data_to_send()
        copied = True
        if self._large:
            # one vectored write, no copy: the transport references what the kernel did not take
            self._large = False
            transport.writelines(cast(list[bytes], out))
            copied = False
        elif out:
            transport.write(b"".join(cast(list[bytes], out)))
        queued = self._queued
        if queued:
            self._queued = []
            if copied:
                run_releases(queued, self.frontend.prefix)
            else:
                self._held.written(queued)

    # -- ending -------------------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        log.warning(
            "%s: dropping %s: no ZMTP handshake in %.0f s",
            self.frontend.prefix,
            self.name,
            HANDSHAKE_TIMEOUT_S,
        )
        self.hang_up()

    def hang_up(self) -> None:
        """Write what is queued (an ERROR command, replies) and close."""
        transport = self.transport
        if transport is None:
            return
        self._write_now()
        transport.close()


class ZmqFrontend:
    """The listening socket, its connections (`Peer`) and the requests in flight (see the module
    docstring).

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
        self.peers: set[Peer] = set()
        self.stopping = False
        self._tokens = tuple(t.encode() for t in settings.auth_tokens)
        #: the gateway's futures of the requests in flight
        self._pending: set[asyncio.Future[Any]] = set()
        #: requests admitted and not yet answered (grouped ones count one each)
        self._admitted = 0
        #: groups forming in this loop iteration, by `group_key`
        self._forming: dict[Hashable, Group] = {}
        self._forming_scheduled = False
        self._specs = {name: gateway.model_spec(name) for name in gateway.model_names()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replied_at = 0.0  # time.monotonic() of the last reply sent
        self._observer = current_observer("zmq", gateway.model_names())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "not running"
        return self._loop

    async def run(self, on_bound: Callable[[int], None], stop: asyncio.Event) -> None:
        """Bind, report the port, serve until ``stop`` is set, then drain and close everything."""
        self._loop = asyncio.get_running_loop()
        server = await self._loop.create_server(
            lambda: Peer(self),
            self.settings.host,
            self.settings.port,
            reuse_port=self.settings.reuse_port or None,
            backlog=1024,
        )
        try:
            port = int(server.sockets[0].getsockname()[1])
            log.info(
                "%s: listening on tcp://%s:%d%s",
                self.prefix,
                self.settings.host,
                port,
                ", SO_REUSEPORT" if self.settings.reuse_port else "",
            )
            on_bound(port)
            await stop.wait()
        finally:
            server.close()
            self.stopping = True
            for peer in list(self.peers):
                if peer.transport is not None:
                    peer.transport.pause_reading()
            await self._drain()
            wait = self._replied_at + FAREWELL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._close_peers()
            log.info("%s: stopped", self.prefix)

    async def _drain(self) -> None:
        self._submit_forming()  # admitted before the stop: answered like the others
        if not self._pending:
            return
        log.info("%s: waiting for %d in-flight requests", self.prefix, len(self._pending))
        _, pending = await asyncio.wait(set(self._pending), timeout=DRAIN_TIMEOUT_S)
        for future in pending:
            future.cancel()  # the gateway releases a result that comes after
        if pending:
            log.warning("%s: cancelled %d requests still running at stop", self.prefix, len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)  # the done callbacks (the answers) run

    async def _close_peers(self) -> None:
        for peer in list(self.peers):
            peer.hang_up()  # writes what is queued first; close() sends the rest before closing
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.peers and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run (it releases what they held)

    # -- per message ---------------------------------------------------------------------------

    def dispatch(self, peer: Peer, parts: list[memoryview], size: int) -> None:
        """Handle one message from ``peer`` (its frames, and its size in bytes)."""
        try:
            self._dispatch(peer, parts, size)
        except Exception:
            # one bad message must never stop the connection
            log.exception("%s: unexpected error handling a message", self.prefix)

    def _dispatch(self, peer: Peer, parts: list[memoryview], size: int) -> None:
        received_ns = time.monotonic_ns()
        if size > self.settings.max_message_bytes:
            self._send_error(
                peer,
                peek_request_id(parts[0]),
                ResourceExhausted(
                    f"message of {size} bytes exceeds max_message_bytes ({self.settings.max_message_bytes})"
                ),
            )
            return
        request_id = -1  # known once the message decodes; read from the header for the error
        try:
            request = decode_request(parts)
            request_id = request.request_id
            if request.msg_type is MsgType.PING:
                # health probes need no token (unless auth_health_open is off): the answer reveals
                # only readiness
                if not self.settings.auth_health_open:
                    self._authenticate(request)
                ready = self.gateway.is_ready() and not self.stopping
                self._send(peer, [encode_pong(request_id, ready=ready, live=self.gateway.is_live())])
                return
            self._authenticate(request)
            if request.msg_type is MsgType.METADATA:
                spec = self.gateway.model_spec(request.model)
                meta = model_metadata(spec, ready=self.gateway.model_ready(request.model))
                self._send(peer, [encode_metadata_reply(request_id, meta)])
                return
            if self.stopping:
                raise Unavailable("server is shutting down")
            if self._admitted >= self.max_inflight:
                busy = ResourceExhausted(
                    f"server busy: {self._admitted} requests in flight (max_inflight {self.max_inflight})"
                )
                self._observer.record(request.model, busy, str(request_id))
                raise busy
            self._admit(peer, request, received_ns)
        except EngineError as exc:
            if request_id < 0:
                request_id = peek_request_id(parts[0])
            self._send_error(peer, request_id, exc)
        except Exception as exc:
            if request_id < 0:
                request_id = peek_request_id(parts[0])
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

    def _admit(self, peer: Peer, request: Request, received_ns: int) -> None:
        """Submit ``request`` now, or hold it in a group with the requests like it that this loop
        iteration brings (`servers.zmq_coalescing`), submitted together when the iteration ends.
        It counts in ``_admitted`` from here until it is answered or refused."""
        self._admitted += 1
        spec = self._specs.get(request.model)
        key = None if spec is None else group_key(request, spec)
        if spec is None or key is None:
            self._submit(peer, request, received_ns)
            return
        started = self._observer.begin(request.model, str(request.request_id))
        deadline_ns = _deadline_ns(request, received_ns)
        group = self._forming.get(key)
        if group is not None and not group.fits(deadline_ns):
            self._submit_group(self._forming.pop(key))
            group = None
        if group is None:
            group = self._forming[key] = Group(spec)
            if not self._forming_scheduled:
                self._forming_scheduled = True
                self.loop.call_soon(self._submit_forming)
        group.add(Member(peer, request, deadline_ns, started))
        if group.full:
            # to the worker now, which may start on it while this iteration reads on
            self._submit_group(self._forming.pop(key))

    def _submit_forming(self) -> None:
        self._forming_scheduled = False
        forming, self._forming = self._forming, {}
        for group in forming.values():
            self._submit_group(group)

    def _submit_group(self, group: Group) -> None:
        members = group.members
        first = members[0]
        if len(members) == 1:
            self._submit_alone(first)
            return
        request = first.request
        try:
            future = self.gateway.submit(
                request.model,
                group.inputs(),
                outputs=request.outputs,
                deadline_ns=group.deadline_ns or None,
                requests=len(members),
            )
        except ResourceExhausted:
            # a bound on requests in flight that the whole group would pass: each is admitted or
            # refused alone, as it would have been without the group
            for member in members:
                self._submit_alone(member)
            return
        except Exception as exc:
            self._admitted -= len(members)
            for member in members:
                self._fail(member.peer, member.request, member.started, exc)
            return
        self._pending.add(future)
        future.add_done_callback(lambda f: self._answer_group(members, f))

    def _submit_alone(self, member: Member) -> None:
        try:
            self._submit_admitted(member.peer, member.request, member.deadline_ns, member.started)
        except Exception as exc:
            self._admitted -= 1
            self._fail(member.peer, member.request, member.started, exc)

    def _answer_group(self, members: list[Member], future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        self._admitted -= len(members)
        if future.cancelled():
            for member in members:
                self._observer.end(member.request.model, member.started, asyncio.CancelledError())
            return
        exc = future.exception()
        if exc is not None:
            for member in members:
                self._fail(member.peer, member.request, member.started, exc)
            return
        result = future.result()
        for member in members:
            self._observer.end(member.request.model, member.started)
        try:
            ids = [member.request.request_id for member in members]
            # every member has the rows of the first (they share a group key)
            replies = encode_replies(ids, result.outputs, members[0].request.inputs[0].shape[0])
            size = self._reply_size(replies[0])
        except Exception as err:
            result.release()
            for member in members:
                self._reply_failed(member.peer, member.request.request_id, err)
            return
        shared = SharedResult(result, len(members))
        for member, frames in zip(members, replies, strict=True):
            self._send_reply(member.peer, member.request.request_id, frames, shared.release_one, size)

    def _fail(self, peer: Peer, request: Request, started: Any, exc: BaseException) -> None:
        """Answer an admitted request with the error its submission or its computation raised."""
        self._observer.end(request.model, started, exc)
        if isinstance(exc, EngineError):
            self._send_error(peer, request.request_id, exc)
            return
        log.error(
            "%s: request %d for model %r failed",
            self.prefix,
            request.request_id,
            request.model,
            exc_info=exc,
        )
        self._send_error(peer, request.request_id, InternalError(f"{type(exc).__name__}: {exc}"), logged=True)

    def _submit(self, peer: Peer, request: Request, received_ns: int) -> None:
        started = self._observer.begin(request.model, str(request.request_id))
        try:
            self._submit_admitted(peer, request, _deadline_ns(request, received_ns), started)
        except BaseException as exc:
            self._admitted -= 1
            self._observer.end(request.model, started, exc)
            raise

    def _submit_admitted(self, peer: Peer, request: Request, deadline_ns: int, started: Any) -> None:
        # no task per request: the gateway's future answers through a done callback
        future = self.gateway.submit(
            request.model, request.inputs, outputs=request.outputs, deadline_ns=deadline_ns or None
        )
        self._pending.add(future)
        future.add_done_callback(lambda f: self._answer(peer, request, started, f))

    def _answer(self, peer: Peer, request: Request, started: Any, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        self._admitted -= 1
        if future.cancelled():
            self._observer.end(request.model, started, asyncio.CancelledError())
            return
        exc = future.exception()
        if exc is None:
            self._observer.end(request.model, started)
            self._send_result(peer, request.request_id, future.result())
            return
        self._fail(peer, request, started, exc)

    def _send_result(self, peer: Peer, request_id: int, result: InferResult) -> None:
        try:
            frames = encode_reply(request_id, result.outputs)
            size = self._reply_size(frames)
        except Exception as exc:
            result.release()
            self._reply_failed(peer, request_id, exc)
            return
        self._send_reply(peer, request_id, frames, result.release, size)

    def _reply_size(self, frames: Sequence[Buffer]) -> int:
        size = frames_nbytes(frames)
        if size > self.settings.max_message_bytes:
            raise ResourceExhausted(
                f"reply of {size} bytes exceeds max_message_bytes ({self.settings.max_message_bytes})"
            )
        return size

    def _reply_failed(self, peer: Peer, request_id: int, exc: Exception) -> None:
        """Answer ERROR for a result that could not be encoded (or is too large to send)."""
        if isinstance(exc, EngineError):
            self._send_error(peer, request_id, exc)
            return
        log.error("%s: cannot encode the reply to request %d", self.prefix, request_id, exc_info=exc)
        self._send_error(peer, request_id, InternalError(f"{type(exc).__name__}: {exc}"), logged=True)

    def _send_reply(
        self, peer: Peer, request_id: int, frames: Sequence[Buffer], release: Release, size: int
    ) -> None:
        self._replied_at = time.monotonic()
        if not peer.send(frames, release, large=size >= ZERO_COPY_THRESHOLD):
            log.debug("%s: reply to request %d not sent: %s has gone", self.prefix, request_id, peer.name)

    def _send_error(self, peer: Peer, request_id: int, error: EngineError, *, logged: bool = False) -> None:
        """Reply ERROR. Internal errors go to the log (unless ``logged`` already), the client sees
        only their public message."""
        if isinstance(error, InternalError):
            if not logged:
                log.error("%s: request %d: %s", self.prefix, request_id, error.message)
        else:
            log.debug("%s: request %d: %s: %s", self.prefix, request_id, error.grpc_code, error.message)
        self._send(peer, [encode_error(request_id, error)])

    def _send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        self._replied_at = time.monotonic()
        if not peer.send(frames):
            log.debug("%s: reply not sent: %s has gone", self.prefix, peer.name)
