"""`servers.held_writes.HeldWrites`: releases of zero-copy writes, run once the transport is done."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvloop

from servers.held_writes import HeldWrites, run_releases


class Transport:
    """What `HeldWrites` asks of a transport: how much it still holds."""

    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


def test_releases_run_at_once_when_the_kernel_took_everything() -> None:
    async def main() -> None:
        transport = Transport()
        held = HeldWrites(asyncio.get_running_loop(), lambda: transport, "t")
        log: list[str] = []
        batch = [lambda: log.append("a"), lambda: log.append("b")]
        held.written(batch)
        assert log == ["a", "b"] and batch == [] and len(held) == 0

    uvloop.run(main())


def test_releases_wait_until_the_write_buffer_has_drained() -> None:
    async def main() -> None:
        transport = Transport()
        transport.buffered = 1000
        held = HeldWrites(asyncio.get_running_loop(), lambda: transport, "t")
        log: list[str] = []
        held.written([lambda: log.append("a")])
        held.written([lambda: log.append("b")])
        await asyncio.sleep(0.05)  # several looks, backing off
        assert log == [] and len(held) == 2
        transport.buffered = 0
        for _ in range(100):
            await asyncio.sleep(0.005)
            if log:
                break
        assert log == ["a", "b"] and len(held) == 0

    uvloop.run(main())


def test_a_lost_connection_releases_everything_held_and_stops_looking() -> None:
    async def main() -> None:
        transport: Transport | None = Transport()
        assert transport is not None
        transport.buffered = 1
        held = HeldWrites(asyncio.get_running_loop(), lambda: transport, "t")
        log: list[str] = []
        held.written([lambda: log.append("a")])
        held.release_all()
        assert log == ["a"] and len(held) == 0
        await asyncio.sleep(0.03)  # no timer left to run anything twice
        assert log == ["a"]

    uvloop.run(main())


def test_a_failing_release_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    releases = [boom, lambda: log.append("b")]
    with caplog.at_level(logging.ERROR, logger="servers.held_writes"):
        run_releases(releases, "front-end x")
    assert log == ["b"] and releases == []
    assert "front-end x: releasing a result failed" in caplog.text
