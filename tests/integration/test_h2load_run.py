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
