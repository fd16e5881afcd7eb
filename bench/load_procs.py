"""Drivers that run a load's phases: in this process, or split over several client processes.

`InProcess` runs one `Session` on a uvloop loop here. `ClientProcesses` starts ``procs`` fresh
interpreters (``python -m bench.load_procs``), each running its share of the load, and drives them in
lock step over their stdin/stdout with JSON lines (never pickle):

    parent -> child  argv: the spec, the address; stdin line 1: the payload (arrays in base64)
    child -> parent  {"ready": true, "pid": N}           once connected and warmed up
    parent -> child  "go"                                 run one phase
    child -> parent  {"start_ns", "end_ns", "hdr", ...}   that phase's `PhaseResult`
    parent -> child  "stop" (or EOF)                      close and exit 0

Every child gets the same "go" at the same moment, so their windows overlap; the phase's result is
the merge (`PhaseResult.merged`). A single Python client process is CPU-bound long before a server
is, on a small machine, so several processes show what the server can do.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from bench.load_payload import Payload
from bench.load_runner import LoadSpec, PhaseResult, Session, new_loop
from bench.load_server import REPO_ROOT
from engine.gc_tuning import settle_heap

#: Seconds a client process gets to connect and warm up.
CHILD_READY_TIMEOUT_S = 120.0


def encode_payload(payload: Payload) -> dict[str, Any]:
    """A JSON-safe form of ``payload``: each array as dtype, shape and base64 bytes."""

    def arrays(items: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        return {
            name: {
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii"),
            }
            for name, a in items.items()
        }

    return {"model": payload.model, "inputs": arrays(payload.inputs), "expected": arrays(payload.expected)}


def decode_payload(data: dict[str, Any]) -> Payload:
    """The payload `encode_payload` described."""

    def arrays(items: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
        if items is None:
            return None
        return {
            name: np.frombuffer(base64.b64decode(a["data"]), dtype=np.dtype(a["dtype"]))
            .reshape(tuple(a["shape"]))
            .copy()
            for name, a in items.items()
        }

    inputs = arrays(data["inputs"])
    assert inputs is not None
    return Payload(str(data["model"]), inputs, arrays(data.get("expected")))


class Driver:
    """Runs the phases of one load; `InProcess` or `ClientProcesses`."""

    def start(self) -> None:
        """Connect and warm up."""
        raise NotImplementedError

    def phase(self) -> PhaseResult:
        """Run one measured phase."""
        raise NotImplementedError

    def count(self) -> int | None:
        """Requests recorded so far in the running phase, when known (for the progress bar)."""
        return None

    def pids(self) -> dict[int, str]:
        """The client processes: pid -> label."""
        return {os.getpid(): "client"}

    def stop(self) -> None:
        """Close everything; safe to call twice."""


class InProcess(Driver):
    """The load from this process's own event loop."""

    def __init__(self, spec: LoadSpec, address: str, payload: Payload) -> None:
        self._session = Session(spec, address, payload)
        self._loop = new_loop()

    def start(self) -> None:
        self._loop.run_until_complete(self._session.start())

    def phase(self) -> PhaseResult:
        return self._loop.run_until_complete(self._session.phase())

    def count(self) -> int | None:
        recorder = self._session.recorder
        return recorder.count if recorder is not None else None

    def stop(self) -> None:
        if not self._loop.is_closed():
            try:
                self._loop.run_until_complete(self._session.stop())
            finally:
                self._loop.close()


class _Child:
    """One client process and a thread reading its stdout lines."""

    def __init__(self, spec: LoadSpec, address: str, payload_line: str) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load_procs", json.dumps(spec.to_json()), address],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.send(payload_line)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(
                f"client process {self.proc.pid} gave no answer (exit {self.proc.poll()}):\n{tail}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("stop")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.log.close()


class ClientProcesses(Driver):
    """The load split over ``procs`` client processes."""

    def __init__(self, spec: LoadSpec, address: str, payload: Payload, procs: int) -> None:
        self._shares = spec.share(procs)
        self._address = address
        self._payload_line = json.dumps(encode_payload(payload))
        self._phase_timeout_s = spec.duration_s + spec.timeout_s + 60.0
        self._children: list[_Child] = []

    def start(self) -> None:
        for share in self._shares:
            self._children.append(_Child(share, self._address, self._payload_line))
        for child in self._children:
            child.receive(CHILD_READY_TIMEOUT_S)

    def phase(self) -> PhaseResult:
        for child in self._children:
            child.send("go")
        return PhaseResult.merged(
            [PhaseResult.decode(child.receive(self._phase_timeout_s)) for child in self._children]
        )

    def pids(self) -> dict[int, str]:
        pids = {os.getpid(): "client (parent)"}
        pids.update({c.proc.pid: f"client #{i}" for i, c in enumerate(self._children)})
        return pids

    def stop(self) -> None:
        children, self._children = self._children, []
        for child in children:
            child.close()


def make_driver(spec: LoadSpec, address: str, payload: Payload, procs: int = 1) -> Driver:
    """`InProcess` for one client process, else `ClientProcesses`."""
    if procs <= 1:
        return InProcess(spec, address, payload)
    return ClientProcesses(spec, address, payload, procs)


def child_main(argv: list[str], stdin: IO[str] = sys.stdin, emit: Callable[[str], None] | None = None) -> int:
    """A client process: ``python -m bench.load_procs SPEC_JSON ADDRESS``, driven over stdin/stdout."""

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    write = emit or out
    spec = LoadSpec.from_json(json.loads(argv[0]))
    payload = decode_payload(json.loads(stdin.readline()))
    driver = InProcess(spec, argv[1], payload)
    try:
        driver.start()
        settle_heap()  # this process is the client's own (see `bench.load.measure`)
        write(json.dumps({"ready": True, "pid": os.getpid()}))
        for line in stdin:
            if line.strip() != "go":
                break
            write(json.dumps(driver.phase().encode()))
    finally:
        driver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
