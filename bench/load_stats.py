"""What a load run records and how it is summed up: HDR latency histograms, error counts, JSON summaries.

A `Recorder` takes one latency (or one error code) per request; latencies go into an HDR histogram in
microseconds (1 us .. 120 s, 3 significant digits), so percentiles cost nothing to keep and histograms
of several client processes merge exactly (`Recorder.encode` / `Recorder.merge`, the histogram's own
compressed base64 encoding: plain text, safe to send over a pipe as JSON). Each latency is first
tallied by whole microsecond and the tally folded into the histogram when it is read: the pure-Python
``record_value`` cost the client ~2.3 us per request, the tally ~0.3, and the client shares the cores
with the server it measures.

`summary` turns a recorder and a wall-clock window into the JSON object ``bench load`` writes. The
open-loop schedule lives here too (`intended_send_ns`, `tickets_in`): request ``i`` of a run at rate
``R`` is due at ``start + i / R`` whatever happened to the ones before it, and its latency is measured
from that instant, so a server that stalls is charged for the whole stall (no coordinated omission).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

#: Histogram range in microseconds, and its precision.
LOWEST_US = 1
HIGHEST_US = 120_000_000
SIGNIFICANT_DIGITS = 3
#: Distinct microsecond values a `Recorder` tallies before it folds them into its histogram.
TALLY_MAX_KEYS = 4096
#: Error code of an answer that came back but was wrong.
WRONG_ANSWER = "WRONG_ANSWER"
#: Percentiles the JSON lists (its ``cdf``), dense in the tail where the interesting part is.
CDF_PERCENTILES: tuple[float, ...] = (
    *range(0, 90, 2),
    *(90 + i * 0.5 for i in range(18)),
    99.0,
    99.2,
    99.4,
    99.5,
    99.6,
    99.7,
    99.8,
    99.9,
    99.95,
    99.99,
    100.0,
)


def new_histogram() -> HdrHistogram:
    """An empty latency histogram (microseconds)."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


@dataclass
class Recorder:
    """Latencies and outcomes of one run (or one round, or one client process).

    Attributes:
        histogram: latencies of the successful requests, in microseconds.
        errors: failed requests by code (``RESOURCE_EXHAUSTED``, ``HTTP_503``, ``WRONG_ANSWER``...).
        checked: answers compared with the expected output.
        check_every: every how many answers one is checked (1 checks all).
        max_lag_ns: open loop only: the most a request was sent after its due time (the client fell
            behind its schedule by this much: its concurrency cap, or its own CPU, was the limit).
    """

    errors: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    check_every: int = 100
    max_lag_ns: int = 0
    _answers: int = 0
    _histogram: HdrHistogram = field(default_factory=new_histogram)
    #: latencies not yet in the histogram: whole microseconds (unclamped) -> requests
    _tally: dict[int, int] = field(default_factory=dict)
    _tallied: int = 0

    @property
    def histogram(self) -> HdrHistogram:
        """Latencies of the successful requests, in microseconds."""
        if self._tally:
            tally, self._tally, self._tallied = self._tally, {}, 0
            record = self._histogram.record_value
            for us, n in tally.items():
                record(min(HIGHEST_US, max(LOWEST_US, us)), n)
        return self._histogram

    @property
    def ok(self) -> int:
        """Successful requests recorded."""
        return int(self._histogram.get_total_count()) + self._tallied

    @property
    def count(self) -> int:
        """Requests recorded, failed ones included."""
        return self.ok + sum(self.errors.values())

    def should_check(self) -> bool:
        """True for the answer that is due a check (the first, then every `check_every`-th)."""
        due = self._answers % self.check_every == 0
        self._answers += 1
        return due

    def record(self, latency_ns: int, error: str | None = None, count: int = 1) -> None:
        """``count`` requests with one outcome: their latency when they succeeded, else their error
        code (the latency of a failed request is not kept)."""
        if error is not None:
            self.errors[error] += count
            return
        us = (latency_ns + 500) // 1000
        tally = self._tally
        tally[us] = tally.get(us, 0) + count
        self._tallied += count
        if len(tally) > TALLY_MAX_KEYS:
            # latencies spread over seconds (an overloaded server): fold before the tally grows
            self.histogram  # noqa: B018 - the property folds

    def merge(self, other: Recorder) -> None:
        """Add ``other``'s requests to this one."""
        self.histogram.add(other.histogram)
        self.errors.update(other.errors)
        self.checked += other.checked
        self.max_lag_ns = max(self.max_lag_ns, other.max_lag_ns)

    def encode(self) -> dict[str, Any]:
        """A JSON-safe form (the histogram in HDR's compressed base64 encoding)."""
        return {
            "hdr": self.histogram.encode().decode("ascii") if self.ok else "",
            "errors": dict(self.errors),
            "checked": self.checked,
            "max_lag_ns": self.max_lag_ns,
        }

    @classmethod
    def decode(cls, data: dict[str, Any]) -> Recorder:
        """The recorder `encode` described."""
        recorder = cls(errors=Counter({str(k): int(v) for k, v in data.get("errors", {}).items()}))
        if data.get("hdr"):
            recorder.histogram.decode_and_add(data["hdr"])
        recorder.checked = int(data.get("checked", 0))
        recorder.max_lag_ns = int(data.get("max_lag_ns", 0))
        return recorder


def percentile_ms(histogram: HdrHistogram, percentile: float) -> float | None:
    """The latency at ``percentile`` in milliseconds (None for an empty histogram)."""
    if histogram.get_total_count() == 0:
        return None
    if percentile >= 100.0:
        return round(histogram.get_max_value() / 1000, 3)
    return round(histogram.get_value_at_percentile(percentile) / 1000, 3)


def cdf(histogram: HdrHistogram) -> list[list[float]]:
    """``[percentile, latency_ms]`` pairs at `CDF_PERCENTILES` (empty for an empty histogram)."""
    if histogram.get_total_count() == 0:
        return []
    points = []
    for p in CDF_PERCENTILES:
        ms = percentile_ms(histogram, p)
        assert ms is not None  # the histogram is not empty
        points.append([float(p), ms])
    return points


def summary(recorder: Recorder, elapsed_s: float, *, with_cdf: bool = True) -> dict[str, Any]:
    """The figures of one run or round.

    Args:
        recorder: what was recorded.
        elapsed_s: the wall-clock window the requests took (first send to last answer).
        with_cdf: add the ``cdf`` points and the encoded histogram (``hdr``).

    Returns:
        ``requests`` (successful), ``rps`` (successful requests per second of ``elapsed_s``), the
        latency percentiles in ms, ``errors`` (total), ``errors_by_code``, ``checked``.
    """
    h = recorder.histogram
    ok = recorder.ok
    out: dict[str, Any] = {
        "duration_s": round(elapsed_s, 3),
        "requests": ok,
        "rps": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": percentile_ms(h, 50),
        "p90_ms": percentile_ms(h, 90),
        "p95_ms": percentile_ms(h, 95),
        "p99_ms": percentile_ms(h, 99),
        "p999_ms": percentile_ms(h, 99.9),
        "max_ms": percentile_ms(h, 100),
        "min_ms": round(h.get_min_value() / 1000, 3) if ok else None,
        "mean_ms": round(h.get_mean_value() / 1000, 3) if ok else None,
        "errors": sum(recorder.errors.values()),
        "errors_by_code": dict(sorted(recorder.errors.items())),
        "checked": recorder.checked,
    }
    if recorder.max_lag_ns:
        out["max_schedule_lag_ms"] = round(recorder.max_lag_ns / 1e6, 3)
    if with_cdf:
        out["cdf"] = cdf(h)
        out["hdr"] = recorder.encode()["hdr"]
    return out


# ---- the open-loop schedule ------------------------------------------------------------------------


def intended_send_ns(start_ns: int, index: int, rate: float) -> int:
    """When request ``index`` (0-based) of a constant-rate run that starts at ``start_ns`` is due."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return start_ns + round(index * 1e9 / rate)


def tickets_in(duration_s: float, rate: float) -> int:
    """How many requests a constant-rate run of ``duration_s`` sends: those due before its end."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return max(0, math.ceil(duration_s * rate - 1e-9))


def split(total: int | float, parts: int) -> list[Any]:
    """``total`` shared among ``parts`` client processes: integers as evenly as possible (the first
    ones get the remainder), floats (rates) in equal shares."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if isinstance(total, float):
        return [total / parts] * parts
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
