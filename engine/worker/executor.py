"""Runs one batch of one model on the worker's device: gather inputs, compute, check outputs.

The gather is the only copy on the way in: a batch of one request is handed to the model as a
zero-copy tensor over shared memory; a larger batch is concatenated once (on CUDA into a pinned
staging buffer, then copied to the device without blocking on the worker's own stream).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from engine.errors import ModelError
from engine.models.backends import LoadedModel, inference_mode
from engine.models.spec import ModelSpec

log = logging.getLogger("engine.worker")

# Inputs are read-only views of another process's arena; models must not write to them, and the
# warning torch gives for every such array would cost more than the request.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class Executor:
    """Computes batches for the models loaded on one device."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staging: dict[tuple[str, int], torch.Tensor] = {}

    def _gather(self, spec: ModelSpec, j: int, parts: Sequence[np.ndarray], rows: int) -> torch.Tensor:
        if not self.cuda:
            if len(parts) == 1:
                return torch.from_numpy(parts[0])
            return torch.from_numpy(np.concatenate(parts, axis=0))
        shape = (rows, *parts[0].shape[1:]) if spec.max_batch_size > 0 else parts[0].shape
        key = (spec.name, j)
        buf = self._staging.get(key)
        need = int(np.prod(shape))
        if buf is None or buf.numel() < need or buf.dtype != torch.from_numpy(parts[0][:0]).dtype:
            buf = torch.empty(max(need, 1), dtype=torch.from_numpy(parts[0][:0]).dtype, pin_memory=True)
            self._staging[key] = buf
        staged = buf[:need].view(shape)
        if len(parts) == 1:
            staged.numpy()[...] = parts[0]
        else:
            np.concatenate(parts, axis=0, out=staged.numpy())
        return staged.to(self.device, non_blocking=True)

    def run(
        self, spec: ModelSpec, model: LoadedModel, inputs: Sequence[Sequence[np.ndarray]], rows: int
    ) -> list[np.ndarray]:
        """Compute one batch. ``inputs[j]`` holds input j of every request, in batch order.

        Returns the outputs as C-contiguous CPU arrays (batch dim first when the model batches).
        Raises ModelError for anything the model does wrong.
        """
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream), inference_mode():
                    tensors = [self._gather(spec, j, parts, rows) for j, parts in enumerate(inputs)]
                    outs = model.run(tensors)
                    host = [o.detach().to("cpu", non_blocking=False) for o in outs]
                self.stream.synchronize()
            else:
                with inference_mode():
                    tensors = [self._gather(spec, j, parts, rows) for j, parts in enumerate(inputs)]
                    host = [o.detach() for o in model.run(tensors)]
        except ModelError:
            raise
        except Exception as exc:  # the model's own failure: only this batch fails
            raise ModelError(f"model {spec.name!r} raised {type(exc).__name__}: {exc}") from exc
        return self._check(spec, host, rows)

    def _check(self, spec: ModelSpec, outs: list[torch.Tensor], rows: int) -> list[np.ndarray]:
        # LoadedModel.run already checked count, dtype, rank, fixed dims and batch size.
        result = []
        for tspec, out in zip(spec.outputs, outs, strict=True):
            arr = np.ascontiguousarray(out.numpy())
            if not spec.allow_nan and arr.dtype.kind == "f" and np.isnan(arr).any():
                raise ModelError(f"model {spec.name!r} output {tspec.name} holds NaN (allow_nan is false)")
            result.append(arr)
        return result
