"""An in-process stand-in for the shared-memory gateway, for protocol tests that need no workers.

It follows `servers.gateway_api.Gateway`, validates like the real one and computes the built-in demo
models with numpy (`simple`, `identity`) plus `fail`, which always raises a model error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import DeadlineExceeded, InvalidArgument, ModelError, NotFound
from engine.models.spec import DynamicBatching, ModelSpec, TensorSpec
from servers.gateway_api import InferInput

SPECS: dict[str, ModelSpec] = {
    "simple": ModelSpec(
        name="simple",
        backend="python",
        inputs=(TensorSpec("INPUT0", "INT32", (16,)), TensorSpec("INPUT1", "INT32", (16,))),
        outputs=(TensorSpec("OUTPUT0", "INT32", (16,)), TensorSpec("OUTPUT1", "INT32", (16,))),
        max_batch_size=8,
    ),
    "identity": ModelSpec(
        name="identity",
        backend="python",
        inputs=(TensorSpec("INPUT0", "FP32", (-1,)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (-1,)),),
        max_batch_size=64,
        dynamic_batching=DynamicBatching(max_queue_delay_us=200),
    ),
    "fail": ModelSpec(
        name="fail",
        backend="python",
        inputs=(TensorSpec("INPUT0", "FP32", (-1,)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (-1,)),),
        max_batch_size=8,
    ),
}


class FakeResult:
    def __init__(self, model: str, request_id: str, outputs: dict[str, np.ndarray]) -> None:
        self.model = model
        self.request_id = request_id
        self.outputs = outputs
        self.released = False

    def release(self) -> None:
        self.released = True

    def __enter__(self) -> FakeResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_inputs(spec: ModelSpec, inputs: Sequence[InferInput]) -> dict[str, np.ndarray]:
    """Validate like the real gateway and return the inputs as numpy arrays."""
    arrays: dict[str, np.ndarray] = {}
    for item in inputs:
        tspec = spec.input(item.name)
        if item.datatype != tspec.datatype:
            raise InvalidArgument(
                f"input {item.name!r}: datatype {item.datatype} does not match the model's {tspec.datatype}"
            )
        want = spec.full_shape(tspec)
        if len(item.shape) != len(want) or any(
            w != -1 and w != s for w, s in zip(want, item.shape, strict=True)
        ):
            raise InvalidArgument(
                f"input {item.name!r}: shape {list(item.shape)} does not match {list(want)}"
            )
        if any(s < 0 for s in item.shape):
            raise InvalidArgument(f"input {item.name!r}: negative dimension in {list(item.shape)}")
        count = int(np.prod(item.shape, dtype=np.int64)) if item.shape else 1
        nbytes = count * tspec.dtype.itemsize
        raw = memoryview(item.data).cast("B")  # type: ignore[arg-type]
        if raw.nbytes != nbytes:
            raise InvalidArgument(
                f"input {item.name!r}: {raw.nbytes} bytes given, shape {list(item.shape)} needs {nbytes}"
            )
        arrays[item.name] = np.frombuffer(raw, dtype=tspec.dtype).reshape(item.shape)
    missing = {i.name for i in spec.inputs} - arrays.keys()
    if missing:
        raise InvalidArgument(f"missing inputs: {', '.join(sorted(missing))}")
    return arrays


class FakeGateway:
    """Computes in-process; counts calls so tests can look at statistics."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.ready = True
        self.calls: dict[str, int] = {name: 0 for name in SPECS}
        self.failures: dict[str, int] = {name: 0 for name in SPECS}
        #: futures of requests `admit` took and that are not done, by ticket
        self.admitted: dict[int, asyncio.Future[FakeResult]] = {}
        self._tickets = 0

    def model_names(self) -> list[str]:
        return list(SPECS)

    def model_spec(self, name: str) -> ModelSpec:
        try:
            return SPECS[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}") from None

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.ready

    def model_ready(self, name: str) -> bool:
        self.model_spec(name)
        return self.ready

    def model_load_errors(self) -> dict[str, str]:
        return {}

    def submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        requests: int = 1,
    ) -> asyncio.Future[FakeResult]:
        if model in self.calls:
            self.calls[model] += requests - 1  # a coalesced group counts its requests, as a worker does
        # through infer, so that subclasses overriding it (gates, failures) shape both paths
        return asyncio.ensure_future(self.infer(model, inputs, outputs=outputs, deadline_ns=deadline_ns))

    def admit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
    ) -> tuple[int, asyncio.Future[FakeResult]]:
        future = self.submit(model, inputs, outputs=outputs, deadline_ns=deadline_ns)
        self._tickets += 1
        ticket = self._tickets
        self.admitted[ticket] = future
        future.add_done_callback(lambda _: self.admitted.pop(ticket, None))
        return ticket, future

    def abandon(self, ticket: int) -> None:
        future = self.admitted.pop(ticket, None)
        if future is not None:
            future.cancel()  # the task computing it is cancelled, as the engine's worker is told

    async def infer(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        request_id: str = "",
    ) -> FakeResult:
        spec = self.model_spec(model)
        arrays = check_inputs(spec, inputs)
        if outputs:
            for name in outputs:
                spec.output(name)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if deadline_ns is not None and time.monotonic_ns() > deadline_ns:
            self.failures[model] += 1
            raise DeadlineExceeded("deadline exceeded before the request was computed")
        self.calls[model] += 1
        if model == "simple":
            a, b = arrays["INPUT0"], arrays["INPUT1"]
            result = {"OUTPUT0": a + b, "OUTPUT1": a - b}
        elif model == "identity":
            result = {"OUTPUT0": arrays["INPUT0"].copy()}
        else:
            self.failures[model] += 1
            raise ModelError("model 'fail' raised RuntimeError: always fails")
        if outputs:
            result = {k: v for k, v in result.items() if k in outputs}
        return FakeResult(model, request_id, result)

    def statistics(self, model: str | None = None) -> list[dict[str, Any]]:
        names = [model] if model else list(SPECS)
        return [
            {
                "name": n,
                "version": "1",
                "inference_count": self.calls[self.model_spec(n).name],
                "execution_count": self.calls[n],
                "success_count": self.calls[n],
                "fail_count": self.failures[n],
                "success_ns": 0,
                "queue_ns": 0,
                "compute_ns": 0,
                "batch_stats": {},
            }
            for n in names
        ]
