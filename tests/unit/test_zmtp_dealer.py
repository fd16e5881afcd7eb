"""Our hand-spoken ZMQ DEALER (`servers.client.zmtp_dealer`) against libzmq's own sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from bench.load_payload import Payload
from bench.load_targets import make_target
from servers.client.zmtp_dealer import connect
from servers.zmtp import ZmtpError


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _serve(router: zmq.Socket[bytes], stop: threading.Event, reply: bool = True) -> threading.Thread:
    """A ROUTER that answers each message with its frames reversed (or takes them and says nothing)."""

    def loop() -> None:
        while not stop.is_set():
            if router.poll(20):
                peer, *frames = router.recv_multipart()
                if reply:
                    router.send_multipart([peer, *reversed(frames)])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_messages_short_and_long_frames_round_trip_through_a_libzmq_router(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    thread = _serve(router, stop)
    # frames under and over 255 bytes (short and long frame headers), an empty one, and 1 MiB
    messages = [
        [b"a", b"bc"],
        [b"x" * 255, b"y" * 256, b""],
        [bytes(range(256)) * 4096],
        [b"one"],
    ]

    async def scenario() -> list[list[bytes]]:
        got: list[list[bytes]] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(frames: list[memoryview]) -> None:
            got.append([bytes(f) for f in frames])
            if len(got) == len(messages) and not done.done():
                done.set_result(None)

        conn = await connect("127.0.0.1", port, on_message)
        try:
            for message in messages:  # queued in one loop iteration: one write
                conn.send(message)
            await asyncio.wait_for(done, 10)
        finally:
            conn.close()
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        stop.set()
        thread.join(5)
    assert got == [list(reversed(m)) for m in messages]


def test_a_peer_that_is_not_a_router_is_refused(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    dealer = ctx.socket(zmq.DEALER)  # DEALER to DEALER: no routing, ZMTP says no
    port = dealer.bind_to_random_port("tcp://127.0.0.1")

    async def scenario() -> None:
        conn = await connect("127.0.0.1", port, lambda frames: None, timeout_s=5.0)
        conn.close()

    with pytest.raises((ZmtpError, ConnectionError)):
        asyncio.run(scenario())


def test_calls_in_flight_fail_at_once_when_the_server_goes_away(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = ctx.socket(zmq.ROUTER)  # takes the requests, never answers, then closes
    port = router.bind_to_random_port("tcp://127.0.0.1")
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    payload = Payload("identity", {"INPUT0": x}, {"OUTPUT0": x.copy()})

    async def scenario() -> tuple[list[str | None], float, str | None]:
        loop = asyncio.get_running_loop()
        target = make_target("zmq", f"127.0.0.1:{port}", payload, timeout_s=30.0, zmq_client="zmtp")
        await target.open()
        try:
            calls = [target.slot() for _ in range(3)]
            pending = asyncio.gather(*(call(False) for call in calls))
            while not router.poll(0):  # the requests are at the server
                await asyncio.sleep(0.01)
            start = loop.time()
            router.close(linger=0)
            outcomes = list(await asyncio.wait_for(pending, 10))
            took = loop.time() - start
            after = await calls[0](False)  # a call on the closed connection fails at once too
            return outcomes, took, after
        finally:
            await target.close()

    outcomes, took, after = asyncio.run(scenario())
    assert outcomes == ["CONNECTION"] * 3 and after == "CONNECTION"
    assert took < 5.0  # not left for the 30 s timeout
