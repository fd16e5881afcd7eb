"""The CPU executor: a batch in, checked C-contiguous arrays out, NaN refused unless allowed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from engine.errors import ModelError
from engine.models.backends import LoadedModel, inference_mode
from engine.models.spec import ModelSpec, TensorSpec
from engine.worker.executor import Executor


def model(
    fn: Callable[..., Any], datatype: str = "FP32", allow_nan: bool = False
) -> tuple[ModelSpec, LoadedModel]:
    spec = ModelSpec(
        name="m",
        backend="python",
        max_batch_size=8,
        allow_nan=allow_nan,
        inputs=(TensorSpec("X", datatype, (3,)),),
        outputs=(TensorSpec("Y", datatype, (3,)),),
    )
    return spec, LoadedModel(spec, "cpu", fn, numpy_io=True)


def run(spec: ModelSpec, loaded: LoadedModel, batch: np.ndarray) -> list[np.ndarray]:
    return Executor("cpu").run(spec, loaded, [[batch[:1], batch[1:]]], len(batch))


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16"])
def test_a_nan_anywhere_fails_the_batch(datatype: str) -> None:
    spec, loaded = model(lambda x: x, datatype)
    batch = np.ones((4, 3), dtype={"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}[datatype])
    assert run(spec, loaded, batch)[0].tolist() == batch.tolist()
    for row, col in [(0, 0), (3, 2), (1, 1)]:
        bad = batch.copy()
        bad[row, col] = np.nan
        with pytest.raises(ModelError, match="output Y holds NaN"):
            run(spec, loaded, bad)


def test_infinities_are_not_nan() -> None:
    spec, loaded = model(lambda x: x)
    batch = np.array([[np.inf, 1, -np.inf], [np.finfo(np.float32).max] * 3], dtype=np.float32)
    (out,) = run(spec, loaded, batch)
    assert np.array_equal(out, batch)


def test_nan_passes_where_the_model_allows_it() -> None:
    spec, loaded = model(lambda x: x, allow_nan=True)
    batch = np.full((2, 3), np.nan, dtype=np.float32)
    (out,) = run(spec, loaded, batch)
    assert np.isnan(out).all() and out.flags.c_contiguous


def test_integer_outputs_are_not_checked() -> None:
    spec, loaded = model(lambda x: x, "INT32")
    batch = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert run(spec, loaded, batch)[0].tolist() == batch.tolist()


def test_outputs_are_contiguous_arrays_without_grad() -> None:
    weight = torch.nn.Parameter(torch.ones(3))  # requires grad: the model's output would too

    spec = ModelSpec(
        name="m",
        backend="torch",
        max_batch_size=8,
        inputs=(TensorSpec("X", "FP32", (3,)),),
        outputs=(TensorSpec("Y", "FP32", (3,)),),
    )
    loaded = LoadedModel(spec, "cpu", lambda x: (x * weight).t().contiguous().t())
    batch = np.arange(6, dtype=np.float32).reshape(2, 3)
    for on in (False, True):
        with torch.inference_mode(on):
            (out,) = Executor("cpu").run(spec, loaded, [[batch]], 2)
        assert out.flags.c_contiguous and out.tolist() == batch.tolist()


def test_inference_mode_is_entered_only_when_off() -> None:
    with inference_mode():
        assert torch.is_inference_mode_enabled()
        inner = inference_mode()
        assert not isinstance(inner, torch.inference_mode)  # nothing to enter
        with inner:
            assert torch.is_inference_mode_enabled()
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()
