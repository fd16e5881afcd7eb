"""The model repository loader: a folder of model subfolders, each with a `model.yaml`, into `ModelSpec`s.

Layout and schema (unknown keys are errors)::

    <repository>/<model>/model.yaml
        name: simple             # optional; must equal the folder name
        backend: torch           # torchscript | torch | python
        source: model.py:build   # torch/python: "file.py:callable"; torchscript: "model.pt"
        version: "1"
        max_batch_size: 8        # 0 = no batching (shapes exact)
        dynamic_batching: {max_queue_delay_us: 100, preferred_batch_sizes: [4, 8]}
        inputs:  [{name: INPUT0, datatype: INT32, shape: [16]}]   # no batch dim; -1 = variable
        outputs: [{name: OUTPUT0, datatype: INT32, shape: [16]}]
        devices: [cpu]           # optional; default every worker
        num_threads: 0           # optional
        allow_nan: true          # optional
        prepack_linear: false    # optional, torch backend: nn.Linear weights packed once for oneDNN on CPU
                                 # (batches padded to row buckets, each bucket warmed at load)
        warmup_batch_sizes: [1]  # optional; batch sizes run once at load ("all": 1..max_batch_size)

A model that fails to load is reported in `Repository.errors` with the reason; the others still load.
Pure Python (yaml + numpy, no torch): the supervisor and front-ends read specs without loading models.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from engine.dtypes import KSERVE_TO_NUMPY
from engine.models.spec import MAX_RANK, DynamicBatching, ModelSpec, TensorSpec

log = logging.getLogger(__name__)

SPEC_FILE = "model.yaml"
BACKENDS = ("torchscript", "torch", "python")
#: `source` when model.yaml leaves it out.
DEFAULT_SOURCE = {"torchscript": "model.pt", "torch": "model.py:build", "python": "model.py:build"}
_KEYS = frozenset(
    {"name", "backend", "source", "version", "max_batch_size", "dynamic_batching", "inputs", "outputs"}
    | {"devices", "num_threads", "allow_nan", "prepack_linear", "warmup_batch_sizes"}
)
_BATCHING_KEYS = frozenset({"max_queue_delay_us", "preferred_batch_sizes", "pipeline_rows"})
_TENSOR_KEYS = frozenset({"name", "datatype", "shape"})
# Model names travel in URLs (/v2/models/{name}) and shared-memory headers: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+)$")


class ModelConfigError(ValueError):
    """One `model.yaml` is invalid; the message names the model, the field, the value and the fix."""

    def __init__(self, model: str, field: str, value: object, reason: str) -> None:
        self.model = model
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"model {model!r}: {field}={value!r}: {reason}")


@dataclass
class Repository:
    """What `load_repository` found.

    Attributes:
        path: the repository folder.
        specs: model name -> spec, for every model that loaded.
        errors: model folder name -> why it did not load.
    """

    path: Path
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def load_repository(path: Path) -> Repository:
    """Read every model subfolder of ``path``; a broken one lands in ``errors``, the rest in ``specs``.

    Folders whose name starts with ``.`` or ``_`` (``__pycache__``...) and plain files are skipped.

    Raises:
        NotADirectoryError: ``path`` is not a folder.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise NotADirectoryError(f"model repository {str(path)!r} is not a folder")
    repo = Repository(path)
    for folder in sorted(path.iterdir()):
        if not folder.is_dir() or folder.name.startswith((".", "_")):
            continue
        try:
            repo.specs[folder.name] = load_model_spec(folder)
        except ModelConfigError as err:
            repo.errors[folder.name] = str(err)
            log.warning("repository: model %s not loaded: %s", folder.name, err)
    return repo


def load_model_spec(folder: Path) -> ModelSpec:
    """Read and validate ``folder/model.yaml``.

    Raises:
        ModelConfigError: naming the model, the field, the value and the reason.
    """
    folder = Path(folder).resolve()
    model = folder.name
    if not _NAME_RE.match(model):
        raise ModelConfigError(
            model, "name", model, "use letters, digits, '_', '.', '-' (first a letter or digit), <= 64 chars"
        )
    spec_file = folder / SPEC_FILE
    try:
        data = yaml.load(spec_file.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise ModelConfigError(
            model, SPEC_FILE, str(spec_file), "missing; every model folder needs one"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelConfigError(model, SPEC_FILE, str(spec_file), f"cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ModelConfigError(model, SPEC_FILE, str(spec_file), f"not valid YAML: {_oneline(err)}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(model, SPEC_FILE, type(data).__name__, "must hold a mapping of key: value")
    return _parse_spec(model, folder, data)


def _parse_spec(model: str, folder: Path, data: Mapping[Any, Any]) -> ModelSpec:
    f = _Fields(model)
    f.only(data, _KEYS, "")
    name = data.get("name", model)
    if name != model:
        f.fail("name", name, f"must equal the folder name {model!r} (or be left out)")
    backend = data.get("backend")
    if backend not in BACKENDS:
        f.fail("backend", backend, f"choose one of {', '.join(BACKENDS)}")
    source = _source(f, folder, backend, data.get("source", DEFAULT_SOURCE[backend]))
    version = data.get("version", "1")
    if isinstance(version, bool) or not isinstance(version, str | int) or not str(version):
        f.fail("version", version, 'expected a non-empty string such as "1"')
    max_batch = f.integer("max_batch_size", data.get("max_batch_size", 0), lo=0)
    batching = _batching(f, data, max_batch)
    inputs = _tensors(f, "inputs", data.get("inputs"), max_batch)
    outputs = _tensors(f, "outputs", data.get("outputs"), max_batch)
    devices = _devices(f, data.get("devices", []), backend)
    num_threads = f.integer("num_threads", data.get("num_threads", 0), lo=0)
    allow_nan = data.get("allow_nan", True)
    if not isinstance(allow_nan, bool):
        f.fail("allow_nan", allow_nan, "expected true or false")
    prepack = data.get("prepack_linear", False)
    if not isinstance(prepack, bool):
        f.fail("prepack_linear", prepack, "expected true or false")
    if prepack and backend != "torch":
        f.fail("prepack_linear", prepack, "only the torch backend packs its nn.Linear layers; leave it out")
    warmup = _warmup_sizes(f, data.get("warmup_batch_sizes", [1]), max_batch)
    return ModelSpec(
        name=model,
        backend=backend,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        dynamic_batching=batching,
        devices=devices,
        num_threads=num_threads,
        version=str(version),
        path=folder,
        source=source,
        allow_nan=allow_nan,
        prepack_linear=prepack,
        warmup_batch_sizes=warmup,
    )


class _Fields:
    """Validation helpers that know which model they are checking."""

    def __init__(self, model: str) -> None:
        self.model = model

    def fail(self, field: str, value: object, reason: str) -> NoReturn:
        raise ModelConfigError(self.model, field, value, reason)

    def only(self, data: Any, allowed: frozenset[str], where: str) -> None:
        if not isinstance(data, dict):
            self.fail(where, data, "expected a mapping of key: value")
        for key in data:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                self.fail(f"{prefix}{key}", data[key], f"unknown key; known: {', '.join(sorted(allowed))}")

    def integer(self, field: str, value: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, value, "expected an integer")
        if value < lo or (hi is not None and value > hi):
            self.fail(field, value, f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return int(value)


def _source(f: _Fields, folder: Path, backend: str, source: Any) -> str:
    if not isinstance(source, str) or not source:
        f.fail("source", source, 'expected a string such as "model.py:build" or "model.pt"')
    file_name, attr = source, ""
    if backend != "torchscript":
        file_name, sep, attr = source.rpartition(":")
        if not sep or not file_name.endswith(".py") or not attr.isidentifier():
            f.fail("source", source, f'a {backend} source is "file.py:callable", e.g. "model.py:build"')
    file = (folder / file_name).resolve()
    if not file.is_relative_to(folder):
        f.fail("source", source, "the file must lie inside the model folder")
    if not file.is_file():
        f.fail("source", source, f"file {file_name!r} not found in {str(folder)!r}")
    return source


def _batching(f: _Fields, data: Mapping[Any, Any], max_batch: int) -> DynamicBatching:
    raw = data.get("dynamic_batching")
    if raw is None:
        return DynamicBatching()
    f.only(raw, _BATCHING_KEYS, "dynamic_batching")
    if max_batch == 0:
        f.fail("dynamic_batching", raw, "needs max_batch_size > 0 (or remove dynamic_batching)")
    kwargs: dict[str, Any] = {}
    if "max_queue_delay_us" in raw:
        delay = raw["max_queue_delay_us"]
        kwargs["max_queue_delay_us"] = f.integer("dynamic_batching.max_queue_delay_us", delay, lo=0)
    if "preferred_batch_sizes" in raw:
        sizes = raw["preferred_batch_sizes"] or []
        field = "dynamic_batching.preferred_batch_sizes"
        if not isinstance(sizes, list):
            f.fail(field, sizes, "expected a list of batch sizes")
        for size in sizes:
            f.integer(field, size, lo=1, hi=max_batch)
        if len(set(sizes)) != len(sizes):
            f.fail(field, sizes, "a size is listed twice")
        kwargs["preferred_batch_sizes"] = tuple(sorted(sizes))
    if "pipeline_rows" in raw:
        rows = raw["pipeline_rows"]
        kwargs["pipeline_rows"] = f.integer("dynamic_batching.pipeline_rows", rows, lo=0, hi=max_batch)
    return DynamicBatching(**kwargs)


def _warmup_sizes(f: _Fields, raw: Any, max_batch: int) -> tuple[int, ...]:
    field = "warmup_batch_sizes"
    if max_batch == 0:
        if raw != [1]:
            f.fail(field, raw, "the model does not batch (max_batch_size 0): leave it out")
        return (1,)
    if raw == "all":
        return tuple(range(1, max_batch + 1))
    if not isinstance(raw, list) or not raw:
        f.fail(field, raw, f'expected "all" or a non-empty list of batch sizes from 1 to {max_batch}')
    for size in raw:
        f.integer(field, size, lo=1, hi=max_batch)
    if len(set(raw)) != len(raw):
        f.fail(field, raw, "a size is listed twice")
    return tuple(sorted(raw))


def _tensors(f: _Fields, kind: str, raw: Any, max_batch: int) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        f.fail(kind, raw, "expected a non-empty list of {name, datatype, shape}")
    # The batch dim counts towards the rank carried through shared memory.
    max_rank = MAX_RANK - (1 if max_batch > 0 else 0)
    specs: list[TensorSpec] = []
    for i, item in enumerate(raw):
        where = f"{kind}[{i}]"
        f.only(item, _TENSOR_KEYS, where)
        name = item.get("name")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            f.fail(f"{where}.name", name, "expected a non-empty name without spaces")
        if any(s.name == name for s in specs):
            f.fail(f"{where}.name", name, f"two {kind} share this name")
        datatype = item.get("datatype")
        dt = datatype.upper() if isinstance(datatype, str) else datatype
        if dt == "BYTES":
            f.fail(f"{where}.datatype", datatype, "BYTES (variable-length) is not supported; use UINT8 bytes")
        if dt not in KSERVE_TO_NUMPY:
            known = ", ".join(KSERVE_TO_NUMPY)
            f.fail(f"{where}.datatype", datatype, f"unknown datatype; use one of {known}")
        shape = item.get("shape")
        if not isinstance(shape, list) or len(shape) > max_rank:
            f.fail(f"{where}.shape", shape, f"expected a list of at most {max_rank} dims")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or (dim < 1 and dim != -1):
                f.fail(f"{where}.shape", shape, f"dim {dim!r}: each dim is >= 1, or -1 for variable")
        specs.append(TensorSpec(name, dt, tuple(shape)))
    return tuple(specs)


def _devices(f: _Fields, raw: Any, backend: str) -> tuple[str, ...]:
    devices = [raw] if isinstance(raw, str) else raw
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        f.fail("devices", raw, "expected a list of device names such as [cpu] or [cuda:0]")
    for d in devices:
        if not _DEVICE_RE.match(d):
            f.fail("devices", raw, f"bad device {d!r}; use cpu or cuda:N")
    if backend == "python" and any(d != "cpu" for d in devices):
        f.fail("devices", raw, "the python backend runs on CPU only; use [cpu] or leave devices out")
    return tuple(dict.fromkeys(devices))


def _oneline(err: Exception) -> str:
    return " ".join(str(err).split())


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
