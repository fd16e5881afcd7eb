"""Scale-out from the client side: round robin over several engines, failover when one goes away.

- `EndpointPool` alone: round robin, the cool-down, down endpoints offered last, endpoint parsing.
- Two engines launched on this machine (``python -m engine.launch``, every port 0, each in a session of
  its own): the gRPC and ZMQ clients, blocking and asyncio, spread requests over both (each engine's
  statistics count its share).
- An endpoint that answers UNAVAILABLE (a fake server) is marked down and its requests go to the
  engine; one that answers RESOURCE_EXHAUSTED passes each request on without being marked down.
- One engine's whole process group is SIGKILLed while clients of every kind keep sending: every request
  still succeeds, answered by the survivor; new clients that list the dead endpoint first succeed too.

Teardown always stops both engines (SIGTERM, then SIGKILL of the process group) and unlinks the
segments the killed engine left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zmq

from engine.errors import EngineError, ResourceExhausted, Unavailable
from ext.segment import unlink_segment
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.client.endpoints import EndpointPool, parse_endpoints
from servers.client.grpc_client import AsyncGrpcClient, GrpcClient
from servers.client.zmq_client import AsyncZmqClient, ZmqClient
from servers.zmq_protocol import encode_error, peek_request_id
from tests.integration.server import segments_created_by

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Small engines: CPU worker with one thread, one front-end per protocol, short drain.
ENGINE_ARGS = (
    "--grpc-port", "0",
    "--rest-port", "0",
    "--zmq-port", "0",
    "--devices", "cpu",
    "--log-level", "WARNING",
    "--set", "frontend_arena_mb=64",
    "--set", "worker_arena_mb=64",
    "--set", "max_message_mb=8",
    "--set", "grpc_frontends=1",
    "--set", "worker_threads=1",
    "--set", "drain_grace_s=2",
)  # fmt: skip
#: Bound on an engine's start (spawned workers import torch on a busy 2-core machine).
READY_S = 120.0
#: Per-request timeout of the clients; bound on every wait of these tests.
TIMEOUT_S = 20.0
KINDS = ("grpc", "grpc-async", "zmq", "zmq-async")


# ---- EndpointPool ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pool_round_robin() -> None:
    pool = EndpointPool("a:1, b:2 ,c:3")
    assert pool.endpoints == ("a:1", "b:2", "c:3")
    assert [pool.candidates()[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert pool.candidates() == [0, 1, 2]


def test_pool_skips_a_down_endpoint_until_its_cooldown_ends() -> None:
    clock = FakeClock()
    pool = EndpointPool(["a", "b", "c"], cooldown_s=5.0, clock=clock)
    pool.mark_down(1)
    assert pool.is_down(1) and pool.down() == ["b"]
    # b's turn falls to the next one up
    assert [pool.candidates() for _ in range(3)] == [[0, 2, 1], [2, 0, 1], [2, 0, 1]]
    clock.now += 5.0
    assert not pool.is_down(1)
    assert [pool.candidates() for _ in range(2)] == [[0, 1, 2], [1, 2, 0]]  # back in its turn


def test_pool_offers_down_endpoints_last_oldest_failure_first() -> None:
    clock = FakeClock()
    pool = EndpointPool(["a", "b"], cooldown_s=60.0, clock=clock)
    pool.mark_down(1)
    clock.now += 1
    pool.mark_down(0)
    assert pool.candidates() == [1, 0]  # every one down: all offered, b failed first
    pool.mark_up(0)
    assert pool.candidates() == [0, 1]


def test_pool_retry_excludes_failed_endpoints_without_moving_the_rotation() -> None:
    pool = EndpointPool(["a", "b", "c"])
    assert pool.candidates() == [0, 1, 2]
    assert pool.candidates(exclude=[1]) == [2, 0]
    assert pool.candidates(exclude=[0, 1, 2]) == []
    assert pool.candidates()[0] == 1  # the retries did not take b's turn


@pytest.mark.parametrize("bad", ["", " , ", ["a", ""], "a,a", []])
def test_parse_endpoints_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(bad)


# ---- engines -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # The launcher refuses ENGINE_* names that are not config keys (ENGINE_BENCH_QUICK...).
    return {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}


class Instance:
    """``python -m engine.launch ENGINE_ARGS`` in a session of its own, so its whole process group
    can be killed; stdout read by a thread, stderr to a file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.launch", *ENGINE_ARGS],
            cwd=REPO_ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.host = ""
        self.ports: dict[str, int] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="engine-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").strip())
        self._lines.put(None)

    def wait_ready(self) -> None:
        end = time.monotonic() + READY_S
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no 'ready' in {READY_S} s; log:\n{self.log_tail()}") from None
            if line is None:
                raise AssertionError(f"engine exited before 'ready'; log:\n{self.log_tail()}")
            if line == "ready":
                return
            proto, _, address = line.partition(" listening on ")
            if address:
                self.host, _, port = address.rpartition(":")
                self.ports[proto.strip()] = int(port)

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def zmq(self) -> str:
        return f"tcp://{self.host}:{self.ports['zmq']}"

    def served(self, model: str = "identity") -> int:
        """Requests of ``model`` this engine answered successfully (its REST statistics)."""
        url = f"http://{self.host}:{self.ports['rest']}/v2/models/{model}/stats"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        with opener.open(url, timeout=TIMEOUT_S) as response:
            (stats,) = json.load(response)["model_stats"]
        # KServe v2 / Triton statistics extension: inference_stats.success.count
        return int(stats["inference_stats"]["success"]["count"])

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill_group(self) -> None:
        """SIGKILL the supervisor and every child (one process group) and reap the supervisor."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)

    def close(self) -> None:
        """Stop gracefully when still running, kill what is left, unlink what a killed engine left
        in /dev/shm (segments whose creator, the supervisor, is dead). Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(TIMEOUT_S)
        self.kill_group()  # children a killed supervisor left behind share its process group
        self._reader.join(TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        for name in segments_created_by(self.proc.pid):
            unlink_segment(name)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    """Two engines serving the built-in models; started together, closed at the end of the module."""
    logs = tmp_path_factory.mktemp("scaleout")
    made: list[Instance] = []
    try:
        made = [Instance(logs / f"engine{i}.log") for i in range(2)]
        for instance in made:
            instance.wait_ready()
        yield made
    finally:
        for instance in made:
            instance.close()


# ---- clients of every kind behind one blocking call ----------------------------------------------


Infer = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def client(kind: str, endpoints: Sequence[str], **options: Any) -> Iterator[tuple[Infer, EndpointPool]]:
    """A client of ``kind`` over ``endpoints``: (``infer(x)`` -> the identity model's output, its pool).
    The asyncio clients run on an event loop of this thread."""
    if kind == "grpc":
        with GrpcClient(endpoints, TIMEOUT_S, **options) as c:
            yield (lambda x: c.infer("identity", {"INPUT0": x})["OUTPUT0"]), c.pool
    elif kind == "zmq":
        with ZmqClient(endpoints, TIMEOUT_S, **options) as z:
            yield (lambda x: z.infer("identity", {"INPUT0": x})["OUTPUT0"]), z.pool
    else:
        loop = asyncio.new_event_loop()

        async def make() -> AsyncGrpcClient | AsyncZmqClient:
            cls = AsyncGrpcClient if kind == "grpc-async" else AsyncZmqClient
            return cls(endpoints, TIMEOUT_S, **options)

        ac = loop.run_until_complete(make())
        try:
            yield (lambda x: loop.run_until_complete(ac.infer("identity", {"INPUT0": x}))["OUTPUT0"]), ac.pool
        finally:
            loop.run_until_complete(ac.close())
            loop.close()


def endpoints_of(kind: str, instances: Sequence[Instance]) -> list[str]:
    return [i.grpc if kind.startswith("grpc") else i.zmq for i in instances]


_values = itertools.count(1)


def echo(infer: Infer) -> None:
    """One identity request with a value of its own; its answer must be that value."""
    x = np.full((1, 4), float(next(_values)), np.float32)
    np.testing.assert_array_equal(infer(x), x)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {TIMEOUT_S} s waiting for {what}")
        time.sleep(0.05)


# ---- spreading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_requests_spread_over_both_engines(engines: list[Instance], kind: str) -> None:
    n = 20
    before = [e.served() for e in engines]
    with client(kind, endpoints_of(kind, engines)) as (infer, _):
        for _ in range(n):
            echo(infer)

    def shares() -> list[int]:
        return [e.served() - b for e, b in zip(engines, before, strict=True)]

    # a worker counts a request just after it answered it
    wait_for(lambda: sum(shares()) >= n, f"both engines to count {n} requests")
    got = shares()
    assert sum(got) == n and all(share > 0 for share in got), got
    if kind == "grpc":
        assert got == [n // 2, n // 2], got  # strict round robin when both are up


# ---- failing over from answers -------------------------------------------------------------------


class FakeZmqServer:
    """A ROUTER that answers every message with one error (a draining or overloaded engine)."""

    def __init__(self, error: EngineError) -> None:
        self.error = error
        self.count = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self._sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-zmq", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):  # wakes to see the stop flag
                continue
            identity, *frames = self._sock.recv_multipart()
            self.count += 1
            self._sock.send_multipart([identity, encode_error(peek_request_id(frames[0]), self.error)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT_S)
        self._sock.close(linger=0)
        self._ctx.term()


class _Refusing(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.count = 0
        self._lock = threading.Lock()

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.count += 1
        context.abort(self.code, "fake server refuses")


class FakeGrpcServer:
    """A gRPC server whose ModelInfer always fails with one status code."""

    def __init__(self, error: EngineError) -> None:
        self.servicer = _Refusing(getattr(grpc.StatusCode, error.grpc_code))
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._server)
        self.endpoint = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    @property
    def count(self) -> int:
        return self.servicer.count

    def close(self) -> None:
        self._server.stop(grace=None)


@contextlib.contextmanager
def fake_server(kind: str, error: EngineError) -> Iterator[FakeZmqServer | FakeGrpcServer]:
    fake = FakeGrpcServer(error) if kind.startswith("grpc") else FakeZmqServer(error)
    try:
        yield fake
    finally:
        fake.close()


def send_until(infer: Infer, condition: Callable[[], bool], what: str, limit: int = 500) -> None:
    """Requests (each must succeed) until ``condition()`` holds; fails after ``limit`` requests."""
    for _ in range(limit):
        if condition():
            return
        echo(infer)
    raise AssertionError(f"{what} did not happen within {limit} requests")


@pytest.mark.parametrize("kind", KINDS)
def test_an_unavailable_endpoint_is_marked_down_and_skipped(engines: list[Instance], kind: str) -> None:
    with fake_server(kind, Unavailable("draining")) as fake:
        endpoints = [fake.endpoint, endpoints_of(kind, engines[:1])[0]]
        with client(kind, endpoints, cooldown_s=600.0) as (infer, pool):
            # a ZMQ endpoint gets requests once it is connected: send until the fake had one
            send_until(infer, lambda: fake.count >= 1, "a request to the fake server")
            assert pool.is_down(0)
            for _ in range(10):
                echo(infer)
    assert fake.count == 1  # down for its cool-down: never tried again


@pytest.mark.parametrize("kind", KINDS)
def test_an_overloaded_endpoint_passes_requests_on_without_being_marked_down(
    engines: list[Instance], kind: str
) -> None:
    with fake_server(kind, ResourceExhausted("busy")) as fake:
        endpoints = [fake.endpoint, endpoints_of(kind, engines[:1])[0]]
        with client(kind, endpoints, cooldown_s=600.0) as (infer, pool):
            send_until(infer, lambda: fake.count >= 3, "three requests to the fake server")
            assert not pool.is_down(0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("error", [Unavailable("draining"), ResourceExhausted("busy")], ids=["down", "busy"])
def test_a_lone_endpoint_raises_what_it_answers(kind: str, error: EngineError) -> None:
    with (
        fake_server(kind, error) as fake,
        client(kind, [fake.endpoint]) as (infer, _),
        pytest.raises(type(error)),
    ):
        echo(infer)
    assert fake.count == 1  # nowhere else to go: no retry


# ---- an engine killed under load (last: the module's second engine is gone afterwards) -----------


class Load:
    """One user per client kind sending identity requests until stopped; counts successes per kind
    and records every failure."""

    def __init__(self, endpoints: dict[str, list[str]]) -> None:
        self.endpoints = endpoints
        self.ok: Counter[str] = Counter()
        self.errors: list[str] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._user, args=(kind,), name=f"load-{kind}", daemon=True)
            for kind in KINDS
        ]
        for thread in self.threads:
            thread.start()

    def _user(self, kind: str) -> None:
        try:
            with client(kind, self.endpoints[kind]) as (infer, _):
                while not self.stop.is_set():
                    echo(infer)
                    with self.changed:
                        self.ok[kind] += 1
                        self.changed.notify_all()
        except BaseException as exc:  # recorded for the test's assertion, with the client kind
            with self.changed:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.changed.notify_all()

    def wait_each(self, count: int) -> None:
        """Until every kind has ``count`` successes (or a user failed)."""
        with self.changed:
            done = self.changed.wait_for(
                lambda: self.errors or all(self.ok[k] >= count for k in KINDS), TIMEOUT_S * 2
            )
        assert done, f"load stalled: {dict(self.ok)}"
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT_S * 2)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not stop"


def test_clients_keep_succeeding_when_an_engine_is_killed(engines: list[Instance]) -> None:
    survivor, victim = engines
    load = Load({kind: endpoints_of(kind, engines) for kind in KINDS})
    try:
        load.wait_each(20)
        assert victim.served() > 0, "the victim got no traffic before it was killed"
        victim.kill_group()  # requests in flight on it now are lost with it
        killed_at = dict(load.ok)
        load.wait_each(max(killed_at.values()) + 30)
    finally:
        load.finish()
    assert not load.errors, load.errors
    # clients made now, the dead endpoint first: refused or not connected, then the survivor answers
    for kind in KINDS:
        with client(kind, endpoints_of(kind, [victim, survivor])) as (infer, _):
            for _ in range(3):
                echo(infer)
    with GrpcClient([victim.grpc, survivor.grpc], TIMEOUT_S) as c:
        assert c.is_ready()
    with GrpcClient(victim.grpc, TIMEOUT_S) as c:
        assert not c.is_ready(timeout_s=5.0)
    with ZmqClient([victim.zmq, survivor.zmq], TIMEOUT_S) as z:
        assert z.ping()

    async def async_ready() -> tuple[bool, bool]:
        async with AsyncGrpcClient([victim.grpc, survivor.grpc], TIMEOUT_S) as both:
            one = await both.is_ready()
        async with AsyncGrpcClient([victim.grpc], TIMEOUT_S) as dead:
            none = await dead.is_ready(timeout_s=5.0)
        return one, none

    assert asyncio.run(async_ready()) == (True, False)
