"""Security of a launched server: bearer tokens on every protocol, private shared memory, localhost binding.

Two servers run for the module, started together:

- ``open_health``: tokens from the environment (``ENGINE_AUTH_TOKENS``, two of them), health open (the
  default), DEBUG logging (so "never logged" holds at the chattiest level), no ``--host`` flag;
- ``closed_health``: a token from ``--set auth_tokens=...`` and ``--set auth_health_open=false``.

On each protocol (gRPC metadata, REST header, ZMQ header field) a missing or wrong token is refused
(UNAUTHENTICATED / 401 / code 16) and a right one works; health answers without a token only where it
is open. Neither server's log holds a token, right or wrong. Every segment is mode 0600 with an
unguessable name, and a process of another user cannot attach one (needs root to switch users). The
default bind address is 127.0.0.1, in the printed lines and in the kernel's socket table.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext.segment import KIND_ANY, Segment, SegmentError
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from servers.zmq_protocol import MsgType, decode_header, decode_reply, encode_ping, encode_request
from tests.integration.conftest import SMALL_ARENAS, LaunchedEngine, launch_env
from tests.integration.server import SHM_DIR, segments_created_by

TIMEOUT_S = 30.0
STOP_S = 40.0
TOKENS = ("alpha-7f3c9e1b2d", "beta-5a8e0c4f6b")
CLOSED_TOKEN = "gamma-1d9b7a3e5c"
WRONG = "alpha-7f3c9e1b2e"  # one character off
#: Every engine segment: "sie-", 32 random hex digits (128 bits), then an optional per-arena suffix.
SEGMENT_NAME = re.compile(r"^sie-[0-9a-f]{32}(-[fw]\d+g\d+)?$")
NOBODY = 65534
#: 127.0.0.1 as /proc/net/tcp prints it, and as /proc/net/tcp6 prints ::ffff:127.0.0.1 (gRPC's sockets
#: are dual-stack IPv6 ones bound to the IPv4-mapped loopback address).
LOOPBACK = frozenset({"0100007F", "0000000000000000FFFF00000100007F"})

_ARGS = (
    "--devices", "cpu",
    "--grpc-port", "0", "--rest-port", "0", "--zmq-port", "0",
    "--set", "grpc_frontends=1",
    "--set", "drain_grace_s=2",
    *(arg for key, value in SMALL_ARENAS.items() for arg in ("--set", f"{key}={value}")),
)  # fmt: skip


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LaunchedEngine]]:
    """``open_health`` and ``closed_health`` (see the module docstring), started side by side; each
    must stop with exit 0 on SIGTERM and leave no segment behind."""
    logs = tmp_path_factory.mktemp("security")
    made: dict[str, LaunchedEngine] = {}
    try:
        made["open_health"] = LaunchedEngine(
            [*_ARGS, "--log-level", "DEBUG"],
            logs / "open.log",
            env=launch_env(ENGINE_AUTH_TOKENS=",".join(TOKENS)),
        )
        made["closed_health"] = LaunchedEngine(
            [
                *_ARGS,
                "--host",
                "127.0.0.1",
                "--set",
                f"auth_tokens={CLOSED_TOKEN}",
                "--set",
                "auth_health_open=false",
            ],
            logs / "closed.log",
        )
        for server in made.values():
            server.wait_ready()
        held = {name: segments_created_by(server.proc.pid) for name, server in made.items()}
        assert all(held.values()), held
        yield made
        for server in made.values():
            server.proc.send_signal(signal.SIGTERM)
        for name, server in made.items():
            assert server.wait(STOP_S) == 0, f"{name} did not stop cleanly:\n{server.stderr_tail()}"
            left = [seg for seg in held[name] if (SHM_DIR / seg).exists()]
            assert not left, f"{name} left segments behind: {left}"
    finally:
        for server in made.values():
            server.kill()


def address(server: LaunchedEngine, proto: str) -> tuple[str, int]:
    return server.endpoints[proto]


# ---- gRPC ----------------------------------------------------------------------------------------


def grpc_infer(server: LaunchedEngine, token: str | None) -> grpc.StatusCode:
    """OK (output checked) or the status code of the refusal."""
    host, port = address(server, "grpc")
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=TIMEOUT_S, metadata=metadata
            )
        except grpc.RpcError as err:
            return err.code()
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), np.arange(4))
    return grpc.StatusCode.OK


def grpc_health(server: LaunchedEngine, token: str | None) -> Any:
    """The health status, or the status code of the refusal."""
    host, port = address(server, "grpc")
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S, metadata=metadata)
                .status
            )
        except grpc.RpcError as err:
            return err.code()


def test_grpc_auth(servers: dict[str, LaunchedEngine]) -> None:
    server = servers["open_health"]
    assert grpc_infer(server, None) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_infer(server, WRONG) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_infer(server, "") == grpc.StatusCode.UNAUTHENTICATED
    for token in TOKENS:
        assert grpc_infer(server, token) == grpc.StatusCode.OK
    assert grpc_health(server, None) == health_pb2.HealthCheckResponse.SERVING

    closed = servers["closed_health"]
    assert grpc_infer(closed, TOKENS[0]) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_infer(closed, CLOSED_TOKEN) == grpc.StatusCode.OK
    assert grpc_health(closed, None) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_health(closed, WRONG) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_health(closed, CLOSED_TOKEN) == health_pb2.HealthCheckResponse.SERVING


# ---- REST ----------------------------------------------------------------------------------------


def rest(server: LaunchedEngine, method: str, path: str, token: str | None) -> tuple[int, bytes]:
    host, port = address(server, "rest")
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = None
    if method == "POST":
        body = orjson.dumps(
            {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        )
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_rest_auth(servers: dict[str, LaunchedEngine]) -> None:
    server = servers["open_health"]
    infer = "/v2/models/identity/infer"
    for token in (None, WRONG, ""):
        status, body = rest(server, "POST", infer, token)
        assert status == 401, body
        assert "token" in orjson.loads(body)["error"]
    assert rest(server, "GET", "/v2/models/identity", None)[0] == 401
    for token in TOKENS:
        status, body = rest(server, "POST", infer, token)
        assert status == 200, body
        assert orjson.loads(body)["outputs"][0]["data"] == [1.0, 2.0]
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert rest(server, "GET", path, None)[0] == 200

    closed = servers["closed_health"]
    assert rest(closed, "POST", infer, TOKENS[1])[0] == 401
    assert rest(closed, "POST", infer, CLOSED_TOKEN)[0] == 200
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert rest(closed, "GET", path, None)[0] == 401
        assert rest(closed, "GET", path, WRONG)[0] == 401
        assert rest(closed, "GET", path, CLOSED_TOKEN)[0] == 200


# ---- ZMQ -----------------------------------------------------------------------------------------


def zmq_call(server: LaunchedEngine, frames: list[Any]) -> list[bytes]:
    host, port = address(server, "zmq")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{host}:{port}")
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(TIMEOUT_S * 1000), zmq.POLLIN), "no ZMQ reply"
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)
        ctx.term()


def zmq_infer(server: LaunchedEngine, token: str | None) -> int:
    """0 for a correct reply, else the error code."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    reply = decode_reply(zmq_call(server, encode_request(5, "identity", {"INPUT0": x}, token=token)))
    if reply.msg_type is MsgType.ERROR:
        assert reply.error is not None
        return reply.error.zmq_code
    assert reply.outputs is not None
    np.testing.assert_array_equal(reply.outputs["OUTPUT0"], x)
    return 0


def zmq_ping(server: LaunchedEngine, token: str | None) -> int:
    """0 for a PONG saying ready, else the error code."""
    header = decode_header(zmq_call(server, encode_ping(6, token))[0])
    if header.msg_type is MsgType.ERROR:
        return int(header.body["code"])
    assert header.msg_type is MsgType.PONG and header.body["ready"], header
    return 0


def test_zmq_auth(servers: dict[str, LaunchedEngine]) -> None:
    server = servers["open_health"]
    assert zmq_infer(server, None) == 16
    assert zmq_infer(server, WRONG) == 16
    assert zmq_infer(server, "") == 16
    for token in TOKENS:
        assert zmq_infer(server, token) == 0
    assert zmq_ping(server, None) == 0

    closed = servers["closed_health"]
    assert zmq_infer(closed, TOKENS[0]) == 16
    assert zmq_infer(closed, CLOSED_TOKEN) == 0
    assert zmq_ping(closed, None) == 16
    assert zmq_ping(closed, WRONG) == 16
    assert zmq_ping(closed, CLOSED_TOKEN) == 0


# ---- logs, binding, shared memory ----------------------------------------------------------------


def test_tokens_never_logged(servers: dict[str, LaunchedEngine]) -> None:
    # after the auth tests (file order): every token, right and wrong, has been sent to every port
    for name, server in servers.items():
        text = server.stderr_text() + "\n".join(server.stdout)
        assert text.strip(), f"{name} logged nothing: the check would prove nothing"
        for token in (*TOKENS, CLOSED_TOKEN, WRONG):
            assert token not in text, f"{name} logged a token"
    # DEBUG really was on for the first one
    assert '"level":"DEBUG"' in servers["open_health"].stderr_text()


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} print them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                addr, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                    found.add(addr)
    return found


def test_default_bind_is_localhost(servers: dict[str, LaunchedEngine]) -> None:
    server = servers["open_health"]  # started without --host
    listening = [line for line in server.stdout if "listening on" in line]
    assert len(listening) == 3, server.stdout
    assert all(" listening on 127.0.0.1:" in line for line in listening), listening
    for proto, (host, port) in server.endpoints.items():
        assert host == "127.0.0.1"
        # the kernel agrees: bound to loopback only
        bound = _listening(port)
        assert bound and bound <= LOOPBACK, (proto, bound)


def test_segments_private_and_unguessable(servers: dict[str, LaunchedEngine]) -> None:
    names = {name: segments_created_by(server.proc.pid) for name, server in servers.items()}
    for held in names.values():
        assert held
        for seg in held:
            assert SEGMENT_NAME.match(seg), seg
            info = os.stat(SHM_DIR / seg)
            assert stat.S_IMODE(info.st_mode) == 0o600, (seg, oct(info.st_mode))
            assert info.st_uid == os.getuid()
    bases = {seg[:36] for held in names.values() for seg in held}
    assert len(bases) == 2, bases  # each server draws its own random base


def _attach_as(uid: int, name: str) -> int:
    """Fork; the child drops to ``uid`` and tries to attach ``name`` read-write and read-only.

    Exit status: 0 when every attach was refused for lack of permission, 1 when one succeeded,
    2 for any other failure.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            refused = 0
            for writable in (True, False):
                try:
                    Segment.attach(name, KIND_ANY, writable=writable).close()
                except SegmentError as err:
                    refused += "Permission denied" in str(err)
            code = 0 if refused == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_other_user_cannot_attach(servers: dict[str, LaunchedEngine]) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    held = sorted(segments_created_by(servers["open_health"].proc.pid))
    control = next(seg for seg in held if "-" not in seg[4:])
    arena = next(seg for seg in held if seg.endswith("g1") and "-w" in seg)
    for name in (control, arena):
        assert Path(SHM_DIR / name).exists()
        assert _attach_as(NOBODY, name) == 0, f"user {NOBODY} could attach {name}"
    # and the same attach works for the owner, so the refusal above is about permissions
    Segment.attach(control, KIND_ANY, writable=False).close()
