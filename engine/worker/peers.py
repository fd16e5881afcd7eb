"""What the worker keeps about each front-end slot: the pair's rings, its notifier, its input arena.

A `Peer` outlives the front-end's incarnations: the worker takes a new incarnation (generation)
in `engine.worker.core.WorkerCore.sync_peers`, dropping the input arena of the dead one; the
arena of the new one is attached on its first request.
"""

from __future__ import annotations

from engine.shm import frontend_arena_name
from ext.arena import Arena
from ext.notify import EventNotifier
from ext.ring import Ring
from ext.segment import KIND_ARENA, Segment


class Peer:
    """What the worker keeps about one front-end slot.

    Args:
        f: the front-end slot.
        request: the pair's request ring (front-end -> worker).
        response: the pair's response ring (worker -> front-end).
        notifier: wakes the front-end once a batch of answers is in its response ring.
    """

    __slots__ = ("acked", "arena", "backlog", "f", "notifier", "request", "response")

    def __init__(self, f: int, request: Ring, response: Ring, notifier: EventNotifier) -> None:
        self.f = f
        self.request = request
        self.response = response
        self.notifier = notifier
        self.acked = 0  # front-end generation taken; 0 = none yet
        self.arena: Arena | None = None
        # answers the full response ring could not take yet, in order (descriptor tuples)
        self.backlog: list[tuple[int, ...]] = []

    def input_arena(self, base: str) -> Arena:
        """The input arena of the incarnation taken, attached (read-only) on first use.

        Args:
            base: the engine's segment name base (`engine.shm.frontend_arena_name`).
        """
        if self.arena is None:
            seg = Segment.attach(frontend_arena_name(base, self.f, self.acked), KIND_ARENA, writable=False)
            self.arena = Arena.attach(seg)
        return self.arena

    def drop_arena(self) -> None:
        """Let go of the input arena of the incarnation taken (a new one is coming or none is)."""
        if self.arena is not None:
            self.arena.close()
            self.arena.segment.close()
            self.arena = None
