"""The worker's side of the shared-memory regions: parse a request region, write a batch's outputs.

A request region (in a front-end's input arena) becomes a `Pending`: its input tensors as views
over the arena, no copy. A computed batch's outputs go into one region of the worker's output
arena, which its requests share; an `OutputRegion` counts who still has to release it. The byte
layouts are drawn in `engine.shm`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class OutputRegion:
    """A region of the worker's output arena (a batch's outputs or an error message) still held."""

    remaining: int
    holders: dict[int, int]  # front-end index -> requests of the batch it still has to release


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
) -> Pending:
    """Check the request region at ``offset`` of front-end ``f``'s ``arena`` against ``spec``.

    Args:
        arena: the input arena of front-end ``f``'s incarnation ``fgen``.
        length: the region's length as the descriptor gives it; no tensor may run past it.

    Returns:
        The request, its inputs viewed in place in ``arena``.

    Raises:
        InvalidArgument: the region does not match the model (magic, input count, dtype, rank, byte
            count, batch dimension). A malformed view raises IndexError or ValueError.
    """
    expected = len(spec.inputs)
    head = _request_head(expected)
    if head.size > length:
        raise InvalidArgument("request region shorter than its header")
    # header and every descriptor in one unpack: one view, no structured-array element per input
    fields = head.unpack_from(arena.view(offset, head.size).data)
    magic, n, _flags, mask = fields[0], fields[1], fields[2], fields[3]
    if magic != REQ_MAGIC or n != expected:
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
        if d_off + nbytes > length:
            raise InvalidArgument(f"input {tspec.name}: data runs past the request region")
        arr = arena.view(offset + d_off, shape, tspec.dtype)
        if arr.nbytes != nbytes:
            raise InvalidArgument(f"input {tspec.name}: {nbytes} bytes for shape {list(shape)}")
        inputs.append(arr)
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
    return Pending(
        f=f,
        fgen=fgen,
        req_id=req_id,
        model=model,
        rows=rows if spec.max_batch_size > 0 else 1,
        group=tuple(dims_key),
        deadline_ns=deadline,
        arrival_ns=now,
        output_mask=mask,
        inputs=inputs,
    )


def write_outputs(arena: Arena, outputs: list[np.ndarray], batched: bool) -> tuple[int, int]:
    """Write a batch's outputs into one new region of the worker's output ``arena``.

    Returns:
        The region's (offset, length).

    Raises:
        ResourceExhausted: the arena has no room for the region.
    """
    total, offs = region_layout([o.nbytes for o in outputs])
    offset = arena.try_alloc(total)
    if offset < 0:
        raise ResourceExhausted("worker output arena is full; retry")
    pack_region_head(
        arena.view(offset, HEADER_BYTES + TENSOR_DESC.size * len(outputs)).data,
        RES_MAGIC,
        FLAG_BATCHED if batched else 0,
        0,
        [(DTYPE_CODES[kserve_name(o.dtype)], o.shape, offs[j], o.nbytes) for j, o in enumerate(outputs)],
    )
    for j, out in enumerate(outputs):
        arena.write(offset + offs[j], out)
    return offset, total
