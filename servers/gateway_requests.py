"""Request checks of the shared-memory gateway: inputs against the model's metadata, the output mask,
byte counts, the size limit, and the absolute deadline of a relative timeout.

What `servers.gateway.ShmGateway` runs on a request before it touches shared memory, so a refused
request costs no arena space and no ring slot; the input checks prepared once per model
(`InputChecks`), as they run on every request. Each refusal is an
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
#: Shapes of requests that passed, remembered per model input at most.
MAX_KNOWN_SHAPES = 64


class InputChecks:
    """`validate_inputs` for one model, prepared once: per model input its name, datatype, dtype
    code, full shape and item size (the gateway checks every request against these, so nothing is
    looked up or rebuilt per request)."""

    __slots__ = ("_known", "names", "spec", "tensors")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.names = tuple(t.name for t in spec.inputs)
        self.tensors = tuple(
            (
                t.name,
                t.datatype,
                DTYPE_CODES[t.datatype],
                spec.full_shape(t),
                numpy_dtype(t.datatype).itemsize,
            )
            for t in spec.inputs
        )
        #: per input, (datatype, shape as given) -> (shape, byte count) of the shapes of requests that
        #: passed: clients send the same few shapes, and a hit skips the per-dimension checks
        self._known: tuple[dict[tuple[object, ...], tuple[tuple[int, ...], int]], ...] = tuple(
            {} for _ in spec.inputs
        )

    def check(self, inputs: Sequence[InferInput]) -> list[tuple[int, InferInput, tuple[int, ...], int]]:
        """See `validate_inputs`; each entry also carries the input's byte count."""
        spec = self.spec
        names = self.names
        if len(inputs) == len(names) and all(i.name == n for i, n in zip(inputs, names, strict=True)):
            items: Sequence[InferInput] = inputs  # the model's order already (the usual case)
        else:
            items = self._reorder(inputs)
        ordered = []
        learned = []
        rows = None
        for item, tensor, known in zip(items, self.tensors, self._known, strict=True):
            key = (item.datatype, item.shape)
            try:
                seen = known.get(key)
                hashable = True
            except TypeError:  # an unhashable dimension: the full checks say what is wrong with it
                seen, hashable = None, False
            if seen is None:
                seen = _check_shape(item, tensor)
                if hashable:
                    learned.append((known, key, seen))
            shape, expected = seen
            nbytes = buffer_nbytes(item.data)
            if nbytes != expected:
                raise InvalidArgument(
                    f"input {tensor[0]!r}: {nbytes} bytes given, shape {list(shape)} of {tensor[1]} "
                    f"needs {expected}"
                )
            if spec.max_batch_size > 0:
                if rows is None:
                    rows = shape[0]
                elif shape[0] != rows:
                    raise InvalidArgument("inputs disagree on the batch size (first dimension)")
            ordered.append((tensor[2], item, shape, nbytes))
        if spec.max_batch_size > 0 and rows is not None and not 1 <= rows <= spec.max_batch_size:
            raise InvalidArgument(
                f"batch size {rows} is outside 1..{spec.max_batch_size} (max_batch_size of {spec.name!r})"
            )
        for known, key, seen in learned:  # only shapes of a request that passed every check
            if len(known) >= MAX_KNOWN_SHAPES:
                known.clear()  # a client cycling through shapes: start over rather than grow
            known[key] = seen
        return ordered

    def _reorder(self, inputs: Sequence[InferInput]) -> list[InferInput]:
        """``inputs`` in the model's order; InvalidArgument for one missing, unknown or given twice."""
        by_name: dict[str, InferInput] = {}
        for item in inputs:
            if item.name in by_name:
                raise InvalidArgument(f"input {item.name!r} given twice")
            by_name[item.name] = item
        items = []
        for name in self.names:
            found = by_name.pop(name, None)
            if found is None:
                raise InvalidArgument(f"model {self.spec.name!r} needs input {name!r}")
            items.append(found)
        if by_name:
            raise InvalidArgument(f"model {self.spec.name!r} has no input {next(iter(by_name))!r}")
        return items


def _check_shape(
    item: InferInput, tensor: tuple[str, str, int, tuple[int, ...], int]
) -> tuple[tuple[int, ...], int]:
    """An input's datatype and shape against the model's ``tensor`` (name, datatype, dtype code, full
    shape, item size): the shape as ints and the byte count it needs. Raises InvalidArgument."""
    name, datatype, _, want, itemsize = tensor
    if item.datatype != datatype:
        raise InvalidArgument(
            f"input {name!r}: datatype {item.datatype} does not match the model's {datatype}"
        )
    shape = tuple(map(int, item.shape))
    if len(shape) != len(want) or len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} does not match {list(want)}")
    count = 1
    for d, w in zip(shape, want, strict=True):
        if d < 0:
            raise InvalidArgument(f"input {name!r}: negative dimension in shape {list(shape)}")
        if w != -1 and d != w:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} does not match {list(want)}")
        count *= d
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} is too large")
    return shape, count * itemsize


def validate_inputs(
    spec: ModelSpec, inputs: Sequence[InferInput]
) -> list[tuple[int, InferInput, tuple[int, ...], int]]:
    """Check a request's inputs against the model and put them in the model's order.

    Args:
        spec: the model's metadata.
        inputs: the request's tensors, in any order.

    Returns:
        One ``(dtype code, input, shape, byte count)`` per model input, in the order of ``spec.inputs``.

    Raises:
        InvalidArgument: an input is missing, unknown, given twice, or its datatype, shape, byte count
            or batch size does not fit the model.
    """
    return InputChecks(spec).check(inputs)


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
