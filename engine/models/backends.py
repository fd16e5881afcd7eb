"""Model backends: turn a `ModelSpec` into a `LoadedModel` that computes on one device.

Imports torch: only worker processes import this module.

Backends (``spec.backend``):

- ``torch``: ``source: file.py:factory``. ``factory()`` -- or ``factory(spec)`` when it takes a
  required positional argument -- returns an ``nn.Module``; it is put in eval mode and moved to the
  device. ``forward`` takes the inputs positionally. With ``prepack_linear`` on a CPU device its
  ``nn.Linear`` layers are packed for oneDNN (`engine.models.cpu_prepack`).
- ``torchscript``: ``source: model.pt``, loaded with ``torch.jit.load(file, map_location=device)``.
- ``python``: ``source: file.py:callable``, called with numpy arrays positionally; CPU only.

Every model returns a tensor (one output), a tuple/list in the spec's output order, or a dict keyed by
output name (extra keys are ignored); the python backend may return numpy arrays in the same shapes.
Outputs are checked against the spec (count, dtype, rank, fixed dims, batch dim): a mismatch, or an
exception from the model, fails only that batch, with a `ModelError`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.dtypes import KSERVE_TO_NUMPY
from engine.errors import InternalError, ModelError
from engine.models.spec import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

#: KServe datatype name -> torch dtype, derived from the numpy table so the two never disagree.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: torch.from_numpy(np.empty(0, dtype=dt)).dtype for name, dt in KSERVE_TO_NUMPY.items()
}
_module_ids = itertools.count()
_ALREADY_ON = contextlib.nullcontext()


def inference_mode() -> contextlib.AbstractContextManager[Any]:
    """torch's inference mode, or nothing when it is on already. Entering it costs ~10 us right
    after a batch, with the caches cold (measured, mlp at 32 rows on the 2-core machine), and the
    worker's executor and `LoadedModel.run` both entered it for every batch."""
    return _ALREADY_ON if torch.is_inference_mode_enabled() else torch.inference_mode()


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a KServe datatype name (``FP32`` -> ``torch.float32``)."""
    return TORCH_DTYPES[datatype]


class LoadedModel:
    """One model, loaded on one device, ready to compute batches.

    Attributes:
        spec: the model's spec.
        device: the torch device name it runs on (``cpu``, ``cuda:0``...).
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        fn: Callable[..., Any],
        numpy_io: bool = False,
        call: Callable[..., Any] | None = None,
        kernel_rows: Sequence[int] = (),
    ) -> None:
        self.spec = spec
        self.device = device
        self._fn = fn
        # batch sizes warmed at load besides the spec's: those packed layers build kernels for
        self._kernel_rows = tuple(kernel_rows)
        # what computes a batch: ``fn``, or a function that computes the same more cheaply
        # (`engine.models.cpu_prepack.chain_call`)
        self._call = call or fn
        # python backend: tensors become numpy arrays on the way in, and back on the way out.
        self._numpy_io = numpy_io
        self._dtypes = [torch_dtype(o.datatype) for o in spec.outputs]

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Compute one batch.

        Args:
            inputs: one tensor per spec input, in the spec's order, already on `device`, with the
                batch dim first when the model batches.

        Returns:
            One tensor per spec output, in the spec's order.

        Raises:
            ModelError: the model raised, or returned outputs its spec forbids.
        """
        spec = self.spec
        if len(inputs) != len(spec.inputs):
            raise InternalError(f"model {spec.name!r} takes {len(spec.inputs)} inputs, got {len(inputs)}")
        with inference_mode():
            try:
                args: list[Any] = [t.numpy() for t in inputs] if self._numpy_io else inputs
                raw = self._call(*args)
            except ModelError:
                raise
            except Exception as err:
                raise ModelError(f"model {spec.name!r} raised {type(err).__name__}: {err}") from err
            batch = inputs[0].shape[0] if spec.max_batch_size > 0 else None
            return [
                self._check(out, self._dtypes[i], value, batch)
                for i, (out, value) in enumerate(zip(spec.outputs, self._outputs(raw), strict=True))
            ]

    def dummy_inputs(self, batch: int = 1) -> list[torch.Tensor]:
        """Zero inputs of batch ``batch`` (ignored when the model does not batch), -1 dims as 1."""
        return [
            torch.zeros(shape, dtype=torch_dtype(t.datatype), device=self.device)
            for t, shape in zip(self.spec.inputs, _input_shapes(self.spec, batch, 1), strict=True)
        ]

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        """The batch sizes `warmup` runs: ``spec.warmup_batch_sizes``, and with packed linear
        layers every row bucket they compute at (`engine.models.cpu_prepack.bucket_sizes`)."""
        return tuple(sorted({*self.spec.warmup_batch_sizes, *self._kernel_rows}))

    def warmup(self) -> None:
        """Run one dummy batch per size of `warmup_sizes`, so that no request pays for lazy
        initialisation or for building the kernels of its batch size.

        Measured, built-in ``mlp`` on the 2-core machine: a batch size oneDNN has not seen costs
        1-2 ms more (its kernel is JIT-compiled); its 47 row buckets take ~0.1 s at load.
        """
        start = time.perf_counter()
        sizes = self.warmup_sizes
        for rows in sizes:
            self.run(self.dummy_inputs(rows))
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        if len(sizes) > 1:
            took = time.perf_counter() - start
            log.info("model %s: %d batch sizes warmed in %.2f s", self.spec.name, len(sizes), took)

    def _outputs(self, raw: Any) -> list[Any]:
        outs = self.spec.outputs
        if len(outs) == 1 and type(raw) is torch.Tensor:
            return [raw]  # the common answer, before the ABC checks below
        if isinstance(raw, Mapping):
            missing = [o.name for o in outs if o.name not in raw]
            if missing:
                raise ModelError(
                    f"model {self.spec.name!r} returned a dict without {', '.join(missing)}; "
                    f"it must hold every output: {self._names()}"
                )
            return [raw[o.name] for o in outs]
        if isinstance(raw, tuple | list):
            if len(raw) != len(outs):
                raise ModelError(
                    f"model {self.spec.name!r} returned {len(raw)} outputs; its config declares "
                    f"{len(outs)} ({self._names()})"
                )
            return list(raw)
        if len(outs) != 1:
            raise ModelError(
                f"model {self.spec.name!r} returned a single value; its config declares {len(outs)} "
                f"outputs ({self._names()}): return a tuple or a dict"
            )
        return [raw]

    def _names(self) -> str:
        return ", ".join(o.name for o in self.spec.outputs)

    def _check(self, out: TensorSpec, dtype: torch.dtype, value: Any, batch: int | None) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            if not self._numpy_io:
                raise ModelError(f"{self._where(out)}: expected a tensor, got {type(value).__name__}")
            array = np.asarray(value)
            # torch.from_numpy warns on read-only arrays (e.g. np.frombuffer over bytes).
            value = torch.from_numpy(array if array.flags.writeable else array.copy())
        if value.dtype != dtype:
            raise ModelError(
                f"{self._where(out)}: dtype {value.dtype} does not match the config's {out.datatype}"
            )
        want = (None, *out.shape) if batch is not None else out.shape
        got = tuple(value.shape)
        if len(got) != len(want) or any(w not in (-1, None, g) for w, g in zip(want, got, strict=True)):
            expected = ["batch" if w is None else w for w in want]
            raise ModelError(f"{self._where(out)}: shape {list(got)} does not match the config's {expected}")
        if batch is not None and got[0] != batch:
            raise ModelError(f"{self._where(out)}: batch dim {got[0]} but the batch holds {batch} rows")
        return value

    def _where(self, out: TensorSpec) -> str:
        return f"model {self.spec.name!r} output {out.name!r}"


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load ``spec`` on ``device`` (``cpu``, ``cuda:0``...) and warm it up.

    ``spec.num_threads > 0`` calls ``torch.set_num_threads``, which is process-wide: the worker runs
    every model with the setting of the last model loaded that asked for one.

    Raises:
        ModelError: the source cannot be loaded, is not what its backend expects, or warm-up failed.
    """
    if spec.num_threads > 0:
        torch.set_num_threads(spec.num_threads)
    try:
        if spec.backend == "torch":
            model = _load_torch(spec, device)
        elif spec.backend == "torchscript":
            model = _load_torchscript(spec, device)
        elif spec.backend == "python":
            model = _load_python(spec, device)
        else:
            raise ModelError(f"model {spec.name!r}: unknown backend {spec.backend!r}")
        model.warmup()
    except ModelError as err:
        raise ModelError(f"cannot load model {spec.name!r} on {device}: {err.message}") from err
    except Exception as err:
        raise ModelError(f"cannot load model {spec.name!r} on {device}: {type(err).__name__}: {err}") from err
    log.info("worker %s: model %s loaded (%s backend)", device, spec.name, spec.backend)
    return model


def _load_torch(spec: ModelSpec, device: str) -> LoadedModel:
    factory = _load_callable(spec)
    module = _call_factory(factory, spec)
    if not isinstance(module, nn.Module):
        raise ModelError(f"{spec.source} returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    module = module.to(device)
    if spec.prepack_linear and torch.device(device).type == "cpu":
        from engine.models import cpu_prepack

        samples = [_sample_inputs(spec, rows) for rows in _sample_rows(spec)]
        packed = cpu_prepack.prepack_linear(module, samples)
        log.info("worker %s: model %s: %d linear layers packed for oneDNN", device, spec.name, packed)
        if packed:
            # every row bucket up to the largest batch gets its kernels now, not under load
            buckets = cpu_prepack.bucket_sizes(spec.max_batch_size) if spec.max_batch_size > 0 else ()
            return LoadedModel(spec, device, module, call=cpu_prepack.chain_call(module), kernel_rows=buckets)
    return LoadedModel(spec, device, module)


def _input_shapes(spec: ModelSpec, rows: int, variable: int) -> list[tuple[int, ...]]:
    """Each input's full shape for a batch of ``rows`` (none when the model does not batch), its -1
    dims set to ``variable``."""
    shapes = []
    for t in spec.inputs:
        dims = tuple(variable if d == -1 else d for d in t.shape)
        shapes.append((rows, *dims) if spec.max_batch_size > 0 else dims)
    return shapes


def _sample_rows(spec: ModelSpec) -> tuple[int, ...]:
    # one row takes the layers' unpacked path; the others, the packed one
    if spec.max_batch_size == 0:
        return (0,)
    return tuple(sorted({1, min(3, spec.max_batch_size), min(17, spec.max_batch_size)}))


def _sample_inputs(spec: ModelSpec, rows: int) -> list[torch.Tensor]:
    """Fixed-seed inputs for ``spec`` with ``rows`` rows (ignored when it does not batch): random
    floats, zeros for other types (an index must stay in range), -1 dims as 3."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for t, shape in zip(spec.inputs, _input_shapes(spec, rows, 3), strict=True):
        dtype = torch_dtype(t.datatype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=dtype))
    return tensors


def _load_torchscript(spec: ModelSpec, device: str) -> LoadedModel:
    if spec.path is None:
        raise ModelError("a torchscript model needs a folder (spec.path)")
    with warnings.catch_warnings():
        # torch 2.9+ marks torch.jit deprecated; loading existing TorchScript files still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(spec.path / spec.source), map_location=device)
    module.eval()
    return LoadedModel(spec, device, module)


def _load_python(spec: ModelSpec, device: str) -> LoadedModel:
    if torch.device(device).type != "cpu":
        raise ModelError(f"the python backend runs on CPU only, not {device}")
    return LoadedModel(spec, device, _load_callable(spec), numpy_io=True)


def _load_callable(spec: ModelSpec) -> Callable[..., Any]:
    if spec.path is None:
        raise ModelError(f"source {spec.source!r} needs a model folder (spec.path)")
    file_name, _, attr = spec.source.rpartition(":")
    module = _import_file(spec, spec.path / file_name)
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ModelError(f"{file_name} has no callable {attr!r}")
    return obj


def _import_file(spec: ModelSpec, path: Path) -> ModuleType:
    # A unique name per load: two models may both ship a "model.py", and a reload must not reuse the
    # first module object.
    name = "engine_model_{}_{}".format(re.sub(r"\W", "_", spec.name), next(_module_ids))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running: dataclasses and typing look the module up in sys.modules.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _call_factory(factory: Callable[..., Any], spec: ModelSpec) -> Any:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return factory()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return factory(spec) if required else factory()
