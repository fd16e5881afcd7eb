"""Hand a file descriptor to a child started with the spawn start method.

multiprocessing's spawn launcher passes the descriptors registered through `reduction.DupFd` while it
pickles the child's arguments; the child gets its own number for the same open file.
"""

from __future__ import annotations

from multiprocessing import reduction
from typing import Any


class PassFd:
    """Pickles (parent to spawned child only) into the child's copy of ``fd``, as a plain int."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild, (reduction.DupFd(self.fd),))


def _rebuild(dup: Any) -> int:
    return int(dup.detach())
