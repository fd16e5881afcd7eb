"""Built-in model `mlp`: Linear 256->2048, ReLU, Linear 2048->256, weights from a fixed seed."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init

SEED = 0
IN_FEATURES = 256
HIDDEN = 2048


def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
    # skip_init leaves the weights uninitialised: nn.Linear's own init would draw from the global
    # RNG, which a model load must not disturb. Same U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch.
    layer = skip_init(nn.Linear, fan_in, fan_out)
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def build() -> nn.Module:
    """The model factory named by `model.yaml`: the same weights on every load and every machine."""
    generator = torch.Generator().manual_seed(SEED)
    return nn.Sequential(
        _linear(IN_FEATURES, HIDDEN, generator),
        nn.ReLU(),
        _linear(HIDDEN, IN_FEATURES, generator),
    )
