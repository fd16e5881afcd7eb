"""What the shared-memory gateway is handed, keeps and hands out: `GatewayHandles` (from the
supervisor), one `WorkerLink` per worker, one `PendingRequest` per request in flight, and the
`ShmResult` that `servers.gateway.ShmGateway.infer` returns.

Plain slotted records; the logic that moves them along lives in `servers.gateway`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.models.spec import ModelSpec
from engine.shm import BoardLayout
from ext.arena import Arena
from ext.notify import WakeWord
from ext.ring import Ring

if TYPE_CHECKING:
    from servers.gateway import ShmGateway


@dataclass(frozen=True)
class GatewayHandles:
    """What a front-end process needs to attach its gateway (handed over by the supervisor)."""

    base: str
    layout: BoardLayout
    f: int
    gen: int
    specs: tuple[ModelSpec, ...]
    repository_errors: tuple[tuple[str, str], ...]
    notifier_fd: int
    arena_max_block: int
    max_inflight_per_model: int
    max_inflight_per_frontend: int
    worker_devices: tuple[str, ...]


class WorkerLink:
    """This front-end's side of one (front-end, worker) pair."""

    __slots__ = (
        "acked", "board", "out_arena", "out_gen", "pending", "releases", "request", "response", "w", "word",
    )  # fmt: skip

    def __init__(
        self, w: int, request: Ring, response: Ring, word: WakeWord, board: tuple[int, int, int, int]
    ) -> None:
        self.w = w
        #: control-segment offsets read per request: the worker's generation, state and model mask,
        #: and the front-end generation it has taken
        self.board = board
        self.request = request
        self.response = response
        self.word = word
        self.acked = 0
        self.out_arena: Arena | None = None
        self.out_gen = 0
        self.pending: set[int] = set()
        self.releases: list[tuple[int, int]] = []


class PendingRequest:
    """One admitted request awaiting its completion: the caller's future, where it went and what it holds."""

    __slots__ = ("future", "link", "model", "outputs", "region", "requests")

    def __init__(
        self,
        future: asyncio.Future[Any],
        link: WorkerLink,
        region: int,
        model: int,
        outputs: int,
        requests: int = 1,
    ) -> None:
        self.future = future
        self.link = link
        self.region = region
        self.model = model
        self.outputs = outputs
        #: client requests it stands for (a ZMQ front-end's coalesced group)
        self.requests = requests


class ShmResult:
    """Outputs of one request as read-only views into a worker's arena; `release()` hands them back."""

    __slots__ = ("_gateway", "_gen", "_link", "_offset", "model", "outputs", "request_id")

    def __init__(
        self,
        gateway: ShmGateway,
        link: WorkerLink,
        offset: int,
        gen: int,
        model: str,
        request_id: str,
        outputs: dict[str, np.ndarray],
    ) -> None:
        self._gateway: ShmGateway | None = gateway
        self._link = link
        self._offset = offset
        self._gen = gen
        self.model = model
        self.request_id = request_id
        self.outputs = outputs

    def release(self) -> None:
        """Give the output region back to the worker. Safe to call twice."""
        gw, self._gateway = self._gateway, None
        if gw is not None:
            self.outputs = {}
            gw._release(self._link, self._offset, self._gen)

    def __enter__(self) -> ShmResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
