"""Writes coalesced per loop iteration, shared by the connection protocols of the gRPC (`grpc_h2`)
and ZMQ (`zmq_server`) front-ends."""

from __future__ import annotations

import asyncio


class CoalescedWrites:
    """Every answer finished in one loop iteration goes out in one write: `_schedule_flush` asks for
    the subclass's `_write_now` once, at the end of the iteration, however many answers asked."""

    loop: asyncio.AbstractEventLoop
    _flush_scheduled = False

    def _write_now(self) -> None:
        raise NotImplementedError

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_now()
