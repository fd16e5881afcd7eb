"""A real engine server as a subprocess (`python -m engine.launch`), and what its built-in models must answer.

`launch_server` starts the supervisor with every port set to 0, reads its stdout until the ``ready``
line (the ``<proto> listening on <host>:<port>`` lines before it give the bound ports) and returns a
`ServerProcess`. `ServerProcess.stop` sends SIGTERM, waits (killing on timeout) and returns the exit
status; `serving` wraps both and proves, after the stop, that the server exited 0 and left no shared
memory behind.

The supervisor's stderr (its log and its children's) goes to a temporary file, never a pipe, so a
chatty server can never block on a full pipe; `ServerProcess.log_tail` shows it in failure messages.

`sample_inputs`, `reference_outputs` and `assert_outputs` give each built-in model's inputs and the
outputs it must return, computed in the test process (the mlp through `engine.models.backends`).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.models.backends import LoadedModel
    from engine.models.spec import ModelSpec

#: Where the engine's segments live, and the prefix of their names (ext.segment.NAME_PREFIX).
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "sie-"
#: The flags every test server runs with (the issue's small arenas and 8 MiB message limit).
DEFAULT_ARGS: tuple[str, ...] = (
    "--grpc-port", "0",
    "--rest-port", "0",
    "--zmq-port", "0",
    "--devices", "cpu",
    "--set", "max_message_mb=8",
    "--set", "frontend_arena_mb=64",
    "--set", "worker_arena_mb=64",
)  # fmt: skip
#: Seconds to wait for the ``ready`` line (model loading on a busy 2-core machine).
READY_TIMEOUT_S = 120.0
#: Seconds SIGTERM gets before SIGKILL; above the supervisor's default drain grace (10 s) plus margin.
STOP_TIMEOUT_S = 40.0

_LISTENING = re.compile(r"^(\w+)\s+listening on (\S+):(\d+)$")
_REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerStartError(RuntimeError):
    """The server exited or stayed silent before printing ``ready``."""


@dataclass
class ServerProcess:
    """A launched engine server.

    Attributes:
        proc: the supervisor process.
        host: the address the front-ends bound.
        ports: bound port per protocol (``grpc``, ``rest``, ``zmq``).
        log_path: file holding the server's stderr.
    """

    proc: subprocess.Popen[bytes]
    host: str
    ports: dict[str, int]
    log_path: Path
    _stdout_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The supervisor's pid."""
        return self.proc.pid

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC front-end."""
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def rest_address(self) -> str:
        """``host:port`` of the REST front-end."""
        return f"{self.host}:{self.ports['rest']}"

    @property
    def zmq_endpoint(self) -> str:
        """``tcp://host:port`` of the ZMQ front-end."""
        return f"tcp://{self.host}:{self.ports['zmq']}"

    def child_pids(self) -> set[int]:
        """Pids of the supervisor's live children (workers, front-ends)."""
        return children_of(self.pid)

    def segments(self) -> set[str]:
        """Names of the /dev/shm segments this server's supervisor created and still holds."""
        return segments_created_by(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stderr, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout_s``, SIGKILL when still running; returns the exit status
        (negative: killed by that signal). Safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._reader is not None:
            # EOF once the supervisor and every child (they inherit the pipe) are gone
            self._reader.join(10)
        if self.proc.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            self.proc.stdout.close()
        return self.proc.returncode


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc; no third-party process library)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == pid:
            found.add(int(entry))
    return found


def segments_created_by(pid: int) -> set[str]:
    """Engine segments in /dev/shm whose header names ``pid`` as their creator."""
    from ext.segment import SegmentError, segment_info

    names: set[str] = set()
    try:
        listing = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return names
    for name in listing:
        if not name.startswith(SHM_PREFIX):
            continue
        try:
            if int(segment_info(name)["creator_pid"]) == pid:
                names.add(name)
        except (SegmentError, OSError):
            continue  # unlinked meanwhile, or still being created by someone else
    return names


def _read_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    # A thread, so that the start-up wait is a queue get with a timeout and the pipe is always drained.
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\n"))
    lines.put(None)


def launch_server(
    extra_args: Sequence[str] = (), *, ready_timeout_s: float = READY_TIMEOUT_S
) -> ServerProcess:
    """Start ``python -m engine.launch`` with `DEFAULT_ARGS` plus ``extra_args``; return once it is ready.

    Raises:
        ServerStartError: the server exited, or printed no ``ready`` line within ``ready_timeout_s``
            (the message holds the tail of its log).
    """
    log = tempfile.NamedTemporaryFile(prefix="engine-server-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(log.name)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.launch", *DEFAULT_ARGS, *extra_args],
        cwd=_REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    log.close()  # the child holds its own descriptor
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(
        target=_read_lines, args=(proc.stdout, lines), name="server-stdout", daemon=True
    )
    reader.start()
    server = ServerProcess(proc=proc, host="", ports={}, log_path=log_path, _reader=reader)
    end = time.monotonic() + ready_timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            server.stop()
            raise ServerStartError(
                f"no 'ready' line within {ready_timeout_s:.0f} s; log:\n{server.log_tail()}"
            ) from None
        if line is None:
            code = proc.wait(10)
            raise ServerStartError(
                f"server exited with code {code} before 'ready'; log:\n{server.log_tail()}"
            )
        server._stdout_lines.append(line)
        if line.strip() == "ready":
            break
        match = _LISTENING.match(line.strip())
        if match:
            proto, host, port = match.groups()
            server.host = host
            server.ports[proto] = int(port)
    missing = {"grpc", "rest", "zmq"} - server.ports.keys()
    if missing:
        server.stop()
        raise ServerStartError(f"'ready' without a port for {sorted(missing)}: {server._stdout_lines}")
    return server


@contextlib.contextmanager
def serving(extra_args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """A launched server for the ``with`` block; afterwards asserts a clean stop.

    Raises:
        AssertionError: after the block, the server did not exit 0 on SIGTERM, or a segment it
            created is still in /dev/shm (unlinked then, so one failure does not cascade).
    """
    server = launch_server(extra_args)
    held: set[str] = set()
    try:
        held = server.segments()
        assert held, "the running server holds no segment in /dev/shm: the leak check would prove nothing"
        yield server
    finally:
        code = server.stop()
    left = {name for name in held | server.segments() if (SHM_DIR / name).exists()}
    for name in left:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / name)
    assert code == 0, f"server exited with code {code} after SIGTERM; log:\n{server.log_tail()}"
    assert not left, f"server left shared memory behind (now unlinked): {sorted(left)}"
    with contextlib.suppress(OSError):
        server.log_path.unlink()


# ---- what the built-in models must answer ----------------------------------------------------------

#: The built-in demo models every test server serves.
BUILTIN_MODELS = ("identity", "mlp", "simple")


@functools.cache
def builtin_specs() -> dict[str, ModelSpec]:
    """The specs of the built-in models, read from the same repository the server loads."""
    from engine.models import builtin_repository
    from engine.models.repository import load_repository

    return dict(load_repository(builtin_repository()).specs)


@functools.cache
def _mlp() -> LoadedModel:
    from engine.models.backends import load_model

    return load_model(builtin_specs()["mlp"], "cpu")


def sample_inputs(model: str, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of ``rows`` rows for a built-in model (identity: 7 columns)."""
    if model == "simple":
        return {
            "INPUT0": rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
            "INPUT1": rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
        }
    if model == "identity":
        return {"INPUT0": rng.standard_normal((rows, 7), dtype=np.float32)}
    if model == "mlp":
        return {"INPUT0": rng.standard_normal((rows, 256), dtype=np.float32)}
    raise ValueError(f"not a built-in model: {model!r}")


def reference_outputs(model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a built-in model must answer, computed here: a+b and a-b, the input itself, or the mlp
    run through `engine.models.backends.load_model` on the CPU of this process."""
    if model == "simple":
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
    if model == "identity":
        return {"OUTPUT0": np.array(inputs["INPUT0"])}
    if model == "mlp":
        import torch

        (out,) = _mlp().run([torch.from_numpy(np.ascontiguousarray(inputs["INPUT0"]))])
        return {"OUTPUT0": out.numpy()}
    raise ValueError(f"not a built-in model: {model!r}")


def assert_outputs(model: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    """Every expected output is there with its shape and dtype; exact for integers, atol 1e-5 else."""
    assert set(got) == set(want), f"{model}: outputs {sorted(got)}, expected {sorted(want)}"
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape, f"{model}.{name}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{model}.{name}: dtype {actual.dtype} != {expected.dtype}"
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=f"{model}.{name}")
