"""Front-end faults, admission control and hostile input against real front-end processes.

- SIGKILL the ZMQ front-end while gRPC and ZMQ clients keep it busy: the supervisor restarts it on the
  same port, the worker is the same process throughout, gRPC clients never notice, ZMQ clients are
  served again, and every region the dead front-end held comes back (arena usage back to idle).
  This one runs the engine in-process (`EngineHarness` with real gRPC and ZMQ front-end processes):
  `Supervisor.status()` then gives each process's arena usage, which a launched server does not
  publish on any route.
- admission (``max_inflight_per_model=2``, a slow model) on a launched server: the third concurrent
  request of a front-end is refused while the first two are still being computed, over every protocol
  (gRPC RESOURCE_EXHAUSTED, REST 429 with Retry-After, ZMQ code 8), and never computed;
- a bounded burst of garbage and malformed requests on every port of that server leaves every server
  process running with its RSS (/proc/<pid>/status VmRSS) grown by less than `RSS_GROWTH_MB`, and a
  good request on each protocol succeeds after it.

Bounds are generous ("within N s", "never hangs"); nothing asserts a measured latency.
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import zmq

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.zmq_protocol import MsgType, decode_header, decode_reply, encode_request
from tests.integration.conftest import EngineHarness, RepoBuilder, small_config
from tests.integration.server import ServerProcess, children_of, serving
from tests.integration.test_hostile_input import (
    CORRECT,
    GRPC_BAD,
    REST_BAD,
    WIRE_STARTS,
    ZMQ_BAD,
    raw_tcp,
    rest_post,
    zmq_exchange,
)

TIMEOUT_S = 30.0
#: A front-end restart spawns a process that imports grpc/zmq: slow on a busy 2-core machine.
RESTART_S = 60.0
#: Requests each load client must have answered before the kill, and after the restart.
WARM_OK = 40
#: Per-request timeout of the ZMQ load client: a request the killed front-end held gets no reply.
ZMQ_LOST_AFTER_S = 10.0
#: Requests the ZMQ load client keeps in flight.
ZMQ_DEPTH = 4
#: The issue's "the process neither crashes nor grows", with room for allocator noise.
RSS_GROWTH_MB = 50
#: The slow model's time per batch: the window in which the third request must be refused.
SLOW_S = 1.5


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in kB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def identity_request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full(4, value, np.float32).tobytes())
    return request


# ---- SIGKILL a front-end under load --------------------------------------------------------------


class Load(threading.Thread):
    """A client thread sending identity requests until `stop` is set; counts answers by outcome."""

    def __init__(self, name: str, body: Callable[[Load], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.body = body
        self.stop = threading.Event()
        self.ok = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self.body(self)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = exc

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.ok += 1


def grpc_load(address: str) -> Callable[[Load], None]:
    def body(load: Load) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = 0
            while not load.stop.is_set():
                n += 1
                try:
                    reply = stub.ModelInfer(identity_request(float(n)), timeout=TIMEOUT_S)
                except grpc.RpcError as err:
                    load.count(err.code().name)
                    continue
                out = np.frombuffer(reply.raw_output_contents[0], np.float32)
                load.count("ok" if np.array_equal(out, np.full(4, float(n), np.float32)) else "wrong")

    return body


def zmq_load(endpoint: str, depth: int = ZMQ_DEPTH) -> Callable[[Load], None]:
    """``depth`` recent requests in flight on one DEALER (so the killed front-end holds some); one
    unanswered for `ZMQ_LOST_AFTER_S` is lost (ZMQ has no connection to fail)."""

    def body(load: Load) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(ZMQ_LOST_AFTER_S * 1000))
        sock.connect(endpoint)
        sent: dict[int, float] = {}
        n = 0
        try:
            while not load.stop.is_set():
                # requests silent for a second no longer hold back new ones (the front-end may be
                # dead), but still get until ZMQ_LOST_AFTER_S to be answered
                fresh = time.monotonic() - 1.0
                while sum(t > fresh for t in sent.values()) < depth:
                    n += 1
                    sock.send_multipart(
                        encode_request(n, "identity", {"INPUT0": np.full((1, 4), n, np.float32)})
                    )
                    sent[n] = time.monotonic()
                if sock.poll(100, zmq.POLLIN):
                    reply = decode_reply(sock.recv_multipart())
                    expected = sent.pop(reply.request_id, None)
                    if expected is None:
                        continue  # the answer to one already counted as lost
                    if reply.msg_type is MsgType.REPLY:
                        assert reply.outputs is not None
                        want = np.full((1, 4), reply.request_id, np.float32)
                        load.count("ok" if np.array_equal(reply.outputs["OUTPUT0"], want) else "wrong")
                    else:
                        load.count(type(reply.error).__name__)
                late = time.monotonic() - ZMQ_LOST_AFTER_S
                for rid in [rid for rid, at in sent.items() if at < late]:
                    del sent[rid]
                    load.count("lost")
        finally:
            sock.close(linger=0)
            ctx.term()

    return body


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def entry(harness: EngineHarness, name: str) -> dict[str, Any]:
    return next(p for p in harness.status()["processes"] if p["name"] == name)


def test_sigkill_frontend_under_load(harness_factory: Any, repo: RepoBuilder) -> None:
    repo.builtin("identity")
    harness = harness_factory(
        small_config(
            repo.path, protocols=("grpc", "zmq"), grpc_port=0, zmq_port=0, grpc_frontends=1, restart_budget=3
        )
    )
    ports = harness.engine.endpoints()
    host = harness.config.host
    worker = entry(harness, "worker cpu")
    victim = entry(harness, "frontend zmq#0")
    assert victim["pid"] in children_of(os.getpid()) and victim["state"] == "up"
    idle = worker["arena_bytes_in_use"]
    assert idle == 0, f"an idle worker holds {idle} bytes of its arena"

    loads = [
        Load("grpc-load", grpc_load(f"{host}:{ports['grpc']}")),
        Load("zmq-load", zmq_load(f"tcp://{host}:{ports['zmq']}")),
    ]
    for load in loads:
        load.start()
    try:
        wait_until(lambda: all(ld.ok >= WARM_OK for ld in loads), TIMEOUT_S, "both clients to be served")
        os.kill(victim["pid"], signal.SIGKILL)

        def restarted() -> bool:
            now = entry(harness, "frontend zmq#0")
            return now["state"] == "up" and now["pid"] not in (None, victim["pid"])

        wait_until(restarted, RESTART_S, "the ZMQ front-end to be restarted")
        zmq_ok_at_restart = loads[1].ok
        grpc_ok_at_restart = loads[0].ok
        wait_until(
            lambda: (
                loads[1].ok >= zmq_ok_at_restart + WARM_OK and loads[0].ok >= grpc_ok_at_restart + WARM_OK
            ),
            TIMEOUT_S,
            "the restarted ZMQ front-end to serve its (reconnected) client",
        )
    finally:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(TIMEOUT_S)
    for load in loads:
        assert not load.is_alive() and load.failure is None, (load.name, load.failure)
    grpc_outcomes, zmq_outcomes = loads[0].outcomes, loads[1].outcomes
    # the other front-end's clients never noticed
    assert set(grpc_outcomes) == {"ok"}, grpc_outcomes
    # the killed one's clients lost what it held (and what was written to its dying connection), no
    # more, and never got a wrong answer
    assert set(zmq_outcomes) <= {"ok", "lost"} and zmq_outcomes["lost"] <= 2 * ZMQ_DEPTH, zmq_outcomes

    now = entry(harness, "frontend zmq#0")
    assert now["restarts"] == 1 and now["port"] == victim["port"] == ports["zmq"], now
    assert now["pid"] in children_of(os.getpid())
    still = entry(harness, "worker cpu")
    assert still["pid"] == worker["pid"] and still["restarts"] == 0, still
    assert entry(harness, "frontend grpc#0")["restarts"] == 0

    # what the dead front-end held (its requests' outputs in the worker arena) is reclaimed
    def arenas_idle() -> bool:
        procs = harness.status()["processes"]
        return all(p["arena_bytes_in_use"] == 0 for p in procs if p["pid"] is not None)

    wait_until(arenas_idle, TIMEOUT_S, "every arena to be back to its idle level")
    assert entry(harness, "worker cpu")["arena_bytes_in_use"] == idle


@pytest.mark.parametrize("budget", [3, 0], ids=["restarted", "retired"])
def test_a_dead_frontend_leaves_nothing_in_flight(
    harness_factory: Any, repo: RepoBuilder, budget: int
) -> None:
    # The killed incarnation held a request. Its in-flight counts must not stand on the board after
    # it: `engine status` shows them, the drain waits for them and the workers' batching rules
    # count them. A restarted front-end publishes its own on its first wake-up; a retired one (no
    # restart budget left) never does.
    repo.model("pair", _PAIR_YAML, _PAIR_PY)  # a lone request waits 30 s for its companion
    harness = harness_factory(small_config(repo.path, protocols=("zmq",), zmq_port=0, restart_budget=budget))
    victim = entry(harness, "frontend zmq#0")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{harness.config.host}:{harness.engine.endpoints()['zmq']}")
        frames = encode_request(1, "pair", {"INPUT0": slow_row(1.0)}, timeout_us=int(TIMEOUT_S * 1e6))
        sock.send_multipart([bytes(f) for f in frames])
        wait_until(
            lambda: entry(harness, "frontend zmq#0")["inflight"] == 1, TIMEOUT_S, "a request in flight"
        )
        os.kill(victim["pid"], signal.SIGKILL)

        def gone() -> bool:
            now = entry(harness, "frontend zmq#0")
            if budget:
                return now["state"] == "up" and now["pid"] not in (None, victim["pid"])
            return now["generation"] > victim["generation"]

        wait_until(gone, RESTART_S, "the ZMQ front-end to be replaced" if budget else "its retirement")
        assert entry(harness, "frontend zmq#0")["inflight"] == 0
    finally:
        sock.close()
        ctx.term()


# ---- a launched server: admission and hostile input ------------------------------------------------


#: ``pair``: a slow echo that computes its requests two at a time (it waits for the second one: the
#: queue delay is long) and logs what it computed. Both values of a pair in the log prove that both
#: requests were admitted, and for `SLOW_S` after that both are still in flight.
_PAIR_YAML = """
    backend: python
    source: model.py:forward
    max_batch_size: 2
    dynamic_batching: {max_queue_delay_us: 30000000, preferred_batch_sizes: [2]}
    inputs: [{name: INPUT0, datatype: FP32, shape: [4]}]
    outputs: [{name: OUTPUT0, datatype: FP32, shape: [4]}]
"""
_PAIR_PY = f'''
    """Echoes its input after sleeping {SLOW_S} s per batch; logs the first value of every row."""
    import time
    from pathlib import Path

    LOG = Path(__file__).with_name("calls.log")

    def forward(x):
        with LOG.open("a") as f:
            f.write("".join(f"{{float(r[0])}}\\n" for r in x))
        time.sleep({SLOW_S})
        return x.copy()
'''


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, RepoBuilder]]:
    """A launched server (all protocols) with identity, mlp and ``pair``, 2 in flight per model."""
    repo = RepoBuilder(tmp_path_factory.mktemp("admission") / "models")
    repo.builtin("identity", "mlp")
    repo.model("pair", _PAIR_YAML, _PAIR_PY)
    args = ("--model-repository", str(repo.path), "--set", "max_inflight_per_model=2")
    with serving(args) as server:
        for good in CORRECT.values():
            good(server)  # first requests of a front-end are slower: not inside a test's window
        yield server, repo


def slow_row(value: float) -> np.ndarray:
    return np.full((1, 4), value, np.float32)


def admission_grpc(
    server: ServerProcess, values: tuple[float, float, float], computing: Callable[[], None]
) -> None:
    def request(v: float) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="pair")
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        r.raw_input_contents.append(slow_row(v).tobytes())
        return r

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first, second = (stub.ModelInfer.future(request(v), timeout=TIMEOUT_S) for v in values[:2])
        computing()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request(values[2]), timeout=TIMEOUT_S)
        assert not second.done(), "the third request was answered only after the second"
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "pair" in (info.value.details() or "")
        for future, v in ((first, values[0]), (second, values[1])):
            np.testing.assert_array_equal(
                np.frombuffer(future.result().raw_output_contents[0], np.float32), slow_row(v)[0]
            )


def admission_rest(
    server: ServerProcess, values: tuple[float, float, float], computing: Callable[[], None]
) -> None:
    def post(v: float) -> tuple[int, dict[str, str], bytes]:
        body = orjson.dumps(
            {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [v] * 4}]}
        )
        conn = http.client.HTTPConnection(server.host, server.ports["rest"], timeout=TIMEOUT_S)
        try:
            conn.request("POST", "/v2/models/pair/infer", body=body)
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, response.read()
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = (pool.submit(post, v) for v in values[:2])
        computing()
        status, headers, body = post(values[2])
        assert not second.done(), "the third request was answered only after the second"
        assert status == 429, body
        assert int(headers["retry-after"]) >= 1, headers
        assert "pair" in orjson.loads(body)["error"]
        for future, v in ((first, values[0]), (second, values[1])):
            status, _, body = future.result()
            assert status == 200, body
            assert orjson.loads(body)["outputs"][0]["data"] == [v] * 4


def admission_zmq(
    server: ServerProcess, values: tuple[float, float, float], computing: Callable[[], None]
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.zmq_endpoint)
    try:
        for rid, v in enumerate(values[:2], start=1):
            sock.send_multipart(encode_request(rid, "pair", {"INPUT0": slow_row(v)}))
        computing()
        sock.send_multipart(encode_request(3, "pair", {"INPUT0": slow_row(values[2])}))
        replies = []
        for _ in range(3):
            assert sock.poll(int(TIMEOUT_S * 1000), zmq.POLLIN), "a ZMQ request got no reply"
            replies.append(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    refusal = decode_header(replies[0][0])
    assert refusal.request_id == 3, "the third request was answered only after another one"
    assert refusal.msg_type is MsgType.ERROR and refusal.body["code"] == 8, refusal.body
    assert refusal.body["error_type"] == "RESOURCE_EXHAUSTED"
    for frames in replies[1:]:
        reply = decode_reply(frames)
        assert reply.msg_type is MsgType.REPLY and reply.outputs is not None
        np.testing.assert_array_equal(reply.outputs["OUTPUT0"], slow_row(values[reply.request_id - 1]))


@pytest.mark.parametrize(
    ("proto", "values"),
    [("grpc", (1.0, 2.0, 3.0)), ("rest", (11.0, 12.0, 13.0)), ("zmq", (21.0, 22.0, 23.0))],
)
def test_third_concurrent_request_is_refused(
    slow_server: tuple[ServerProcess, RepoBuilder], proto: str, values: tuple[float, float, float]
) -> None:
    server, repo = slow_server
    run = {"grpc": admission_grpc, "rest": admission_rest, "zmq": admission_zmq}[proto]

    def computing() -> None:
        # both in the batch being computed: both were admitted, and stay in flight for SLOW_S
        both = lambda: {values[0], values[1]} <= set(repo.computed("pair"))  # noqa: E731
        wait_until(both, TIMEOUT_S, "the first two requests to be computed together")

    run(server, values, computing)
    assert values[2] not in repo.computed("pair"), "the refused request was computed"


# ---- hostile input: no process grows ------------------------------------------------------------------


#: Rounds of the whole garbage set per port (bounded: the suite keeps to a few seconds).
HOSTILE_ROUNDS = 2


def hostile_burst(server: ServerProcess, rng: np.random.Generator) -> None:
    """One round of garbage on every port: random bytes, truncated messages, malformed requests,
    an oversized message per protocol."""
    for proto, whole in WIRE_STARTS.items():
        for _ in range(10):
            raw_tcp(server, proto, rng.bytes(int(rng.integers(1, 4096))))
        for cut in (1, 9, len(whole) // 2, len(whole) - 1):
            raw_tcp(server, proto, whole[:cut])
    too_big = bytes(9 << 20)  # the server's max_message_mb is 8
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        big = pb.ModelInferRequest(model_name="identity")
        big.inputs.add(name="INPUT0", datatype="FP32", shape=[1, len(too_big) // 4])
        big.raw_input_contents.append(too_big)
        for request, _code in [*GRPC_BAD.values(), (big, None)]:
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(request, timeout=TIMEOUT_S)
    for body, headers in [*REST_BAD.values(), (too_big, {})]:
        status, _ = rest_post(server, "/v2/models/identity/infer", body, headers)
        assert 400 <= status < 500
    replies = zmq_exchange(server, [frames for frames, _code in ZMQ_BAD.values()])
    assert all(decode_header(r[0]).msg_type is MsgType.ERROR for r in replies)


def test_hostile_burst_leaves_every_process_up_and_flat(
    slow_server: tuple[ServerProcess, RepoBuilder], rng: np.random.Generator
) -> None:
    server, _ = slow_server
    pids = {server.pid, *server.child_pids()}
    assert len(pids) >= 5, pids  # the supervisor, one worker and three front-ends
    before = {pid: rss_kb(pid) for pid in pids}
    for _ in range(HOSTILE_ROUNDS):
        hostile_burst(server, rng)
    assert server.proc.poll() is None and {server.pid, *server.child_pids()} == pids, "a process died"
    grown = {pid: (rss_kb(pid) - before[pid]) / 1024 for pid in pids}
    print("RSS growth by pid (MB):", {pid: round(mb, 1) for pid, mb in grown.items()})
    assert all(mb < RSS_GROWTH_MB for mb in grown.values()), f"RSS growth by pid (MB): {grown}"
    for good in CORRECT.values():
        good(server)
