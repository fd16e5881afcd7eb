"""Load clients, one per protocol, that spend as little client CPU per request as they can.

Every request is serialised once, before the run: gRPC sends the ModelInferRequest's bytes through a
generic ``unary_unary`` without serializers (no protobuf work per call), ZMQ sends prebuilt frames
(only the 8-byte request id is patched into a copy of the header), REST writes one prebuilt HTTP/1.1
request (header and binary tensor body) on a keep-alive connection per in-flight slot and reads the
answer with a minimal `asyncio.Protocol` parser. Answers are only parsed when a spot check is due.

A `Target` hands out one `Call` per in-flight slot; ``await call(check)`` sends one request and
returns None on success, else an error code (the gRPC status name, ``HTTP_<status>``, the ZMQ error's
gRPC name, ``TIMEOUT``, ``CONNECTION``, `WRONG_ANSWER` when a checked answer differs). A call never
raises, so the load loops stay tiny.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import numpy as np
import orjson

from bench.grpc_h2_client import STATUS_NAMES, GrpcH2Connection, connect, framed, request_header_block
from bench.load_payload import Payload
from bench.load_stats import WRONG_ANSWER

#: One request of one slot: ``await call(check)`` -> None or an error code.
Call = Callable[[bool], Awaitable[str | None]]
#: The protocols a load can speak, and the engine endpoint each uses.
PROTOCOLS = ("grpc", "zmq", "rest")
ENDPOINT_OF = {"grpc": "grpc", "zmq": "zmq", "rest": "rest"}
#: gRPC load clients: ``h2``, HTTP/2 spoken by hand (`bench.grpc_h2_client`, ~4x less client CPU per
#: call), or ``grpcio``, grpc.aio (grpc core: what most Python services call with)
GRPC_CLIENTS = ("h2", "grpcio")
#: ZMQ load clients: ``zmtp``, a DEALER spoken by hand (`servers.client.zmtp_dealer`, as the engine's
#: asyncio client speaks; about half pyzmq's client CPU per request), or ``pyzmq`` (libzmq: what most
#: Python services would call a ZMQ server with)
ZMQ_CLIENTS = ("zmtp", "pyzmq")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_U64_LE = struct.Struct("<Q")
#: a ZMQ message's frames, as either client hands them over
Frames = Sequence[bytes | memoryview]
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_HEADER_LENGTH = re.compile(rb"(?i)\r\ninference-header-content-length:\s*(\d+)")


class Target:
    """A server endpoint speaking one protocol, with the request to send.

    Args:
        address: ``host:port`` of the endpoint.
        payload: the request and its expected answer.
        timeout_s: per-request timeout (a request past it is counted as ``TIMEOUT`` or
            ``DEADLINE_EXCEEDED``).
    """

    protocol = ""

    def __init__(self, address: str, payload: Payload, timeout_s: float = 30.0) -> None:
        self.address = address
        self.payload = payload
        self.timeout_s = timeout_s

    async def open(self) -> None:
        """Connect (called once, inside the running loop, before any `slot`)."""

    def slot(self) -> Call:
        """A call for one in-flight slot (slots may share a connection)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection."""


def make_target(
    protocol: str,
    address: str,
    payload: Payload,
    timeout_s: float = 30.0,
    grpc_client: str = "h2",
    zmq_client: str = "zmtp",
) -> Target:
    """The `Target` for ``protocol`` (``grpc``, ``zmq`` or ``rest``); gRPC through ``grpc_client``,
    ZMQ through ``zmq_client``."""
    classes: dict[str, type[Target]] = {"grpc": GrpcTarget, "zmq": ZmqTarget, "rest": RestTarget}
    if protocol not in classes:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if grpc_client not in GRPC_CLIENTS:
        raise ValueError(f"unknown gRPC client {grpc_client!r}; one of {', '.join(GRPC_CLIENTS)}")
    if zmq_client not in ZMQ_CLIENTS:
        raise ValueError(f"unknown ZMQ client {zmq_client!r}; one of {', '.join(ZMQ_CLIENTS)}")
    if protocol == "grpc" and grpc_client == "h2":
        return GrpcH2Target(address, payload, timeout_s)
    if protocol == "zmq" and zmq_client == "zmtp":
        return ZmtpTarget(address, payload, timeout_s)
    return classes[protocol](address, payload, timeout_s)


def _verify(payload: Payload, outputs: dict[str, np.ndarray]) -> str | None:
    return None if payload.verify(outputs) else WRONG_ANSWER


# ---- gRPC ----------------------------------------------------------------------------------------


def grpc_request_bytes(payload: Payload) -> bytes:
    """The serialised ModelInferRequest of ``payload`` (raw input contents)."""
    from engine.dtypes import kserve_name
    from protos import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=payload.model)
    for name, array in payload.inputs.items():
        request.inputs.add(name=name, datatype=kserve_name(array.dtype), shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return bytes(request.SerializeToString())


def grpc_response_outputs(raw: bytes) -> dict[str, np.ndarray]:
    """The outputs of a serialised ModelInferResponse (raw output contents)."""
    from engine.dtypes import numpy_dtype
    from protos import grpc_service_pb2 as pb

    response = pb.ModelInferResponse.FromString(raw)
    return {
        out.name: np.frombuffer(data, dtype=numpy_dtype(out.datatype)).reshape(tuple(out.shape))
        for out, data in zip(response.outputs, response.raw_output_contents, strict=False)
    }


class GrpcTarget(Target):
    """KServe v2 ModelInfer over one grpc.aio channel (HTTP/2: every slot shares the connection)."""

    protocol = "grpc"

    async def open(self) -> None:
        import grpc
        import grpc.aio

        self._code_names = {code: code.name for code in grpc.StatusCode}
        self._error = grpc.aio.AioRpcError
        self._channel = grpc.aio.insecure_channel(
            self.address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        await asyncio.wait_for(self._channel.channel_ready(), self.timeout_s)
        # no serializers: the call takes and returns bytes
        self._method = self._channel.unary_unary(MODEL_INFER)
        self._request = grpc_request_bytes(self.payload)

    def slot(self) -> Call:
        method, request, timeout, payload = self._method, self._request, self.timeout_s, self.payload
        error, names = self._error, self._code_names

        async def call(check: bool) -> str | None:
            try:
                raw = await method(request, timeout=timeout)
            except error as exc:
                return names.get(exc.code(), "UNKNOWN")
            if check:
                return _verify(payload, grpc_response_outputs(raw))
            return None

        return call

    async def close(self) -> None:
        await self._channel.close()


class GrpcH2Target(Target):
    """KServe v2 ModelInfer over one HTTP/2 connection spoken by `bench.grpc_h2_client` (every slot
    shares it); a connection that failed is replaced at the next call."""

    protocol = "grpc"

    async def open(self) -> None:
        self._host, _, port = self.address.rpartition(":")
        self._port = int(port)
        self._block = request_header_block(MODEL_INFER, self.address, self.timeout_s)
        self._body = framed(grpc_request_bytes(self.payload))
        self._connecting: asyncio.Future[GrpcH2Connection] | None = None
        self._opened: list[GrpcH2Connection] = []
        self._connection = await self._connect()

    async def _connect(self) -> GrpcH2Connection:
        connection = await connect(self._host, self._port, self.timeout_s, connect_timeout_s=self.timeout_s)
        self._opened.append(connection)
        return connection

    async def _reconnect(self) -> GrpcH2Connection:
        # the slots that find the connection gone share one new one
        if self._connection.accepting:
            return self._connection
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            connection = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._connection = connection
        return connection

    def slot(self) -> Call:
        block, body, payload, names = self._block, self._body, self.payload, STATUS_NAMES

        async def call(check: bool) -> str | None:
            connection = self._connection
            try:
                if not connection.accepting:
                    connection = await self._reconnect()
                answer = await connection.unary(block, body, check)
            except (OSError, TimeoutError):  # ConnectionError is an OSError
                return "UNAVAILABLE"
            if answer.code:
                return names[answer.code] if answer.code < len(names) else "UNKNOWN"
            if check:
                return _verify(payload, grpc_response_outputs(answer.message))
            return None

        return call

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        for connection in self._opened:  # a replaced one may still carry calls
            connection.close()
        self._opened.clear()


# ---- ZMQ -----------------------------------------------------------------------------------------


class _ZmqTarget(Target):
    """What both ZMQ load clients share: prebuilt frames (only the 8-byte request id patched into a
    copy of the header per request), replies matched to requests by id, one sweep timer for every
    request's timeout."""

    protocol = "zmq"

    def _prepare(self) -> None:
        from servers.zmq_protocol import MsgType, encode_request

        frames = encode_request(
            0, self.payload.model, self.payload.inputs, timeout_us=int(self.timeout_s * 1e6)
        )
        self._header = bytes(frames[0])
        self._tensors = [bytes(f) for f in frames[1:]]
        self._reply_type = int(MsgType.REPLY)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frames]] = {}
        #: send time (loop clock) of every request not yet answered, in send order
        self._sent_at: dict[int, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_s = max(0.01, self.timeout_s / 8)
        self._loop = asyncio.get_running_loop()

    def _request(self) -> tuple[bytearray, asyncio.Future[Frames]]:
        """A new request: its header (the request id patched in) and the future of its reply."""
        request_id = next(self._ids)
        head = bytearray(self._header)
        _U64_LE.pack_into(head, 8, request_id)
        future: asyncio.Future[Frames] = self._loop.create_future()
        self._pending[request_id] = future
        self._sent_at[request_id] = self._loop.time()
        return head, future

    def _outcome(self, frames: Frames, check: bool) -> str | None:
        """None for a good reply; otherwise (or when asked to ``check`` it) what `_zmq_outcome` says."""
        if frames[0][5] != self._reply_type or check:
            return _zmq_outcome(frames, self.payload)
        return None

    def _answer(self, frames: Frames) -> None:
        """A reply came: its request's call returns."""
        if not frames or len(frames[0]) < 16:
            return
        (request_id,) = _U64_LE.unpack_from(frames[0], 8)
        self._sent_at.pop(request_id, None)
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(frames)

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _sweep(self) -> None:
        # one timer for every request's timeout, not one per request: requests are sent in id
        # order, so the overdue ones are at the front of `_sent_at`
        self._sweeper = None
        sent_at, pending = self._sent_at, self._pending
        overdue = self._loop.time() - self.timeout_s
        for request_id, at in list(sent_at.items()):
            if at > overdue:
                break
            del sent_at[request_id]
            future = pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(TimeoutError())
        if self._is_open():
            self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)

    def _stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class ZmqTarget(_ZmqTarget):
    """The ZMQ front-end over one pyzmq DEALER socket (libzmq: the client most users have)."""

    async def open(self) -> None:
        import zmq

        # A plain socket read by the event loop (as the server's), not zmq.asyncio: its futures and
        # per-call event registration cost the client half its CPU per request on 2 shared cores.
        self._prepare()
        self._zmq = zmq
        self._ctx: Any = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        address = self.address if "://" in self.address else f"tcp://{self.address}"
        self._sock.connect(address)
        self._fd = int(self._sock.getsockopt(zmq.FD))
        self._read_scheduled = False
        self._loop.add_reader(self._fd, self._read)
        self._read()

    def _is_open(self) -> bool:
        return not self._sock.closed

    def _read(self) -> None:
        """Take every reply waiting (ZMQ_FD is edge-triggered: read until EAGAIN)."""
        self._read_scheduled = False
        sock, again, noblock = self._sock, self._zmq.Again, self._zmq.NOBLOCK
        if sock.closed:
            return
        for _ in range(256):
            try:
                frames = sock.recv_multipart(noblock)
            except again:
                return
            self._answer(frames)
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read)

    def slot(self) -> Call:
        tensors, sock, request, outcome = self._tensors, self._sock, self._request, self._outcome
        events, pollin = self._zmq.EVENTS, int(self._zmq.POLLIN)
        # plain int flags and one send per frame: send_multipart builds Flag enums per frame
        more, last = int(self._zmq.SNDMORE) | int(self._zmq.NOBLOCK), int(self._zmq.NOBLOCK)
        send = sock.send
        self._start_sweeping()

        async def call(check: bool) -> str | None:
            head, future = request()
            try:
                if tensors:
                    send(head, more)
                    for tensor in tensors[:-1]:
                        send(tensor, more)
                    send(tensors[-1], last)
                else:
                    send(head, last)
                # a send can consume the edge of a reply that arrived meanwhile
                if int(sock.getsockopt(events)) & pollin:
                    self._schedule_read()
                frames = await future
            except TimeoutError:
                return "TIMEOUT"
            return outcome(frames, check)

        return call

    async def close(self) -> None:
        self._stop_sweeping()
        self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)  # a pending call_soon(_read) then returns at once
        self._ctx.term()


class ZmtpTarget(_ZmqTarget):
    """The ZMQ front-end over one connection of our own DEALER (`servers.client.zmtp_dealer`: ZMTP by
    hand, every request of one loop iteration in one write; ~half pyzmq's client CPU per request)."""

    async def open(self) -> None:
        from servers.client.zmtp_dealer import connect

        self._prepare()
        host, _, port = self.address.rpartition("://")[2].rpartition(":")
        self._conn = await connect(host.strip("[]") or "127.0.0.1", int(port), self._answer)
        self._conn.closed.add_done_callback(self._lost)

    def _is_open(self) -> bool:
        return not self._conn.closed.done()

    def _lost(self, _: asyncio.Future[BaseException]) -> None:
        # the connection is gone: nothing pending will be answered
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the ZMQ connection closed"))
        self._pending.clear()
        self._sent_at.clear()

    def slot(self) -> Call:
        tensors, conn, request, outcome = self._tensors, self._conn, self._request, self._outcome
        self._start_sweeping()

        async def call(check: bool) -> str | None:
            if conn.closed.done():
                return "CONNECTION"
            head, future = request()
            conn.send((head, *tensors))
            try:
                frames = await future
            except TimeoutError:
                return "TIMEOUT"
            except ConnectionError:
                return "CONNECTION"
            return outcome(frames, check)

        return call

    async def close(self) -> None:
        self._stop_sweeping()
        self._conn.close()


def _zmq_outcome(frames: Frames, payload: Payload) -> str | None:
    from engine.errors import EngineError
    from servers.zmq_protocol import decode_reply

    try:
        reply = decode_reply(frames)
    except EngineError as exc:
        return f"BAD_REPLY_{exc.grpc_code}"
    if reply.error is not None:
        return reply.error.grpc_code
    return _verify(payload, reply.outputs or {})


# ---- REST ----------------------------------------------------------------------------------------


def rest_request_bytes(host: str, payload: Payload) -> bytes:
    """The whole HTTP/1.1 request (head and body) of ``payload`` with binary tensors both ways."""
    from engine.dtypes import kserve_name

    entries = []
    tails = []
    for name, array in payload.inputs.items():
        data = np.ascontiguousarray(array).tobytes()
        entries.append(
            {
                "name": name,
                "datatype": kserve_name(array.dtype),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        tails.append(data)
    header = orjson.dumps({"inputs": entries, "parameters": {"binary_data_output": True}})
    body = header + b"".join(tails)
    head = (
        f"POST /v2/models/{payload.model}/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def rest_response_outputs(head: bytes, body: bytes) -> dict[str, np.ndarray]:
    """The outputs of a KServe v2 HTTP response (JSON, or JSON header plus binary tensors)."""
    from engine.dtypes import numpy_dtype

    match = _HEADER_LENGTH.search(head)
    json_length = int(match[1]) if match else len(body)
    document: dict[str, Any] = orjson.loads(body[:json_length])
    outputs: dict[str, np.ndarray] = {}
    at = json_length
    for entry in document.get("outputs", []):
        dtype = numpy_dtype(entry["datatype"])
        shape = tuple(entry["shape"])
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[entry["name"]] = np.frombuffer(body[at : at + size], dtype=dtype).reshape(shape)
            at += size
        else:
            outputs[entry["name"]] = np.asarray(entry["data"], dtype=dtype).reshape(shape)
    return outputs


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None:
            return
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[: end + 2])
        match = _CONTENT_LENGTH.search(head)
        if match is None:
            self._fail(ConnectionError(f"response without Content-Length: {head[:200]!r}"))
            return
        total = end + 4 + int(match[1])
        if len(buffer) < total:
            return
        body = bytes(buffer[end + 4 : total])
        del buffer[:total]
        self._waiter = None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), head, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self._transport is not None:
            self._transport.close()
        self.closed = True

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes, bytes]]:
        """Send ``raw``; the future gives (status, head, body)."""
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return self._waiter

    def abort(self) -> None:
        """Drop the connection (a request timed out: its answer may still come, on a dead socket)."""
        self._fail(TimeoutError())


class RestTarget(Target):
    """KServe v2 HTTP with binary tensors: one keep-alive connection per slot."""

    protocol = "rest"

    async def open(self) -> None:
        self._host, _, port = self.address.rpartition(":")
        self._port = int(port)
        self._raw = rest_request_bytes(self._host, self.payload)
        self._connections: list[HttpConnection] = []

    async def _connect(self) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(HttpConnection, self._host, self._port)
        self._connections.append(connection)
        return connection

    def slot(self) -> Call:
        loop = asyncio.get_running_loop()
        raw, timeout, payload = self._raw, self.timeout_s, self.payload
        held: list[HttpConnection] = []

        async def call(check: bool) -> str | None:
            try:
                if not held or held[0].closed:
                    held[:] = [await self._connect()]
                connection = held[0]
                future = connection.request(raw)
                timer = loop.call_later(timeout, connection.abort)
                try:
                    status, head, body = await future
                finally:
                    timer.cancel()
            except TimeoutError:
                return "TIMEOUT"
            except OSError:
                return "CONNECTION"
            if status != 200:
                return f"HTTP_{status}"
            if check:
                return _verify(payload, rest_response_outputs(head, body))
            return None

        return call

    async def close(self) -> None:
        for connection in self._connections:
            connection.abort()
        self._connections.clear()
