"""Request checks of the shared-memory gateway: inputs against the model's metadata, the output mask,
byte counts, the size limit, and the absolute deadline of a relative timeout.

Plain functions that `servers.gateway.ShmGateway.infer` calls before it touches shared memory, so a
refused request costs no arena space and no ring slot. Each refusal is an
`engine.errors.InvalidArgument` whose message names the tensor at fault.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.dtypes import DTYPE_CODES, numpy_dtype
from engine.errors import InvalidArgument
from engine.models.spec import MAX_RANK, ModelSpec
from servers.gateway_api import InferInput

#: Most elements one input tensor may have, whatever its shape says.
MAX_ELEMENTS = 1 << 40


def validate_inputs(
    spec: ModelSpec, inputs: Sequence[InferInput]
) -> list[tuple[int, InferInput, tuple[int, ...]]]:
    """Check a request's inputs against the model and put them in the model's order.

    Args:
        spec: the model's metadata.
        inputs: the request's tensors, in any order.

    Returns:
        One ``(dtype code, input, shape)`` per model input, in the order of ``spec.inputs``.

    Raises:
        InvalidArgument: an input is missing, unknown, given twice, or its datatype, shape, byte count
            or batch size does not fit the model.
    """
    by_name: dict[str, InferInput] = {}
    for item in inputs:
        if item.name in by_name:
            raise InvalidArgument(f"input {item.name!r} given twice")
        by_name[item.name] = item
    ordered = []
    rows = None
    for tspec in spec.inputs:
        found = by_name.pop(tspec.name, None)
        if found is None:
            raise InvalidArgument(f"model {spec.name!r} needs input {tspec.name!r}")
        item = found
        if item.datatype != tspec.datatype:
            raise InvalidArgument(
                f"input {tspec.name!r}: datatype {item.datatype} does not match the model's {tspec.datatype}"
            )
        shape = tuple(int(d) for d in item.shape)
        want = spec.full_shape(tspec)
        if len(shape) != len(want) or len(shape) > MAX_RANK:
            raise InvalidArgument(f"input {tspec.name!r}: shape {list(shape)} does not match {list(want)}")
        count = 1
        for d, w in zip(shape, want, strict=True):
            if d < 0:
                raise InvalidArgument(f"input {tspec.name!r}: negative dimension in shape {list(shape)}")
            if w != -1 and d != w:
                raise InvalidArgument(
                    f"input {tspec.name!r}: shape {list(shape)} does not match {list(want)}"
                )
            count *= d
            if count > MAX_ELEMENTS:
                raise InvalidArgument(f"input {tspec.name!r}: shape {list(shape)} is too large")
        nbytes = buffer_nbytes(item.data)
        if nbytes != count * numpy_dtype(tspec.datatype).itemsize:
            raise InvalidArgument(
                f"input {tspec.name!r}: {nbytes} bytes given, shape {list(shape)} of {tspec.datatype} "
                f"needs {count * numpy_dtype(tspec.datatype).itemsize}"
            )
        if spec.max_batch_size > 0:
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidArgument("inputs disagree on the batch size (first dimension)")
        ordered.append((DTYPE_CODES[tspec.datatype], item, shape))
    if by_name:
        raise InvalidArgument(f"model {spec.name!r} has no input {next(iter(by_name))!r}")
    if spec.max_batch_size > 0 and rows is not None and not 1 <= rows <= spec.max_batch_size:
        raise InvalidArgument(
            f"batch size {rows} is outside 1..{spec.max_batch_size} (max_batch_size of {spec.name!r})"
        )
    return ordered


def output_mask(spec: ModelSpec, outputs: Sequence[str] | None) -> int:
    """Bit ``j`` set for each requested output ``spec.outputs[j]``; 0 (every output) when none is named.

    Raises:
        InvalidArgument: a name the model has no output for (the message lists the outputs).
    """
    if not outputs:
        return 0
    mask = 0
    names = [o.name for o in spec.outputs]
    for name in outputs:
        if name not in names:
            spec.output(name)  # raises InvalidArgument naming the outputs
        mask |= 1 << names.index(name)
    return mask


def buffer_nbytes(data: object) -> int:
    """Byte count of a tensor's data (a numpy array or anything with the buffer protocol)."""
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    return memoryview(data).nbytes  # type: ignore[arg-type]
