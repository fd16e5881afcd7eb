"""Request coalescing in the ZMQ front-end (`servers.zmq_coalescing`): which requests share a group,
how a group's inputs and result are split, and the front-end's behaviour with real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from engine.errors import ModelError, ResourceExhausted
from engine.models.spec import DynamicBatching
from servers.client.zmq_client import AsyncZmqClient, ZmqClient
from servers.gateway_api import FrontendSettings, InferInput
from servers.zmq_coalescing import (
    MAX_DEADLINE_SPREAD_NS,
    MAX_GROUP_BYTES,
    MAX_MEMBER_BYTES,
    Group,
    Member,
    SharedResult,
    group_key,
)
from servers.zmq_protocol import MsgType, Request
from tests import fakes
from tests.fakes import FakeResult
from tests.unit.test_zmq_server import WAIT_S, RecordingGateway, ServerThread

IDENTITY = fakes.SPECS["identity"]  # max_batch_size 64


def request(
    rows: int = 1, cols: int = 4, *, value: float = 0.0, timeout_us: int = 0, outputs: Any = None
) -> Request:
    data = np.full((rows, cols), value, np.float32)
    inputs = (InferInput("INPUT0", "FP32", (rows, cols), memoryview(data).cast("B")),)
    return Request(MsgType.REQUEST, 1, timeout_us, "identity", inputs, outputs)


# -- which requests share a group ---------------------------------------------------------------------


def test_requests_of_the_same_shape_outputs_and_timeout_share_a_key() -> None:
    assert group_key(request(value=1), IDENTITY) == group_key(request(value=2), IDENTITY)
    assert group_key(request(), IDENTITY) != group_key(request(cols=5), IDENTITY)
    assert group_key(request(), IDENTITY) != group_key(request(rows=2), IDENTITY)
    assert group_key(request(timeout_us=5), IDENTITY) == group_key(request(timeout_us=9), IDENTITY)
    assert group_key(request(), IDENTITY) != group_key(request(timeout_us=5), IDENTITY)
    assert group_key(request(), IDENTITY) != group_key(request(outputs=("OUTPUT0",)), IDENTITY)


def test_requests_that_go_alone() -> None:
    no_batching = dataclasses.replace(IDENTITY, max_batch_size=0, dynamic_batching=DynamicBatching())
    assert group_key(request(), no_batching) is None
    assert group_key(request(rows=64), IDENTITY) is None  # a whole batch already
    assert group_key(request(cols=MAX_MEMBER_BYTES // 4 + 1), IDENTITY) is None
    scalar = Request(MsgType.REQUEST, 1, 0, "identity", (InferInput("INPUT0", "FP32", (), b"\0" * 4),))
    assert group_key(scalar, IDENTITY) is None
    two = (
        InferInput("INPUT0", "FP32", (1, 4), b"\0" * 16),
        InferInput("INPUT1", "FP32", (2, 4), b"\0" * 32),
    )
    disagreeing = Request(MsgType.REQUEST, 1, 0, "identity", two)
    assert group_key(disagreeing, IDENTITY) is None  # refused by the gateway, on its own


def test_a_group_stacks_its_members_rows_in_order_within_its_bounds() -> None:
    group = Group(IDENTITY)
    for v in range(3):
        group.add(Member(None, request(rows=2, value=v), 0, None))
    (stacked,) = group.inputs()
    assert stacked.shape == (6, 4)
    got = np.frombuffer(stacked.data, np.float32).reshape(6, 4)
    np.testing.assert_array_equal(got[:, 0], [0, 0, 1, 1, 2, 2])
    assert (group.rows, group.nbytes) == (6, 96)
    assert not group.full
    while group.fits(0):
        group.add(Member(None, request(rows=2), 0, None))
    assert group.rows == 64  # one more would pass max_batch_size
    assert group.full  # no pipeline_rows: full at max_batch_size
    big = Group(IDENTITY)
    wide = MAX_GROUP_BYTES // 3 // 4  # rows of a third of the byte bound each
    while big.fits(0):
        big.add(Member(None, request(rows=1, cols=wide), 0, None))
    assert len(big.members) == 3


def test_a_group_has_its_earliest_deadline_and_deadlines_far_apart_do_not_share_one() -> None:
    group = Group(IDENTITY)
    t = 10**12
    group.add(Member(None, request(timeout_us=1), t + 500, None))
    group.add(Member(None, request(timeout_us=1), t, None))
    assert group.deadline_ns == t
    assert group.fits(t + 500 + MAX_DEADLINE_SPREAD_NS)
    assert not group.fits(t + 501 + MAX_DEADLINE_SPREAD_NS)
    assert Group(IDENTITY).deadline_ns == 0


def test_a_group_is_full_at_pipeline_rows_else_at_max_batch_size() -> None:
    piped = dataclasses.replace(IDENTITY, dynamic_batching=DynamicBatching(200, (), 4))
    group = Group(piped)
    for _ in range(3):
        group.add(Member(None, request(), 0, None))
    assert not group.full
    group.add(Member(None, request(), 0, None))
    assert group.full
    assert Group(IDENTITY).target_rows == 64


def test_the_group_result_is_released_once_every_share_is() -> None:
    released = []
    group_result = FakeResult("identity", "", {})
    group_result.release = lambda: released.append(True)  # type: ignore[method-assign]
    shared = SharedResult(group_result, 3)
    shared.release_one()
    shared.release_one()
    assert not released
    shared.release_one()
    assert released == [True]


# -- the front-end ---------------------------------------------------------------------------------


class SubmitRecorder(RecordingGateway):
    """Keeps each submission's (model, rows, requests)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[str, int, int]] = []

    def submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        requests: int = 1,
    ) -> asyncio.Future[FakeResult]:
        self.submitted.append((model, inputs[0].shape[0] if inputs[0].shape else 1, requests))
        return super().submit(model, inputs, outputs=outputs, deadline_ns=deadline_ns, requests=requests)


@pytest.fixture
def recorder() -> Iterator[tuple[ServerThread, SubmitRecorder]]:
    gateway = SubmitRecorder()
    srv = ServerThread(gateway, FrontendSettings(port=0))
    yield srv, gateway
    srv.close()


def rows(n: int, cols: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"INPUT0": np.full((1, cols), i, np.float32)} for i in range(n)]


def test_requests_read_together_are_one_submission_and_each_gets_its_own_answer(
    recorder: tuple[ServerThread, SubmitRecorder],
) -> None:
    srv, gateway = recorder
    with ZmqClient(srv.endpoint, timeout_s=WAIT_S) as c:
        outs = c.infer_many("identity", rows(40))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["OUTPUT0"], np.full((1, 4), i, np.float32))
    assert sum(n for _, _, n in gateway.submitted) == 40
    assert all(r == n for _, r, n in gateway.submitted)
    assert len(gateway.submitted) < 40, gateway.submitted
    assert gateway.calls["identity"] == 40  # statistics count the requests, not the submissions
    srv.close()  # the last replies' results are released once written
    assert len(gateway.results) == len(gateway.submitted)
    assert all(r.released for r in gateway.results)


def test_groups_hold_at_most_max_batch_size_rows(recorder: tuple[ServerThread, SubmitRecorder]) -> None:
    srv, gateway = recorder
    with ZmqClient(srv.endpoint, timeout_s=WAIT_S) as c:
        outs = c.infer_many("identity", rows(150))
    assert [int(o["OUTPUT0"][0, 0]) for o in outs] == list(range(150))
    assert max(r for _, r, _ in gateway.submitted) <= 64
    assert sum(n for _, _, n in gateway.submitted) == 150


def test_a_group_goes_to_the_gateway_once_it_reaches_pipeline_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    piped = dataclasses.replace(IDENTITY, dynamic_batching=DynamicBatching(200, (), 8))
    monkeypatch.setitem(fakes.SPECS, "identity", piped)
    gateway = SubmitRecorder()
    srv = ServerThread(gateway, FrontendSettings(port=0))
    try:
        with ZmqClient(srv.endpoint, timeout_s=WAIT_S) as c:
            outs = c.infer_many("identity", rows(40))
    finally:
        srv.close()
    assert [int(o["OUTPUT0"][0, 0]) for o in outs] == list(range(40))
    assert max(r for _, r, _ in gateway.submitted) <= 8
    assert sum(n for _, _, n in gateway.submitted) == 40


def test_a_failed_group_fails_each_of_its_requests(recorder: tuple[ServerThread, SubmitRecorder]) -> None:
    srv, gateway = recorder

    async def main() -> list[Any]:
        async with AsyncZmqClient(srv.endpoint, timeout_s=WAIT_S) as c:
            calls = [c.infer("fail", {"INPUT0": np.ones((1, 4), np.float32)}) for _ in range(6)]
            errors = await asyncio.gather(*calls, return_exceptions=True)
            assert await c.ping()
            return errors

    errors = asyncio.run(main())
    assert all(isinstance(e, ModelError) and "always fails" in str(e) for e in errors), errors
    assert sum(n for _, _, n in gateway.submitted) == 6
    assert any(n > 1 for _, _, n in gateway.submitted), gateway.submitted


def test_a_group_over_a_limit_is_admitted_request_by_request() -> None:
    class Limited(SubmitRecorder):
        """Refuses a submission that would bring its requests in flight past 3 (as the gateway's
        max_inflight_per_model does)."""

        def submit(self, model: str, inputs: Sequence[InferInput], **kw: Any) -> asyncio.Future[FakeResult]:
            held = sum(n for _, _, n in self.submitted)
            if held + kw.get("requests", 1) > 3:
                raise ResourceExhausted("model 'identity' has too many requests in flight")
            return super().submit(model, inputs, **kw)

    gateway = Limited()
    srv = ServerThread(gateway, FrontendSettings(port=0))
    try:
        with ZmqClient(srv.endpoint, timeout_s=WAIT_S) as c:
            futures = [c.submit("identity", r) for r in rows(5)]
            answered, refused = 0, 0
            for i, f in enumerate(futures):
                try:
                    np.testing.assert_array_equal(f.result()["OUTPUT0"], np.full((1, 4), i, np.float32))
                    answered += 1
                except ResourceExhausted:
                    refused += 1
    finally:
        srv.close()
    assert (answered, refused) == (3, 2)
