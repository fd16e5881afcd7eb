"""pytest-benchmark of the built-in ``mlp``'s forward in this process: as torch runs it, and with its
Linear layers packed for oneDNN (``prepack_linear``, what the engine's CPU worker loads), at the batch
sizes dynamic batching forms. One torch thread, as a worker on a shared machine runs it.

Compare the two variants of one size with ``--benchmark-group-by=param:rows``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine.models import builtin_repository, cpu_prepack
from engine.models.backends import LoadedModel, load_model
from engine.models.repository import load_repository


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlp_models() -> dict[str, LoadedModel]:
    spec = load_repository(builtin_repository()).specs["mlp"]
    return {
        "plain": load_model(dataclasses.replace(spec, prepack_linear=False), "cpu"),
        "packed": load_model(spec, "cpu"),
    }


@pytest.mark.parametrize("rows", [1, 8, 22, 64])
@pytest.mark.parametrize("variant", ["plain", "packed"])
def test_mlp_forward(
    benchmark: Any, bench_quick_mode: bool, mlp_models: dict[str, LoadedModel], variant: str, rows: int
) -> None:
    if variant == "packed" and not cpu_prepack.available():
        pytest.skip("this torch build has no oneDNN")
    model = mlp_models[variant]
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))

    def forward() -> torch.Tensor:
        (out,) = model.run([x])
        return out

    if bench_quick_mode:
        out = benchmark.pedantic(forward, rounds=3, iterations=2, warmup_rounds=1)
    else:
        out = benchmark(forward)
    assert out.shape == (rows, 256)
    (reference,) = mlp_models["plain"].run([x])
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
