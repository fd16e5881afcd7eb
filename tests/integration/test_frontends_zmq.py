"""The ZMQ front-end of a real server: inference on every built-in model, metadata, ping, error codes
on the wire, deadlines, the message size limit, and 500 concurrent requests from `AsyncZmqClient`."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.utils.monitor

from engine.errors import InvalidArgument, NotFound
from servers.client.zmq_client import AsyncZmqClient, ZmqClient
from servers.zmq_protocol import (
    Frames,
    MsgType,
    decode_header,
    decode_reply,
    encode_header,
    encode_request,
)
from tests.integration.server import (
    BUILTIN_MODELS,
    ServerProcess,
    assert_outputs,
    builtin_specs,
    reference_outputs,
    sample_inputs,
)

TIMEOUT_S = 60.0
#: wire codes of the ERROR reply (gRPC status numbers, `engine.errors.*.zmq_code`)
INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, RESOURCE_EXHAUSTED = 3, 4, 5, 8


@pytest.fixture(scope="module")
def client(engine_server: ServerProcess) -> Iterator[ZmqClient]:
    with ZmqClient(engine_server.zmq_endpoint, timeout_s=TIMEOUT_S) as c:
        yield c


@pytest.fixture
def dealer(engine_server: ServerProcess) -> Iterator[zmq.Socket[bytes]]:
    """A bare DEALER socket on the server, for messages the client would never build."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine_server.zmq_endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def exchange(sock: zmq.Socket[bytes], frames: Sequence[Any], timeout_s: float = TIMEOUT_S) -> list[bytes]:
    """Send one message and return the frames of the next reply (fails the test when none comes)."""
    sock.send_multipart(list(frames), copy=True)
    assert sock.poll(int(timeout_s * 1000), zmq.POLLIN), "no reply from the server"
    return sock.recv_multipart()


def error_code(reply: Sequence[bytes], request_id: int) -> int:
    """The wire ``code`` of an ERROR reply to ``request_id``."""
    header = decode_header(reply[0])
    assert header.msg_type is MsgType.ERROR, header
    assert header.request_id == request_id
    assert isinstance(header.body.get("message"), str) and header.body["message"]
    return int(header.body["code"])


# ---- inference, metadata, ping -------------------------------------------------------------------------


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_infer_every_builtin_model(client: ZmqClient, model: str, rng: np.random.Generator) -> None:
    inputs = sample_inputs(model, 3, rng)
    assert_outputs(model, client.infer(model, inputs), reference_outputs(model, inputs))


def test_infer_selected_output(client: ZmqClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    outputs = client.infer("simple", {"INPUT0": a, "INPUT1": a}, outputs=["OUTPUT0"])
    assert list(outputs) == ["OUTPUT0"]
    np.testing.assert_array_equal(outputs["OUTPUT0"], 2 * a)


def test_metadata_and_ping(client: ZmqClient) -> None:
    assert client.ping() is True
    for name, spec in builtin_specs().items():
        meta = client.metadata(name)
        assert meta["name"] == name and meta["ready"] is True
        assert meta["max_batch_size"] == spec.max_batch_size
        assert [(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.inputs
        ]
        assert [(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]] == [
            (t.name, t.datatype, spec.full_shape(t)) for t in spec.outputs
        ]
    with pytest.raises(NotFound):
        client.metadata("no-such-model")


# ---- errors --------------------------------------------------------------------------------------------


def _request(model: str, inputs: list[tuple[str, str, list[int]]], data: list[bytes], rid: int) -> Frames:
    body = {"model": model, "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs]}
    return [encode_header(MsgType.REQUEST, rid, body), *data]


_ROW = np.zeros((1, 256), np.float32).tobytes()
BAD_REQUESTS: dict[str, tuple[Frames, int]] = {
    "dtype": (_request("mlp", [("INPUT0", "FP64", [1, 256])], [b"\0" * 2048], 11), INVALID_ARGUMENT),
    "shape": (_request("mlp", [("INPUT0", "FP32", [1, 255])], [b"\0" * 1020], 12), INVALID_ARGUMENT),
    "byte_count": (_request("mlp", [("INPUT0", "FP32", [1, 256])], [b"\0" * 1000], 13), INVALID_ARGUMENT),
    "unknown_dtype": (_request("mlp", [("INPUT0", "FP7", [1, 256])], [_ROW], 14), INVALID_ARGUMENT),
    "unknown_model": (_request("no-such-model", [("INPUT0", "FP32", [1, 256])], [_ROW], 15), NOT_FOUND),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_error_codes_on_the_wire(dealer: zmq.Socket[bytes], case: str) -> None:
    frames, code = BAD_REQUESTS[case]
    rid = decode_header(frames[0]).request_id
    assert error_code(exchange(dealer, frames), rid) == code


def test_client_raises_the_server_error(client: ZmqClient) -> None:
    with pytest.raises(InvalidArgument):
        client.infer("mlp", {"INPUT0": np.zeros((1, 256), np.float64)})
    with pytest.raises(NotFound):
        client.infer("no-such-model", {"INPUT0": np.zeros((1, 4), np.float32)})


def test_deadline_exceeded(dealer: zmq.Socket[bytes], rng: np.random.Generator) -> None:
    # timeout_us travels in the header; 1 us has passed by the time the worker sees the request, so it
    # answers DEADLINE_EXCEEDED without computing. (The clients would time out locally first, so the
    # request is sent raw and the reply awaited for longer.)
    frames = encode_request(21, "mlp", sample_inputs("mlp", 256, rng), timeout_us=1)
    assert error_code(exchange(dealer, frames), 21) == DEADLINE_EXCEEDED


def test_message_over_the_size_limit_gets_resource_exhausted(dealer: zmq.Socket[bytes]) -> None:
    # 9 MiB in two frames of 4.5 MiB (each under the per-frame limit): the server adds them up.
    half = b"\0" * (9 * (1 << 20) // 2)
    frames = _request("identity", [("INPUT0", "FP32", [1, len(half) // 2])] * 2, [half, half], 31)
    assert error_code(exchange(dealer, frames), 31) == RESOURCE_EXHAUSTED
    small = np.ones((1, 3), np.float32)
    reply = decode_reply(exchange(dealer, encode_request(32, "identity", {"INPUT0": small})))
    assert reply.outputs is not None
    np.testing.assert_array_equal(reply.outputs["OUTPUT0"], small)


def test_frame_over_the_size_limit_drops_the_connection(engine_server: ServerProcess) -> None:
    # One 9 MiB frame: over the per-frame limit, the server drops the peer unanswered, from the
    # frame's header alone, as libzmq's MAXMSGSIZE does (documented in servers/zmq_server.py).
    # Seen here as a disconnect event; the server goes on.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(engine_server.zmq_endpoint)
        big = np.zeros((1, 9 * (1 << 20) // 4), np.float32)
        sock.send_multipart(encode_request(41, "identity", {"INPUT0": big}), copy=True)
        events: list[int] = []
        while zmq.EVENT_DISCONNECTED not in events:
            assert monitor.poll(int(TIMEOUT_S * 1000)), f"no disconnect; events so far: {events}"
            events.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
        assert not sock.poll(0), "the server answered an over-size frame"
        # the DEALER reconnects by itself and the next request is answered
        small = np.ones((1, 2), np.float32)
        reply = decode_reply(exchange(sock, encode_request(42, "identity", {"INPUT0": small})))
        assert reply.request_id == 42 and reply.outputs is not None
        np.testing.assert_array_equal(reply.outputs["OUTPUT0"], small)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


# ---- concurrency ---------------------------------------------------------------------------------------


def test_500_concurrent_requests(engine_server: ServerProcess, rng: np.random.Generator) -> None:
    n = 500
    rows = sample_inputs("mlp", n, rng)["INPUT0"]
    want = reference_outputs("mlp", {"INPUT0": rows})["OUTPUT0"]

    requests0, inferences0, executions0 = _stats(engine_server, "mlp")

    async def run_all() -> list[dict[str, np.ndarray]]:
        async with AsyncZmqClient(engine_server.zmq_endpoint, timeout_s=TIMEOUT_S) as zc:
            return await zc.infer_many("mlp", [{"INPUT0": rows[i : i + 1]} for i in range(n)])

    results = asyncio.run(run_all())
    assert len(results) == n
    for i, outputs in enumerate(results):
        assert_outputs("mlp", outputs, {"OUTPUT0": want[i : i + 1]})
    # The front-end coalesces requests read together into one for the worker: the statistics
    # still count each client request (and each row), and the model ran far fewer times.
    requests, inferences, executions = _stats(engine_server, "mlp")
    assert (requests - requests0, inferences - inferences0) == (n, n)
    assert 0 < executions - executions0 < n // 4


def _stats(server: ServerProcess, model: str) -> tuple[int, int, int]:
    """(successful requests, inferences, executions) of ``model``, from its KServe statistics."""
    with urllib.request.urlopen(f"http://{server.rest_address}/v2/models/{model}/stats", timeout=10) as r:
        (stats,) = json.loads(r.read())["model_stats"]
    success = int(stats["inference_stats"]["success"]["count"])
    return success, int(stats["inference_count"]), int(stats["execution_count"])
