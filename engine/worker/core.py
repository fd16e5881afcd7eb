"""The worker's logic as a steppable object: drain request rings, batch per model, compute, answer.

`WorkerCore` owns no process concerns (signals, titles, heartbeats thread): `engine.worker.main`
wraps it. One `step()` waits for work (a short spin, then a futex sleep), takes every descriptor
the front-ends have pushed, answers expired requests, computes the batches that are due and posts
the completions, waking each front-end at most once per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.dtypes import CODE_TO_DTYPE, DTYPE_CODES, kserve_name
from engine.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidArgument,
    ModelError,
    ResourceExhausted,
    Unavailable,
)
from engine.metrics import NO_BATCH_METRICS, BatchObserver
from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_INFLIGHT,
    FLAG_BATCHED,
    HEADER_BYTES,
    KIND_CANCEL,
    KIND_ERROR,
    KIND_RELEASE,
    KIND_REQUEST,
    KIND_RESPONSE,
    NO_REGION,
    REGION_HEADER,
    REQ_MAGIC,
    RES_MAGIC,
    STAT_INDEX,
    STAT_NAMES,
    TENSOR_DESC,
    TENSOR_DESC_DTYPE,
    BoardLayout,
    frontend_arena_name,
    pack_region_head,
    region_layout,
)
from engine.worker.batcher import Batcher
from engine.worker.breaker import CLOSED, STATE_NAMES, CircuitBreaker
from ext.arena import Arena
from ext.notify import EventNotifier, WakeWord, wait_rings
from ext.ring import DESC_DTYPE, Ring
from ext.segment import KIND_ARENA, Segment

log = logging.getLogger("engine.worker")

#: A lone request runs at once (when nothing else admitted is on its way) if requests of its model
#: arrive at least this many batch computations apart. Measured on 2 cores, mlp: a closed loop of one
#: client arrives ~2.5-3.5 computations apart, 64 clients under 1.
SPARSE_COMPUTE_RATIO = 2.0
#: Longest a worker holding a batch that waits for companions sleeps without taking new arrivals.
DOZE_MAX_S = 0.002

#: computes one batch: (spec, model index, inputs[j][i], rows) -> outputs
RunBatch = Callable[[ModelSpec, int, Sequence[Sequence[np.ndarray]], int], list[np.ndarray]]


@dataclass(slots=True)
class Pending:
    """One admitted request waiting in a batcher."""

    f: int
    fgen: int
    req_id: int
    model: int
    rows: int
    group: Hashable
    deadline_ns: int
    arrival_ns: int
    output_mask: int
    inputs: list[np.ndarray] = field(default_factory=list)


@dataclass(slots=True)
class _Region:
    remaining: int
    holders: dict[int, int]  # front-end index -> requests of the batch it still has to release


class _Peer:
    """What the worker keeps about one front-end slot."""

    __slots__ = ("acked", "arena", "backlog", "f", "notifier", "request", "response")

    def __init__(self, f: int, request: Ring, response: Ring, notifier: EventNotifier) -> None:
        self.f = f
        self.request = request
        self.response = response
        self.notifier = notifier
        self.acked = 0  # front-end generation taken; 0 = none yet
        self.arena: Arena | None = None
        self.backlog: list[tuple[int, ...]] = []


class WorkerCore:
    """Steppable worker logic for worker slot ``w`` of the board."""

    #: told about every computed batch (queue and compute time histograms); the process shell sets it
    observer: BatchObserver = NO_BATCH_METRICS

    def __init__(
        self,
        control: Segment,
        layout: BoardLayout,
        w: int,
        gen: int,
        base: str,
        specs: Sequence[ModelSpec],
        output_arena: Arena,
        notifier_fds: Sequence[int],
        run_batch: RunBatch,
        *,
        spin_s: float = 50e-6,
        clock: Callable[[], int] = time.monotonic_ns,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 5.0,
    ) -> None:
        self.control = control
        self.layout = layout
        self.w = w
        self.gen = gen
        self.base = base
        self.specs = list(specs)
        self.arena = output_arena
        self.run_batch = run_batch
        self.spin_s = spin_s
        self.clock = clock
        self.word = WakeWord(control, layout.worker(w, 64))
        self.peers = [
            _Peer(
                f,
                Ring.attach(control, layout.request_ring(f, w)),
                Ring.attach(control, layout.response_ring(f, w)),
                EventNotifier(control, layout.frontend(f, 64), notifier_fds[f]),
            )
            for f in range(layout.n_frontends)
        ]
        self.batchers: list[Batcher[Pending]] = [
            Batcher(
                s.max_batch_size,
                s.dynamic_batching.max_queue_delay_us * 1000,
                s.dynamic_batching.preferred_batch_sizes,
            )
            for s in self.specs
        ]
        self.loaded: set[int] = set()
        self._inflight_at = [layout.frontend(f, F_INFLIGHT) for f in range(layout.n_frontends)]
        # the board offsets of this worker's counters, computed once (they are on the request path)
        self._stat_base = [layout.stat(w, m, STAT_NAMES[0]) for m in range(len(self.specs))]
        self.breakers = [CircuitBreaker(breaker_failures, int(breaker_cooldown_s * 1e9)) for _ in self.specs]
        # (front-end, request id) the front-end gave up on; checked when their batch forms
        self._cancelled: set[tuple[int, int]] = set()
        # Per model, moving averages of the gap between arrivals and of a batch's compute time. When
        # requests come further apart than a batch takes (or than the batching delay), the device would
        # idle while a request waits for companions, so a lone request runs at once.
        self._gap_ns = [0.0] * len(self.specs)
        self._compute_ns = [0.0] * len(self.specs)
        self._last_arrival = [0] * len(self.specs)
        self.regions: dict[int, _Region] = {}
        self._buf = np.empty(256, dtype=DESC_DTYPE)
        self._active: list[_Peer] = []
        self._to_wake: set[int] = set()

    # ---- peers --------------------------------------------------------------------------------

    def sync_peers(self) -> None:
        """Take new front-end incarnations: drop what the dead one left, reset the pair, acknowledge."""
        active = []
        for peer in self.peers:
            fgen = self.control.load_u64(self.layout.frontend(peer.f, F_GEN))
            if fgen != peer.acked:
                self._forget_frontend(peer)
                if fgen:
                    peer.request.reset()
                    peer.response.reset()
                peer.acked = fgen
                self.control.store_u64(self.layout.ack_w(self.w, peer.f), fgen)
            if peer.acked and self.control.load_u64(self.layout.ack_f(peer.f, self.w)) == self.gen:
                active.append(peer)
        self._active = active

    def _forget_frontend(self, peer: _Peer) -> None:
        for batcher in self.batchers:
            if len(batcher):
                # requests of the dead incarnation: nobody waits for them any more
                kept = [p for p in _drain(batcher, self.clock()) if p.f != peer.f]
                for p in kept:
                    batcher.add(p)
        for off in list(self.regions):
            region = self.regions[off]
            held = region.holders.pop(peer.f, 0)
            if held:
                region.remaining -= held
                if region.remaining <= 0:
                    del self.regions[off]
                    self.arena.free(off)
        peer.backlog.clear()
        if peer.arena is not None:
            peer.arena.close()
            peer.arena.segment.close()
            peer.arena = None

    def _peer_arena(self, peer: _Peer) -> Arena:
        if peer.arena is None:
            seg = Segment.attach(
                frontend_arena_name(self.base, peer.f, peer.acked), KIND_ARENA, writable=False
            )
            peer.arena = Arena.attach(seg)
        return peer.arena

    # ---- one step ------------------------------------------------------------------------------

    def step(self, max_wait_s: float = 0.1) -> int:
        """Wait for work (at most ``max_wait_s`` or until the next batch is due), then do it.

        Returns the number of descriptors taken from the rings.
        """
        self.sync_peers()
        wait = max_wait_s
        wake_at = self._next_wakeup()
        if wake_at is not None:
            wait = max(0.0, min(wait, (wake_at - self.clock()) / 1e9))
        if wait > 0:
            if wake_at is not None and self._queued_total() and self._nothing_on_the_way():
                # A batch is waiting for companions and every admitted request is here: new
                # arrivals can join it when the wait ends, so doze deaf to them instead of waking
                # (and making each front-end pay a futex wake) per arrival. Capped, so other
                # models' requests, cancels and releases wait no longer than this for their turn.
                self.word.doze(min(wait, DOZE_MAX_S))
            else:
                wait_rings(self.word, [p.request for p in self._active], self.spin_s, wait)
        taken = 0
        for peer in self._active:
            taken += self._drain(peer)
        self._compute_due()
        self._flush()
        if self._cancelled and not any(len(b) for b in self.batchers):
            # requests are pushed before their cancels: with every queue empty, what is left were
            # cancels of requests already answered
            self._cancelled.clear()
        return taken

    def _next_wakeup(self) -> int | None:
        times = [t for b in self.batchers if (t := b.next_wakeup_ns()) is not None]
        return min(times) if times else None

    def _drain(self, peer: _Peer) -> int:
        total = 0
        while True:
            n = peer.request.pop_into(self._buf)
            if not n:
                return total
            total += n
            now = self.clock()
            for d in self._buf[:n].tolist():
                # tuple order follows DESC_DTYPE
                req_id, offset, length, deadline, _aux, _aux2, kind, model, _status, gen = d
                if kind == KIND_REQUEST:
                    self._admit(peer, req_id, offset, length, deadline, model, gen, now)
                elif kind == KIND_RELEASE:
                    self._release(peer.f, offset, gen)
                elif kind == KIND_CANCEL:
                    self._cancelled.add((peer.f, req_id))
                else:
                    log.warning(
                        "worker %s: unknown descriptor kind %d from frontend %d", self.w, kind, peer.f
                    )
            if n < len(self._buf):
                return total

    def _admit(
        self,
        peer: _Peer,
        req_id: int,
        offset: int,
        length: int,
        deadline: int,
        model: int,
        gen: int,
        now: int,
    ) -> None:
        try:
            if gen != peer.acked:
                return  # a stale descriptor of a dead incarnation
            if model >= len(self.specs) or model not in self.loaded:
                raise InvalidArgument(f"model index {model} is not loaded on this worker")
            spec = self.specs[model]
            if deadline and deadline <= now:
                raise DeadlineExceeded("deadline exceeded before the request was computed")
            breaker = self.breakers[model]
            if not breaker.allow(now):
                raise self._breaker_error(model, now)
            pending = self._parse(peer, spec, req_id, offset, length, deadline, model, now)
        except EngineError as err:
            self._respond_error(peer.f, req_id, model, err)
            return
        except (IndexError, ValueError) as err:
            self._respond_error(peer.f, req_id, model, InvalidArgument(f"malformed request region: {err}"))
            return
        last = self._last_arrival[model]
        self._last_arrival[model] = now
        if last:
            self._gap_ns[model] = 0.75 * self._gap_ns[model] + 0.25 * (now - last)
        self.batchers[model].add(pending)

    def _parse(
        self,
        peer: _Peer,
        spec: ModelSpec,
        req_id: int,
        offset: int,
        length: int,
        deadline: int,
        model: int,
        now: int,
    ) -> Pending:
        arena = self._peer_arena(peer)
        magic, n, _flags, mask, _ = REGION_HEADER.unpack_from(arena.view(offset, HEADER_BYTES).data)
        if magic != REQ_MAGIC or n != len(spec.inputs):
            raise InvalidArgument(f"bad request region (magic {magic:#x}, {n} inputs)")
        if HEADER_BYTES + n * TENSOR_DESC_DTYPE.itemsize > length:
            raise InvalidArgument("request region shorter than its header")
        descs = arena.view(offset + HEADER_BYTES, (n,), TENSOR_DESC_DTYPE)
        inputs = []
        rows = 1
        dims_key: list[tuple[int, ...]] = []
        for j, tspec in enumerate(spec.inputs):
            code, ndim, _p0, _p1, d_off, nbytes, dims = descs[j].tolist()
            if CODE_TO_DTYPE.get(code) != tspec.datatype or not 0 <= ndim <= 8:
                raise InvalidArgument(f"input {tspec.name}: bad dtype code {code} or rank {ndim}")
            shape = tuple(dims[:ndim])
            if d_off + nbytes > length:
                raise InvalidArgument(f"input {tspec.name}: data runs past the request region")
            arr = arena.view(offset + d_off, shape, tspec.dtype)
            if arr.nbytes != nbytes:
                raise InvalidArgument(f"input {tspec.name}: {nbytes} bytes for shape {list(shape)}")
            inputs.append(arr)
            if spec.max_batch_size > 0:
                if ndim == 0:
                    raise InvalidArgument(f"input {tspec.name}: a batching model needs a batch dimension")
                if j == 0:
                    rows = shape[0]
                elif shape[0] != rows:
                    raise InvalidArgument("inputs disagree on the batch size")
                dims_key.append(shape[1:])
            else:
                dims_key.append(shape)
        if spec.max_batch_size > 0 and not 1 <= rows <= spec.max_batch_size:
            raise InvalidArgument(f"batch of {rows} rows exceeds max_batch_size {spec.max_batch_size}")
        return Pending(
            f=peer.f,
            fgen=peer.acked,
            req_id=req_id,
            model=model,
            rows=rows if spec.max_batch_size > 0 else 1,
            group=tuple(dims_key),
            deadline_ns=deadline,
            arrival_ns=now,
            output_mask=mask,
            inputs=inputs,
        )

    def _release(self, f: int, offset: int, gen: int) -> None:
        if gen != self.gen:
            return  # a region of this worker's previous incarnation
        region = self.regions.get(offset)
        if region is None or not region.holders.get(f):
            log.warning("worker %s: frontend %d released unknown region %d", self.w, f, offset)
            return
        region.holders[f] -= 1
        region.remaining -= 1
        if region.remaining <= 0:
            del self.regions[offset]
            self.arena.free(offset)

    # ---- compute -------------------------------------------------------------------------------

    def _compute_due(self) -> None:
        while True:
            now = self.clock()
            for m, batcher in enumerate(self.batchers):
                for p in batcher.pop_expired(now):
                    self._cancelled.discard((p.f, p.req_id))
                    self._stat(m, "expired", 1)
                    self._respond_error(
                        p.f,
                        p.req_id,
                        m,
                        DeadlineExceeded("deadline exceeded before the request was computed"),
                    )
            best: tuple[int, list[Pending]] | None = None
            for m, batcher in enumerate(self.batchers):
                if not len(batcher):
                    continue
                batch = batcher.next_batch(now)
                if (
                    batch is None
                    and self._sparse(m, batcher)
                    and self._inflight_total() <= self._queued_total()
                ):
                    # sparse traffic, and every admitted request is already here: nobody is coming
                    # to share the batch soon, so waiting would only add latency
                    batch = batcher.flush_one(now)
                if batch:
                    best = (m, batch)
                    break
            if best is None:
                return
            self._execute(*best)
            # Wake the front-ends per batch: answers must not wait for the batches queued behind them.
            self._flush()
            if any(not peer.request.is_empty() for peer in self._active):
                # Cancels (or requests) came in while that batch ran: the next step takes them before
                # another batch forms, or a request cancelled while it waited would be computed anyway.
                return

    def _execute(self, m: int, batch: list[Pending]) -> None:
        spec = self.specs[m]
        live = []
        for p in batch:
            if p.fgen != self.peers[p.f].acked:
                continue  # its front-end died: nobody waits for the answer
            if self._cancelled and (p.f, p.req_id) in self._cancelled:
                self._cancelled.discard((p.f, p.req_id))
                self._respond_error(p.f, p.req_id, m, Cancelled("cancelled by the client"))
                continue
            live.append(p)
        if not live:
            return
        rows = sum(p.rows for p in live)
        start = self.clock()
        breaker = self.breakers[m]
        if not breaker.allow(start):
            err = self._breaker_error(m, start)
            self._stat(m, "failure", len(live))
            for p in live:
                self._respond_error(p.f, p.req_id, m, err)
            return
        try:
            inputs = [[p.inputs[j] for p in live] for j in range(len(spec.inputs))]
            outputs = self.run_batch(spec, m, inputs, rows)
            offset, total = self._write_outputs(outputs, spec.max_batch_size > 0)
        except EngineError as err:
            self._stat(m, "failure", len(live))
            if isinstance(err, ModelError):
                self._breaker_record(m, False)
            for p in live:
                self._respond_error(p.f, p.req_id, m, err)
            return
        except Exception as exc:  # an engine bug must not take the worker down
            log.exception("worker %s: batch of model %s failed", self.w, spec.name)
            self._stat(m, "failure", len(live))
            for p in live:
                self._respond_error(p.f, p.req_id, m, InternalError(f"{type(exc).__name__}: {exc}"))
            return
        end = self.clock()
        self._compute_ns[m] = 0.75 * self._compute_ns[m] + 0.25 * (end - start)
        holders: dict[int, int] = {}
        row = 0
        for p in live:
            holders[p.f] = holders.get(p.f, 0) + 1
            self._push(p.f, (p.req_id, offset, total, 0, row, p.rows, KIND_RESPONSE, m, 0, self.gen))
            row += p.rows
        self.regions[offset] = _Region(len(live), holders)
        if breaker.state != CLOSED:
            self._breaker_record(m, True)
        self._stat(m, "success", len(live))
        self._stat(m, "batches", 1)
        self._stat(m, "rows", rows)
        self._stat(m, "queue_ns", sum(start - p.arrival_ns for p in live))
        self._stat(m, "compute_ns", end - start)
        self._stat(m, "compute_req_ns", (end - start) * len(live))
        self._stat(m, f"batch_le_{_bucket(rows)}", 1)
        self._stat(m, f"batch_ns_le_{_bucket(rows)}", end - start)
        self.observer.batch(m, live, start, end)

    def _sparse(self, m: int, batcher: Batcher[Pending]) -> bool:
        """Whether requests of model ``m`` arrive too far apart for waiting to pay: further apart than
        the batching delay, or more than two batch computations apart (the device would idle most of
        the wait). The second test keeps a long delay from holding back a closed loop of one client,
        while dense traffic, whose arrivals come faster than batches compute, still waits and batches.
        A model that names preferred batch sizes asked for those: it gets only the delay test."""
        gap = self._gap_ns[m]
        if gap > batcher.max_queue_delay_ns:
            return True
        return not batcher.preferred_batch_sizes and gap >= SPARSE_COMPUTE_RATIO * self._compute_ns[m]

    def _nothing_on_the_way(self) -> bool:
        """No request ring holds anything, and every request the front-ends admitted is queued here
        or answered (its answer still in a response ring or backlog)."""
        answered = 0
        for peer in self._active:
            if not peer.request.is_empty():
                return False
            answered += len(peer.response) + len(peer.backlog)
        return self._inflight_total() <= self._queued_total() + answered

    def _inflight_total(self) -> int:
        """Requests the front-ends have admitted and not yet seen answered (all models)."""
        return sum(self.control.load_u64(at) for at in self._inflight_at)

    def _queued_total(self) -> int:
        return sum(len(b) for b in self.batchers)

    def _breaker_error(self, m: int, now: int) -> Unavailable:
        breaker = self.breakers[m]
        return Unavailable(
            f"model {self.specs[m].name!r} is failing ({breaker.consecutive} failed batches in a row): "
            f"circuit breaker open, next try in {breaker.retry_in_s(now):.1f} s"
        )

    def _breaker_record(self, m: int, success: bool) -> None:
        breaker = self.breakers[m]
        was = breaker.state
        breaker.record(success, self.clock())
        if breaker.state != was:
            log.warning(
                "worker %s: circuit breaker of model %s is now %s",
                self.w,
                self.specs[m].name,
                STATE_NAMES[breaker.state],
            )
            self.control.store_u64(self.layout.stat(self.w, m, "breaker_state"), breaker.state)
            self.control.store_u64(self.layout.stat(self.w, m, "breaker_trips"), breaker.trips)

    def _write_outputs(self, outputs: list[np.ndarray], batched: bool) -> tuple[int, int]:
        total, offs = region_layout([o.nbytes for o in outputs])
        offset = self.arena.try_alloc(total)
        if offset < 0:
            raise ResourceExhausted("worker output arena is full; retry")
        pack_region_head(
            self.arena.view(offset, HEADER_BYTES + TENSOR_DESC.size * len(outputs)).data,
            RES_MAGIC,
            FLAG_BATCHED if batched else 0,
            0,
            [(DTYPE_CODES[_kserve(o.dtype)], o.shape, offs[j], o.nbytes) for j, o in enumerate(outputs)],
        )
        for j, out in enumerate(outputs):
            self.arena.write(offset + offs[j], out)
        return offset, total

    # ---- answers -------------------------------------------------------------------------------

    def _respond_error(self, f: int, req_id: int, model: int, err: EngineError) -> None:
        offset, length = NO_REGION, 0
        message = err.message.encode()[:4000]
        if message:
            off = self.arena.try_alloc(len(message))
            if off >= 0:
                self.arena.write(off, message)
                offset, length = off, len(message)
                self.regions[off] = _Region(1, {f: 1})
        self._push(f, (req_id, offset, length, 0, 0, 0, KIND_ERROR, model, err.wire_code, self.gen))

    def _push(self, f: int, d: tuple[int, ...]) -> None:
        peer = self.peers[f]
        if peer.backlog or not peer.response.push(d[6], d[7], d[0], d[1], d[2], d[3], d[4], d[5], d[8], d[9]):
            peer.backlog.append(d)
        self._to_wake.add(f)

    def _flush(self) -> None:
        for f in self._to_wake:
            peer = self.peers[f]
            while peer.backlog:
                d = peer.backlog[0]
                if not peer.response.push(d[6], d[7], d[0], d[1], d[2], d[3], d[4], d[5], d[8], d[9]):
                    break
                peer.backlog.pop(0)
            peer.notifier.signal()
        self._to_wake = {f for f in self._to_wake if self.peers[f].backlog}

    def _stat(self, model: int, name: str, value: int) -> None:
        base = self._stat_base[model]
        if value:
            self.control.fetch_add_u64(base + 8 * STAT_INDEX[name], value)
        if name == "batches":
            self.control.store_u64(base + 8 * STAT_INDEX["last_ns"], time.time_ns())

    def drain_all(self, timeout_s: float) -> None:
        """Finish what is queued (used on graceful stop): compute every queued batch now."""
        end = self.clock() + int(timeout_s * 1e9)
        while self.clock() < end:
            for peer in self._active:
                self._drain(peer)
            busy = False
            for m, batcher in enumerate(self.batchers):
                while len(batcher):
                    batch = batcher.flush_one(self.clock())
                    if not batch:
                        break
                    busy = True
                    self._execute(m, batch)
            self._flush()
            if not busy and all(p.request.is_empty() for p in self._active):
                return


def _drain(batcher: Batcher[Pending], now: int) -> list[Pending]:
    out: list[Pending] = []
    while len(batcher):
        batch = batcher.flush_one(now)
        if not batch:
            break
        out.extend(batch)
    return out


def _bucket(rows: int) -> int:
    b = 1
    while b < rows and b < 512:
        b <<= 1
    return min(b, 512)


def _kserve(dtype: np.dtype) -> str:
    return kserve_name(dtype)
