"""The worker's regions: its check of a request region a front-end wrote (`parse_request`), and the
response regions it writes (`write_outputs`) as the front-ends read them.

The gateway validates requests before it writes them, so these checks are the worker's defence
against a front-end bug (or a corrupted arena): every malformed region must raise InvalidArgument,
never hand the model a wrong view.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from engine.dtypes import DTYPE_CODES
from engine.errors import InvalidArgument
from engine.models import builtin_repository
from engine.models.repository import load_repository
from engine.models.spec import ModelSpec, TensorSpec
from engine.shm import HEADER_BYTES, REQ_MAGIC, RES_MAGIC, TENSOR_DESC, pack_region_head, region_layout
from engine.worker import regions
from engine.worker.regions import MAX_REQUEST_PLANS, RequestPlan, parse_request, write_outputs
from ext.arena import Arena
from ext.segment import Segment
from servers.gateway_responses import parse_outputs

I32 = DTYPE_CODES["INT32"]


@pytest.fixture
def arena() -> Iterator[Arena]:
    seg = Segment.create(8 << 20)
    try:
        yield Arena.format(seg, max_block=1 << 20)
    finally:
        seg.close()
        seg.unlink()


@pytest.fixture(scope="module")
def simple() -> ModelSpec:
    spec: ModelSpec = load_repository(builtin_repository()).specs["simple"]
    return spec


def write_region(
    arena: Arena,
    arrays: list[np.ndarray],
    *,
    magic: int = REQ_MAGIC,
    mask: int = 0,
    descs: list[tuple[int, tuple[int, ...], int, int]] | None = None,
) -> tuple[int, int]:
    """A request region holding ``arrays``; ``descs`` overrides the descriptors written."""
    total, offs = region_layout([a.nbytes for a in arrays])
    offset = arena.try_alloc(total)
    assert offset >= 0
    if descs is None:
        descs = [(DTYPE_CODES["INT32"], a.shape, offs[j], a.nbytes) for j, a in enumerate(arrays)]
    head = arena.view(offset, HEADER_BYTES + TENSOR_DESC.size * len(descs)).data
    pack_region_head(head, magic, 0, mask, descs)
    for j, a in enumerate(arrays):
        arena.write(offset + offs[j], a)
    return offset, total


def parse(
    arena: Arena, spec: ModelSpec, offset: int, length: int, plans: dict[bytes, RequestPlan] | None = None
) -> Any:
    return parse_request(arena, 0, 1, spec, 7, offset, length, 0, 0, 123, plans)


def pair(rows: int = 2) -> list[np.ndarray]:
    a = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16)
    return [a, -a]


def test_a_well_formed_region_becomes_views_of_its_inputs(arena: Arena, simple: ModelSpec) -> None:
    x = pair(3)
    offset, total = write_region(arena, x, mask=0b10)
    p = parse(arena, simple, offset, total)
    assert (p.rows, p.req_id, p.output_mask, p.arrival_ns) == (3, 7, 0b10, 123)
    assert p.group == ((16,), (16,))
    for got, want in zip(p.inputs, x, strict=True):
        np.testing.assert_array_equal(got, want)
    # views over the arena, not copies
    x2 = np.full((3, 16), 5, np.int32)
    arena.write(offset + region_layout([x[0].nbytes, x[1].nbytes])[1][0], x2)
    np.testing.assert_array_equal(p.inputs[0], x2)


def _descs(x: list[np.ndarray]) -> list[tuple[int, tuple[int, ...], int, int]]:
    _, offs = region_layout([a.nbytes for a in x])
    return [(I32, a.shape, offs[j], a.nbytes) for j, a in enumerate(x)]


BAD: dict[str, tuple[Any, str]] = {
    "response magic": (lambda d: {"magic": RES_MAGIC}, "bad request region"),
    "one input of two": (lambda d: {"descs": d[:1]}, "bad request region"),
    "dtype code": (lambda d: {"descs": [(DTYPE_CODES["FP32"], *d[0][1:]), d[1]]}, "bad dtype code"),
    "data past the region": (lambda d: {"descs": [d[0], (I32, d[1][1], d[1][2] + 4096, 128)]}, "runs past"),
    "byte count": (lambda d: {"descs": [(I32, d[0][1], d[0][2], d[0][3] - 4), d[1]]}, "bytes for shape"),
    "batch sizes disagree": (lambda d: {"descs": [d[0], (I32, (1, 16), d[1][2], 64)]}, "disagree"),
    "no batch dim": (lambda d: {"descs": [(I32, (), d[0][2], 4), d[1]]}, "batch dimension"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_region_is_refused(arena: Arena, simple: ModelSpec, case: str) -> None:
    x = pair(2)
    change, message = BAD[case]
    offset, total = write_region(arena, x, **change(_descs(x)))
    with pytest.raises(InvalidArgument, match=message):
        parse(arena, simple, offset, total)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_region_is_refused_beside_known_headers(
    arena: Arena, simple: ModelSpec, case: str
) -> None:
    # a worker keeps the plans of headers it checked (a front-end writes the same one for every
    # request of the same shapes): a malformed one is still refused, and not remembered
    plans: dict[bytes, RequestPlan] = {}
    for rows in (1, 2):
        x = pair(rows)
        parse(arena, simple, *write_region(arena, x), plans)
    known = dict(plans)
    assert len(known) == 2
    x = pair(2)
    change, message = BAD[case]
    offset, total = write_region(arena, x, **change(_descs(x)))
    with pytest.raises(InvalidArgument, match=message):
        parse(arena, simple, offset, total, plans)
    if case == "data past the region":
        assert len(plans) == 3  # the header is fine: it is the region's length that is too short
    else:
        assert plans == known


def test_a_known_header_still_views_its_own_region_within_its_length(arena: Arena, simple: ModelSpec) -> None:
    plans: dict[bytes, RequestPlan] = {}
    regions = [(x, *write_region(arena, x)) for x in (pair(2), [a + 100 for a in pair(2)])]
    for x, offset, total in regions:
        p = parse(arena, simple, offset, total, plans)
        for got, want in zip(p.inputs, x, strict=True):
            np.testing.assert_array_equal(got, want)
    assert len(plans) == 1
    _, offset, total = regions[0]
    with pytest.raises(InvalidArgument, match="runs past"):
        parse(arena, simple, offset, total - 64, plans)  # the length is the descriptor's, per request


def test_known_headers_stay_bounded(arena: Arena) -> None:
    spec: ModelSpec = load_repository(builtin_repository()).specs["identity"]
    plans: dict[bytes, RequestPlan] = {}
    for width in range(1, MAX_REQUEST_PLANS + 40):
        x = np.arange(width, dtype=np.float32)[None]
        total, offs = region_layout([x.nbytes])
        offset = arena.try_alloc(total)
        pack_region_head(
            arena.view(offset, HEADER_BYTES + TENSOR_DESC.size).data,
            REQ_MAGIC,
            0,
            0,
            [(DTYPE_CODES["FP32"], x.shape, offs[0], x.nbytes)],
        )
        arena.write(offset + offs[0], x)
        p = parse(arena, spec, offset, total, plans)
        np.testing.assert_array_equal(p.inputs[0], x)
        arena.free(offset)
    assert 0 < len(plans) <= MAX_REQUEST_PLANS


def test_a_rank_over_8_is_refused(arena: Arena, simple: ModelSpec) -> None:
    x = pair(1)
    offset, total = write_region(arena, x)
    arena.view(offset + HEADER_BYTES + 1, 1)[0] = 9  # the first descriptor's ndim byte
    with pytest.raises(InvalidArgument, match="rank 9"):
        parse(arena, simple, offset, total)


def test_a_region_shorter_than_its_descriptors_is_refused(arena: Arena, simple: ModelSpec) -> None:
    x = pair(1)
    offset, _ = write_region(arena, x)
    with pytest.raises(InvalidArgument, match="shorter than its header"):
        parse(arena, simple, offset, HEADER_BYTES + TENSOR_DESC.size)


def test_more_rows_than_max_batch_size_are_refused(arena: Arena, simple: ModelSpec) -> None:
    x = pair(simple.max_batch_size + 1)
    offset, total = write_region(arena, x)
    with pytest.raises(InvalidArgument, match="exceeds max_batch_size"):
        parse(arena, simple, offset, total)


def test_outputs_round_trip_through_a_response_region(arena: Arena, simple: ModelSpec) -> None:
    # write_outputs is what the front-end reads back; its header must carry the response magic
    outs = pair(2)
    offset, total = write_outputs(arena, outs, batched=True)
    magic = int.from_bytes(bytes(arena.view(offset, 4)), "little")
    assert magic == RES_MAGIC and total >= sum(o.nbytes for o in outs)


def two_outputs(batched: bool) -> ModelSpec:
    return ModelSpec(
        name="two",
        backend="python",
        max_batch_size=8 if batched else 0,
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("A", "FP32", (-1,)), TensorSpec("B", "INT64", (-1,))),
    )


def test_outputs_read_back_as_written_for_every_layout(arena: Arena) -> None:
    # each layout batched and not, then again (planned before), then more layouts than the plans keep
    rng = np.random.default_rng(5)
    specs = {batched: two_outputs(batched) for batched in (True, False)}
    layouts = [(rows, width) for rows in (0, 1, 3, 8) for width in (1, 5)]
    regions._output_plans.clear()
    for rows, width in [*layouts, *layouts, *((1, w) for w in range(2, regions.MAX_OUTPUT_PLANS + 10))]:
        for batched, spec in specs.items():
            outs = [
                rng.standard_normal((rows, width)).astype(np.float32),
                rng.integers(-(1 << 40), 1 << 40, size=(rows, width + 1)),
            ]
            offset, total = write_outputs(arena, outs, batched)
            got = parse_outputs(arena, offset, total, spec)
            assert [(name, b) for name, _, b in got] == [("A", batched), ("B", batched)]
            for (_, view, _), want in zip(got, outs, strict=True):
                assert view.dtype == want.dtype and np.array_equal(view, want)
            arena.free(offset)
    assert len(regions._output_plans) <= regions.MAX_OUTPUT_PLANS
