"""The PNG plots of `python -m bench report` (matplotlib, drawn to files only).

- `plot_cdf`: the latency of every request, per result, as a percentile spectrum (x: percentile,
  log-spaced so the tail is visible; y: latency, log);
- `plot_sweep`: requests/s and p99 latency against concurrency, one line per protocol and server.

matplotlib is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _log_axis_labels(axis: Any) -> None:
    """A log scale labelled 1, 2, 5, 10, 20, 50... in plain numbers (no 10^n)."""
    from matplotlib import ticker

    axis.axes.set_yscale("log") if axis is axis.axes.yaxis else axis.axes.set_xscale("log")
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _label(result: dict[str, Any]) -> str:
    target = result.get("target") or "server"
    shape = f"burst {result['burst']}" if result.get("burst") else f"c={result['concurrency']}"
    return f"{target} {result['protocol']} {shape}"


def plot_cdf(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Latency percentile spectrum of each result (its ``cdf`` points) in one PNG; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for result in results:
        points = [(p, ms) for p, ms in result.get("cdf") or () if p < 100.0]
        if not points:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]  # 50% -> 2, 99% -> 100, 99.9% -> 1000
        style = (
            "--"
            if result.get("target") not in (None, "", "engine", "server")
            and not str(result.get("target", "")).startswith("engine")
            else "-"
        )
        ax.plot(xs, [ms for _, ms in points], style, label=_label(result), linewidth=1.6)
    ticks = [0, 50, 90, 99, 99.9, 99.99]
    ax.set_xscale("log")
    ax.set_xticks([1.0 / (1.0 - t / 100.0) for t in ticks])
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlim(1, 1.0 / (1.0 - 99.99 / 100.0))
    _log_axis_labels(ax.yaxis)
    ax.set_xlabel("percentile of requests")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title or "Latency by percentile (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_sweep(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Requests/s and p99 against concurrency, one line per protocol, side by side; returns the path."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault(f"{r.get('target') or 'engine'} {r['protocol']}", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rows]
        left.plot(cs, [r["rps"] for r in rows], "o-", label=name)
        right.plot(cs, [r["p99_ms"] or math.nan for r in rows], "o-", label=name)
    concurrencies = sorted({r["concurrency"] for r in results})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(concurrencies)
        ax.set_xticklabels([str(c) for c in concurrencies])
        ax.minorticks_off() if ax is left else None
        ax.set_xlabel("requests in flight (concurrency, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("requests per second (higher is better)")
    left.set_ylim(bottom=0)
    left.set_title("Throughput")
    _log_axis_labels(right.yaxis)
    right.set_ylabel("p99 latency (ms, log scale; lower is better)")
    right.set_title("p99 latency")
    fig.suptitle(title or "Engine over each protocol, mlp model, one request = one row")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


__all__ = ["plot_cdf", "plot_sweep"]
