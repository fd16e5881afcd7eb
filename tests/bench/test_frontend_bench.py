"""pytest-benchmark of the ZMQ front-end's own work per read: 32 requests in, 32 replies out.

The real `ZmqFrontend` and `Peer` (ZMTP, decode, coalescing, the observer, reply encoding) run on a
uvloop loop with a transport that keeps what is written and a gateway that answers each
submission in the next loop iteration, so no socket, shared memory or worker is measured: what is
left is the front-end's Python per request (plus the client side's ZMTP parse of each reply, ~0.8
µs), the part a full `bench load` run cannot resolve under its ~40% hour-to-hour noise. Divide a
round's time by 32 for the figure per request: median 360 µs per round, ~11 µs per request, on the
2-core VM (BENCHMARKS.md §7). Every round's 32 replies are decoded and checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import uvloop

from engine.models.spec import DynamicBatching, ModelSpec, TensorSpec
from servers import zmtp
from servers.client.zmtp_dealer import DealerZmtp
from servers.gateway_api import FrontendSettings, InferInput
from servers.zmq_protocol import MsgType, decode_reply, encode_request
from servers.zmq_server import Peer, ZmqFrontend
from tests.fakes import FakeGateway, FakeResult

#: Requests per read: what the lean load client's one write holds at c=64 (~30, §7).
PER_READ = 32
#: The built-in mlp's shapes and batching, without its model.
SPEC = ModelSpec(
    name="mlp",
    backend="python",
    inputs=(TensorSpec("INPUT0", "FP32", (256,)),),
    outputs=(TensorSpec("OUTPUT0", "FP32", (256,)),),
    max_batch_size=256,
    dynamic_batching=DynamicBatching(max_queue_delay_us=2000, pipeline_rows=32),
)


class InstantGateway(FakeGateway):
    """Answers every submission with its own inputs (identity), in the next loop iteration."""

    def model_names(self) -> list[str]:
        return [SPEC.name]

    def model_spec(self, name: str) -> ModelSpec:
        return SPEC

    def submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        requests: int = 1,
    ) -> asyncio.Future[FakeResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FakeResult] = loop.create_future()
        rows = np.frombuffer(inputs[0].data, np.float32).reshape(inputs[0].shape)
        loop.call_soon(future.set_result, FakeResult(model, "", {"OUTPUT0": rows}))
        return future


class ClientSide(DealerZmtp):
    """The load client's end of the connection: parses what the front-end wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[list[bytes]] = []

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self.replies.append([bytes(f) for f in frames])


class KeptTransport(asyncio.Transport):
    """A transport that hands what the front-end writes to the client's parser."""

    def __init__(self, client: ClientSide) -> None:
        super().__init__()
        self.client = client

    def write(self, data: Any) -> None:
        self.client.receive(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.client.receive(b"".join(bytes(memoryview(d)) for d in list_of_data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _wire(messages: Sequence[Sequence[Any]]) -> bytes:
    out = bytearray()
    for frames in messages:
        for i, frame in enumerate(frames):
            body = bytes(frame)
            out += zmtp.frame_head(len(body), i < len(frames) - 1) + body
    return bytes(out)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def test_zmq_frontend_read_of_32(
    benchmark: Any, bench_quick_mode: bool, loop: asyncio.AbstractEventLoop
) -> None:
    client = ClientSide()
    rows = np.random.default_rng(0).standard_normal((PER_READ, 256), dtype=np.float32)
    read = _wire(
        [
            encode_request(i + 1, SPEC.name, {"INPUT0": rows[i : i + 1]}, timeout_us=30_000_000)
            for i in range(PER_READ)
        ]
    )

    async def connect() -> Peer:
        frontend = ZmqFrontend(InstantGateway(), FrontendSettings())
        frontend._loop = asyncio.get_running_loop()  # what `run` sets before it serves
        peer = Peer(frontend)
        peer.connection_made(KeptTransport(client))
        peer.data_received(zmtp.GREETING + zmtp.ready([(b"Socket-Type", b"DEALER")]))
        return peer

    peer = loop.run_until_complete(connect())
    assert client.ready, "the front-end's greeting and READY reached the client"

    async def one_read() -> None:
        peer.data_received(read)
        for _ in range(64):  # the groups' submissions, their answers, then the writes
            if len(client.replies) == PER_READ:
                return
            await asyncio.sleep(0)

    def round_trip() -> list[list[bytes]]:
        client.replies.clear()
        loop.run_until_complete(one_read())
        return list(client.replies)

    if bench_quick_mode:
        replies = benchmark.pedantic(round_trip, rounds=5, iterations=1, warmup_rounds=2)
    else:
        replies = benchmark(round_trip)
    assert len(replies) == PER_READ
    for i, frames in enumerate(sorted(replies, key=lambda f: decode_reply(f).request_id)):
        reply = decode_reply(frames)
        assert (reply.msg_type, reply.request_id) == (MsgType.REPLY, i + 1)
        assert reply.outputs is not None
        np.testing.assert_array_equal(reply.outputs["OUTPUT0"], rows[i : i + 1])
    assert peer.frontend._admitted == 0
