"""`python -m bench h2load` against a launched engine and the echo floor (where h2load is installed:
Debian's nghttp2-client), every answer checked by the engine's own counters."""

from __future__ import annotations

import shutil

import pytest

from bench import h2load


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_a_short_run_against_the_engine_and_the_echo_floor() -> None:
    results = h2load.run(["engine", "echo"], [8], 300)
    assert [(r["server"], r["streams"]) for r in results] == [("engine", 8), ("echo", 8)]
    for result in results:
        assert h2load._complete(result), result
        assert result["done"] == 300


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_bursts_against_the_engine() -> None:
    (result,) = h2load.run(["engine"], [], 0, burst=40, rounds=3)
    assert (result["burst"], result["rounds"], result["requests"], result["done"]) == (40, 3, 120, 120)
    assert h2load._complete(result), result
    assert len(result["round_p95_ms"]) == 3 and all(p > 0 for p in result["round_p95_ms"])
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["max_ms"] + 1e-6
    assert "times_ms" not in result
