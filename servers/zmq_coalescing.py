"""Request coalescing for the ZMQ front-end: small requests of one model, received in the same loop
iteration, go to the workers as one request of all their rows.

Why: at concurrency 64 a client's requests reach the front-end ~30 per read, and each one admitted on
its own pays the gateway (region, ring descriptor, future, completion, release) and the worker
(admission, batcher entry, answer descriptor) once. Those costs are per request, not per row: the
worker would have put the rows in one batch anyway. A group of K requests pays them once.

What may share a group (`group_key`): requests for the same batching model (``max_batch_size`` > 0),
with the same inputs (names, order, datatypes, shapes: so also the same rows each), the same
requested outputs, and deadlines within `MAX_DEADLINE_SPREAD_NS` of the first member's (or none); the group
has the earliest of them, so no member is computed after its own. So every member of a group would
be accepted or refused alone for the same reason, and a failure of the group (model error,
deadline, worker death) is each member's answer. The in-flight limits count a group's requests; a
group that would pass one is admitted request by request (`servers.zmq_server`).

A group holds at most ``max_batch_size`` rows and `MAX_GROUP_BYTES` of input; a request of more than
`MAX_MEMBER_BYTES` goes alone. A group that reaches the model's ``dynamic_batching.pipeline_rows``
(else ``max_batch_size``) goes at once, so that the worker computes it while the front-end reads
the rest; the others go when the loop iteration's reads are done.

The group's result is shared: each member's reply views its own rows
(`servers.zmq_protocol.encode_replies`), and the group's output region goes back to the worker when
every member's reply has been sent (`SharedResult`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from engine.models.spec import ModelSpec
from servers.gateway_api import InferInput, InferResult
from servers.zmq_protocol import Request

#: Inputs of one request (bytes) above which it is not coalesced: copying it into the group's buffer
#: would cost more than the per-request overheads the group saves.
MAX_MEMBER_BYTES = 64 * 1024
#: Input bytes of one group at most (the group is copied once into one buffer before the gateway's
#: arena write).
MAX_GROUP_BYTES = 1 << 20
#: How far apart the deadlines of one group's members may be. A client's timeouts are relative and
#: run from when it sent each request, so the same timeout gives deadlines microseconds apart.
MAX_DEADLINE_SPREAD_NS = 1_000_000


def group_key(request: Request, spec: ModelSpec) -> Hashable | None:
    """The key of the requests ``request`` may share a group with, or None when it goes alone
    (a model that does not batch, a request with no batch dimension, a large one)."""
    if spec.max_batch_size <= 0 or not request.inputs:
        return None
    shapes = []
    size = 0
    rows = -1
    for item in request.inputs:
        shape = item.shape
        if not shape:
            return None
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            return None  # the gateway refuses it; alone, so the refusal is its own
        shapes.append((item.name, item.datatype, shape))
        size += _nbytes(item.data)
    if not 0 < rows < spec.max_batch_size or size > MAX_MEMBER_BYTES:
        return None
    return (request.model, request.outputs, request.timeout_us > 0, tuple(shapes))


def _nbytes(data: Any) -> int:
    return data.nbytes if isinstance(data, memoryview | np.ndarray) else len(data)


class Member:
    """One request waiting in a group: where its reply goes, its absolute deadline (0: none) and its
    observer token."""

    __slots__ = ("deadline_ns", "peer", "request", "started")

    def __init__(self, peer: Any, request: Request, deadline_ns: int, started: Any) -> None:
        self.peer = peer
        self.request = request
        self.deadline_ns = deadline_ns
        self.started = started


class Group:
    """Requests of one `group_key` for model ``spec``, collected in one loop iteration."""

    __slots__ = (
        "deadline_ns",
        "max_rows",
        "member_bytes",
        "member_rows",
        "members",
        "nbytes",
        "rows",
        "target_rows",
    )

    def __init__(self, spec: ModelSpec) -> None:
        self.members: list[Member] = []
        self.rows = 0
        self.nbytes = 0
        #: rows and input bytes of each member: the same for all (the key holds their shapes)
        self.member_rows = 0
        self.member_bytes = 0
        #: the earliest of the members' deadlines (0: they have none)
        self.deadline_ns = 0
        self.max_rows = spec.max_batch_size
        #: rows at which the group goes to the worker without waiting for the iteration's end
        self.target_rows = spec.dynamic_batching.pipeline_rows or spec.max_batch_size

    def fits(self, deadline_ns: int) -> bool:
        """Whether one more request of the group's key, due at ``deadline_ns``, can join without the
        group passing its row or byte bound, or its deadlines spreading too far."""
        if not self.members:
            return True
        return (
            self.rows + self.member_rows <= self.max_rows
            and self.nbytes + self.member_bytes <= MAX_GROUP_BYTES
            and abs(deadline_ns - self.members[0].deadline_ns) <= MAX_DEADLINE_SPREAD_NS
        )

    @property
    def full(self) -> bool:
        return self.rows >= self.target_rows

    def add(self, member: Member) -> None:
        if member.deadline_ns and (not self.deadline_ns or member.deadline_ns < self.deadline_ns):
            self.deadline_ns = member.deadline_ns
        if not self.members:
            self.member_rows = member.request.inputs[0].shape[0]
            self.member_bytes = sum(_nbytes(item.data) for item in member.request.inputs)
        self.members.append(member)
        self.rows += self.member_rows
        self.nbytes += self.member_bytes

    def inputs(self) -> list[InferInput]:
        """The members' inputs stacked along the batch dimension (one copy of their bytes)."""
        first = self.members[0].request
        out = []
        for j, item in enumerate(first.inputs):
            data = b"".join([m.request.inputs[j].data for m in self.members])  # type: ignore[misc]
            out.append(InferInput(item.name, item.datatype, (self.rows, *item.shape[1:]), data))
        return out


class SharedResult:
    """A group's result, handed back to its gateway once each of ``shares`` holders has released."""

    __slots__ = ("_left", "_result")

    def __init__(self, result: InferResult, shares: int) -> None:
        self._result = result
        self._left = shares

    def release_one(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._result.release()
