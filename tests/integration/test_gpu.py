"""The CUDA path end to end: a worker on cuda:0 computes the built-in models (needs a GPU; marked gpu)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from servers.gateway_api import InferInput

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_worker_serves_builtin_models() -> None:
    config = EngineConfig(
        protocols=(), devices=("cuda:0",), frontend_arena_mb=64, worker_arena_mb=64, max_message_mb=8
    )

    async def scenario(engine: Engine) -> None:
        gw = engine.connect()
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, dtype=np.int32)
        with await gw.infer(
            "simple", [InferInput("INPUT0", "INT32", (1, 16), a), InferInput("INPUT1", "INT32", (1, 16), b)]
        ) as r:
            np.testing.assert_array_equal(r.outputs["OUTPUT0"], a + b)
            np.testing.assert_array_equal(r.outputs["OUTPUT1"], a - b)
        x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)

        async def one() -> np.ndarray:
            with await gw.infer("mlp", [InferInput("INPUT0", "FP32", (1, 256), x)]) as r:
                return r.outputs["OUTPUT0"].copy()

        outs = await asyncio.gather(*[one() for _ in range(64)])
        for out in outs[1:]:
            np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-4)
        stats = engine.status()["models"]["mlp"]
        assert stats["rows"] == 64 and stats["batches"] < 64

    with Engine(config) as engine:
        asyncio.run(scenario(engine))
