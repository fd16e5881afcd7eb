"""The JSON documents the REST front-end serves about the server and its models.

Server metadata, model metadata, Triton-style model configuration and the repository index, built
from `engine.models.spec.ModelSpec` in the shapes that KServe v2 / Triton HTTP clients expect. Each
model's documents are encoded once and cached until the gateway hands out a different spec.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from engine.models.spec import ModelSpec, TensorSpec
from servers.gateway_api import Gateway
from servers.rest_codec import dumps

SERVER_NAME = "shm-inference-engine"

#: KServe v2 extensions this front-end implements.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics")

#: Triton's platform names for our backends (what `tritonclient` shows as ``platform``).
_PLATFORMS = {"torchscript": "pytorch_libtorch", "torch": "pytorch", "python": "python"}


def server_version() -> str:
    """The installed package's version ("unknown" when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def server_metadata() -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    """``GET /v2/models/{name}``: shapes as clients send them (leading -1 when the model batches)."""
    return {
        "name": spec.name,
        "versions": [spec.version],
        "platform": _PLATFORMS.get(spec.backend, spec.backend),
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(spec.full_shape(t))} for t in spec.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(spec.full_shape(t))} for t in spec.outputs
        ],
    }


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: Triton's model config (dims without the batch dim)."""
    config: dict[str, Any] = {
        "name": spec.name,
        "platform": _PLATFORMS.get(spec.backend, spec.backend),
        "backend": spec.backend,
        "version_policy": {"specific": {"versions": [spec.version]}},
        "max_batch_size": spec.max_batch_size,
        "input": [_config_tensor(t) for t in spec.inputs],
        "output": [_config_tensor(t) for t in spec.outputs],
    }
    if spec.max_batch_size > 0:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": spec.dynamic_batching.max_queue_delay_us,
            "preferred_batch_size": list(spec.dynamic_batching.preferred_batch_sizes),
        }
    return config


def _config_tensor(tensor: TensorSpec) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": triton_type(tensor.datatype), "dims": list(tensor.shape)}


def triton_type(datatype: str) -> str:
    """KServe datatype name -> Triton config ``data_type`` (``FP32`` -> ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def repository_index(gateway: Gateway, ready_only: bool = False) -> list[dict[str, Any]]:
    """``POST /v2/repository/index``: every model with its state, and the reason when not ready."""
    errors = gateway.model_load_errors()
    names = list(dict.fromkeys([*gateway.model_names(), *errors]))
    index: list[dict[str, Any]] = []
    for name in names:
        ready = name not in errors and gateway.model_ready(name)
        if ready_only and not ready:
            continue
        entry: dict[str, Any] = {"name": name, "state": "READY" if ready else "UNAVAILABLE"}
        if name not in errors:
            entry["version"] = gateway.model_spec(name).version
        if not ready:
            entry["reason"] = errors.get(name, "no worker serving it is up")
        index.append(entry)
    return index


class ModelDocuments:
    """One model's spec with its metadata and config documents, encoded once.

    Attributes:
        spec: the spec the documents were built from (compared by identity to spot a reload).
        metadata: encoded `model_metadata`.
        config: encoded `model_config`.
    """

    __slots__ = ("config", "metadata", "spec")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.metadata = dumps(model_metadata(spec))
        self.config = dumps(model_config(spec))
