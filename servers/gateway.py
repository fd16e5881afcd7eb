"""Submit-and-await over shared memory: the `Gateway` every front-end process talks to the workers through.

`ShmGateway` lives in a front-end's asyncio loop. `infer()` validates a request against the model's
metadata before touching shared memory, writes the inputs into this front-end's arena (the one copy),
pushes a descriptor to a worker's ring and awaits the completion. Completions arrive on the
front-end's eventfd (registered with ``loop.add_reader``), signalled by workers at most once per
burst; outputs come back as read-only numpy views into the worker's arena, released when the
protocol has sent them.

Request checks live in `servers.gateway_requests`, response-region reading in
`servers.gateway_responses`, the records kept and handed out (`GatewayHandles`, `ShmResult`) in
`servers.gateway_records`; all are importable from here. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from engine.errors import (
    DeadlineExceeded,
    EngineError,
    InternalError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WorkerDied,
    from_wire,
)
from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_INFLIGHT,
    F_MODELS,
    F_REQUESTS,
    F_STATE,
    HEADER_BYTES,
    KIND_CANCEL,
    KIND_ERROR,
    KIND_RELEASE,
    KIND_REQUEST,
    KIND_RESPONSE,
    NO_REGION,
    PROC_UP,
    REQ_MAGIC,
    SERVER_READY,
    STAT_NAMES,
    TENSOR_DESC,
    frontend_arena_name,
    pack_region_head,
    region_layout,
    worker_arena_name,
)
from engine.stats import kserve_statistics, model_counters
from ext.arena import Arena
from ext.notify import EventNotifier, WakeWord
from ext.ring import DESC_DTYPE, Ring
from ext.segment import KIND_ARENA, KIND_CONTROL, Segment
from servers.deadlines import DeadlineHeap
from servers.gateway_api import InferInput
from servers.gateway_records import GatewayHandles, PendingRequest, ShmResult, WorkerLink
from servers.gateway_requests import InputChecks, output_mask
from servers.gateway_responses import ParsedOutput, parse_outputs

__all__ = ["DEADLINE_SLACK_S", "GatewayHandles", "ShmGateway", "ShmResult"]

log = logging.getLogger("servers.gateway")

#: How long after a request's deadline the front-end answers it itself when the worker has not.
DEADLINE_SLACK_S = 0.05
_DEADLINE_SLACK_NS = int(DEADLINE_SLACK_S * 1e9)
#: Request region plans (per model, output mask and input shapes) a front-end keeps at most.
MAX_REGION_PLANS = 256

#: a request region's total size, each input's data offset, and its header and descriptors
RegionPlan = tuple[int, list[int], bytes]


class ShmGateway:
    """The shared-memory implementation of `servers.gateway_api.Gateway` for front-end slot ``f``."""

    def __init__(self, handles: GatewayHandles) -> None:
        self.h = handles
        self.layout = handles.layout
        self.specs = {s.name: s for s in handles.specs}
        self.index = {s.name: i for i, s in enumerate(handles.specs)}
        # per model index: its input checks, prepared once (they run on every request)
        self._checks = [InputChecks(s) for s in handles.specs]
        #: (model, output mask, input shapes) -> a request region's size, data offsets and header
        #: bytes: requests of a model mostly come in a few shapes, and the header is the same for all
        self._regions: dict[tuple[object, ...], RegionPlan] = {}
        #: where this front-end publishes its in-flight counts on the board (once per submission):
        #: submissions for the workers' batching, client requests for status and drain
        self._inflight_at = handles.layout.frontend(handles.f, F_INFLIGHT)
        self._requests_at = handles.layout.frontend(handles.f, F_REQUESTS)
        self._control: Segment | None = None
        self._arena: Arena | None = None
        self._links: list[WorkerLink] = []
        self._pending: dict[int, PendingRequest] = {}
        #: client requests in flight, per model and in all (a submission may stand for several)
        self._inflight = [0] * len(handles.specs)
        self._requests = 0
        self._next_id = 1
        self._rr = 0
        self._buf = np.empty(256, dtype=DESC_DTYPE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier: EventNotifier | None = None
        self._closed = False
        #: when to answer each pending request with a deadline (by req_id), from `start` on
        self._deadlines: DeadlineHeap[int] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def control(self) -> Segment:
        """The attached control segment (after `start`)."""
        if self._control is None:
            raise RuntimeError("gateway not started")
        return self._control

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered (a coalesced group counts its requests)."""
        return self._requests

    def _publish_inflight(self) -> None:
        control = self._control
        if control is not None:
            control.store_u64(self._inflight_at, len(self._pending))
            control.store_u64(self._requests_at, self._requests)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Attach shared memory, take the pairs with every worker and listen for completions."""
        h = self.h
        self._loop = loop or asyncio.get_running_loop()
        pending = self._pending
        self._deadlines = DeadlineHeap(self._loop, self._expire, pending.__contains__, pending.__len__)
        control = Segment.attach(h.base, KIND_CONTROL)
        self._control = control
        arena_seg = Segment.attach(frontend_arena_name(h.base, h.f, h.gen), KIND_ARENA)
        self._arena = Arena.format(arena_seg, max_block=h.arena_max_block)
        self._links = [
            WorkerLink(
                w,
                Ring.attach(control, self.layout.request_ring(h.f, w)),
                Ring.attach(control, self.layout.response_ring(h.f, w)),
                WakeWord(control, self.layout.worker(w, 64)),
                board=(
                    self.layout.worker(w, F_GEN),
                    self.layout.worker(w, F_STATE),
                    self.layout.worker(w, F_MODELS),
                    self.layout.ack_w(w, h.f),
                ),
            )
            for w in range(self.layout.n_workers)
        ]
        self._notifier = EventNotifier(control, self.layout.frontend(h.f, 64), h.notifier_fd)
        self._sync_workers()
        self._await_worker_acks(5.0)
        self._loop.add_reader(h.notifier_fd, self._on_wake)
        self._notifier.arm()
        self._on_wake()

    def _await_worker_acks(self, timeout_s: float) -> None:
        # Blocking on purpose (process start-up): a worker takes a new front-end incarnation in its
        # next step; until then the pair carries nothing and requests would be refused.
        control = self.control
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            waiting = [
                link
                for link in self._links
                if self._worker_up(link.w)
                and control.load_u64(self.layout.ack_w(link.w, self.h.f)) != self.h.gen
            ]
            if not waiting:
                return
            for link in waiting:
                link.word.wake()
            time.sleep(0.001)

    def close(self) -> None:
        """Stop listening and fail what is still pending. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._deadlines is not None:
            self._deadlines.close()
        if self._loop is not None:
            self._loop.remove_reader(self.h.notifier_fd)
        for req_id in list(self._pending):
            self._fail(req_id, Unavailable("front-end shutting down"))
        self._publish_inflight()  # or the supervisor's drain waits its whole grace for them

    # ---- Gateway protocol --------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return list(self.specs)

    def model_spec(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise NotFound(f"unknown model {name!r}")
        return spec

    def is_live(self) -> bool:
        return not self._closed

    def is_ready(self) -> bool:
        return (
            not self._closed
            and self._board(0) & 0xFFFFFFFF == SERVER_READY
            and any(self._worker_up(link.w) for link in self._links)
        )

    def model_ready(self, name: str) -> bool:
        m = self.index.get(name)
        if m is None:
            raise NotFound(f"unknown model {name!r}")
        return self.is_ready() and any(self._serves(link.w, m) for link in self._links)

    def model_load_errors(self) -> dict[str, str]:
        errors = dict(self.h.repository_errors)
        control = self._control
        if control is not None:
            buf = control.buffer()
            for w in range(self.layout.n_workers):
                at = self.layout.text(w)
                n = control.load_u64(at)
                if n:
                    errors.update(orjson.loads(bytes(buf[at + 8 : at + 8 + n])))
        return errors

    async def infer(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        request_id: str = "",
    ) -> ShmResult:
        req_id, future = self._submit(model, inputs, outputs, deadline_ns)
        try:
            result = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # answered in the loop iteration that cancelled us: nobody will see this result
                future.result().release()
            else:
                # the client went away: let the worker drop the request instead of computing it
                self._cancel_at_worker(req_id)
            raise
        result.request_id = request_id
        return result

    def submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
        requests: int = 1,
    ) -> asyncio.Future[ShmResult]:
        return self._submit(model, inputs, outputs, deadline_ns, requests)[1]

    def admit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        *,
        outputs: Sequence[str] | None = None,
        deadline_ns: int | None = None,
    ) -> tuple[int, asyncio.Future[ShmResult]]:
        return self._submit(model, inputs, outputs, deadline_ns)

    def abandon(self, ticket: int) -> None:
        entry = self._pending.get(ticket)
        if entry is None:
            return  # already answered (or failed)
        if not entry.future.done():
            entry.future.cancel()  # its result, when one comes, is released by _take_responses
        self._cancel_at_worker(ticket)

    def _submit(
        self,
        model: str,
        inputs: Sequence[InferInput],
        outputs: Sequence[str] | None,
        deadline_ns: int | None,
        requests: int = 1,
    ) -> tuple[int, asyncio.Future[ShmResult]]:
        m = self.index.get(model)
        if m is None:
            raise NotFound(f"unknown model {model!r}")
        ordered = self._checks[m].check(inputs)
        mask = output_mask(self.h.specs[m], outputs) if outputs else 0
        if self._closed or self._board(0) & 0xFFFFFFFF != SERVER_READY:
            raise Unavailable("server is not ready (starting or draining)")
        if self._requests + requests > self.h.max_inflight_per_frontend:
            raise ResourceExhausted(
                f"this front-end has {self._requests} requests in flight (max_inflight_per_frontend); "
                "retry later"
            )
        if self._inflight[m] + requests > self.h.max_inflight_per_model:
            raise ResourceExhausted(
                f"model {model!r} has {self._inflight[m]} requests in flight on this front-end; retry later"
            )
        link = self._pick(m, model)
        arena = self._arena
        assert arena is not None
        key = (m, mask, *[entry[2] for entry in ordered])
        plan = self._regions.get(key)
        if plan is None:
            plan = self._plan_region(key, mask, ordered)
        total, offs, head = plan
        region = arena.try_alloc(total) if total <= arena.max_block else -1
        if region < 0:
            raise ResourceExhausted("front-end arena is full; retry later")
        try:
            arena.write(region, head)
            for j, (_, item, _, _) in enumerate(ordered):
                arena.write(region + offs[j], item.data)
        except BaseException:
            arena.free(region)
            raise
        req_id = self._next_id
        self._next_id += 1
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[ShmResult] = loop.create_future()
        if not link.request.push(
            KIND_REQUEST, m, req_id, region, total, deadline_ns or 0, requests, 0, 0, self.h.gen
        ):
            arena.free(region)
            raise ResourceExhausted("request ring to the worker is full; retry later")
        link.word.notify()
        self._pending[req_id] = PendingRequest(future, link, region, m, mask, requests)
        link.pending.add(req_id)
        self._inflight[m] += requests
        self._requests += requests
        self._publish_inflight()
        if deadline_ns and self._deadlines is not None:
            # A hung worker must not hold the answer past the deadline: answer here, a little after
            # the worker itself would have, and free the region when the worker finally reports back.
            self._deadlines.watch(deadline_ns + _DEADLINE_SLACK_NS, req_id)
        return req_id, future

    def _plan_region(
        self, key: tuple[object, ...], mask: int, ordered: list[tuple[int, InferInput, tuple[int, ...], int]]
    ) -> RegionPlan:
        """The region of a request of these checked inputs: its size, data offsets and header."""
        nbytes = [entry[3] for entry in ordered]
        total, offs = region_layout(nbytes)
        head = bytearray(HEADER_BYTES + TENSOR_DESC.size * len(ordered))
        pack_region_head(
            memoryview(head),
            REQ_MAGIC,
            0,
            mask,
            [(code, shape, offs[j], nbytes[j]) for j, (code, _, shape, _) in enumerate(ordered)],
        )
        plan = (total, offs, bytes(head))
        if len(self._regions) >= MAX_REGION_PLANS:
            self._regions.clear()  # a client cycling through shapes: start over rather than grow
        self._regions[key] = plan
        return plan

    def _expire(self, req_id: int) -> None:
        entry = self._pending.get(req_id)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(DeadlineExceeded("deadline exceeded: the worker did not answer"))
            self._cancel_at_worker(req_id)

    def _cancel_at_worker(self, req_id: int) -> None:
        entry = self._pending.get(req_id)
        if entry is None:
            return  # already answered
        # Best effort: when the ring is full the request is simply computed and its answer dropped.
        if entry.link.request.push(KIND_CANCEL, entry.model, req_id, 0, 0, 0, 0, 0, 0, self.h.gen):
            entry.link.word.notify()

    def statistics(self, model: str | None = None) -> list[dict[str, Any]]:
        names = [model] if model else list(self.specs)
        control = self._control
        out = []
        for name in names:
            m = self.index.get(name)
            if m is None:
                raise NotFound(f"unknown model {name!r}")
            if control is None:
                counters = dict.fromkeys(STAT_NAMES, 0)
            else:
                counters = model_counters(control, self.layout, m)
            out.append(kserve_statistics(self.specs[name], counters))
        return out

    # ---- request side ------------------------------------------------------------------------

    def _pick(self, m: int, model: str) -> WorkerLink:
        """The next worker, round robin, that is up, paired with this front-end and serves model ``m``."""
        control = self._control
        assert control is not None
        load = control.load_u64
        links = self._links
        n = len(links)
        gen = self.h.gen
        for k in range(n):
            link = links[(self._rr + k) % n]
            gen_at, state_at, models_at, ack_at = link.board
            if load(gen_at) != link.acked:
                self._sync_workers()
            if link.acked and load(ack_at) == gen and load(state_at) == PROC_UP and load(models_at) >> m & 1:
                self._rr = (self._rr + k + 1) % n
                return link
        raise Unavailable(f"no worker serving model {model!r} is up")

    # ---- board -------------------------------------------------------------------------------

    def _board(self, offset: int) -> int:
        control = self._control
        return control.load_u64(offset) if control is not None else 0

    def _worker_up(self, w: int) -> bool:
        return self._board(self.layout.worker(w, F_STATE)) == PROC_UP

    def _serves(self, w: int, m: int) -> bool:
        return self._worker_up(w) and bool(self._board(self.layout.worker(w, F_MODELS)) >> m & 1)

    def _sync_workers(self) -> None:
        """Take new worker incarnations: fail what the dead one held, reset the pair, acknowledge."""
        control = self._control
        assert control is not None
        for link in self._links:
            wgen = control.load_u64(self.layout.worker(link.w, F_GEN))
            if wgen == link.acked:
                continue
            for req_id in list(link.pending):
                self._fail(req_id, WorkerDied(f"worker {link.w} died before answering; retry"))
            link.request.reset()
            link.response.reset()
            link.releases.clear()
            link.out_arena = None
            link.acked = wgen
            control.store_u64(self.layout.ack_f(self.h.f, link.w), wgen)
            log.info("frontend slot %d: took worker %d generation %d", self.h.f, link.w, wgen)

    # ---- completion side ---------------------------------------------------------------------

    def _on_wake(self) -> None:
        notifier = self._notifier
        if notifier is None or self._closed:
            return
        while True:
            notifier.drain()
            self._sync_workers()
            for link in self._links:
                self._take_responses(link)
                self._flush_releases(link)
            self._publish_inflight()
            notifier.arm()
            # a completion pushed between our last pop and arm() signalled nobody: look again
            if not any(not link.response.is_empty() for link in self._links):
                return

    def _take_responses(self, link: WorkerLink) -> None:
        parsed: dict[int, list[ParsedOutput]] = {}
        while True:
            n = link.response.pop_into(self._buf)
            if not n:
                return
            for d in self._buf[:n].tolist():
                req_id, offset, length, _dl, row, rows, kind, _model, status, gen = d
                entry = self._pending.pop(req_id, None)
                if entry is None or entry.link is not link:
                    if entry is not None:
                        self._pending[req_id] = entry
                    if offset != NO_REGION and kind in (KIND_RESPONSE, KIND_ERROR):
                        self._release(link, offset, gen)
                    continue
                link.pending.discard(req_id)
                self._inflight[entry.model] -= entry.requests
                self._requests -= entry.requests
                arena = self._arena
                assert arena is not None
                arena.free(entry.region)
                try:
                    if kind == KIND_RESPONSE:
                        spec = self.h.specs[entry.model]
                        outs = parsed.get(offset)
                        if outs is None:
                            outs = parse_outputs(self._out_arena(link, gen), offset, length, spec)
                            parsed[offset] = outs
                        arrays = {}
                        for j, (name, arr, batched) in enumerate(outs):
                            if entry.outputs and not entry.outputs >> j & 1:
                                continue
                            arrays[name] = arr[row : row + rows] if batched else arr
                        result = ShmResult(self, link, offset, gen, spec.name, "", arrays)
                        if entry.future.done():  # the caller gave up (cancelled): hand it back now
                            result.release()
                        else:
                            entry.future.set_result(result)
                    else:
                        message = ""
                        if offset != NO_REGION and length:
                            message = (
                                self._out_arena(link, gen)
                                .view(offset, (length,))
                                .tobytes()
                                .decode(errors="replace")
                            )
                            self._release(link, offset, gen)
                        if not entry.future.done():
                            entry.future.set_exception(from_wire(status, message or "request failed"))
                except EngineError as err:
                    if not entry.future.done():
                        entry.future.set_exception(err)
                except Exception as exc:  # a malformed region from a worker: a bug, not the client's
                    log.exception("bad response region from worker %d", link.w)
                    if not entry.future.done():
                        entry.future.set_exception(InternalError(str(exc)))
            if n < len(self._buf):
                return

    def _out_arena(self, link: WorkerLink, gen: int) -> Arena:
        if link.out_arena is None or link.out_gen != gen:
            seg = Segment.attach(worker_arena_name(self.h.base, link.w, gen), KIND_ARENA, writable=False)
            link.out_arena = Arena.attach(seg)
            link.out_gen = gen
        return link.out_arena

    def _fail(self, req_id: int, err: EngineError) -> None:
        entry = self._pending.pop(req_id, None)
        if entry is None:
            return
        entry.link.pending.discard(req_id)
        self._inflight[entry.model] -= entry.requests
        self._requests -= entry.requests
        if self._arena is not None:
            self._arena.free(entry.region)
        if not entry.future.done():
            entry.future.set_exception(err)

    def _release(self, link: WorkerLink, offset: int, gen: int) -> None:
        if gen != link.acked:
            return  # that worker incarnation is gone, and its arena with it
        link.releases.append((offset, gen))
        self._flush_releases(link)

    def _flush_releases(self, link: WorkerLink) -> None:
        while link.releases:
            offset, gen = link.releases[0]
            if not link.request.push(KIND_RELEASE, 0, 0, offset, 0, 0, 0, 0, 0, gen):
                link.word.notify()  # full: let the worker catch up, the rest goes out on the next wake
                return
            link.releases.pop(0)
