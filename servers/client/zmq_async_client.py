"""The asyncio client of the ZMQ front-end: `AsyncZmqClient` (re-exported by `servers.client.zmq_client`).

It behaves as `servers.client.zmq_client` describes (one DEALER per endpoint, replies matched by id,
round robin over several endpoints, requests moved on UNAVAILABLE, RESOURCE_EXHAUSTED or a dropped
connection); here each request is one coroutine that awaits its reply, trying one endpoint after
another within its timeout, and one background task per endpoint watches its socket monitor.

Replies are read and requests sent on plain (synchronous, non-blocking) views of the sockets, driven
by the loop's reader on each socket's ``ZMQ_FD``, not through zmq.asyncio: its futures, event
bookkeeping and ``Flag`` enums per call were half of this client's CPU per request (~100 µs at 64 in
flight, measured); only the monitors stay on zmq.asyncio.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine.errors import DeadlineExceeded, Unavailable
from servers.client.endpoints import DEFAULT_COOLDOWN_S, EndpointPool
from servers.client.zmq_common import (
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

#: replies taken per turn of the loop before other work runs
READ_BATCH = 256
#: how long a sender waits before looking again when every connected endpoint is full
FULL_RETRY_S = 0.001
_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


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
        to_timeout_us(timeout_s)
        self.pool = EndpointPool(endpoint, cooldown_s=cooldown_s)
        self.endpoints = self.pool.endpoints
        self.endpoint = ",".join(self.endpoints)
        self.timeout_s = timeout_s
        self.token = token
        self._ctx = zmq.asyncio.Context()
        pairs: list[tuple[zmq.Socket[Any], zmq.Socket[Any]]] = []
        self._finalizer = weakref.finalize(self, close_endpoints, pairs, self._ctx)
        try:
            for address in self.endpoints:
                pairs.append(open_endpoint(self._ctx, address))
        except BaseException:
            self._finalizer()  # a bad address: close what was opened
            raise
        self._socks: list[zmq.asyncio.Socket] = [sock for sock, _ in pairs]  # type: ignore[misc]
        #: the same sockets, synchronous: sends and reads go through these (see the module's doc)
        self._plain: list[zmq.Socket[Any]] = [zmq.Socket.shadow(sock.underlying) for sock in self._socks]
        self._read_scheduled = [False] * len(self._socks)
        #: per endpoint, the running reader's stop future (which reader owns the fd's callback)
        self._readers: list[asyncio.Future[None] | None] = [None] * len(self._socks)
        self._monitors: list[zmq.asyncio.Socket] = [monitor for _, monitor in pairs]  # type: ignore[misc]
        self._ids = RequestIds()
        self._pending: dict[int, _Attempt] = {}
        #: per endpoint: its connection dropped and no new one is up yet (see `_monitor_loop`)
        self._stale = [False] * len(self._socks)
        #: futures of senders waiting for a connection to come back
        self._reconnect_waiters: list[asyncio.Future[None]] = []
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
        self._tasks = [asyncio.create_task(self._reader(i)) for i in range(len(self._socks))]
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
        to_timeout_us(timeout)
        self._start()
        deadline = time.monotonic() + timeout
        tried: list[int] = []
        request_id = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    request_id = self._ids.next()
                    attempt = await self._send(request_id, build(request_id, remaining_us(deadline)), tried)
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
                    if moves_on(reply) and can_move(self.pool, tried, attempt.endpoint):
                        if isinstance(reply.error, Unavailable):
                            self.pool.mark_down(attempt.endpoint)
                        tried.append(attempt.endpoint)
                        continue
                    return unpack_reply(reply, expected)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply to request {request_id} from {self.endpoint} within {timeout} s"
            ) from None

    async def _send(self, request_id: int, frames: Frames, tried: list[int]) -> _Attempt:
        """Send to the first candidate endpoint that takes the message now; when none does (none is
        connected, or all are full), wait until one can."""
        loop = asyncio.get_running_loop()
        while True:
            candidates = [i for i in self.pool.candidates(exclude=tried) if not self._stale[i]]
            for index in candidates:
                attempt = _Attempt(loop.create_future(), index, tried)
                self._pending[request_id] = attempt  # before the send: the reply may beat us to it
                if not self._send_now(index, frames):
                    del self._pending[request_id]
                    continue
                return attempt
            # bounded by the caller's timeout
            reconnected: asyncio.Future[None] = loop.create_future()
            self._reconnect_waiters.append(reconnected)
            try:
                if candidates:  # connected but full: look again soon (the readers hold the sockets' fds)
                    await asyncio.wait([reconnected], timeout=FULL_RETRY_S)
                else:
                    await reconnected
            finally:
                if reconnected in self._reconnect_waiters:
                    self._reconnect_waiters.remove(reconnected)

    def _send_now(self, index: int, frames: Frames) -> bool:
        """Send ``frames`` on endpoint ``index`` if it takes them without waiting (False if full)."""
        sock = self._plain[index]
        last = len(frames) - 1
        try:
            # frame by frame with int flags: send_multipart builds Flag enums per frame. Only the
            # first frame can meet the high-water mark: a message's later frames always go.
            for i, frame in enumerate(frames):
                sock.send(frame, _MORE if i < last else _LAST, copy=False)
        except zmq.Again:
            return False
        finally:
            # a send can take the edge of a reply that came meanwhile: ZMQ_FD would not fire for it
            if int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                self._schedule_read(index)
        return True

    async def _reader(self, index: int) -> None:
        """Reads endpoint ``index``'s replies from the loop's reader on its ``ZMQ_FD`` while the
        client runs; ends (and is restarted by the next call) if reading fails."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        fd = int(self._plain[index].get(zmq.FD))
        loop.add_reader(fd, self._read, index, failed)
        self._readers[index] = failed
        try:
            self._read(index, failed)
            await failed
        finally:
            if self._readers[index] is failed:  # not a reader started since, on the same fd
                loop.remove_reader(fd)

    def _schedule_read(self, index: int) -> None:
        if self._read_scheduled[index] or not self._running:
            return
        reader = self._tasks[index] if index < len(self._tasks) else None
        if reader is not None and not reader.done():
            # flagged only while a read is really pending: a reader restarted later must not find
            # the flag stuck and miss the edge it stands for
            self._read_scheduled[index] = True
            asyncio.get_running_loop().call_soon(self._read_later, index)

    def _read_later(self, index: int) -> None:
        self._read_scheduled[index] = False
        if self._running and not self._closed:
            self._read(index, None)

    def _read(self, index: int, failed: asyncio.Future[None] | None) -> None:
        """Take every reply waiting (ZMQ_FD is edge-triggered: read until EAGAIN)."""
        sock, endpoint, pending = self._plain[index], self.endpoints[index], self._pending
        try:
            for _ in range(READ_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                reply = decode_pending([f.buffer for f in frames], pending, endpoint)
                if reply is not None:
                    future = pending[reply.request_id].future
                    if not future.done():
                        future.set_result(reply)
            self._schedule_read(index)  # more may wait: let other work run first
        except Exception as exc:
            log.exception("zmq client %s: reader stopped", endpoint)
            self._running = False  # now, not when the reader's task ends: the very next call restarts it
            self._fail_pending(Unavailable(f"zmq client reader stopped: {exc}"))
            reader = self._tasks[index] if index < len(self._tasks) else None
            if failed is None and reader is not None:
                reader.cancel()  # ends the reader; the next call restarts it
            elif failed is not None and not failed.done():
                failed.set_result(None)  # the reader ends normally; the next call restarts it

    async def _monitor_loop(self, index: int) -> None:
        monitor = self._monitors[index]
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                # stale from a drop to the next connect: see zmq_common.MONITOR_EVENTS
                if event == zmq.EVENT_CONNECTED:
                    self._stale[index] = False
                    self.pool.mark_up(index)
                    waiters, self._reconnect_waiters = self._reconnect_waiters, []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                elif event == zmq.EVENT_DISCONNECTED:
                    self._stale[index] = True
                    self._lost(index)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zmq client %s: monitor stopped", self.endpoints[index])

    def _lost(self, index: int) -> None:
        """The connection to endpoint ``index`` dropped: its unanswered requests move elsewhere, or
        fail with Unavailable when no endpoint is left to try (no answer can come any more)."""
        self.pool.mark_down(index)
        moved = failed = 0
        for request_id, attempt in self._pending.items():
            if attempt.endpoint != index or attempt.future.done():
                continue
            if can_move(self.pool, attempt.tried, index):
                attempt.future.set_exception(_Lost())
                moved += 1
            else:
                attempt.future.set_exception(connection_lost(request_id, self.endpoints[index]))
                failed += 1
        if moved or failed:
            log.warning(
                "zmq client: connection to %s lost; %d requests moved, %d failed",
                self.endpoints[index],
                moved,
                failed,
            )

    def _fail_pending(self, error: Exception) -> None:
        for attempt in self._pending.values():
            if not attempt.future.done():
                attempt.future.set_exception(error)
        self._pending.clear()


__all__ = ["AsyncZmqClient"]
