"""The engine end to end through a real worker: results, batching, model errors, validation, deadlines.

Every test talks to the module's `shared_engine` (simple, identity, mlp, ``faulty``, ``slow``) through the
shared-memory gateway of an embedded front-end slot; tests compare counters as deltas, since the engine
outlives each of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from engine.errors import DeadlineExceeded, InvalidArgument, ModelError, NotFound
from engine.models.repository import load_repository
from engine.shm import F_INFLIGHT, F_REQUESTS
from servers.gateway_api import InferInput
from tests.integration.conftest import PATIENT_DELAY_S

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


def inputs_of(arrays: Mapping[str, np.ndarray]) -> list[InferInput]:
    """`InferInput`s for named arrays (datatype and shape from the array)."""
    return [InferInput(name, DATATYPES[a.dtype], a.shape, a) for name, a in arrays.items()]


async def infer(
    gateway: Any, model: str, arrays: Mapping[str, np.ndarray], **kwargs: Any
) -> dict[str, np.ndarray]:
    """One request; returns copies of the outputs and releases the shared-memory views."""
    with await gateway.infer(model, inputs_of(arrays), **kwargs) as result:
        return {name: np.array(out) for name, out in result.outputs.items()}


def delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if k != "last_ns"}


def simple_inputs(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "INPUT0": rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
        "INPUT1": rng.integers(-1000, 1000, (rows, 16), dtype=np.int32),
    }


@pytest.fixture(scope="module")
def mlp_reference(shared_engine: Any) -> Any:
    """The mlp loaded in this process from the engine's repository, to compute what the worker must answer."""
    from engine.models.backends import load_model

    spec = load_repository(shared_engine.repo.path).specs["mlp"]
    return load_model(spec, "cpu")


# ---- results -------------------------------------------------------------------------------------


def test_simple_adds_and_subtracts(shared_engine: Any, rng: np.random.Generator) -> None:
    arrays = simple_inputs(rng, 3)
    out = shared_engine.run(infer(shared_engine.gateway, "simple", arrays))
    np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])
    np.testing.assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])
    assert out["OUTPUT0"].dtype == np.int32


def test_identity_returns_its_input(shared_engine: Any, rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 300), dtype=np.float32)
    out = shared_engine.run(infer(shared_engine.gateway, "identity", {"INPUT0": x}))
    np.testing.assert_array_equal(out["OUTPUT0"], x)


def test_mlp_matches_a_direct_model_call(
    shared_engine: Any, mlp_reference: Any, rng: np.random.Generator
) -> None:
    import torch

    x = rng.standard_normal((5, 256), dtype=np.float32)
    out = shared_engine.run(infer(shared_engine.gateway, "mlp", {"INPUT0": x}))
    (want,) = mlp_reference.run([torch.from_numpy(x)])
    np.testing.assert_allclose(out["OUTPUT0"], want.numpy(), rtol=0, atol=1e-5)


def test_64_concurrent_requests_are_batched(shared_engine: Any, rng: np.random.Generator) -> None:
    before = shared_engine.stats("identity")
    xs = [rng.standard_normal((1, 256), dtype=np.float32) for _ in range(64)]

    async def scenario() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(infer(shared_engine.gateway, "identity", {"INPUT0": x}) for x in xs))

    outs = shared_engine.run(scenario())
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["OUTPUT0"], x)
    d = delta(shared_engine.stats("identity"), before)
    assert d["success"] == 64 and d["rows"] == 64, d
    assert d["rows"] > d["batches"], f"64 concurrent requests were never batched: {d}"
    assert sum(v for k, v in d.items() if k.startswith("batch_le_")) == d["batches"]


def test_a_lone_request_does_not_wait_out_the_batching_delay(shared_engine: Any) -> None:
    # "patient" holds a request up to a minute for companions; one request at a time with nothing else
    # admitted must run at once: waiting could not fill its batch, only add latency.
    before = shared_engine.stats("patient")

    async def one_at_a_time() -> None:
        for i in range(5):
            x = np.full((1, 4), float(i), dtype=np.float32)
            out = await asyncio.wait_for(
                infer(shared_engine.gateway, "patient", {"INPUT0": x}), PATIENT_DELAY_S / 4
            )
            np.testing.assert_array_equal(out["OUTPUT0"], x)

    shared_engine.run(one_at_a_time())
    d = delta(shared_engine.stats("patient"), before)
    assert d["success"] == 5 and d["batches"] == 5, d


def test_a_closed_loop_runs_once_all_its_requests_are_queued(shared_engine: Any) -> None:
    # Four clients, each sending its next request when its answer comes, to a model that computes for
    # 50 ms a batch and has a minute-long batching delay: arrivals come far closer together than a
    # batch computes, yet with every admitted request queued nobody else can join, so each round
    # runs at once instead of waiting out the delay (which the timeout below would catch).
    before = shared_engine.stats("slow_patient")

    async def client(k: int) -> None:
        for i in range(5):
            x = np.full((1, 4), float(10 * k + i), dtype=np.float32)
            out = await asyncio.wait_for(
                infer(shared_engine.gateway, "slow_patient", {"INPUT0": x}), PATIENT_DELAY_S / 4
            )
            np.testing.assert_array_equal(out["OUTPUT0"], x)

    async def four_clients() -> None:
        await asyncio.gather(*(client(k) for k in range(4)))

    shared_engine.run(four_clients())
    d = delta(shared_engine.stats("slow_patient"), before)
    assert d["success"] == 20, d
    assert d["batches"] < 20, f"the clients' requests never shared a batch: {d}"


def test_mixed_models_interleaved(shared_engine: Any, mlp_reference: Any, rng: np.random.Generator) -> None:
    import torch

    jobs: list[tuple[str, dict[str, np.ndarray]]] = []
    for _ in range(12):
        jobs.append(("simple", simple_inputs(rng, int(rng.integers(1, 4)))))
        jobs.append(
            ("identity", {"INPUT0": rng.standard_normal((int(rng.integers(1, 4)), 64), dtype=np.float32)})
        )
        jobs.append(
            ("mlp", {"INPUT0": rng.standard_normal((int(rng.integers(1, 4)), 256), dtype=np.float32)})
        )
    order = rng.permutation(len(jobs))
    jobs = [jobs[i] for i in order]

    async def scenario() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(infer(shared_engine.gateway, m, a) for m, a in jobs))

    outs = shared_engine.run(scenario())
    for (model, arrays), out in zip(jobs, outs, strict=True):
        if model == "simple":
            np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])
            np.testing.assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])
        elif model == "identity":
            np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"])
        else:
            (want,) = mlp_reference.run([torch.from_numpy(arrays["INPUT0"])])
            np.testing.assert_allclose(out["OUTPUT0"], want.numpy(), rtol=0, atol=1e-5)


def test_requested_outputs_only(shared_engine: Any, rng: np.random.Generator) -> None:
    arrays = simple_inputs(rng, 1)
    out = shared_engine.run(infer(shared_engine.gateway, "simple", arrays, outputs=["OUTPUT1"]))
    assert set(out) == {"OUTPUT1"}
    np.testing.assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])


def test_region_plans_follow_shapes_and_output_masks(shared_engine: Any, rng: np.random.Generator) -> None:
    # a request region's size, offsets and header are planned once per (model, output mask, shapes):
    # each mix of those must still get its own, and the plans stay bounded
    from servers.gateway import MAX_REGION_PLANS

    jobs = [(rows, outputs) for rows in (1, 3, 2) for outputs in (None, ["OUTPUT1"], ["OUTPUT0"])] * 2
    for rows, outputs in jobs:
        arrays = simple_inputs(rng, rows)
        out = shared_engine.run(infer(shared_engine.gateway, "simple", arrays, outputs=outputs))
        assert set(out) == set(outputs or ["OUTPUT0", "OUTPUT1"])
        if "OUTPUT0" in out:
            np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])
        if "OUTPUT1" in out:
            np.testing.assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])
    for width in range(1, MAX_REGION_PLANS + 40):
        x = rng.standard_normal((1, width), dtype=np.float32)
        out = shared_engine.run(infer(shared_engine.gateway, "identity", {"INPUT0": x}))
        np.testing.assert_array_equal(out["OUTPUT0"], x)
    assert len(shared_engine.gateway._regions) <= MAX_REGION_PLANS


# ---- a model that raises -------------------------------------------------------------------------


def test_model_error_fails_only_its_batch(shared_engine: Any, rng: np.random.Generator) -> None:
    worker_before = shared_engine.worker()
    bad = np.array([[1.0, -2.0, 3.0, 4.0]], dtype=np.float32)
    others = [rng.standard_normal((1, 32), dtype=np.float32) for _ in range(16)]
    pairs = [simple_inputs(rng, 1) for _ in range(8)]

    async def scenario() -> list[Any]:
        return await asyncio.gather(
            infer(shared_engine.gateway, "faulty", {"INPUT0": bad}),
            *(infer(shared_engine.gateway, "identity", {"INPUT0": x}) for x in others),
            *(infer(shared_engine.gateway, "simple", p) for p in pairs),
            return_exceptions=True,
        )

    results = shared_engine.run(scenario())
    error = results[0]
    assert isinstance(error, ModelError), error
    assert "negative input is not allowed" in error.message
    assert "faulty" in error.message
    for x, out in zip(others, results[1:17], strict=True):
        assert not isinstance(out, BaseException), out
        np.testing.assert_array_equal(out["OUTPUT0"], x)
    for p, out in zip(pairs, results[17:], strict=True):
        assert not isinstance(out, BaseException), out
        np.testing.assert_array_equal(out["OUTPUT0"], p["INPUT0"] + p["INPUT1"])
    # the worker lives on and the model still serves good requests
    good = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    out = shared_engine.run(infer(shared_engine.gateway, "faulty", {"INPUT0": good}))
    np.testing.assert_array_equal(out["OUTPUT0"], good * 2)
    worker_after = shared_engine.worker()
    assert worker_after["pid"] == worker_before["pid"]
    assert worker_after["restarts"] == 0 and worker_after["state"] == "up"


# ---- validation ----------------------------------------------------------------------------------

_F32 = np.zeros((1, 16), dtype=np.float32)
_I32 = np.zeros((1, 16), dtype=np.int32)

VALIDATION_CASES = {
    "wrong datatype": (
        "simple",
        [InferInput("INPUT0", "FP32", (1, 16), _F32), InferInput("INPUT1", "INT32", (1, 16), _I32)],
        InvalidArgument,
        "datatype",
    ),
    "wrong shape": (
        "simple",
        [
            InferInput("INPUT0", "INT32", (1, 8), _I32[:, :8]),
            InferInput("INPUT1", "INT32", (1, 8), _I32[:, :8]),
        ],
        InvalidArgument,
        "shape",
    ),
    "wrong rank": (
        "simple",
        [InferInput("INPUT0", "INT32", (16,), _I32[0]), InferInput("INPUT1", "INT32", (16,), _I32[0])],
        InvalidArgument,
        "shape",
    ),
    "wrong byte count": (
        "simple",
        [InferInput("INPUT0", "INT32", (1, 16), b"\0" * 60), InferInput("INPUT1", "INT32", (1, 16), _I32)],
        InvalidArgument,
        "bytes",
    ),
    "missing input": ("simple", [InferInput("INPUT0", "INT32", (1, 16), _I32)], InvalidArgument, "INPUT1"),
    "unknown input": (
        "identity",
        [InferInput("INPUT0", "FP32", (1, 16), _F32), InferInput("EXTRA", "FP32", (1, 16), _F32)],
        InvalidArgument,
        "EXTRA",
    ),
    "batch too large": (
        "simple",
        [
            InferInput("INPUT0", "INT32", (9, 16), np.zeros((9, 16), np.int32)),
            InferInput("INPUT1", "INT32", (9, 16), np.zeros((9, 16), np.int32)),
        ],
        InvalidArgument,
        "max_batch_size",
    ),
    "unknown model": (
        "no_such_model",
        [InferInput("INPUT0", "FP32", (1, 16), _F32)],
        NotFound,
        "no_such_model",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_error_before_shared_memory(shared_engine: Any, case: str) -> None:
    model, inputs, error, text = VALIDATION_CASES[case]
    gw = shared_engine.gateway
    # what a request that reached shared memory would have changed: an arena block, a ring slot
    arena_before = gw._arena.allocations
    rings_before = [(link.request.head, link.request.tail) for link in gw._links]
    stats_before = shared_engine.status()["models"]
    with pytest.raises(error) as info:
        shared_engine.run(gw.infer(model, inputs))
    assert text in info.value.message
    assert gw._arena.allocations == arena_before
    assert [(link.request.head, link.request.tail) for link in gw._links] == rings_before
    assert shared_engine.status()["models"] == stats_before
    assert gw.inflight == 0


# ---- deadlines -----------------------------------------------------------------------------------


def test_deadline_already_past_is_not_computed(shared_engine: Any) -> None:
    x = np.full((4,), 7.0, dtype=np.float32)  # slow does not batch: no batch dim
    before = shared_engine.stats("slow")
    with pytest.raises(DeadlineExceeded):
        shared_engine.run(
            infer(shared_engine.gateway, "slow", {"INPUT0": x}, deadline_ns=time.monotonic_ns() - 1)
        )
    assert 7.0 not in shared_engine.repo.computed("slow")
    d = delta(shared_engine.stats("slow"), before)
    assert d["success"] == 0 and d["batches"] == 0, d


def test_deadline_too_short_behind_a_slow_batch(shared_engine: Any) -> None:
    # "slow" takes 0.3 s per request and does not batch: the second request waits behind the first
    # and its 0.1 s deadline passes before the worker gets to it.
    first = np.full((4,), 1.0, dtype=np.float32)
    second = np.full((4,), 2.0, dtype=np.float32)
    before = shared_engine.stats("slow")

    async def scenario() -> list[Any]:
        gw = shared_engine.gateway
        return await asyncio.gather(
            infer(gw, "slow", {"INPUT0": first}),
            infer(gw, "slow", {"INPUT0": second}, deadline_ns=time.monotonic_ns() + 100_000_000),
            return_exceptions=True,
        )

    ok, late = shared_engine.run(scenario())
    assert not isinstance(ok, BaseException), ok
    np.testing.assert_array_equal(ok["OUTPUT0"], first)
    assert isinstance(late, DeadlineExceeded), late
    computed = shared_engine.repo.computed("slow")
    assert 1.0 in computed and 2.0 not in computed
    d = delta(shared_engine.stats("slow"), before)
    assert d["success"] == 1 and d["batches"] == 1, d


# ---- submit: the future without a task ---------------------------------------------------------


def test_submit_answers_through_its_future(shared_engine: Any, rng: np.random.Generator) -> None:
    arrays = simple_inputs(rng, 3)

    async def scenario() -> dict[str, np.ndarray]:
        future = shared_engine.gateway.submit("simple", inputs_of(arrays))
        with await future as result:
            return {name: np.array(out) for name, out in result.outputs.items()}

    out = shared_engine.run(scenario())
    np.testing.assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])
    np.testing.assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])


def test_the_board_counts_a_group_once_for_the_worker_and_its_requests_for_status(
    shared_engine: Any,
) -> None:
    # A ZMQ group of 3 client requests is one submission: the worker's batching rules compare
    # F_INFLIGHT with its queue (which holds the group once); `engine status` and the supervisor's
    # drain must see the 3 requests.
    gw = shared_engine.gateway
    layout, f = gw.h.layout, gw.h.f

    def board() -> tuple[int, int]:
        load = gw.control.load_u64
        return load(layout.frontend(f, F_INFLIGHT)), load(layout.frontend(f, F_REQUESTS))

    def status_inflight() -> int:
        return sum(p["inflight"] or 0 for p in shared_engine.status()["processes"] if p["role"] == "frontend")

    async def scenario() -> tuple[tuple[int, int], int, tuple[int, int]]:
        future = gw.submit("slow", inputs_of({"INPUT0": np.full((4,), 9.0, np.float32)}), requests=3)
        during = board(), status_inflight()
        with await future as result:
            assert np.array(result.outputs["OUTPUT0"]).tolist() == [9.0] * 4
        return *during, board()

    during, shown, after = shared_engine.run(scenario())
    assert during == (1, 3)
    assert shown == 3
    assert after == (0, 0)


def test_submit_refuses_at_once_what_admission_refuses(shared_engine: Any) -> None:
    async def scenario() -> None:
        with pytest.raises(NotFound):
            shared_engine.gateway.submit("nope", [])

    shared_engine.run(scenario())


def test_a_cancelled_submit_has_its_result_given_back_when_it_comes(shared_engine: Any) -> None:
    # the ZMQ front-end cancels what is still in flight at the end of its drain: the gateway must
    # hand the output region back to the worker when the answer arrives: nobody else will
    gw = shared_engine.gateway
    released: list[int] = []
    real_release = gw._release

    def spy(link: Any, offset: int, gen: int) -> None:
        released.append(offset)
        real_release(link, offset, gen)

    async def scenario() -> None:
        gw._release = spy
        try:
            future = gw.submit("slow", inputs_of({"INPUT0": np.full((4,), 3.0, np.float32)}))
            await asyncio.sleep(0.05)
            future.cancel()
            deadline = time.monotonic() + 30
            while gw._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            del gw._release
        assert not gw._pending

    shared_engine.run(scenario())
    assert len(released) == 1
    assert 3.0 in shared_engine.repo.computed("slow")


def test_an_abandoned_request_is_dropped_by_the_worker(shared_engine: Any) -> None:
    # gRPC's ModelInfer on h2 admits without a task and abandons what its client cancels: the
    # worker must drop a request it has not run yet, as it does for a cancelled `infer`
    gw = shared_engine.gateway

    async def scenario() -> None:
        busy = gw.submit("slow", inputs_of({"INPUT0": np.full((4,), 11.0, np.float32)}))
        ticket, future = gw.admit("slow", inputs_of({"INPUT0": np.full((4,), 12.0, np.float32)}))
        gw.abandon(ticket)
        assert future.cancelled()
        gw.abandon(ticket)  # again: nothing more happens
        with await busy as result:
            assert np.array(result.outputs["OUTPUT0"]).tolist() == [11.0] * 4
        deadline = time.monotonic() + 30
        while gw._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not gw._pending

    shared_engine.run(scenario())
    computed = shared_engine.repo.computed("slow")
    assert 11.0 in computed and 12.0 not in computed


def test_an_infer_cancelled_as_its_answer_arrives_gives_the_result_back(shared_engine: Any) -> None:
    # The answer is set on the request's future and the awaiting task is cancelled in the same
    # loop iteration, before the task resumes (a client hanging up as its answer comes): the task
    # sees only CancelledError, so the gateway must release the result it will never hand out.
    gw = shared_engine.gateway
    released: list[int] = []
    real_release, real_submit = gw._release, gw._submit
    task: asyncio.Task[Any] | None = None

    def spy_release(link: Any, offset: int, gen: int) -> None:
        released.append(offset)
        real_release(link, offset, gen)

    def spy_submit(*args: Any, **kwargs: Any) -> Any:
        req_id, future = real_submit(*args, **kwargs)
        # registered before the task awaits the future, so it runs before the task's wake-up
        future.add_done_callback(lambda _: task.cancel() if task is not None else None)
        return req_id, future

    async def scenario() -> None:
        nonlocal task
        gw._release, gw._submit = spy_release, spy_submit
        try:
            inputs = inputs_of(simple_inputs(np.random.default_rng(0), 1))
            task = asyncio.ensure_future(gw.infer("simple", inputs))
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            del gw._release, gw._submit
        assert not gw._pending

    shared_engine.run(scenario())
    assert len(released) == 1, "the answered result was never given back"
