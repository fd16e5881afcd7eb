"""The worker's side of the shared-memory regions: parse a request region, write a batch's outputs.

A request region (in a front-end's input arena) becomes a `Pending`: its input tensors as views
over the arena, no copy. A computed batch's outputs go into one region of the worker's output
arena, which its requests share; an `OutputRegion` counts who still has to release it. The byte
layouts are drawn in `engine.shm`.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.dtypes import CODE_TO_DTYPE, DTYPE_CODES, kserve_name
from engine.errors import InvalidArgument, ResourceExhausted
from engine.models.spec import ModelSpec
from engine.shm import (
    FLAG_BATCHED,
    HEADER_BYTES,
    MAX_RANK,
    REGION_HEADER,
    REQ_MAGIC,
    RES_MAGIC,
    TENSOR_DESC,
    pack_region_head,
    region_layout,
)
from ext.arena import Arena

_HEAD_FIELDS = 5  # REGION_HEADER: magic, n, flags, output_mask, pad
_DESC_FIELDS = 6 + MAX_RANK  # TENSOR_DESC: dtype, ndim, pad0, pad1, offset, nbytes, dims


@functools.cache
def _request_head(n: int) -> struct.Struct:
    """A request region's header followed by ``n`` tensor descriptors, as one struct."""
    return struct.Struct("<" + REGION_HEADER.format.lstrip("<") + TENSOR_DESC.format.lstrip("<") * n)


@dataclass(slots=True)
class Pending:
    """One admitted request waiting in a batcher."""

    f: int
    fgen: int
    req_id: int
    model: int
    rows: int
    group: Hashable
    deadline_ns: int
    arrival_ns: int
    output_mask: int
    inputs: list[np.ndarray] = field(default_factory=list)
    #: client requests this one stands for (a front-end's coalesced group), for the statistics
    requests: int = 1


@dataclass(slots=True)
class OutputRegion:
    """A region of the worker's output arena (a batch's outputs or an error message) still held."""

    remaining: int
    holders: dict[int, int]  # front-end index -> requests of the batch it still has to release


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What a request region's header and descriptors say, checked against the model: the same for
    every request of the same shapes, so a worker checks each header it has not seen once."""

    rows: int
    group: Hashable
    output_mask: int
    #: per input: name, data offset in the region, shape, numpy dtype, end of its data
    inputs: tuple[tuple[str, int, tuple[int, ...], np.dtype[Any], int], ...]


#: Request headers a worker keeps the plans of, per model, at most.
MAX_REQUEST_PLANS = 256


def plan_request(head: bytes, spec: ModelSpec) -> RequestPlan:
    """Check a request region's header and descriptors (``head``, `_request_head`'s size for the
    model) against ``spec``. Raises InvalidArgument (or ValueError for a shape numpy refuses)."""
    fields = _request_head(len(spec.inputs)).unpack(head)
    magic, n, _flags, mask = fields[0], fields[1], fields[2], fields[3]
    if magic != REQ_MAGIC or n != len(spec.inputs):
        raise InvalidArgument(f"bad request region (magic {magic:#x}, {n} inputs)")
    inputs = []
    rows = 1
    dims_key: list[tuple[int, ...]] = []
    for j, tspec in enumerate(spec.inputs):
        at = _HEAD_FIELDS + j * _DESC_FIELDS
        code, ndim, d_off, nbytes = fields[at], fields[at + 1], fields[at + 4], fields[at + 5]
        if CODE_TO_DTYPE.get(code) != tspec.datatype or not 0 <= ndim <= 8:
            raise InvalidArgument(f"input {tspec.name}: bad dtype code {code} or rank {ndim}")
        shape = fields[at + 6 : at + 6 + ndim]
        if min(shape, default=0) < 0:
            raise ValueError(f"negative dimension in {list(shape)}")
        dtype = tspec.dtype
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise InvalidArgument(f"input {tspec.name}: {nbytes} bytes for shape {list(shape)}")
        inputs.append((tspec.name, d_off, shape, dtype, d_off + nbytes))
        if spec.max_batch_size > 0:
            if ndim == 0:
                raise InvalidArgument(f"input {tspec.name}: a batching model needs a batch dimension")
            if j == 0:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidArgument("inputs disagree on the batch size")
            dims_key.append(shape[1:])
        else:
            dims_key.append(shape)
    if spec.max_batch_size > 0 and not 1 <= rows <= spec.max_batch_size:
        raise InvalidArgument(f"batch of {rows} rows exceeds max_batch_size {spec.max_batch_size}")
    return RequestPlan(rows if spec.max_batch_size > 0 else 1, tuple(dims_key), mask, tuple(inputs))


def parse_request(
    arena: Arena,
    f: int,
    fgen: int,
    spec: ModelSpec,
    req_id: int,
    offset: int,
    length: int,
    deadline: int,
    model: int,
    now: int,
    plans: dict[bytes, RequestPlan] | None = None,
) -> Pending:
    """Check the request region at ``offset`` of front-end ``f``'s ``arena`` against ``spec``.

    Args:
        arena: the input arena of front-end ``f``'s incarnation ``fgen``.
        length: the region's length as the descriptor gives it; no tensor may run past it.
        plans: the plans of headers seen before (for this model), which this call adds to: a
            front-end writes the same header for every request of the same shapes.

    Returns:
        The request, its inputs viewed in place in ``arena``.

    Raises:
        InvalidArgument: the region does not match the model (magic, input count, dtype, rank, byte
            count, batch dimension). A malformed view raises IndexError or ValueError.
    """
    size = _request_head(len(spec.inputs)).size
    if size > length:
        raise InvalidArgument("request region shorter than its header")
    head = bytes(arena.view(offset, size).data)
    plan = plans.get(head) if plans is not None else None
    if plan is None:
        plan = plan_request(head, spec)
        if plans is not None:
            if len(plans) >= MAX_REQUEST_PLANS:
                plans.clear()  # a front-end cycling through shapes: start over rather than grow
            plans[head] = plan
    inputs = []
    for name, d_off, shape, dtype, end in plan.inputs:
        if end > length:
            raise InvalidArgument(f"input {name}: data runs past the request region")
        inputs.append(arena.view(offset + d_off, shape, dtype))
    return Pending(
        f=f,
        fgen=fgen,
        req_id=req_id,
        model=model,
        rows=plan.rows,
        group=plan.group,
        deadline_ns=deadline,
        arrival_ns=now,
        output_mask=plan.output_mask,
        inputs=inputs,
    )


#: Output layouts (dtypes and shapes) a worker keeps the region plans of, at most.
MAX_OUTPUT_PLANS = 256
_output_plans: dict[Hashable, tuple[int, list[int], bytes]] = {}


def write_outputs(arena: Arena, outputs: list[np.ndarray], batched: bool) -> tuple[int, int]:
    """Write a batch's outputs into one new region of the worker's output ``arena``.

    The region's size, data offsets and header bytes are planned once per layout (outputs' dtypes
    and shapes): a model answers batches of a few sizes, and this runs right after each forward.

    Returns:
        The region's (offset, length).

    Raises:
        ResourceExhausted: the arena has no room for the region.
    """
    key = (batched, *[(o.dtype, o.shape) for o in outputs])
    plan = _output_plans.get(key)
    if plan is None:
        plan = _plan_outputs(outputs, batched)
        if len(_output_plans) >= MAX_OUTPUT_PLANS:
            _output_plans.clear()
        _output_plans[key] = plan
    total, offs, head = plan
    offset = arena.try_alloc(total)
    if offset < 0:
        raise ResourceExhausted("worker output arena is full; retry")
    arena.write(offset, head)
    for j, out in enumerate(outputs):
        arena.write(offset + offs[j], out)
    return offset, total


def _plan_outputs(outputs: list[np.ndarray], batched: bool) -> tuple[int, list[int], bytes]:
    total, offs = region_layout([o.nbytes for o in outputs])
    head = bytearray(HEADER_BYTES + TENSOR_DESC.size * len(outputs))
    pack_region_head(
        memoryview(head),
        RES_MAGIC,
        FLAG_BATCHED if batched else 0,
        0,
        [(DTYPE_CODES[kserve_name(o.dtype)], o.shape, offs[j], o.nbytes) for j, o in enumerate(outputs)],
    )
    return total, offs, bytes(head)
