"""Faults under a steady load: what each client saw when a process was killed, stopped or told to stop.

`run` launches ``python -m engine.launch`` (one CPU worker, one front-end per protocol) and, for each
fault, drives a steady closed-loop load of ``mlp`` requests (FP32 [1, 256]) from gRPC users (no
deadline) and ZMQ users (a 1 s deadline in the header), injects the fault, keeps the load on until the
server has recovered and a few seconds more, then stops and counts, per protocol: requests sent,
answered OK, answered with an error (by code), hung (no answer within `HANG_S`: must be 0), how long
the longest stretch without an OK answer from the fault on (the outage its clients saw), and the OK
rate before the fault and in the last second of the run (throughput recovered).

Faults, in order (the first three on one server, the last on a fresh one):

- ``sigkill-worker``: SIGKILL the worker; its requests fail at once, the supervisor restarts it;
- ``sigkill-frontend``: SIGKILL the gRPC front-end; its clients see their calls fail and reconnect
  to the restarted one on the same port, ZMQ clients should not notice;
- ``sigstop-worker``: SIGSTOP the worker for 3 s (a hang, below ``hang_timeout_s``): requests wait,
  those with a deadline are answered DEADLINE_EXCEEDED by the front-end;
- ``sigterm-server``: SIGTERM the supervisor: it drains (answers what it admitted, refuses new work
  with UNAVAILABLE), exits 0 and leaves nothing in /dev/shm. Users stop at their first refusal, as a
  client told "draining" goes elsewhere.

Clients back off 50 ms after an UNAVAILABLE or RESOURCE_EXHAUSTED answer (as a real client would),
so a restart window does not turn into a tight loop of refusals.
``python -m bench faults [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.load_server import REPO_ROOT, process_title, process_tree
from bench.output import write_json

FAULTS = ("sigkill-worker", "sigkill-frontend", "sigstop-worker", "sigterm-server")
MODEL = "mlp"
SHAPE = (1, 256)
GRPC_USERS = 8
ZMQ_USERS = 8
#: The ZMQ users' deadline, carried in the request header and enforced by the server.
ZMQ_DEADLINE_S = 1.0
#: No answer within this is a hung request.
HANG_S = 20.0
BACKOFF_S = 0.05
BEFORE_S = 2.0
AFTER_S = 4.0
QUICK_AFTER_S = 2.0
STOP_S = 3.0
#: How long a restarted process may take (a worker imports torch and loads the models again).
RECOVER_S = 60.0
READY_S = 120.0
SERVER_ARGS = (
    "--devices", "cpu", "--log-level", "WARNING",
    "--grpc-port", "0", "--rest-port", "0", "--zmq-port", "0",
    "--set", "grpc_frontends=1", "--set", "drain_grace_s=5",
    "--set", "max_message_mb=8", "--set", "frontend_arena_mb=64", "--set", "worker_arena_mb=64",
)  # fmt: skip
BENCH_QUICK_ENV = "ENGINE_BENCH_QUICK"
_LISTENING = re.compile(r"^(\w+)\s+listening on (\S+):(\d+)$")


# ---- the server ------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A launched engine: its supervisor process, endpoints and log."""

    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    host: str = ""
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def child(self, title: str) -> int | None:
        """Pid of the server process whose title holds ``title`` (e.g. ``engine: worker cpu``)."""
        for pid in process_tree(self.pid)[1:]:
            if title in process_title(pid):
                return pid
        return None

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def segments(self) -> list[str]:
        """/dev/shm segments this server's supervisor created that still exist."""
        from ext.segment import segment_info

        names = []
        for path in Path("/dev/shm").glob("sie-*"):
            with contextlib.suppress(Exception):
                if segment_info(path.name)["creator_pid"] == self.pid:
                    names.append(path.name)
        return names


@contextlib.contextmanager
def launched() -> Iterator[Server]:
    """``python -m engine.launch`` with `SERVER_ARGS` for the block; SIGTERM (then SIGKILL) after."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.launch", *SERVER_ARGS],
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        server = Server(proc, log)
        try:
            _wait_ready(server)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def _wait_ready(server: Server) -> None:
    stdout = server.proc.stdout
    assert stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for raw in iter(stdout.readline, b""):
            lines.put(raw.decode(errors="replace").strip())
        lines.put(None)

    threading.Thread(target=read, name="faults-server-stdout", daemon=True).start()
    end = time.monotonic() + READY_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            raise RuntimeError(f"the server did not get ready; log:\n{server.log_tail()}")
        if line == "ready":
            return
        match = _LISTENING.match(line)
        if match:
            server.host = match[2]
            server.ports[match[1]] = int(match[3])


# ---- the load --------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one protocol's users saw."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    #: monotonic time of every OK answer
    ok_times: list[float] = field(default_factory=list)


class Load:
    """gRPC and ZMQ users in one asyncio loop; `stop` ends them after their current request."""

    def __init__(self, server: Server) -> None:
        import grpc.aio
        import zmq
        import zmq.asyncio

        from protos import grpc_service_pb2 as pb
        from protos import grpc_service_pb2_grpc as pb_grpc
        from servers.zmq_protocol import encode_request

        self.server = server
        self.stopping = False
        self.stop_at_refusal = False
        self.tallies = {"grpc": Tally(), "zmq": Tally()}
        data = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
        self._channel = grpc.aio.insecure_channel(f"{server.host}:{server.ports['grpc']}")
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._request = pb.ModelInferRequest(model_name=MODEL)
        self._request.inputs.add(name="INPUT0", datatype="FP32", shape=SHAPE)
        self._request.raw_input_contents.append(data.tobytes())
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{server.host}:{server.ports['zmq']}")
        self._encode = lambda rid: encode_request(
            rid, MODEL, {"INPUT0": data}, timeout_us=int(ZMQ_DEADLINE_S * 1e6)
        )
        self._replies: dict[int, asyncio.Future[str]] = {}
        self._next_id = 1
        self._tasks: list[asyncio.Task[None]] = []

    async def _grpc(self) -> str:
        import grpc

        try:
            response = await self._stub.ModelInfer(self._request)
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return "OK" if len(response.raw_output_contents) == 1 else "BAD_RESPONSE"

    async def _zmq(self) -> str:
        rid = self._next_id
        self._next_id += 1
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        try:
            await self._sock.send_multipart(self._encode(rid))
            return await future
        finally:
            self._replies.pop(rid, None)

    async def _receive(self) -> None:
        from servers.zmq_protocol import MsgType, decode_reply

        while True:
            reply = decode_reply(await self._sock.recv_multipart())
            future = self._replies.get(reply.request_id)
            if future is None or future.done():
                continue
            if reply.msg_type is MsgType.REPLY:
                future.set_result("OK")
            else:
                future.set_result(getattr(reply.error, "grpc_code", "ERROR"))

    async def _user(self, proto: str, call: Callable[[], Awaitable[str]]) -> None:
        tally = self.tallies[proto]
        while not self.stopping:
            tally.sent += 1
            try:
                outcome = await asyncio.wait_for(call(), HANG_S)
            except TimeoutError:
                outcome = "HUNG"
            tally.outcomes[outcome] += 1
            if outcome == "OK":
                tally.ok_times.append(time.monotonic())
            elif outcome in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                if self.stop_at_refusal:
                    return
                await asyncio.sleep(BACKOFF_S)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._receive()))
        self._users = [asyncio.create_task(self._user("grpc", self._grpc)) for _ in range(GRPC_USERS)]
        self._users += [asyncio.create_task(self._user("zmq", self._zmq)) for _ in range(ZMQ_USERS)]

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self._users)
        for task in self._tasks:
            task.cancel()
        await self._channel.close()
        self._sock.close(linger=0)
        self._ctx.term()


# ---- faults ----------------------------------------------------------------------------------------------


async def _wait_new(server: Server, title: str, old: int) -> float:
    """Seconds until a process titled ``title`` other than ``old`` runs (RECOVER_S at most)."""
    start = time.monotonic()
    while time.monotonic() - start < RECOVER_S:
        pid = server.child(title)
        if pid is not None and pid != old:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no new {title} within {RECOVER_S} s; log:\n{server.log_tail()}")


async def _until(condition: Callable[[], bool], what: str, server: Server) -> None:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > RECOVER_S:
            raise RuntimeError(f"{what} not within {RECOVER_S} s; log:\n{server.log_tail()}")
        await asyncio.sleep(0.02)


async def one_fault(server: Server, fault: str, after_s: float) -> dict[str, Any]:
    """Steady load, the fault, recovery, a few seconds more; the tallies."""
    load = Load(server)
    load.start()
    notes: dict[str, Any] = {}
    tallies = load.tallies.items()
    # steady state first: both protocols served (a previous fault's restart may still be loading)
    await _until(lambda: all(len(t.ok_times) >= 20 for _, t in tallies), "a steady load", server)
    mark = {p: len(t.ok_times) for p, t in tallies}
    await asyncio.sleep(BEFORE_S)
    rate_before = {p: (len(t.ok_times) - mark[p]) / BEFORE_S for p, t in tallies}
    at = time.monotonic()
    # answers after this instant count as recovery (not replies already on their way at the fault)
    settled = at
    if fault == "sigkill-worker":
        pid = server.child("engine: worker")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        notes["new_process_after_s"] = round(await _wait_new(server, "engine: worker", pid), 2)
        settled = time.monotonic()
    elif fault == "sigkill-frontend":
        pid = server.child("engine: frontend grpc#0")
        assert pid is not None
        worker = server.child("engine: worker")
        os.kill(pid, signal.SIGKILL)
        notes["new_process_after_s"] = round(await _wait_new(server, "engine: frontend grpc#0", pid), 2)
        settled = time.monotonic()
        notes["worker_unchanged"] = server.child("engine: worker") == worker
    elif fault == "sigstop-worker":
        pid = server.child("engine: worker")
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(STOP_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        settled = time.monotonic()
        notes["worker_unchanged"] = server.child("engine: worker") == pid
    elif fault == "sigterm-server":
        load.stop_at_refusal = True
        held = server.segments()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 60)
        notes["exit_code"] = code
        notes["shm_left"] = len([name for name in held if Path("/dev/shm", name).exists()])
    else:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    if fault != "sigterm-server":
        await _until(
            lambda: all(t.ok_times and t.ok_times[-1] > settled for _, t in tallies), "recovery", server
        )
        await asyncio.sleep(after_s)
    end = time.monotonic()
    await load.stop()
    rows = []
    for proto, tally in tallies:
        errors = {k: v for k, v in tally.outcomes.items() if k not in ("OK", "HUNG")}
        # the longest stretch without an OK answer from the fault to the end: the outage clients saw
        marks = [at, *(t for t in tally.ok_times if t > at), end]
        gap = max(b - a for a, b in itertools.pairwise(marks))
        tail = [t for t in tally.ok_times if end - 1.0 <= t <= end]
        rows.append(
            {
                "protocol": proto,
                "sent": tally.sent,
                "ok": tally.outcomes["OK"],
                "errors": errors,
                "error_count": sum(errors.values()),
                "hung": tally.outcomes["HUNG"],
                "longest_gap_s": round(gap, 2) if fault != "sigterm-server" else None,
                "ok_rps_before": round(rate_before[proto], 1),
                "ok_rps_last_second": len(tail) if fault != "sigterm-server" else None,
            }
        )
    return {"fault": fault, "notes": notes, "results": rows}


def run(
    json_path: str | Path | None = None, *, quick: bool = False, faults: tuple[str, ...] = FAULTS
) -> dict[str, Any]:
    """Launch servers, run each fault, print the table, write JSON to ``json_path`` (unless None)."""
    after_s = QUICK_AFTER_S if quick else AFTER_S
    runs = []
    shared = [f for f in faults if f != "sigterm-server"]
    if shared:
        with launched() as server:
            for fault in shared:
                runs.append(asyncio.run(one_fault(server, fault, after_s)))
    if "sigterm-server" in faults:
        with launched() as server:
            runs.append(asyncio.run(one_fault(server, "sigterm-server", after_s)))
    result: dict[str, Any] = {
        "benchmark": "faults",
        "model": MODEL,
        "input": f"FP32{list(SHAPE)}",
        "users": {"grpc": GRPC_USERS, "zmq": ZMQ_USERS},
        "zmq_deadline_s": ZMQ_DEADLINE_S,
        "hang_s": HANG_S,
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "runs": runs,
    }
    print(format_table(result))
    if json_path is not None:
        print(f"wrote {write_json(result, json_path)}")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as a text table."""
    lines = [
        f"faults: {result['model']} {result['input']}, {result['users']['grpc']} gRPC users (no deadline), "
        f"{result['users']['zmq']} ZMQ users ({result['zmq_deadline_s']:g} s deadline), hung = no answer "
        f"in {result['hang_s']:g} s",
        f"  {'fault':<17} {'proto':<5} {'sent':>6} {'ok':>6} {'errors':>6} {'hung':>4} {'gap s':>8} "
        f"{'rps before/last s':>17}  errors by code",
    ]
    for r in result["runs"]:
        for row in r["results"]:
            first = row["longest_gap_s"]
            last = row["ok_rps_last_second"]
            rates = f"{row['ok_rps_before']:.0f}/{'-' if last is None else last}"
            codes = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "-"
            lines.append(
                f"  {r['fault']:<17} {row['protocol']:<5} {row['sent']:>6} {row['ok']:>6} "
                f"{row['error_count']:>6} {row['hung']:>4} {'-' if first is None else f'{first:.2f}':>8} "
                f"{rates:>17}  {codes}"
            )
        notes = ", ".join(f"{k} {v}" for k, v in r["notes"].items())
        if notes:
            lines.append(f"  {'':<17} {notes}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m bench faults``."""
    parser.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_AFTER_S:.0f} s of load after recovery")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="run only this fault (repeatable)")


def main(args: argparse.Namespace) -> int:
    """Entry of ``python -m bench faults``; exit status 1 when a request hung."""
    result = run(
        args.json,
        quick=args.quick or os.environ.get(BENCH_QUICK_ENV) == "1",
        faults=tuple(args.fault or FAULTS),
    )
    hung = sum(row["hung"] for r in result["runs"] for row in r["results"])
    return 1 if hung else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    configure(_parser)
    raise SystemExit(main(_parser.parse_args()))
