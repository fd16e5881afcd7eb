"""Linear layers with their weights packed once for oneDNN, for models served on a CPU.

On CPU, ``nn.Linear`` goes through MKL's sgemm, which repacks the whole weight matrix into its kernel
layout on every call: for the built-in ``mlp`` (4 MiB of weights) at the batch sizes dynamic batching
forms (4-64 rows), packing was about a third of the GEMM's samples in a profile of the worker.
oneDNN's inner product takes a weight reordered once, at load, and fuses a following ReLU. Measured
on the 2-core machine (one thread, the two variants interleaved): 0.73-0.89x the time of
``nn.Linear`` from 2 to 64 rows, but 1.0-1.17x for a single row, where MKL takes its gemv path, so a
one-row call keeps ``F.linear``.

What it costs: oneDNN builds (JIT-compiles) a kernel for each new input shape: the first batch of
each size runs 1-2 ms slower (measured, mlp: 2.2 vs 0.6 ms at 2-10 rows, 9.4 vs 7.6 ms at 100-256),
and kernels are kept in oneDNN's per-process cache of 1,024. So the packed layers compute a batch
padded with zero rows to a bucket size (`bucket_rows`: exact up to 16 rows, then 8 sizes per
doubling, at most 12.5% more rows), and the model is warmed at load on every bucket up to its
``max_batch_size`` (`bucket_sizes`: 47 sizes for 256, ~0.1 s for ``mlp``; all 256 sizes took
~0.8 s). Measured, mlp in one process, 84 batches of 1-130 rows as dynamic batching forms them in
bursts, on a fresh model: 124-132 ms unpadded, 60 ms padded and warmed (58 ms with all 256 sizes
warmed: the padding costs ~3%). A model with more layers, or several models, no longer outgrow the
cache (two kernels per size for ``mlp``'s two layers). Each call also creates its primitive
descriptor (~35 us against ~10 us for ``F.linear`` on a tiny layer), which the packing repays from
a few rows up.

Opt-in per model (``prepack_linear: true`` in its ``model.yaml``): the packed copy doubles the memory
of the layers it packs (the original weights stay, for code that reads ``layer.weight``). Only
``nn.Linear`` itself is packed (not subclasses, whose ``forward`` may differ), float32 on CPU.
`prepack_linear` checks the packed model against the original on sample inputs and puts the original
layers back if they disagree or the packed one fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Batch size the weights are laid out for; oneDNN computes any batch size from the same layout.
_PACK_HINT = 64

#: Row counts up to this run as they are; above it, they are padded to one of 8 sizes per doubling.
EXACT_ROWS = 16


def bucket_rows(rows: int) -> int:
    """The row count a packed layer computes a batch of ``rows`` at: ``rows`` itself up to
    `EXACT_ROWS`, else the next multiple of 1/8 of the power of two below it (17 -> 18, 33 -> 36,
    100 -> 104, 129 -> 144): at most 12.5% more rows, and 8 kernels per doubling."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def bucket_sizes(max_rows: int) -> tuple[int, ...]:
    """Every row count `bucket_rows` gives for 2 to ``max_rows`` rows (one row takes ``F.linear``)."""
    return tuple(sorted({bucket_rows(rows) for rows in range(2, max_rows + 1)}))


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` (2-D, more than one row) with zero rows appended up to `bucket_rows` of its rows."""
    rows = x.shape[0]
    bucket = bucket_rows(rows)
    return x if bucket == rows else F.pad(x, (0, 0, 0, bucket - rows))


def available() -> bool:
    """Whether this torch build has the oneDNN ops the packed layer calls."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` (optionally followed by a ReLU) computed by oneDNN from weights packed once."""

    def __init__(self, linear: nn.Linear, relu: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.relu = relu
        self._attr = "relu" if relu else "none"
        with torch.no_grad():
            # a plain attribute, not a buffer: an opaque oneDNN tensor has no place in a state dict
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACK_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] or x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            # one row (MKL's gemv is as fast), or what oneDNN would refuse with a worse message
            out = F.linear(x, self.weight, self.bias)
            return F.relu(out) if self.relu else out
        # rows are independent: the padding rows' results are computed and dropped
        rows = x.shape[0] if x.dim() == 2 else -1
        src = _padded(x) if rows >= 0 else x
        out = torch.ops.mkldnn._linear_pointwise(src, self.packed, self.bias, self._attr, [], "")
        return out[:rows] if rows >= 0 else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, relu={self.relu}"
        )


def _packable(module: nn.Module) -> TypeGuard[nn.Linear]:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def _swap(module: nn.Module, undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Replace the packable linear layers under ``module``, recording each replaced child in ``undo``."""
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        if _packable(child):
            # inside a Sequential, a ReLU right after the layer is fused into it
            nxt = module._modules.get(names[i + 1]) if i + 1 < len(names) else None
            fuse = isinstance(module, nn.Sequential) and type(nxt) is nn.ReLU
            undo.append((module, name, child))
            module._modules[name] = PackedLinear(child, relu=fuse)
            if fuse:
                assert nxt is not None
                undo.append((module, names[i + 1], nxt))
                module._modules[names[i + 1]] = nn.Identity()
        elif not isinstance(child, PackedLinear):
            _swap(child, undo)


def prepack_linear(module: nn.Module, samples: Sequence[Sequence[torch.Tensor]]) -> int:
    """Pack the ``nn.Linear`` layers of ``module`` (in place) and return how many were packed.

    Args:
        module: a CPU model in eval mode.
        samples: input lists (``module(*inputs)``) to compare the packed model with the original on.

    Returns:
        The number of layers packed: 0 when oneDNN is missing, nothing was packable, or the packed
        model disagreed with the original or failed on a sample (then the original layers are back).
    """
    if not available():
        log.warning("prepack_linear: this torch build has no oneDNN linear ops; layers left as they are")
        return 0
    with torch.inference_mode():
        expected = [_flat(module(*s)) for s in samples]
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    _swap(module, undo)
    packed = sum(type(child) is nn.Linear for _, _, child in undo)  # the others are fused ReLUs
    if not packed:
        return 0
    try:
        with torch.inference_mode():
            got = [_flat(module(*s)) for s in samples]
        problem = next(
            (
                f"sample {i} output {j} differs"
                for i, (want, have) in enumerate(zip(expected, got, strict=True))
                for j, (a, b) in enumerate(zip(want, have, strict=True))
                if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
            ),
            None,
        )
    except Exception as err:  # the model's own code may not accept the packed layer
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        for parent, name, child in reversed(undo):
            parent._modules[name] = child
        log.warning("prepack_linear: the packed model does not match the original (%s); not packed", problem)
        return 0
    return packed


def _flat(raw: object) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple/list or a dict of them), in order."""
    if isinstance(raw, torch.Tensor):
        return [raw.detach().clone()]
    if isinstance(raw, dict):
        return [t for v in raw.values() for t in _flat(v)]
    if isinstance(raw, tuple | list):
        return [t for v in raw for t in _flat(v)]
    return []


def chain_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a packed ``nn.Sequential`` of `PackedLinear` layers (and the ``nn.Identity`` a fused ReLU
    leaves), a function computing what ``module(x)`` computes, the same oneDNN calls in the same
    order, without ``nn.Module``'s call machinery around each layer: ~25 us per batch right after
    the previous one, with the caches cold (measured, mlp at 32 rows: 479 against 503 us, calls of
    the two interleaved). None for anything else, or when a hook is registered at load (the chain
    would skip it; hooks registered later are not seen).

    Inputs the packed path does not take (one row, another dtype, another width) go to ``module``.
    """
    if type(module) is not nn.Sequential or _hooked(module):
        return None
    layers: list[PackedLinear] = []
    for child in module:
        if type(child) is nn.Identity and not _hooked(child):
            continue
        if type(child) is not PackedLinear or _hooked(child):
            return None
        if layers and layers[-1].out_features != child.in_features:
            return None  # a model that cannot run: let nn.Module say why
        layers.append(child)
    if not layers:
        return None
    steps = [(layer.packed, layer.bias, layer._attr) for layer in layers]
    width = layers[0].in_features
    linear = torch.ops.mkldnn._linear_pointwise.default

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] or x.dtype != torch.float32 or x.shape[-1] != width:
            return module(x)
        # padded once for the whole chain, to the bucket each layer would pad to alone: the chain
        # and the module run the same kernels and answer the same, bit for bit
        rows = x.shape[0] if x.dim() == 2 else -1
        if rows >= 0:
            x = _padded(x)
        for packed, bias, attr in steps:
            x = linear(x, packed, bias, attr, [], "")
        return x[:rows] if rows >= 0 else x

    return call


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
    )
