"""Backends: the built-in models against numpy, TorchScript and python-callable models, output checks."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from engine.errors import ModelError
from engine.models import builtin_repository
from engine.models.backends import LoadedModel, load_model, torch_dtype
from engine.models.repository import load_model_spec, load_repository
from engine.models.spec import ModelSpec, TensorSpec

SEED = 1234


@pytest.fixture(scope="module")
def builtins() -> dict[str, ModelSpec]:
    repo = load_repository(builtin_repository())
    assert repo.errors == {}
    return repo.specs


@pytest.fixture
def rng() -> np.random.Generator:
    print(f"numpy seed {SEED}")  # pytest shows captured output when a test fails
    return np.random.default_rng(SEED)


def make_model(root: Path, name: str, data: dict[str, Any], code: str = "") -> ModelSpec:
    folder = root / name
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    if code:
        (folder / "model.py").write_text(code)
    return load_model_spec(folder)


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def test_simple_matches_numpy(builtins: dict[str, ModelSpec], rng: np.random.Generator) -> None:
    model = load_model(builtins["simple"], "cpu")
    a = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    out0, out1 = model.run([torch.from_numpy(a), torch.from_numpy(b)])
    assert out0.dtype == torch.int32 and out1.dtype == torch.int32
    np.testing.assert_array_equal(out0.numpy(), a + b)
    np.testing.assert_array_equal(out1.numpy(), a - b)


def test_identity_returns_its_input(builtins: dict[str, ModelSpec], rng: np.random.Generator) -> None:
    model = load_model(builtins["identity"], "cpu")
    x = rng.standard_normal((2, 5), dtype=np.float32)
    (out,) = model.run([torch.from_numpy(x)])
    np.testing.assert_array_equal(out.numpy(), x)


def test_mlp_matches_numpy_and_is_deterministic(
    builtins: dict[str, ModelSpec], rng: np.random.Generator
) -> None:
    rng_state = torch.get_rng_state()
    model = load_model(builtins["mlp"], "cpu")
    assert torch.equal(torch.get_rng_state(), rng_state), "loading mlp must not touch the global RNG"
    again = load_model(builtins["mlp"], "cpu")
    first: Any = model._fn  # the nn.Module
    second: Any = again._fn
    weights = {k: v.numpy() for k, v in first.state_dict().items()}
    for k, v in second.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), weights[k])
    x = rng.standard_normal((4, 256), dtype=np.float32)
    (out,) = model.run([torch.from_numpy(x)])
    hidden = np.maximum(x @ weights["0.weight"].T + weights["0.bias"], 0)
    want = hidden @ weights["2.weight"].T + weights["2.bias"]
    assert out.shape == (4, 256)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_torchscript_model_loads_and_runs(tmp_path: Path) -> None:
    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    folder = tmp_path / "ts"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in torch 2.9+
        torch.jit.save(torch.jit.trace(Affine(), torch.zeros(1, 4)), str(folder / "model.pt"))
    data = {
        "backend": "torchscript",
        "source": "model.pt",
        "max_batch_size": 8,
        "inputs": [tensor("X", "FP32", [4])],
        "outputs": [tensor("Y", "FP32", [4])],
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    model = load_model(load_model_spec(folder), "cpu")
    (out,) = model.run([torch.arange(8, dtype=torch.float32).reshape(2, 4)])
    np.testing.assert_array_equal(out.numpy(), np.arange(8, dtype=np.float32).reshape(2, 4) * 2 + 1)


PY_MODEL = """
import numpy as np

def compute(a, b):
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    return {"PROD": a * b, "SUM": a + b, "EXTRA": a}

def as_tuple(a, b):
    return (a + b, a * b)

def as_float64(a, b):
    return (a + b).astype(np.float64), a * b

def just_one(a, b):
    return a + b
"""


def py_spec(tmp_path: Path, source: str) -> dict[str, Any]:
    return {
        "backend": "python",
        "source": f"model.py:{source}",
        "max_batch_size": 4,
        "inputs": [tensor("A", "FP32", [3]), tensor("B", "FP32", [3])],
        "outputs": [tensor("SUM", "FP32", [3]), tensor("PROD", "FP32", [3])],
    }


@pytest.mark.parametrize("source", ["compute", "as_tuple"])
def test_python_callable_model(tmp_path: Path, source: str) -> None:
    model = load_model(make_model(tmp_path, "py", py_spec(tmp_path, source), PY_MODEL), "cpu")
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[4.0, 5.0, 6.0]])
    total, prod = model.run([a, b])
    assert isinstance(total, torch.Tensor)
    np.testing.assert_array_equal(total.numpy(), [[5.0, 7.0, 9.0]])
    np.testing.assert_array_equal(prod.numpy(), [[4.0, 10.0, 18.0]])


def test_output_count_mismatch_fails_the_load(tmp_path: Path) -> None:
    spec = make_model(tmp_path, "py", py_spec(tmp_path, "just_one"), PY_MODEL)
    with pytest.raises(ModelError, match=r"returned a single value; its config declares 2 outputs"):
        load_model(spec, "cpu")


def test_wrong_output_dtype_fails(tmp_path: Path) -> None:
    spec = make_model(tmp_path, "py", py_spec(tmp_path, "as_float64"), PY_MODEL)
    with pytest.raises(
        ModelError, match=r"output 'SUM': dtype torch.float64 does not match the config's FP32"
    ):
        load_model(spec, "cpu")


def test_python_backend_is_cpu_only(tmp_path: Path) -> None:
    spec = make_model(tmp_path, "py", py_spec(tmp_path, "compute"), PY_MODEL)
    with pytest.raises(ModelError, match=r"CPU only"):
        load_model(spec, "cuda:0")


def two_output_spec(**kw: Any) -> ModelSpec:
    return ModelSpec(
        name="m",
        backend="python",
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("A", "FP32", (-1,)), TensorSpec("B", "FP32", (2,))),
        **kw,
    )


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (lambda x: (x,), r"returned 1 outputs; its config declares 2 \(A, B\)"),
        (lambda x: [x, x, x], "returned 3 outputs"),
        (lambda x: {"A": x}, "returned a dict without B"),
        (lambda x: x, "returned a single value"),
        (lambda x: (x, "nope"), "output 'B': expected a tensor, got str"),
        (lambda x: (x, torch.zeros(x.shape[0], 3)), r"output 'B': shape \[1, 3\] does not match"),
        (lambda x: (x, torch.zeros(x.shape[0] + 1, 2)), "batch dim 2 but the batch holds 1 rows"),
        (lambda x: (x, torch.zeros(2)), r"shape \[2\] does not match the config's \['batch', 2\]"),
    ],
)
def test_outputs_not_matching_the_spec_raise_model_error(result: Any, message: str) -> None:
    model = LoadedModel(two_output_spec(max_batch_size=4), "cpu", result)
    with pytest.raises(ModelError, match=message):
        model.run([torch.zeros(1, 5)])


def test_model_exception_becomes_model_error() -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("always fails")

    model = LoadedModel(two_output_spec(), "cpu", boom)
    with pytest.raises(ModelError, match=r"model 'm' raised RuntimeError: always fails"):
        model.run([torch.zeros(3)])


def test_warmup_uses_batch_one_and_variable_dims_as_one() -> None:
    seen: list[tuple[tuple[int, ...], torch.dtype, bool]] = []

    def record(x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((tuple(x.shape), n.dtype, torch.is_inference_mode_enabled()))
        return x, torch.zeros(2)

    batched = ModelSpec(
        name="m",
        backend="torch",
        inputs=(TensorSpec("X", "FP32", (-1, 3, -1)), TensorSpec("N", "INT64", ())),
        outputs=(TensorSpec("A", "FP32", (-1, 3, -1)), TensorSpec("B", "FP32", (2,))),
        max_batch_size=0,
    )
    LoadedModel(batched, "cpu", record).warmup()
    assert seen == [((1, 3, 1), torch.int64, True)]
    assert [tuple(t.shape) for t in LoadedModel(batched, "cpu", record).dummy_inputs()] == [(1, 3, 1), ()]


def test_warmup_runs_every_listed_batch_size() -> None:
    rows: list[int] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[0])
        return x

    spec = ModelSpec(
        name="m",
        backend="torch",
        inputs=(TensorSpec("X", "FP32", (4,)),),
        outputs=(TensorSpec("Y", "FP32", (4,)),),
        max_batch_size=8,
        warmup_batch_sizes=(1, 3, 8),
    )
    LoadedModel(spec, "cpu", record).warmup()
    assert rows == [1, 3, 8]


def test_a_failing_warmup_size_fails_the_load(tmp_path: Path) -> None:
    code = "def compute(x):\n    assert x.shape[0] < 3, 'too many rows'\n    return x\n"
    data = {
        "backend": "python",
        "source": "model.py:compute",
        "max_batch_size": 4,
        "warmup_batch_sizes": [1, 2, 4],
        "inputs": [tensor("X", "FP32", [2])],
        "outputs": [tensor("Y", "FP32", [2])],
    }
    with pytest.raises(ModelError, match=r"cannot load model 'w'.*too many rows"):
        load_model(make_model(tmp_path, "w", data, code), "cpu")


def test_builtin_identity_warms_up_with_variable_dim(builtins: dict[str, ModelSpec]) -> None:
    model = load_model(builtins["identity"], "cpu")
    assert [tuple(t.shape) for t in model.dummy_inputs()] == [(1, 1)]
    model.warmup()


TORCH_MODEL = """
import torch

class Double(torch.nn.Module):
    def forward(self, x):
        return {"Y": x * 2}

def build(spec):
    assert spec.name == "t"
    return Double()

def build_plain(scale=3):
    return torch.nn.Identity()

def not_a_module():
    return 42
"""


def torch_spec(source: str, **kw: Any) -> dict[str, Any]:
    return {
        "backend": "torch",
        "source": f"model.py:{source}",
        "inputs": [tensor("X", "FP32", [2])],
        "outputs": [tensor("Y", "FP32", [2])],
        **kw,
    }


def test_torch_factory_gets_the_spec_when_it_asks_for_it(tmp_path: Path) -> None:
    model = load_model(make_model(tmp_path, "t", torch_spec("build"), TORCH_MODEL), "cpu")
    (out,) = model.run([torch.tensor([1.0, 2.0])])
    np.testing.assert_array_equal(out.numpy(), [2.0, 4.0])
    model = load_model(make_model(tmp_path, "u", torch_spec("build_plain"), TORCH_MODEL), "cpu")
    assert model.run([torch.tensor([1.0, 2.0])])[0].tolist() == [1.0, 2.0]


def test_factory_must_return_a_module(tmp_path: Path) -> None:
    spec = make_model(tmp_path, "t", torch_spec("not_a_module"), TORCH_MODEL)
    with pytest.raises(
        ModelError, match=r"cannot load model 't' on cpu: .*returned int, not a torch.nn.Module"
    ):
        load_model(spec, "cpu")


def test_import_failure_is_a_model_error(tmp_path: Path) -> None:
    spec = make_model(tmp_path, "t", torch_spec("build"), "import no_such_module_here\n")
    with pytest.raises(ModelError, match=r"cannot load model 't' on cpu: ModuleNotFoundError"):
        load_model(spec, "cpu")


def test_num_threads_is_applied(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_model(make_model(tmp_path, "t", torch_spec("build", num_threads=1), TORCH_MODEL), "cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torch_dtypes() -> None:
    assert torch_dtype("FP32") == torch.float32
    assert torch_dtype("INT32") == torch.int32
    assert torch_dtype("BOOL") == torch.bool
    assert torch_dtype("FP16") == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_builtins_on_gpu_match_cpu(builtins: dict[str, ModelSpec]) -> None:
    for name, spec in builtins.items():
        cpu = load_model(spec, "cpu")
        gpu = load_model(spec, "cuda:0")
        inputs = [t.random_(0, 100) for t in cpu.dummy_inputs(batch=4)]
        want = cpu.run(inputs)
        got = gpu.run([t.to("cuda:0") for t in inputs])
        for w, g in zip(want, got, strict=True):
            assert g.device.type == "cuda", name
            torch.testing.assert_close(g.cpu(), w, rtol=1e-3, atol=1e-3)
