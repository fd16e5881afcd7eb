"""Built-in model `simple`: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32, dims [16])."""

from __future__ import annotations

import torch
from torch import nn


class AddSub(nn.Module):
    """Triton's `simple` example as a torch module, so it runs on any device."""

    def forward(self, input0: torch.Tensor, input1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return input0 + input1, input0 - input1


def build() -> nn.Module:
    """The model factory named by `model.yaml`."""
    return AddSub()
