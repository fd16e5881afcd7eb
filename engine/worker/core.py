"""The worker's logic as a steppable object: drain request rings, batch per model, compute, answer.

`WorkerCore` owns no process concerns (signals, titles, heartbeats thread): `engine.worker.main`
wraps it. One `step()` waits for work (a short spin at light traffic, then a futex sleep), takes
every descriptor the front-ends have pushed, answers expired requests, computes the batches that
are due and posts the completions, waking each front-end at most once per step.

What it keeps per front-end slot is a `engine.worker.peers.Peer`; the request and output region
bytes are read and written in `engine.worker.regions`; the board counters in `engine.worker.stats`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidArgument,
    ModelError,
    Unavailable,
)
from engine.metrics import NO_BATCH_METRICS, BatchObserver
from engine.models.spec import ModelSpec
from engine.shm import (
    F_GEN,
    F_INFLIGHT,
    KIND_CANCEL,
    KIND_ERROR,
    KIND_RELEASE,
    KIND_REQUEST,
    KIND_RESPONSE,
    NO_REGION,
    STAT_NAMES,
    BoardLayout,
)
from engine.worker.batcher import Batcher
from engine.worker.breaker import CLOSED, STATE_NAMES, CircuitBreaker
from engine.worker.peers import Peer
from engine.worker.regions import OutputRegion, Pending, RequestPlan, parse_request, write_outputs
from engine.worker.stats import add_stat, count_batch
from ext.arena import Arena
from ext.notify import EventNotifier, WakeWord, wait_rings
from ext.ring import DESC_DTYPE, Ring
from ext.segment import Segment

log = logging.getLogger("engine.worker")

#: Longest a worker holding a batch that waits for companions sleeps without taking new arrivals.
DOZE_MAX_S = 0.002

#: computes one batch: (spec, model index, inputs[j][i], rows) -> outputs
RunBatch = Callable[[ModelSpec, int, Sequence[Sequence[np.ndarray]], int], list[np.ndarray]]


#: The worker spins (``spin_s``) before it sleeps only after a step that took descriptors, while the
#: front-ends hold at most this many submissions in flight (``F_INFLIGHT``: a coalesced ZMQ group
#: counts once, as it comes as one descriptor): a load of one or two descriptors at a time, whose
#: next one comes only after a round trip through the client. An idle worker (waking every
#: ``max_wait_s`` for its deadlines) must not spin each time, and under more load a spinning
#: worker costs the front-ends and the client their second core: a woken process goes to an idle
#: CPU, and a spinning one is not idle.
#: Measured on the 2-core VM with a 300 us spin, alternating with none: concurrency 1 gained
#: 0.1-0.4 ms of p50 over gRPC, ZMQ and REST; spinning after any step with descriptors cost gRPC at
#: concurrency 500 4-23% of its req/s (3 pairs, the worker's CPU per request ~37 -> ~46 us), and
#: spinning after steps of at most 8 descriptors looked to cost REST at concurrency 64 11-14% (2
#: pairs: 14,095 / 13,308 -> 12,587 / 11,493 req/s). Counting client requests (``F_REQUESTS``)
#: instead, which stops the spin under ZMQ at concurrency 8 and 64 (one or two groups in flight),
#: cost ZMQ there in 3 of 3 pairs: c=64 40,428 / 33,894 / 40,430 -> 38,231 / 29,808 / 38,903 req/s,
#: c=8 9,440 / 7,600 / 9,656 -> 7,910 / 6,760 / 7,690.
SPIN_INFLIGHT_AT_MOST = 2


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
            Peer(
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
                s.dynamic_batching.pipeline_rows,
            )
            for s in self.specs
        ]
        self.loaded: set[int] = set()
        self._inflight_at = [layout.frontend(f, F_INFLIGHT) for f in range(layout.n_frontends)]
        # per front-end: its generation, this worker's acknowledgement of it, its acknowledgement of
        # this worker (read every step by `sync_peers`)
        self._handshake_at = [
            (layout.frontend(f, F_GEN), layout.ack_w(w, f), layout.ack_f(f, w))
            for f in range(layout.n_frontends)
        ]
        # the board offsets of this worker's counters, computed once (they are on the request path)
        self._stat_base = [layout.stat(w, m, STAT_NAMES[0]) for m in range(len(self.specs))]
        self.breakers = [CircuitBreaker(breaker_failures, int(breaker_cooldown_s * 1e9)) for _ in self.specs]
        # (front-end, request id) the front-end gave up on; checked when their batch forms
        self._cancelled: set[tuple[int, int]] = set()
        # Per model, a moving average of the gap between arrivals: a model with preferred batch sizes
        # runs a lone request at once only when its requests come further apart than its delay.
        self._gap_ns = [0.0] * len(self.specs)
        self._last_arrival = [0] * len(self.specs)
        self.regions: dict[int, OutputRegion] = {}
        #: per model, the request headers checked before (`engine.worker.regions.plan_request`)
        self._plans: list[dict[bytes, RequestPlan]] = [{} for _ in self.specs]
        self._buf = np.empty(256, dtype=DESC_DTYPE)
        self._active: list[Peer] = []
        self._active_rings: list[Ring] = []
        self._to_wake: set[int] = set()
        # whether the last step took descriptors (requests, releases) with at most
        # SPIN_INFLIGHT_AT_MOST submissions in flight: only then does the worker spin before it sleeps
        self._light_traffic = False

    # ---- peers --------------------------------------------------------------------------------

    def sync_peers(self) -> None:
        """Take new front-end incarnations: drop what the dead one left, reset the pair, acknowledge."""
        active = []
        load = self.control.load_u64
        for peer, (gen_at, ack_w_at, ack_f_at) in zip(self.peers, self._handshake_at, strict=True):
            fgen = load(gen_at)
            if fgen != peer.acked:
                self._forget_frontend(peer)
                if fgen:
                    peer.request.reset()
                    peer.response.reset()
                peer.acked = fgen
                self.control.store_u64(ack_w_at, fgen)
            if peer.acked and load(ack_f_at) == self.gen:
                active.append(peer)
        if active != self._active:
            self.set_active(active)

    def set_active(self, peers: list[Peer]) -> None:
        """The pairs whose handshake is complete: the only ones drained and waited on."""
        self._active = peers
        self._active_rings = [peer.request for peer in peers]

    def _forget_frontend(self, peer: Peer) -> None:
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
        peer.drop_arena()

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
                # A batch is waiting for companions and every admitted request is here (a model
                # with preferred batch sizes: others would have run): new arrivals can join it when
                # the wait ends, so doze deaf to them instead of waking (and making each front-end
                # pay a futex wake) per arrival. Capped, so other models' requests, cancels and
                # releases wait no longer than this for their turn.
                self.word.doze(min(wait, DOZE_MAX_S))
            else:
                spin_s = self.spin_s if self._light_traffic else 0.0
                wait_rings(self.word, self._active_rings, spin_s, wait)
        taken = 0
        for peer in self._active:
            if not peer.request.is_empty():  # most rings are, at a step: no call for them
                taken += self._drain(peer)
        self._light_traffic = taken > 0 and self._inflight_total() <= SPIN_INFLIGHT_AT_MOST
        self._compute_due()
        self._flush()
        if self._cancelled and not any(len(b) for b in self.batchers):
            # requests are pushed before their cancels: with every queue empty, what is left were
            # cancels of requests already answered
            self._cancelled.clear()
        return taken

    def _next_wakeup(self) -> int | None:
        times = [t for b in self.batchers if len(b) and (t := b.next_wakeup_ns()) is not None]
        return min(times) if times else None

    def _drain(self, peer: Peer) -> int:
        total = 0
        while True:
            n = peer.request.pop_into(self._buf)
            if not n:
                return total
            total += n
            now = self.clock()
            for d in self._buf[:n].tolist():
                # tuple order follows DESC_DTYPE
                req_id, offset, length, deadline, aux, _aux2, kind, model, _status, gen = d
                if kind == KIND_REQUEST:
                    self._admit(peer, req_id, offset, length, deadline, model, gen, now, aux or 1)
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
        peer: Peer,
        req_id: int,
        offset: int,
        length: int,
        deadline: int,
        model: int,
        gen: int,
        now: int,
        requests: int = 1,
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
            pending = parse_request(
                peer.input_arena(self.base),
                peer.f,
                peer.acked,
                spec,
                req_id,
                offset,
                length,
                deadline,
                model,
                now,
                self._plans[model],
            )
        except EngineError as err:
            self._respond_error(peer.f, req_id, model, err)
            return
        except (IndexError, ValueError) as err:
            self._respond_error(peer.f, req_id, model, InvalidArgument(f"malformed request region: {err}"))
            return
        pending.requests = requests
        last = self._last_arrival[model]
        self._last_arrival[model] = now
        if last:
            self._gap_ns[model] = 0.75 * self._gap_ns[model] + 0.25 * (now - last)
        self.batchers[model].add(pending)

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
            # most models hold nothing at a given step: only the others are looked at
            held = [(m, batcher) for m, batcher in enumerate(self.batchers) if len(batcher)]
            if not held:
                return
            now = self.clock()
            for m, batcher in held:
                for p in batcher.pop_expired(now):
                    self._cancelled.discard((p.f, p.req_id))
                    add_stat(self.control, self._stat_base[m], "expired", p.requests)
                    self._respond_error(
                        p.f,
                        p.req_id,
                        m,
                        DeadlineExceeded("deadline exceeded before the request was computed"),
                    )
            best: tuple[int, list[Pending]] | None = None
            for m, batcher in held:
                if not len(batcher):
                    continue  # what it held had expired
                batch = batcher.next_batch(now)
                if batch is None and self._nobody_coming(m, batcher):
                    # waiting would only leave the device idle: run what is queued now
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
        rows = requests = 0
        arrived = 0  # the arrival times, each counted once per client request it stands for
        peers = self.peers
        cancelled = self._cancelled
        for p in batch:
            if p.fgen != peers[p.f].acked:
                continue  # its front-end died: nobody waits for the answer
            if cancelled and (p.f, p.req_id) in cancelled:
                cancelled.discard((p.f, p.req_id))
                self._respond_error(p.f, p.req_id, m, Cancelled("cancelled by the client"))
                continue
            live.append(p)
            rows += p.rows
            requests += p.requests
            arrived += p.arrival_ns * p.requests
        if not live:
            return
        start = self.clock()
        breaker = self.breakers[m]
        if not breaker.allow(start):
            err = self._breaker_error(m, start)
            add_stat(self.control, self._stat_base[m], "failure", requests)
            for p in live:
                self._respond_error(p.f, p.req_id, m, err)
            return
        try:
            inputs = [[p.inputs[j] for p in live] for j in range(len(spec.inputs))]
            outputs = self.run_batch(spec, m, inputs, rows)
            offset, total = write_outputs(self.arena, outputs, spec.max_batch_size > 0)
        except EngineError as err:
            add_stat(self.control, self._stat_base[m], "failure", requests)
            if isinstance(err, ModelError):
                self._breaker_record(m, False)
            for p in live:
                self._respond_error(p.f, p.req_id, m, err)
            return
        except Exception as exc:  # an engine bug must not take the worker down
            log.exception("worker %s: batch of model %s failed", self.w, spec.name)
            add_stat(self.control, self._stat_base[m], "failure", requests)
            for p in live:
                self._respond_error(p.f, p.req_id, m, InternalError(f"{type(exc).__name__}: {exc}"))
            return
        end = self.clock()
        holders: dict[int, int] = {}
        row = 0
        for p in live:
            holders[p.f] = holders.get(p.f, 0) + 1
            self._push(p.f, (p.req_id, offset, total, 0, row, p.rows, KIND_RESPONSE, m, 0, self.gen))
            row += p.rows
        self.regions[offset] = OutputRegion(len(live), holders)
        if breaker.state != CLOSED:
            self._breaker_record(m, True)
        count_batch(self.control, self._stat_base[m], requests, rows, start * requests - arrived, end - start)
        self.observer.batch(m, live, start, end)

    def _nobody_coming(self, m: int, batcher: Batcher[Pending]) -> bool:
        """Whether the queued requests of model ``m`` should run now, before their batching delay:
        every request the front-ends admitted is already here (queued, or answered and on its way
        back), so no companion can join before the delay ends and waiting would only idle the
        device. A closed loop of N clients then runs as soon as all N are queued instead of waiting
        out the delay every round (measured, mlp on 2 cores: c=8 +50-65% req/s over gRPC and ZMQ).
        A model that names preferred batch sizes asked for those: it runs early only when its
        requests also arrive further apart than its delay."""
        if not batcher.preferred_batch_sizes:
            return self._nothing_on_the_way()
        return self._gap_ns[m] > batcher.max_queue_delay_ns and self._inflight_total() <= self._queued_total()

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
        """Submissions the front-ends have made and not yet seen answered (all models; a coalesced
        group counts once, as this worker's queue holds it)."""
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

    # ---- answers -------------------------------------------------------------------------------

    def _respond_error(self, f: int, req_id: int, model: int, err: EngineError) -> None:
        offset, length = NO_REGION, 0
        message = err.message.encode()[:4000]
        if message:
            off = self.arena.try_alloc(len(message))
            if off >= 0:
                self.arena.write(off, message)
                offset, length = off, len(message)
                self.regions[off] = OutputRegion(1, {f: 1})
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
