"""Model metadata as the engine sees it: tensor specs, batching knobs, placement.

Pure Python (no torch): front-ends validate requests against these on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.dtypes import numpy_dtype
from engine.errors import InvalidArgument

#: Highest tensor rank carried through shared memory (batch dimension included).
MAX_RANK = 8


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model.

    Attributes:
        name: tensor name as clients send it (e.g. ``INPUT0``).
        datatype: KServe datatype name (``FP32``, ``INT32``, ...).
        shape: dims *without* the batch dimension when the model batches; -1 marks a variable dim.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)


@dataclass(frozen=True)
class DynamicBatching:
    """Dynamic batcher knobs of one model.

    Attributes:
        max_queue_delay_us: longest a request waits for companions before its batch is sent; it
            runs sooner when every request the front-ends admitted is already queued (nobody else
            could join), unless ``preferred_batch_sizes`` are named.
        preferred_batch_sizes: batch sizes the batcher sends as soon as it can fill one.
        pipeline_rows: when > 0, a queue of at least this many rows runs at once instead of
            waiting for companions, and a ZMQ front-end coalesces at most this many rows into one
            request. Batches of part of the requests in flight let the front-ends answer one while
            the next computes: on CPU, where the model shares the cores with the front-ends and
            the clients, one batch of every request in flight leaves them idle while it runs.
            0 (the default): off.
    """

    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    pipeline_rows: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine knows about one model of the repository.

    Attributes:
        name: model name, unique in the repository.
        backend: ``torchscript``, ``torch`` or ``python``.
        inputs / outputs: tensor specs (shapes without the batch dim when ``max_batch_size > 0``).
        max_batch_size: largest batch (in rows) sent to the model; 0 means the model does not batch
            and each request is computed alone with exactly its own shape.
        dynamic_batching: batcher knobs.
        devices: device names this model may run on (``cpu``, ``cuda:0``...); empty means all workers.
        num_threads: torch intra-op threads for this model (0 = leave the worker's setting).
        version: model version string reported in metadata.
        path: the model folder (None for models built in code).
        source: backend-specific artefact: a file name relative to ``path`` or ``module:attr``.
        allow_nan: when False, an output holding NaN fails its batch.
        prepack_linear: torch backend on CPU: pack the ``nn.Linear`` weights once for oneDNN
            (`engine.models.cpu_prepack`).
        warmup_batch_sizes: batch sizes run once on dummy inputs at load, before the worker reports
            the model ready: kernels that are built per input shape (oneDNN's on CPU, cuBLAS's
            choices on CUDA) are then built before the first request of that size, not during it.
            Packed linear layers also warm every row bucket they compute at, whatever this says.
    """

    name: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    devices: tuple[str, ...] = ()
    num_threads: int = 0
    version: str = "1"
    path: Path | None = None
    source: str = ""
    allow_nan: bool = True
    prepack_linear: bool = False
    warmup_batch_sizes: tuple[int, ...] = (1,)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidArgument(
            f"model {self.name!r} has no input {name!r}; inputs: {', '.join(i.name for i in self.inputs)}"
        )

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidArgument(
            f"model {self.name!r} has no output {name!r}; outputs: {', '.join(o.name for o in self.outputs)}"
        )

    def full_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """The shape a client sends: with a leading -1 batch dim when the model batches."""
        return (-1, *spec.shape) if self.max_batch_size > 0 else spec.shape
