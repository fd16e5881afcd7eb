"""Resiliency through real worker processes: circuit breaker, model faults, cancellation, deadlines, hangs.

- circuit breaker: a model whose batches keep failing is cut off after ``breaker_failures`` batches
  (UNAVAILABLE naming the breaker, nothing computed), other models are served, and after the
  cool-down one good request closes it again; status and statistics show the state;
- a model that raises, returns the wrong shape or returns NaN where its config forbids it fails its
  batch with a clear `ModelError`; the other models are unaffected;
- cancellation: requests queued behind a slow model whose callers gave up are never computed and
  their arena regions come back;
- deadlines and hangs: a SIGSTOPped worker cannot hold a request past its deadline (the front-end
  answers it), a worker that resumes serves again, and one stopped past ``hang_timeout_s`` is
  killed and restarted by the supervisor.

Models log what they computed (`RepoBuilder.computed`), so "not computed" is checked, not assumed.
Bounds are generous ("within the deadline + 1 s", "never hangs"), never a measured latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

from engine.errors import DeadlineExceeded, ModelError, Unavailable
from servers.gateway_api import InferInput
from tests.integration.conftest import FAULTY_MESSAGE, EngineHarness, RepoBuilder, small_config

T = TypeVar("T")

#: Worker restarts import torch and load the models again: slow on a busy 2-core machine.
RESTART_S = 60.0
#: How late after its deadline a request stuck on a hung worker may be answered (the issue: ~1 s).
DEADLINE_GRACE_S = 1.0
BREAKER_FAILURES = 3
#: Long enough that the fail-fast checks right after the breaker opens run inside it on a busy machine.
BREAKER_COOLDOWN_S = 2.0

#: ``flaky``: an echo that logs the first value of every row it computes and raises on negative input.
_FLAKY_YAML = """
    backend: python
    source: model.py:forward
    max_batch_size: 8
    dynamic_batching: {max_queue_delay_us: 100}
    inputs: [{name: INPUT0, datatype: FP32, shape: [4]}]
    outputs: [{name: OUTPUT0, datatype: FP32, shape: [4]}]
"""
_FLAKY_PY = f'''
    """Echoes its input, logging what it computed; refuses negative values."""
    from pathlib import Path

    LOG = Path(__file__).with_name("calls.log")

    def forward(x):
        with LOG.open("a") as f:
            f.write("".join(f"{{float(r[0])}}\\n" for r in x))
        if (x < 0).any():
            raise ValueError("{FAULTY_MESSAGE}")
        return x.copy()
'''
#: ``wrongshape``: declares FP32 [4] but returns 3 columns (except for the all-zero warm-up batch,
#: which a worker runs before it serves a model).
_WRONG_SHAPE_PY = '''
    """Returns one column too few for any non-zero input."""

    def forward(x):
        return x.copy() if not x.any() else x[:, :3].copy()
'''
#: ``nan``: declares allow_nan false and returns NaN for input 13.
_NAN_YAML = _FLAKY_YAML + "    allow_nan: false\n"
_NAN_PY = '''
    """Echoes its input, except that 13 becomes NaN."""
    import numpy as np

    def forward(x):
        out = x.copy()
        out[x == 13] = np.nan
        return out
'''


def rows(*values: float) -> list[InferInput]:
    """One FP32 [n, 4] input whose row i is filled with values[i]."""
    x = np.repeat(np.asarray(values, dtype=np.float32)[:, None], 4, axis=1)
    return [InferInput("INPUT0", "FP32", x.shape, x)]


def unbatched(value: float) -> list[InferInput]:
    x = np.full((4,), value, dtype=np.float32)
    return [InferInput("INPUT0", "FP32", x.shape, x)]


async def echo(
    gateway: Any, model: str, inputs: list[InferInput], deadline_ns: int | None = None
) -> np.ndarray:
    with await gateway.infer(model, inputs, deadline_ns=deadline_ns) as result:
        return np.array(result.outputs["OUTPUT0"])


def outcome(harness: EngineHarness, model: str, inputs: list[InferInput], **kw: Any) -> Any:
    """The result of one request, or the exception it failed with."""
    try:
        return harness.run(echo(harness.gateway, model, inputs, **kw), 30.0)
    except Exception as exc:
        return exc


def settle(harness: EngineHarness, task: asyncio.Task[T]) -> T:
    """Run the loop until ``task`` is done (bounded); its result."""
    return harness.loop.run_until_complete(asyncio.wait_for(task, 30.0))


def process(harness: EngineHarness, role: str) -> dict[str, Any]:
    return next(p for p in harness.status()["processes"] if p["role"] == role)


def wait_idle(harness: EngineHarness) -> None:
    """Nothing in flight, and both arenas empty: every region of every request came back."""
    gateway = harness.gateway

    def idle() -> bool:
        procs = harness.status()["processes"]
        return gateway.inflight == 0 and all(p["arena_bytes_in_use"] == 0 for p in procs)

    harness.wait_for(idle, 10.0, "no request in flight and every arena empty")
    arena = gateway._arena  # the embedded front-end's own view agrees with the status
    assert arena is not None and arena.bytes_in_use == 0


@pytest.fixture(scope="module")
def faulty_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHarness]:
    """One engine for the breaker, model-fault and cancellation tests (each uses its own model)."""
    repo = RepoBuilder(tmp_path_factory.mktemp("resiliency") / "models")
    repo.builtin("identity")
    repo.model("flaky", _FLAKY_YAML, _FLAKY_PY)
    repo.faulty("raises")
    repo.model("wrongshape", _FLAKY_YAML, _WRONG_SHAPE_PY)
    repo.model("nan", _NAN_YAML, _NAN_PY)
    repo.slow("slow", sleep_s=0.4, max_batch_size=0)
    config = small_config(repo.path, breaker_failures=BREAKER_FAILURES, breaker_cooldown_s=BREAKER_COOLDOWN_S)
    harness = EngineHarness(config)
    harness.repo = repo
    try:
        yield harness
    finally:
        harness.close()


# ---- circuit breaker ---------------------------------------------------------------------------


def breaker_of(harness: EngineHarness, model: str) -> tuple[str, int, int]:
    """(statistics' breaker name, its trips, status' breaker_state number)."""
    (stats,) = harness.gateway.statistics(model)
    return stats["breaker"], stats["breaker_trips"], harness.stats(model)["breaker_state"]


def test_circuit_breaker_opens_fails_fast_and_closes(faulty_engine: EngineHarness) -> None:
    harness = faulty_engine
    assert harness.repo is not None
    assert breaker_of(harness, "flaky") == ("closed", 0, 0)
    # each request is awaited alone: one failed batch each
    for i in range(BREAKER_FAILURES):
        error = outcome(harness, "flaky", rows(-1.0 - i))
        assert isinstance(error, ModelError), repr(error)
        assert FAULTY_MESSAGE in error.message
    assert breaker_of(harness, "flaky") == ("open", 1, 1)
    assert harness.repo.computed("flaky") == [-1.0, -2.0, -3.0]

    # open: good requests fail fast, without reaching the model
    for value in (11.0, 12.0):
        error = outcome(harness, "flaky", rows(value))
        assert isinstance(error, Unavailable), repr(error)
        assert "circuit breaker" in error.message and "flaky" in error.message, error.message
    # another model is not affected
    np.testing.assert_array_equal(outcome(harness, "identity", rows(5.0)), np.full((1, 4), 5.0, np.float32))
    assert harness.repo.computed("flaky") == [-1.0, -2.0, -3.0], "a request got through an open breaker"

    # after the cool-down one good request is the probe, and closes it
    value = 100.0
    deadline = time.monotonic() + BREAKER_COOLDOWN_S + 20.0
    while True:
        answer = outcome(harness, "flaky", rows(value))
        if isinstance(answer, np.ndarray):
            break
        assert isinstance(answer, Unavailable) and "circuit breaker" in answer.message, repr(answer)
        assert time.monotonic() < deadline, "the breaker never let a probe through"
        # the refusal says when the probe may run: wait that long (the loop keeps running)
        retry = re.search(r"next try in ([0-9.]+) s", answer.message)
        assert retry is not None, answer.message
        harness.run(asyncio.sleep(float(retry[1]) + 0.05))
        value += 1.0
    np.testing.assert_array_equal(answer, np.full((1, 4), value, np.float32))
    assert breaker_of(harness, "flaky") == ("closed", 1, 0)
    # only the probe was computed after the failures
    assert harness.repo.computed("flaky") == [-1.0, -2.0, -3.0, value]
    np.testing.assert_array_equal(outcome(harness, "flaky", rows(7.0, 8.0)), [[7.0] * 4, [8.0] * 4])


# ---- model faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "value", "message"),
    [
        ("raises", -1.0, f"raised ValueError: {FAULTY_MESSAGE}"),
        ("wrongshape", 1.0, "does not match the config"),
        ("nan", 13.0, "holds NaN (allow_nan is false)"),
    ],
)
def test_model_fault_fails_its_batch_only(
    faulty_engine: EngineHarness, model: str, value: float, message: str
) -> None:
    harness = faulty_engine
    gateway = harness.gateway

    async def batch() -> list[Any]:
        # two requests (one or two batches: fewer than breaker_failures), both fail, nothing else does
        calls = [echo(gateway, model, rows(value, value)), echo(gateway, model, rows(value))]
        calls.append(echo(gateway, "identity", rows(3.0)))
        return await asyncio.gather(*calls, return_exceptions=True)

    *failed, other = harness.run(batch())
    for error in failed:
        assert isinstance(error, ModelError), repr(error)
        assert model in error.message and message in error.message, error.message
    np.testing.assert_array_equal(other, np.full((1, 4), 3.0, np.float32))
    if model != "wrongshape":  # a good request to the same model still works ("raises" doubles)
        want = np.full((1, 4), 4.0 if model == "raises" else 2.0, np.float32)
        np.testing.assert_array_equal(outcome(harness, model, rows(2.0)), want)
    assert harness.stats(model)["failure"] >= 2
    wait_idle(harness)


# ---- cancellation ------------------------------------------------------------------------------


def test_cancelled_requests_are_not_computed_and_free_their_regions(faulty_engine: EngineHarness) -> None:
    harness = faulty_engine
    repo = harness.repo
    assert repo is not None
    gateway, loop = harness.gateway, harness.loop
    before = len(repo.computed("slow"))
    first = loop.create_task(echo(gateway, "slow", unbatched(1.0)))
    # queued behind the first: the model computes one request at a time, 0.4 s each
    queued = [loop.create_task(echo(gateway, "slow", unbatched(float(v)))) for v in range(2, 8)]
    harness.wait_for(lambda: 1.0 in repo.computed("slow"), 30.0, "the slow model to start the first request")
    assert gateway.inflight == 7
    for task in queued:
        task.cancel()
    np.testing.assert_array_equal(settle(harness, first), np.full(4, 1.0, np.float32))
    for task in queued:
        with pytest.raises(asyncio.CancelledError):
            settle(harness, task)
    # the worker answers each cancel (engine.errors.Cancelled, to nobody); then all is free again
    wait_idle(harness)
    assert repo.computed("slow")[before:] == [1.0], "a cancelled request was computed"
    np.testing.assert_array_equal(outcome(harness, "slow", unbatched(9.0)), np.full(4, 9.0, np.float32))


# ---- deadlines and hangs -----------------------------------------------------------------------


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT after (unless it died meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_deadline_answered_while_worker_hangs_then_hang_restarts_it(
    harness_factory: Any, repo: RepoBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    repo.builtin("identity")
    harness = harness_factory(
        small_config(repo.path, hang_timeout_s=1.5, heartbeat_interval_s=0.2, restart_budget=3)
    )
    np.testing.assert_array_equal(outcome(harness, "identity", rows(1.0)), np.full((1, 4), 1.0, np.float32))
    worker = process(harness, "worker")
    pid = worker["pid"]

    # a short stop (well under hang_timeout_s): the front-end answers past the deadline by itself
    timeout_s = 0.3
    with stopped(pid):
        started = time.monotonic()
        error = outcome(
            harness, "identity", rows(2.0), deadline_ns=time.monotonic_ns() + int(timeout_s * 1e9)
        )
        waited = time.monotonic() - started
    assert isinstance(error, DeadlineExceeded), repr(error)
    assert waited < timeout_s + DEADLINE_GRACE_S, f"answered {waited:.2f} s after a {timeout_s} s deadline"
    # a later request with an earlier deadline is answered first: the front-end keeps one timer for
    # all deadlines and moves it forward for the earlier one
    with stopped(pid):
        now = time.monotonic_ns()
        late = harness.loop.create_task(echo(harness.gateway, "identity", rows(6.0), now + int(30e9)))
        early = harness.loop.create_task(echo(harness.gateway, "identity", rows(7.0), now + int(0.3e9)))
        harness.loop.run_until_complete(asyncio.wait([early], timeout=10.0))
        assert early.done() and isinstance(early.exception(), DeadlineExceeded), early
        assert not late.done(), "the request with the later deadline was answered with the earlier one"
    # resumed: the late request's answer comes from the worker
    np.testing.assert_array_equal(settle(harness, late), np.full((1, 4), 6.0, np.float32))
    # resumed: it serves again, the very same process, and the late request's region came back
    np.testing.assert_array_equal(outcome(harness, "identity", rows(3.0)), np.full((1, 4), 3.0, np.float32))
    wait_idle(harness)
    worker = process(harness, "worker")
    assert worker["pid"] == pid and worker["restarts"] == 0

    # a long stop (3 s, past hang_timeout_s 1.5 s): heartbeats go stale, the supervisor kills it
    gateway = harness.gateway
    with stopped(pid):
        no_deadline = harness.loop.create_task(echo(gateway, "identity", rows(4.0)))
        error = outcome(harness, "identity", rows(5.0), deadline_ns=time.monotonic_ns() + int(0.5e9))
        assert isinstance(error, DeadlineExceeded), repr(error)
        # generous: the kill is due 1.5 s after the last heartbeat
        harness.wait_for(
            lambda: process(harness, "worker")["pid"] != pid, 10.0, "the hung worker to be killed"
        )
    # the request without a deadline was held by the killed worker: answered, never left hanging
    harness.loop.run_until_complete(asyncio.wait([no_deadline], timeout=10.0))
    assert no_deadline.done(), "a request held by the killed worker still hangs"
    assert isinstance(no_deadline.exception(), Unavailable), repr(no_deadline.exception())

    def up_again() -> bool:
        w = process(harness, "worker")
        return w["state"] == "up" and w["pid"] not in (None, pid)

    harness.wait_for(up_again, RESTART_S, "the worker to be restarted")
    assert process(harness, "worker")["restarts"] == 1
    assert harness.engine.supervisor.failed is None
    # killed and reported once, not at every supervisor tick until its exit was seen
    kills = [r for r in caplog.records if "missed its heartbeat" in r.getMessage()]
    assert [str(pid) in k.getMessage() for k in kills] == [True]
    np.testing.assert_array_equal(outcome(harness, "identity", rows(6.0)), np.full((1, 4), 6.0, np.float32))
    wait_idle(harness)
