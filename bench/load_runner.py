"""The load loops of one client process: closed loop, open loop (constant rate) and bursts.

A `LoadSpec` says what to send and how; a `Session` runs it against one endpoint from an asyncio
loop: ``start`` connects and warms up, each ``phase`` is one measured window (the whole run, or one
burst round) and returns a `PhaseResult`.

- closed loop: ``concurrency`` slots each send, await the answer, send again, for ``duration_s``;
  latency runs from each send.
- open loop (``rate``): request ``i`` is due at ``start + i / rate``; the ``concurrency`` slots take
  the next due request as soon as they are free, and latency runs from the *due* time, so time spent
  waiting for a free slot, or for a stalled server, is charged to the request (no coordinated
  omission). ``max_lag`` tells how far behind schedule sending fell (uvloop's ~1 ms timer resolution
  makes up to that much of it).
- burst: ``burst`` requests are released at once; latency runs from the release; one round per phase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any

from bench.load_payload import Payload
from bench.load_stats import WRONG_ANSWER, Recorder, intended_send_ns, split, tickets_in
from bench.load_targets import GRPC_CLIENTS, PROTOCOLS, ZMQ_CLIENTS, Call, Target, make_target

now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process of the machine


@dataclass(frozen=True)
class LoadSpec:
    """What one load run sends, and how.

    Attributes:
        protocol: ``grpc``, ``zmq`` or ``rest`` (binary tensors).
        model: the model the requests name.
        concurrency: requests in flight (closed loop), or the most in flight (open loop).
        duration_s: measured seconds (closed and open loop).
        rate: requests per second: an open loop; None for a closed loop.
        burst: requests released at once, per round: burst mode when set.
        rounds: burst rounds.
        warmup_s: unmeasured seconds first (burst mode: one unmeasured round when > 0).
        timeout_s: per-request timeout.
        check_every: one answer in this many is compared with the expected output.
        grpc_client: the gRPC load client, ``h2`` (lean, HTTP/2 by hand) or ``grpcio`` (grpc.aio).
        zmq_client: the ZMQ load client, ``zmtp`` (a DEALER by hand) or ``pyzmq`` (libzmq).
    """

    protocol: str = "grpc"
    model: str = "mlp"
    concurrency: int = 1
    duration_s: float = 10.0
    rate: float | None = None
    burst: int | None = None
    rounds: int = 5
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    check_every: int = 100
    grpc_client: str = "h2"
    zmq_client: str = "zmtp"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.grpc_client not in GRPC_CLIENTS:
            choices = ", ".join(GRPC_CLIENTS)
            raise ValueError(f"grpc_client must be one of {choices}, got {self.grpc_client!r}")
        if self.zmq_client not in ZMQ_CLIENTS:
            choices = ", ".join(ZMQ_CLIENTS)
            raise ValueError(f"zmq_client must be one of {choices}, got {self.zmq_client!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.rounds < 1 or self.check_every < 1:
            raise ValueError("rounds and check_every must be >= 1")
        if not self.duration_s > 0 or not self.timeout_s > 0:
            raise ValueError("duration_s and timeout_s must be > 0")

    @property
    def mode(self) -> str:
        """``burst``, ``open`` or ``closed``."""
        if self.burst is not None:
            return "burst"
        return "open" if self.rate is not None else "closed"

    @property
    def slots(self) -> int:
        """In-flight slots the client needs."""
        return self.burst if self.burst is not None else self.concurrency

    @property
    def phases(self) -> int:
        """Measured phases: one per burst round, else one."""
        return self.rounds if self.burst is not None else 1

    def share(self, parts: int) -> list[LoadSpec]:
        """This load split among ``parts`` client processes (each gets at least one slot)."""
        if parts > self.slots:
            raise ValueError(f"{parts} client processes for {self.slots} in-flight requests")
        concurrency = split(self.concurrency, parts)
        bursts = split(self.burst, parts) if self.burst is not None else [None] * parts
        rates = split(float(self.rate), parts) if self.rate is not None else [None] * parts
        return [
            dataclasses.replace(self, concurrency=max(1, c), burst=b, rate=r)
            for c, b, r in zip(concurrency, bursts, rates, strict=True)
        ]

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadSpec:
        """The spec `to_json` described."""
        return cls(**data)


@dataclass
class PhaseResult:
    """One measured window: what was recorded, and when the first request went and the last came back.

    Attributes:
        recorder: latencies and errors.
        start_ns / end_ns: `now_ns` stamps (CLOCK_MONOTONIC, comparable across processes).
    """

    recorder: Recorder
    start_ns: int
    end_ns: int

    @property
    def elapsed_s(self) -> float:
        """The window in seconds."""
        return max(0, self.end_ns - self.start_ns) / 1e9

    def encode(self) -> dict[str, Any]:
        """A JSON-safe form (for a client process's stdout)."""
        return {"start_ns": self.start_ns, "end_ns": self.end_ns, **self.recorder.encode()}

    @classmethod
    def decode(cls, data: dict[str, Any]) -> PhaseResult:
        """The result `encode` described."""
        return cls(Recorder.decode(data), int(data["start_ns"]), int(data["end_ns"]))

    @classmethod
    def merged(cls, results: list[PhaseResult]) -> PhaseResult:
        """Several processes' results of the same phase as one (the union of their windows)."""
        total = Recorder()
        for r in results:
            total.merge(r.recorder)
        return cls(total, min(r.start_ns for r in results), max(r.end_ns for r in results))


async def _timed(call: Call, recorder: Recorder) -> tuple[str | None, int]:
    check = recorder.should_check()
    code = await call(check)
    if check and (code is None or code == WRONG_ANSWER):
        recorder.checked += 1
    return code, now_ns()


async def closed_loop(calls: list[Call], recorder: Recorder, duration_s: float) -> PhaseResult:
    """Every slot sends its next request as soon as its last one is answered, for ``duration_s``."""
    start = now_ns()
    end = start + int(duration_s * 1e9)

    async def slot(call: Call) -> int:
        last = start
        while (sent := now_ns()) < end:
            code, last = await _timed(call, recorder)
            recorder.record(last - sent, code)
        return last

    done = await asyncio.gather(*(slot(c) for c in calls))
    return PhaseResult(recorder, start, max(done))


async def open_loop(calls: list[Call], recorder: Recorder, duration_s: float, rate: float) -> PhaseResult:
    """Requests due at a constant ``rate`` for ``duration_s``; latency from each one's due time."""
    start = now_ns()
    total = tickets_in(duration_s, rate)
    tickets = itertools.count()

    async def slot(call: Call) -> int:
        last = start
        for index in tickets:  # shared: a free slot takes the next due request
            if index >= total:
                break
            due = intended_send_ns(start, index, rate)
            delay = due - now_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            recorder.max_lag_ns = max(recorder.max_lag_ns, now_ns() - due)
            code, last = await _timed(call, recorder)
            recorder.record(last - due, code)
        return last

    done = await asyncio.gather(*(slot(c) for c in calls))
    return PhaseResult(recorder, start, max(done))


async def burst_round(calls: list[Call], recorder: Recorder) -> PhaseResult:
    """One request per slot, all released at once; latency from the release."""
    start = now_ns()

    async def one(call: Call) -> int:
        code, done = await _timed(call, recorder)
        recorder.record(done - start, code)
        return done

    done = await asyncio.gather(*(one(c) for c in calls))
    return PhaseResult(recorder, start, max(done))


class Session:
    """One client process's share of a load against one endpoint.

    Args:
        spec: the load (this process's share of it).
        address: ``host:port`` of the endpoint.
        payload: the request and its expected answer.
    """

    def __init__(self, spec: LoadSpec, address: str, payload: Payload) -> None:
        self.spec = spec
        self.address = address
        self.payload = payload
        self.recorder: Recorder | None = None  # of the phase running (progress reads its count)
        self._target: Target | None = None
        self._calls: list[Call] = []

    async def start(self) -> None:
        """Connect, and warm up (unmeasured) for ``spec.warmup_s``."""
        spec = self.spec
        self._target = make_target(
            spec.protocol, self.address, self.payload, spec.timeout_s, spec.grpc_client, spec.zmq_client
        )
        await self._target.open()
        self._calls = [self._target.slot() for _ in range(spec.slots)]
        if spec.warmup_s > 0:
            await self._run(Recorder(check_every=spec.check_every), spec.warmup_s)

    async def phase(self) -> PhaseResult:
        """One measured window: the whole run, or one burst round."""
        self.recorder = Recorder(check_every=self.spec.check_every)
        return await self._run(self.recorder, self.spec.duration_s)

    async def _run(self, recorder: Recorder, duration_s: float) -> PhaseResult:
        spec = self.spec
        if spec.burst is not None:
            return await burst_round(self._calls, recorder)
        if spec.rate is not None:
            return await open_loop(self._calls, recorder, duration_s, spec.rate)
        return await closed_loop(self._calls, recorder, duration_s)

    async def stop(self) -> None:
        """Close the connections."""
        if self._target is not None:
            await self._target.close()
            self._target = None


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when available, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
