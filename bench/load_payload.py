"""The request a load run sends over and over, and the answer it must get back.

`make_payload` builds one request of a model of the built-in repository (one row per input, seeded
random data) and the outputs the server must answer, computed once in this process: the input itself
for ``identity`` (and for the echo baseline, whatever the model), a+b and a-b for ``simple``, and the
``mlp`` run through `engine.models.backends.load_model` on this process's CPU. `Payload.verify`
compares an answer with them (exact for integers, a small tolerance for floats, since a batch of 64
rows need not round like a batch of one).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.models.spec import ModelSpec

#: Size given to a variable (-1) dimension of a model input.
VARIABLE_DIM = 256
#: Float answers may differ from the reference by this much (batched BLAS rounds differently).
ATOL = 1e-4
RTOL = 1e-4


@dataclass(frozen=True)
class Payload:
    """One request and its expected answer.

    Attributes:
        model: the model name sent.
        inputs: input name -> array (batch dimension first when the model batches).
        expected: output name -> the array the server must answer; None when this client cannot
            know it (a model it has no reference for: only the presence of outputs is checked).
    """

    model: str
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] | None

    def verify(self, outputs: Mapping[str, np.ndarray]) -> bool:
        """Whether ``outputs`` is the expected answer (every expected output, same shape, same values)."""
        if self.expected is None:
            return bool(outputs)
        for name, want in self.expected.items():
            got = outputs.get(name)
            if got is None or got.shape != want.shape or got.dtype != want.dtype:
                return False
            if want.dtype.kind == "f":
                if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
                    return False
            elif not np.array_equal(got, want):
                return False
        return True


@functools.cache
def _specs() -> dict[str, ModelSpec]:
    from engine.models import builtin_repository
    from engine.models.repository import load_repository

    return dict(load_repository(builtin_repository()).specs)


def builtin_spec(model: str) -> ModelSpec:
    """The spec of the built-in model ``model``.

    Raises:
        ValueError: no such built-in model.
    """
    spec = _specs().get(model)
    if spec is None:
        raise ValueError(f"unknown model {model!r}; built-in models: {', '.join(builtin_models())}")
    return spec


def builtin_models() -> list[str]:
    """Names of the models of the built-in repository."""
    return sorted(_specs())


def make_payload(model: str, *, rows: int = 1, seed: int = 0, echo: bool = False) -> Payload:
    """The request for ``model`` (a built-in model) with ``rows`` rows and its expected answer.

    Args:
        model: built-in model name.
        rows: rows per request (the batch dimension of each input).
        seed: seeds the input data.
        echo: the server echoes its inputs as outputs (``INPUTn`` -> ``OUTPUTn``): the echo baseline.

    Raises:
        ValueError: ``model`` is not a built-in model.
    """
    spec = builtin_spec(model)
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        dims = tuple(VARIABLE_DIM if d == -1 else d for d in tensor.shape)
        shape = (rows, *dims) if spec.max_batch_size > 0 else dims
        dtype = tensor.dtype
        if dtype.kind == "f":
            inputs[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            inputs[tensor.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            inputs[tensor.name] = rng.integers(0, 100, shape).astype(dtype)
    expected: dict[str, np.ndarray] | None
    if echo:
        expected = {name.replace("INPUT", "OUTPUT", 1): array for name, array in inputs.items()}
    else:
        expected = reference_outputs(model, inputs)
    return Payload(model, inputs, expected)


def reference_outputs(model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """What a built-in model answers, computed in this process; None for a model without a reference."""
    if model == "identity":
        return {"OUTPUT0": np.array(inputs["INPUT0"])}
    if model == "simple":
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
    if model == "mlp":
        import torch

        from engine.models.backends import load_model

        spec = _specs()["mlp"]
        (out,) = load_model(spec, "cpu").run([torch.from_numpy(np.ascontiguousarray(inputs["INPUT0"]))])
        return {"OUTPUT0": out.numpy().copy()}
    return None
