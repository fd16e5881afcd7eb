"""Several front-end processes of one protocol share its port (SO_REUSEPORT): the real engine with two
processes per protocol, many client connections per protocol, and /proc telling which process holds
each connection.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from contextlib import ExitStack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.client.zmq_client import ZmqClient
from tests.integration.server import ServerProcess, children_of, serving

#: Connections per protocol: with two processes the kernel's hash leaves one without any with a
#: chance of 2 / 2**16.
CONNECTIONS = 16
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def engine_server() -> Iterator[ServerProcess]:
    with serving(
        ["--set", "grpc_frontends=2", "--set", "rest_frontends=2", "--set", "zmq_frontends=2"]
    ) as server:
        yield server


def frontend_pids(server: ServerProcess, protocol: str) -> set[int]:
    pids = set()
    for pid in children_of(server.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
        if f"engine: frontend {protocol}#" in title:
            pids.add(pid)
    return pids


def holders(pids: set[int], port: int) -> set[int]:
    """Which of ``pids`` hold an established TCP connection on local ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # ESTABLISHED
                    inodes.add(f"socket:[{cols[9]}]")
    found = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    found.add(pid)
                    break
            except FileNotFoundError:
                continue
    return found


def test_every_protocol_runs_two_processes(engine_server: ServerProcess) -> None:
    for protocol in ("grpc", "rest", "zmq"):
        assert len(frontend_pids(engine_server, protocol)) == 2, protocol


def test_zmq_connections_spread_over_both_processes(engine_server: ServerProcess) -> None:
    with ExitStack() as stack:
        for _ in range(CONNECTIONS):
            client = stack.enter_context(ZmqClient(engine_server.zmq_endpoint, timeout_s=TIMEOUT_S))
            assert client.ping()
        pids = frontend_pids(engine_server, "zmq")
        assert holders(pids, engine_server.ports["zmq"]) == pids


def test_grpc_connections_spread_over_both_processes(engine_server: ServerProcess) -> None:
    with ExitStack() as stack:
        for _ in range(CONNECTIONS):
            channel = stack.enter_context(
                grpc.insecure_channel(
                    # its own connection: channels to one address otherwise share one
                    engine_server.grpc_address,
                    options=[("grpc.use_local_subchannel_pool", 1)],
                )
            )
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        pids = frontend_pids(engine_server, "grpc")
        assert holders(pids, engine_server.ports["grpc"]) == pids


def test_rest_connections_spread_over_both_processes(engine_server: ServerProcess) -> None:
    host, port = engine_server.host, engine_server.ports["rest"]
    with ExitStack() as stack:
        for _ in range(CONNECTIONS):
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
            stack.callback(conn.close)
            conn.request("GET", "/v2/health/ready")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        pids = frontend_pids(engine_server, "rest")
        assert holders(pids, port) == pids
