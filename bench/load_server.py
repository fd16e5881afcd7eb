"""Servers a benchmark starts for itself: the engine (``python -m engine.launch``) or a baseline.

Every server the benchmarks start speaks the launch protocol on stdout: one ``<proto> listening on
<host>:<port>`` line per endpoint, then ``ready``. `launched` runs any such command for a ``with``
block (waiting for ``ready`` with a timeout, stderr to a temporary file so a chatty server never blocks
on a pipe) and SIGTERMs it after; `launched_server` is that for the engine with the benchmark flags.
`process_tree` lists the server's processes, so a benchmark can account for the CPU each one used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: The flags every engine the benchmarks launch runs with (ephemeral ports, one CPU worker, quiet log).
SERVER_ARGS = (
    "--grpc-port",
    "0",
    "--rest-port",
    "0",
    "--zmq-port",
    "0",
    "--devices",
    "cpu",
    "--log-level",
    "WARNING",
    "--set",
    "max_message_mb=8",
    "--set",
    "frontend_arena_mb=64",
    "--set",
    "worker_arena_mb=64",
)
#: Seconds a server gets to print ``ready`` (model loading on a busy 2-core machine).
READY_TIMEOUT_S = 120.0
#: Seconds SIGTERM gets before SIGKILL.
STOP_TIMEOUT_S = 60.0

_LISTENING = re.compile(r"^(\w+)\s+listening on (\S+):(\d+)$")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Endpoints:
    """Where a launched server listens.

    Attributes:
        host: the address its endpoints bound.
        ports: bound port per protocol (``grpc``, ``rest``, ``zmq``).
        pid: the server's (supervisor's) pid; 0 when unknown (a server given by ``--url``).
    """

    host: str
    ports: dict[str, int] = field(default_factory=dict)
    pid: int = 0


@contextmanager
def launched(argv: Sequence[str], ready_timeout_s: float = READY_TIMEOUT_S) -> Iterator[Endpoints]:
    """Run ``argv`` (a command speaking the launch protocol) for the ``with`` block.

    Raises:
        RuntimeError: the command exited, or printed no ``ready`` within ``ready_timeout_s``; the
            message holds the tail of its stderr.
    """
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            yield _wait_ready(proc, argv, log, ready_timeout_s)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


@contextmanager
def launched_server(extra_args: Sequence[str] = ()) -> Iterator[Endpoints]:
    """``python -m engine.launch`` with `SERVER_ARGS` plus ``extra_args`` for the ``with`` block.

    Raises:
        RuntimeError: the server exited or printed no ``ready`` within `READY_TIMEOUT_S`.
    """
    with launched([sys.executable, "-m", "engine.launch", *SERVER_ARGS, *extra_args]) as endpoints:
        yield endpoints


def _read_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    # A thread: the start-up wait is then a queue get with a timeout, and the pipe is always drained.
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").strip())
    lines.put(None)


def _wait_ready(
    proc: subprocess.Popen[bytes], argv: Sequence[str], log: IO[bytes], timeout_s: float
) -> Endpoints:
    assert proc.stdout is not None  # Popen(stdout=PIPE)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(
        target=_read_lines, args=(proc.stdout, lines), name="bench-server-stdout", daemon=True
    ).start()
    host, ports = "", dict[str, int]()
    end = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(
                f"{' '.join(map(str, argv[:4]))}... did not get ready (exit code {proc.poll()}); log:\n{tail}"
            )
        if line == "ready":
            return Endpoints(host, ports, proc.pid)
        match = _LISTENING.match(line)
        if match:
            host = match[2]
            ports[match[1]] = int(match[3])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        tree.append(current)
        todo.extend(sorted(children.get(current, ())))
    return tree


def process_title(pid: int) -> str:
    """The process's title (``engine: worker cpu #0``...: setproctitle rewrites the command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return f"pid {pid}"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"pid {pid}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used, all its threads, those gone included (0.0
    once it is gone). Read from the process's CPU-time clock, to the nanosecond: /proc/PID/stat
    counts 10 ms ticks, ±4 µs per request over a 2,500-call burst for each process."""
    clock = _cpu_clock(pid)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:
            return 0.0
    return _tick_seconds(pid)


def _cpu_clock(pid: int) -> int | None:
    """The clock id of ``pid``'s process CPU time (``clock_getcpuclockid``), or None where libc or
    the kernel has none for it."""
    try:
        libc = _libc()
    except OSError:
        return None
    clock = ctypes.c_int()
    if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    return clock.value


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _tick_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after "(comm)": state is field 0, utime field 11, stime field 12 (proc(5) fields 14 and 15)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
