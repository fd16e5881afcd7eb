"""Fixtures for the engine's integration tests: small configs, model repositories, engines, launched servers.

Everything here starts real processes, and everything it starts it also stops, on every path:

- `EngineHarness` runs an in-process `Engine` (real worker processes) with its own event loop and one
  connected gateway; `harness_factory` closes each harness at teardown, failed test or not, so the
  shared-memory leak check of ``tests/conftest.py`` holds.
- `LaunchedEngine` runs ``python -m engine.launch`` in its own session; `launcher` kills the whole
  session and waits for it at teardown when a test left it running.
- `RepoBuilder` (fixture `repo`) builds model repositories in ``tmp_path``: copies of the built-in
  models and misbehaving python-backend models (one that raises, slow ones that log what they computed,
  one that kills its worker on a magic value, one whose worker dies soon after every start).
- `shared_engine` is the one engine of ``test_engine.py`` (module scope: its worker never dies).
- `engine_server` is the launched server of the front-end tests (``tests/integration/server.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.models import builtin_repository

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Arena sizes that keep /dev/shm use (and segment set-up) small; one message is at most 8 MiB.
SMALL_ARENAS = {"frontend_arena_mb": 16, "worker_arena_mb": 16, "max_message_mb": 8}
#: Seconds a launched engine may take to print "ready" (spawning workers imports torch).
LAUNCH_READY_S = 90.0


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without ``ENGINE_*`` variables (ENGINE_BENCH_QUICK, ENGINE_TEST_SEED... are not
    config keys, and the launcher refuses unknown ENGINE_ names), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env.update(extra)
    return env


def small_config(repository: Path | None = None, **overrides: Any) -> EngineConfig:
    """An `EngineConfig` for tests: one CPU worker, no network front-ends, small arenas, quick stops."""
    values: dict[str, Any] = {
        "protocols": (),
        "devices": ("cpu",),
        "drain_grace_s": 0.5,
        "restart_backoff_s": 0.05,
        "heartbeat_interval_s": 0.2,
        "worker_threads": 1,
        "log_level": "WARNING",
        **SMALL_ARENAS,
    }
    if repository is not None:
        values["model_repository"] = repository
    values.update(overrides)
    return EngineConfig(**values)


# ---- model repositories ------------------------------------------------------------------------

#: ``faulty``: OUTPUT0 = 2 * INPUT0; raises ValueError naming the problem when an input is negative.
FAULTY_MESSAGE = "negative input is not allowed"
_FAULTY_YAML = """
    backend: python
    source: model.py:forward
    max_batch_size: 8
    dynamic_batching: {max_queue_delay_us: 100}
    inputs: [{name: INPUT0, datatype: FP32, shape: [4]}]
    outputs: [{name: OUTPUT0, datatype: FP32, shape: [4]}]
"""
_FAULTY_PY = f'''
    """Doubles its input; refuses negative values."""
    import numpy as np

    def forward(x):
        if (x < 0).any():
            raise ValueError("{FAULTY_MESSAGE}")
        return (x * 2).astype(np.float32)
'''

#: ``patient``: an FP32 [4] echo that batches with a batching delay far longer than any test waits.
PATIENT_DELAY_S = 60.0
_PATIENT_YAML = f"""
    backend: python
    source: model.py:forward
    max_batch_size: 8
    dynamic_batching: {{max_queue_delay_us: {int(PATIENT_DELAY_S * 1e6)}}}
    inputs: [{{name: INPUT0, datatype: FP32, shape: [4]}}]
    outputs: [{{name: OUTPUT0, datatype: FP32, shape: [4]}}]
"""
_ECHO_PY = '''
    """Echoes its input."""

    def forward(x):
        return x.copy()
'''

#: A slow echo: OUTPUT0 = INPUT0 after sleeping; logs the first value of every row it computes to
#: ``calls.log`` in its folder (the warm-up logs 0.0), so a test can tell which requests were computed.
_SLOW_YAML = """
    backend: python
    source: model.py:forward
    max_batch_size: {max_batch_size}
    {batching}
    inputs: [{{name: INPUT0, datatype: FP32, shape: [4]}}]
    outputs: [{{name: OUTPUT0, datatype: FP32, shape: [4]}}]
"""
_SLOW_PY = '''
    """Echoes its input after sleeping {sleep_s} s per batch; logs what it computed."""
    import time
    from pathlib import Path

    LOG = Path(__file__).with_name("calls.log")

    def forward(x):
        rows = x if x.ndim > 1 else x[None]
        with LOG.open("a") as f:
            f.write("".join(f"{{float(r[0])}}\\n" for r in rows))
        time.sleep({sleep_s})
        return x.copy()
'''

#: ``crash``: OUTPUT0 = INPUT0, except that the value 666 kills the worker process (exit code 3).
CRASH_VALUE = 666.0
_CRASH_YAML = """
    backend: python
    source: model.py:forward
    inputs: [{name: INPUT0, datatype: FP32, shape: [4]}]
    outputs: [{name: OUTPUT0, datatype: FP32, shape: [4]}]
"""
_CRASH_PY = '''
    """Echoes its input; the value 666 makes the worker process exit at once (a crash)."""
    import os

    def forward(x):
        if (x == 666).any():
            os._exit(3)
        return x.copy()
'''

#: ``doomed``: an echo whose import arms a timer that kills the worker process {delay_s} s later, so
#: every incarnation of the worker crashes soon after it got ready (a crash loop without requests).
_DOOMED_PY = '''
    """Echoes its input; importing it schedules the worker's death (exit code 3) {delay_s} s later."""
    import os
    import threading

    threading.Timer({delay_s}, os._exit, (3,)).start()

    def forward(x):
        return x.copy()
'''


class RepoBuilder:
    """Builds a model repository folder: built-in copies and the misbehaving test models.

    Attributes:
        path: the repository folder (pass it as ``model_repository``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def model(self, name: str, spec_yaml: str, model_py: str) -> Path:
        """Write ``name/model.yaml`` and ``name/model.py``; returns the model folder."""
        folder = self.path / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.yaml").write_text(textwrap.dedent(spec_yaml).lstrip(), encoding="utf-8")
        (folder / "model.py").write_text(textwrap.dedent(model_py).lstrip(), encoding="utf-8")
        return folder

    def builtin(self, *names: str) -> None:
        """Copy built-in models (``simple``, ``identity``, ``mlp``)."""
        for name in names:
            shutil.copytree(
                builtin_repository() / name, self.path / name, ignore=shutil.ignore_patterns("__pycache__")
            )

    def faulty(self, name: str = "faulty") -> Path:
        """FP32 [4] -> 2x, batching up to 8; a negative input raises ValueError(`FAULTY_MESSAGE`)."""
        return self.model(name, _FAULTY_YAML, _FAULTY_PY)

    def patient(self, name: str = "patient") -> Path:
        """FP32 [4] echo, batching up to 8 with a `PATIENT_DELAY_S` batching delay."""
        return self.model(name, _PATIENT_YAML, _ECHO_PY)

    def slow(self, name: str, sleep_s: float, max_batch_size: int, delay_us: int = 1000) -> Path:
        """FP32 [4] echo that sleeps ``sleep_s`` per batch and logs the rows it computed (batching
        delay ``delay_us`` when it batches)."""
        batching = f"dynamic_batching: {{max_queue_delay_us: {delay_us}}}" if max_batch_size else ""
        return self.model(
            name,
            _SLOW_YAML.format(max_batch_size=max_batch_size, batching=batching),
            _SLOW_PY.format(sleep_s=sleep_s),
        )

    def crash(self, name: str = "crash") -> Path:
        """FP32 [4] echo without batching; the value `CRASH_VALUE` kills the worker."""
        return self.model(name, _CRASH_YAML, _CRASH_PY)

    def doomed(self, name: str = "doomed", delay_s: float = 1.5) -> Path:
        """FP32 [4] echo whose worker dies ``delay_s`` after loading it, in every incarnation."""
        return self.model(name, _CRASH_YAML, _DOOMED_PY.format(delay_s=delay_s))

    def computed(self, name: str) -> list[float]:
        """First value of every row a `slow` model computed, its warm-up (0.0) left out."""
        log = self.path / name / "calls.log"
        if not log.exists():
            return []
        return [v for v in (float(line) for line in log.read_text().split()) if v != 0.0]


@pytest.fixture
def repo(tmp_path: Path) -> RepoBuilder:
    """An empty model repository in ``tmp_path``."""
    return RepoBuilder(tmp_path / "models")


@pytest.fixture
def engine_config() -> Callable[..., EngineConfig]:
    """`small_config`: ``engine_config(repository, **overrides)``."""
    return small_config


# ---- in-process engines ------------------------------------------------------------------------


class EngineHarness:
    """An `Engine` with real worker processes, its own event loop and one gateway connected to it.

    Tests drive coroutines with `run`; the loop is not running between calls, which is fine for the
    gateway (completions wait in the eventfd until the loop runs again).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.repo: RepoBuilder | None = None
        self.engine = Engine(config, embedded_frontends=1)
        self.loop = asyncio.new_event_loop()
        self._entered = False
        self._closed = False
        try:
            self.engine.__enter__()  # stops what it started when it fails
            self._entered = True
            self.gateway = self.engine.connect(self.loop)
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the harness loop; fails the test (TimeoutError) when it runs past the bound."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def status(self) -> dict[str, Any]:
        """`Engine.status()`."""
        return self.engine.status()

    def stats(self, model: str) -> dict[str, int]:
        """The worker counters of one model (success, batches, rows, expired, batch_le_*...)."""
        return dict(self.engine.status()["models"][model])

    def worker(self) -> dict[str, Any]:
        """The status entry of the (only) worker process."""
        return next(p for p in self.engine.status()["processes"] if p["role"] == "worker")

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Run the loop until ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            # the loop keeps taking completions meanwhile
            self.loop.run_until_complete(asyncio.sleep(0.02))

    def close(self) -> None:
        """Stop every engine process, unlink shared memory, close the loop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._entered:
                self.engine.close(grace_s=0.2)
        finally:
            self.loop.close()


@pytest.fixture
def harness_factory() -> Iterator[Callable[[EngineConfig], EngineHarness]]:
    """``start(config)`` starts an `EngineHarness`; each is closed at teardown, also on failure."""
    made: list[EngineHarness] = []

    def start(config: EngineConfig) -> EngineHarness:
        harness = EngineHarness(config)
        made.append(harness)
        return harness

    yield start
    errors: list[BaseException] = []
    for harness in reversed(made):
        try:
            harness.close()
        except Exception as exc:  # close the others all the same
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHarness]:
    """One engine for a whole module: simple, identity, mlp, ``faulty``, ``patient``, ``slow`` (0.3 s
    per request, no batching) and ``slow_patient`` (50 ms a batch of up to 8, a minute's delay).
    Tests that kill or crash the worker start their own through `harness_factory`."""
    builder = RepoBuilder(tmp_path_factory.mktemp("shared") / "models")
    builder.builtin("simple", "identity", "mlp")
    builder.faulty("faulty")
    builder.patient("patient")
    builder.slow("slow", sleep_s=0.3, max_batch_size=0)
    # computes for 50 ms a batch and would wait a minute for companions
    builder.slow("slow_patient", sleep_s=0.05, max_batch_size=8, delay_us=int(PATIENT_DELAY_S * 1e6))
    harness = EngineHarness(small_config(builder.path))
    harness.repo = builder
    try:
        yield harness
    finally:
        harness.close()


# ---- launched servers --------------------------------------------------------------------------

_LISTEN_RE = re.compile(r"^(\w+)\s+listening on (\S+):(\d+)$")


class LaunchedEngine:
    """``python -m engine.launch ARGS`` (or ``python ENTRY ARGS``) in a session of its own, stdout read
    line by line.

    Attributes:
        proc: the supervisor process.
        endpoints: protocol -> (host, port) from the "listening on" lines.
        stderr_path: where the logs of every engine process go (a file: a pipe could fill and block).
    """

    def __init__(
        self,
        args: Sequence[str],
        stderr_path: Path,
        env: dict[str, str] | None = None,
        entry: Sequence[str] = ("-m", "engine.launch"),
    ) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=launch_env() if env is None else env,
            start_new_session=True,  # so teardown can stop the supervisor's children with it
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._reader = threading.Thread(target=self._read, name="launch-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout_s: float = LAUNCH_READY_S) -> None:
        """Read stdout until "ready"; fail with the logs when the process exits or takes too long."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                tail = self.stderr_tail()
                raise AssertionError(f"no 'ready' within {timeout_s} s; logs:\n{tail}") from None
            if line is None:
                self.proc.wait(10)
                raise AssertionError(
                    f"launch exited with {self.proc.returncode} before 'ready'; logs:\n{self.stderr_tail()}"
                )
            self.stdout.append(line)
            match = _LISTEN_RE.match(line.strip())
            if match:
                self.endpoints[match[1]] = (match[2], int(match[3]))
            if line.strip() == "ready":
                return

    def stderr_text(self) -> str:
        """Everything the engine processes logged so far."""
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr_text().splitlines()[-lines:])

    def wait(self, timeout_s: float) -> int:
        """Wait for the supervisor to exit; its exit status."""
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the whole session (supervisor and children) and reap the supervisor. Safe twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            # the supervisor is gone; children it left behind still belong to its session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._reader.join(5)
        self._stderr.close()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Callable[..., LaunchedEngine]]:
    """``launch(*args, env=None, entry=("-m", "engine.launch"))`` runs ``python ENTRY ARGS`` (default
    environment: `launch_env`); each is killed and reaped at teardown."""
    made: list[LaunchedEngine] = []

    def launch(
        *args: str, env: dict[str, str] | None = None, entry: Sequence[str] = ("-m", "engine.launch")
    ) -> LaunchedEngine:
        launched = LaunchedEngine(args, tmp_path / f"launch{len(made)}.log", env, entry)
        made.append(launched)
        return launched

    yield launch
    for launched in made:
        launched.kill()


# ---- the shared server of the front-end tests (tests/integration/server.py) --------------------


@pytest.fixture(scope="module")
def engine_server() -> Iterator[Any]:
    """A launched server (`tests.integration.server.serving`) shared by one module's tests; after them,
    `serving` asserts it stopped with exit 0 and left no shared memory."""
    from tests.integration.server import serving

    with serving() as server:
        yield server
