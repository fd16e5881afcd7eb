"""pytest-benchmark of one engine round trip: embedded gateway -> worker process -> gateway, over shm.

The engine (built-in models, one CPU worker) starts once per session; each round is one ``identity``
request of FP32 [1, 256] whose output is checked and released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from bench.engine_rtt import MODEL, bench_config, identity_input, new_loop
from engine.engine import Engine


@pytest.fixture(scope="session")
def engine_round_trip() -> Iterator[Callable[[], np.ndarray]]:
    """A callable doing one round trip (returning a copy of the output) on a session-wide engine."""
    loop = new_loop()
    engine = Engine(bench_config(), embedded_frontends=1)
    try:
        engine.__enter__()  # stops what it started when it fails
        gateway = engine.connect(loop)
        inputs = identity_input()

        async def one() -> np.ndarray:
            with await gateway.infer(MODEL, inputs) as result:
                return np.array(result.outputs["OUTPUT0"])

        yield lambda: loop.run_until_complete(asyncio.wait_for(one(), 30.0))
    finally:
        engine.close()
        loop.close()


def test_engine_round_trip(benchmark: Any, engine_round_trip: Callable[[], np.ndarray]) -> None:
    out = benchmark(engine_round_trip)
    np.testing.assert_array_equal(out, np.asarray(identity_input()[0].data))
