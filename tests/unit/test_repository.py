"""Model repository loader: the built-in models, per-model error reporting, and each validation rule."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.models import builtin_repository
from engine.models.repository import ModelConfigError, load_model_spec, load_repository
from engine.models.spec import DynamicBatching, TensorSpec

VALID: dict[str, Any] = {
    "backend": "python",
    "source": "model.py:compute",
    "max_batch_size": 4,
    "dynamic_batching": {"max_queue_delay_us": 50, "preferred_batch_sizes": [4, 2]},
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [3]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [3]}],
}


def make_model(
    root: Path, name: str, data: dict[str, Any] | str, files: tuple[str, ...] = ("model.py",)
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    (folder / "model.yaml").write_text(text)
    for file in files:
        (folder / file).write_text("def compute(x):\n    return x\n")
    return folder


def test_builtins_load() -> None:
    repo = load_repository(builtin_repository())
    assert repo.errors == {}
    assert sorted(repo.specs) == ["identity", "mlp", "simple"]
    simple = repo.specs["simple"]
    assert simple.backend == "torch" and simple.max_batch_size == 8
    assert simple.inputs == (TensorSpec("INPUT0", "INT32", (16,)), TensorSpec("INPUT1", "INT32", (16,)))
    assert [o.name for o in simple.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert simple.dynamic_batching.max_queue_delay_us == 100
    identity = repo.specs["identity"]
    assert identity.inputs[0].shape == (-1,) and identity.max_batch_size == 256
    assert identity.dynamic_batching.max_queue_delay_us == 200
    mlp = repo.specs["mlp"]
    assert mlp.inputs[0] == TensorSpec("INPUT0", "FP32", (256,))
    assert mlp.dynamic_batching == DynamicBatching(
        max_queue_delay_us=2000, preferred_batch_sizes=(), pipeline_rows=32
    )
    assert mlp.prepack_linear and not repo.specs["simple"].prepack_linear
    assert all(s.path is not None and s.path.is_dir() for s in repo.specs.values())


def test_full_spec_is_parsed(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID) | {"version": 3, "devices": "cpu", "num_threads": 2, "allow_nan": False}
    data["inputs"][0]["datatype"] = "fp32"
    spec = load_model_spec(make_model(tmp_path, "m", data))
    assert spec.name == "m" and spec.version == "3" and spec.devices == ("cpu",)
    assert spec.dynamic_batching == DynamicBatching(50, (2, 4))
    assert spec.inputs[0].datatype == "FP32"
    assert (spec.num_threads, spec.allow_nan, spec.source) == (2, False, "model.py:compute")


def test_defaults(tmp_path: Path) -> None:
    data = {k: v for k, v in VALID.items() if k not in ("source", "dynamic_batching", "max_batch_size")}
    spec = load_model_spec(make_model(tmp_path, "m", data))
    assert spec.source == "model.py:build" and spec.max_batch_size == 0
    assert spec.dynamic_batching == DynamicBatching() and spec.devices == () and spec.version == "1"
    assert not spec.prepack_linear and spec.warmup_batch_sizes == (1,)


def test_warmup_batch_sizes(tmp_path: Path) -> None:
    listed = load_model_spec(make_model(tmp_path, "listed", VALID | {"warmup_batch_sizes": [4, 1, 2]}))
    assert listed.warmup_batch_sizes == (1, 2, 4)
    every = load_model_spec(make_model(tmp_path, "every", VALID | {"warmup_batch_sizes": "all"}))
    assert every.warmup_batch_sizes == (1, 2, 3, 4)
    unbatched = edit("dynamic_batching", DELETE) | {"max_batch_size": 0}
    one = load_model_spec(make_model(tmp_path, "one", unbatched | {"warmup_batch_sizes": [1]}))
    assert one.warmup_batch_sizes == (1,)
    for n, sizes in enumerate(("all", [2])):
        with pytest.raises(ModelConfigError, match=r"warmup_batch_sizes=.*does not batch"):
            load_model_spec(make_model(tmp_path, f"u{n}", unbatched | {"warmup_batch_sizes": sizes}))


def test_broken_folder_is_reported_by_name_while_others_load(tmp_path: Path) -> None:
    make_model(tmp_path, "good", VALID)
    make_model(tmp_path, "bad", VALID | {"backend": "tensorflow"})
    make_model(tmp_path, "worse", "inputs: [\n")
    (tmp_path / "no_yaml").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.md").write_text("not a model")
    repo = load_repository(tmp_path)
    assert list(repo.specs) == ["good"]
    assert sorted(repo.errors) == ["bad", "no_yaml", "worse"]
    assert "backend='tensorflow'" in repo.errors["bad"] and "model 'bad'" in repo.errors["bad"]
    assert "not valid YAML" in repo.errors["worse"]
    assert "model.yaml" in repo.errors["no_yaml"] and "missing" in repo.errors["no_yaml"]


def test_repository_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match=r"not a folder"):
        load_repository(tmp_path / "absent")


def edit(path: str, value: Any) -> dict[str, Any]:
    """VALID with one field (dotted path, list indices as numbers) set; value DELETE removes it."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


DELETE = object()

INVALID = [
    # (edit path, new value, field named in the message, reason fragment)
    ("colour", "red", "colour", "unknown key"),
    ("inputs.0.dims", [3], "inputs[0].dims", "unknown key"),
    ("dynamic_batching.delay", 1, "dynamic_batching.delay", "unknown key"),
    ("name", "other", "name", "must equal the folder name"),
    ("backend", "onnx", "backend", "torchscript, torch, python"),
    ("backend", DELETE, "backend", "choose one of"),
    ("source", "missing.py:compute", "source", "not found"),
    ("source", "model.py", "source", "file.py:callable"),
    ("source", "model.py:not-an-identifier", "source", "file.py:callable"),
    ("source", "../model.py:compute", "source", "inside the model folder"),
    ("version", "", "version", "non-empty string"),
    ("max_batch_size", -1, "max_batch_size", ">= 0"),
    ("max_batch_size", True, "max_batch_size", "expected an integer"),
    ("dynamic_batching.max_queue_delay_us", -5, "dynamic_batching.max_queue_delay_us", ">= 0"),
    ("dynamic_batching.preferred_batch_sizes", [8], "preferred_batch_sizes", "<= 4"),
    ("dynamic_batching.preferred_batch_sizes", [2, 2], "preferred_batch_sizes", "listed twice"),
    ("dynamic_batching.pipeline_rows", 5, "dynamic_batching.pipeline_rows", "<= 4"),
    ("dynamic_batching.pipeline_rows", -1, "dynamic_batching.pipeline_rows", ">= 0"),
    ("dynamic_batching.pipeline_rows", "8", "dynamic_batching.pipeline_rows", "expected an integer"),
    ("inputs", [], "inputs", "non-empty list"),
    ("outputs", DELETE, "outputs", "non-empty list"),
    ("inputs.0.datatype", "FLOAT", "inputs[0].datatype", "unknown datatype"),
    ("inputs.0.datatype", "BYTES", "inputs[0].datatype", "not supported"),
    ("outputs.0.datatype", "bytes", "outputs[0].datatype", "not supported"),
    ("inputs.0.shape", [3, -2], "inputs[0].shape", "-1 for variable"),
    ("inputs.0.shape", [0], "inputs[0].shape", "-1 for variable"),
    ("inputs.0.shape", "3", "inputs[0].shape", "list of at most 7 dims"),
    ("inputs.0.shape", [1] * 8, "inputs[0].shape", "at most 7 dims"),
    ("inputs.0.name", "", "inputs[0].name", "non-empty"),
    ("outputs", [{"name": "Y", "datatype": "FP32", "shape": [3]}] * 2, "outputs[1].name", "share"),
    ("devices", ["gpu"], "devices", "cpu or cuda:N"),
    ("devices", ["cuda:0"], "devices", "CPU only"),
    ("num_threads", -1, "num_threads", ">= 0"),
    ("allow_nan", "yes", "allow_nan", "true or false"),
    ("prepack_linear", "yes", "prepack_linear", "true or false"),
    ("prepack_linear", True, "prepack_linear", "only the torch backend"),
    ("warmup_batch_sizes", [0], "warmup_batch_sizes", ">= 1 and <= 4"),
    ("warmup_batch_sizes", [5], "warmup_batch_sizes", ">= 1 and <= 4"),
    ("warmup_batch_sizes", [2, 2], "warmup_batch_sizes", "listed twice"),
    ("warmup_batch_sizes", [], "warmup_batch_sizes", "non-empty list"),
    ("warmup_batch_sizes", "every", "warmup_batch_sizes", '"all" or'),
    ("warmup_batch_sizes", 4, "warmup_batch_sizes", '"all" or'),
    ("warmup_batch_sizes", [True], "warmup_batch_sizes", "expected an integer"),
]


@pytest.mark.parametrize(("path", "value", "field", "reason"), INVALID)
def test_validation_error_names_model_field_value(
    tmp_path: Path, path: str, value: Any, field: str, reason: str
) -> None:
    folder = make_model(tmp_path, "m", edit(path, value))
    with pytest.raises(ModelConfigError) as info:
        load_model_spec(folder)
    message = str(info.value)
    assert message.startswith("model 'm': ")
    assert field in info.value.field and reason in message
    assert f"{info.value.field}={info.value.value!r}" in message
    if value is not DELETE and not isinstance(value, list):
        assert repr(value) in message


def test_dynamic_batching_needs_batching(tmp_path: Path) -> None:
    folder = make_model(tmp_path, "m", edit("max_batch_size", 0))
    with pytest.raises(ModelConfigError, match=r"dynamic_batching=.*max_batch_size > 0"):
        load_model_spec(folder)


def test_unbatched_model_may_use_eight_dims(tmp_path: Path) -> None:
    data = edit("dynamic_batching", DELETE) | {"max_batch_size": 0}
    data["inputs"][0]["shape"] = [1] * 8
    assert load_model_spec(make_model(tmp_path, "m", data)).inputs[0].shape == (1,) * 8


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(VALID) + "backend: torch\n"
    with pytest.raises(ModelConfigError, match=r"duplicate key 'backend'"):
        load_model_spec(make_model(tmp_path, "m", text))


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"must hold a mapping"):
        load_model_spec(make_model(tmp_path, "m", "- 1\n"))


def test_bad_folder_name(tmp_path: Path) -> None:
    repo = load_repository(make_model(tmp_path, "has space", VALID).parent)
    assert "has space" in repo.errors and "letters, digits" in repo.errors["has space"]


def test_torchscript_source_is_a_file(tmp_path: Path) -> None:
    folder = make_model(tmp_path, "ts", VALID | {"backend": "torchscript", "source": "model.pt"})
    with pytest.raises(ModelConfigError, match=r"'model.pt' not found"):
        load_model_spec(folder)
    (folder / "model.pt").write_bytes(b"")
    assert load_model_spec(folder).source == "model.pt"


def test_importable_without_torch() -> None:
    code = (
        "import sys\nfrom engine.models.repository import load_repository\n"
        "from engine.models import builtin_repository\n"
        "assert load_repository(builtin_repository()).specs\nassert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
