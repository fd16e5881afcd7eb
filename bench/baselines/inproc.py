"""The compute floor: the model called in this process, ideally batched, with no transport at all.

`measure_inproc` runs the same load shape as `bench.load.measure` and returns the same keys, as if
an ideal server answered: no network, no serialisation, no queueing overhead, every batch exactly
``min(in flight, max_batch_size)`` rows. Closed loop with ``concurrency`` N: the N clients form
``ceil(N / max_batch_size)`` groups, computed one after the other in a cycle, each client's latency
being its group's time since that group's previous answer (one cycle). Burst of N: the groups are
computed one after the other from the release; each row's latency is the time until its group is
done. Open loops are not modelled (a closed loop at the same concurrency is the floor anyway).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.load_payload import Payload, builtin_spec, make_payload
from bench.load_runner import LoadSpec
from bench.load_stats import WRONG_ANSWER, Recorder, summary


def _groups(rows: int, max_batch: int) -> list[int]:
    size = max(1, max_batch) if max_batch > 0 else 1
    full, rest = divmod(rows, size)
    return [size] * full + ([rest] if rest else [])


def measure_inproc(spec: LoadSpec, payload: Payload | None = None) -> dict[str, Any]:
    """The compute floor for ``spec`` (closed loop or burst); keys as `bench.load.measure`'s."""
    import torch

    from engine.models.backends import load_model

    if spec.rate is not None:
        raise ValueError("the in-process floor models closed loops and bursts, not open loops")
    payload = payload if payload is not None else make_payload(spec.model)
    model_spec = builtin_spec(spec.model)
    model = load_model(model_spec, "cpu")
    model.warmup()
    groups = _groups(spec.slots, model_spec.max_batch_size)
    batches = {
        n: [torch.from_numpy(np.ascontiguousarray(np.repeat(x, n, axis=0))) for x in payload.inputs.values()]
        for n in set(groups)
    }
    names = [o.name for o in model_spec.outputs]
    now = time.monotonic_ns

    def run(n: int, recorder: Recorder | None) -> None:
        outputs = model.run(batches[n])
        if recorder is not None and recorder.should_check():
            recorder.checked += 1
            first = {name: t.numpy()[:1] for name, t in zip(names, outputs, strict=True)}
            if not payload.verify(first):
                recorder.errors[WRONG_ANSWER] += 1

    for n in groups:  # warm-up: one cycle, and a little more when asked
        run(n, None)
    end_warmup = now() + int(spec.warmup_s * 1e9)
    while now() < end_warmup:
        for n in groups:
            run(n, None)

    rounds: list[dict[str, Any]] = []
    total = Recorder(check_every=max(1, spec.check_every // max(groups)))
    elapsed_ns = 0
    if spec.burst is not None:
        for _ in range(spec.rounds):
            recorder = Recorder(check_every=total.check_every)
            start = now()
            for n in groups:
                run(n, recorder)
                recorder.record(now() - start, count=n)
            took = now() - start
            elapsed_ns += took
            rounds.append(summary(recorder, took / 1e9, with_cdf=False))
            total.merge(recorder)
    else:
        start = now()
        end = start + int(spec.duration_s * 1e9)
        last = [start] * len(groups)
        while now() < end:
            for i, n in enumerate(groups):
                run(n, total)
                done = now()
                total.record(done - last[i], count=n)
                last[i] = done
        elapsed_ns = now() - start
    result: dict[str, Any] = {
        "protocol": "in-process",
        "model": spec.model,
        "mode": spec.mode,
        "concurrency": spec.slots,
        "rate": None,
        "burst": spec.burst,
        "procs": 1,
        "target": "inproc",
        "address": "",
        "batch_rows": groups,
        **summary(total, elapsed_ns / 1e9),
    }
    if rounds:
        result["rounds"] = rounds
    return result
