"""Reading a worker's response region: the output tensors as read-only views into the worker's arena.

The region's layout (header, tensor descriptors, data) is `engine.shm`'s; this module only reads it and
checks that every tensor lies inside the region the completion descriptor announced.
"""

from __future__ import annotations

import numpy as np

from engine.dtypes import CODE_TO_DTYPE, numpy_dtype
from engine.errors import InternalError
from engine.models.spec import ModelSpec
from engine.shm import FLAG_BATCHED, HEADER_BYTES, REGION_HEADER, RES_MAGIC, TENSOR_DESC_DTYPE
from ext.arena import Arena

#: One output of a response region: name, view into the worker's arena, batched (rows to slice).
ParsedOutput = tuple[str, np.ndarray, bool]


def parse_outputs(arena: Arena, offset: int, length: int, spec: ModelSpec) -> list[ParsedOutput]:
    """Read the response region at ``offset`` of a worker's arena.

    Args:
        arena: the worker's arena, attached read-only.
        offset: start of the region.
        length: its length, from the completion descriptor.
        spec: the model that answered; the region holds one tensor per ``spec.outputs``.

    Returns:
        One ``(name, view, batched)`` per output, in the order of ``spec.outputs``. When ``batched``
        the views hold the whole batch and each request takes its own rows.

    Raises:
        InternalError: a malformed region (wrong magic or output count, a tensor past its end).
    """
    magic, n, flags, _mask, _ = REGION_HEADER.unpack_from(arena.view(offset, HEADER_BYTES).data)
    if magic != RES_MAGIC or n != len(spec.outputs):
        raise InternalError(f"bad response region (magic {magic:#x}, {n} outputs)")
    batched = bool(flags & FLAG_BATCHED)
    out = []
    for tspec, (code, ndim, _p0, _p1, d_off, nbytes, dims) in zip(
        spec.outputs, arena.view(offset + HEADER_BYTES, (n,), TENSOR_DESC_DTYPE).tolist(), strict=True
    ):
        if d_off + nbytes > length:
            raise InternalError("response tensor runs past its region")
        arr = arena.view(offset + d_off, tuple(dims[:ndim]), numpy_dtype(CODE_TO_DTYPE[code]))
        out.append((tspec.name, arr, batched))
    return out
