"""Where a load's CPU goes: CPU seconds per process, and py-spy profiles of each process.

`CpuMeter` reads each process's user + system time from /proc before and after the measured window:
CPU seconds per process and per request tell whether the client, a front-end or the worker is the
bottleneck (on a 2-core machine the three share the cores). `Profiler` runs ``py-spy record`` on each
process for the window (``--nonblocking``: the target is never stopped, so the profile costs it
nothing but a little CPU for py-spy itself) and `summarize_collapsed` turns each profile into its
top functions by own time ("self") and by time including callees ("total"), in % of its samples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load_server import cpu_seconds, process_title, process_tree

#: py-spy samples per second.
PROFILE_RATE = 100
#: Functions listed per process.
TOP = 12
#: A function on at least this share of a profile's stacks is an entry point, not a hot spot.
ROOT_SHARE = 0.95
_BOILERPLATE = re.compile(
    r"^<module>|\(<frozen |\(<string>\)|multiprocessing/|threading\.py|runpy|^main \(|__main__\.py"
    r"|^Runner\.run |^run \((uvloop|servers/frontend|engine/worker/main)|^(run_\w+|measure) \(bench/"
    r"|^InProcess\.phase "
)


def server_processes(pid: int) -> dict[int, str]:
    """The processes of a server (``pid`` and its descendants): pid -> title."""
    return {p: _short_title(process_title(p)) for p in process_tree(pid)} if pid else {}


def _short_title(title: str) -> str:
    if title.startswith("engine: "):
        return title.removeprefix("engine: ")
    parts = title.split()
    if "resource_tracker" in title:
        return "resource tracker"
    # "python -m bench.baselines.fastapi_torch --port 0" -> "bench.baselines.fastapi_torch"
    if "-m" in parts and parts.index("-m") + 1 < len(parts):
        return parts[parts.index("-m") + 1]
    return parts[0] if parts else title


class CpuMeter:
    """CPU seconds each process used between `start` and `stop`.

    Args:
        processes: pid -> label.
    """

    def __init__(self, processes: dict[int, str]) -> None:
        self.processes = dict(processes)
        self._before: dict[int, float] = {}

    def start(self) -> None:
        """Take the first reading."""
        self._before = self.reading()

    def reading(self) -> dict[int, float]:
        """CPU seconds of each process so far (for `between`)."""
        return {pid: cpu_seconds(pid) for pid in self.processes}

    def stop(self, window_s: float, requests: int) -> dict[str, Any]:
        """The second reading: ``{"window_s", "processes": {label: {"cpu_s", "cores", "us_per_request"}}}``
        (``cores``: the share of one core it used over the window)."""
        return self.between(self._before, self.reading(), window_s, requests)

    def between(
        self, before: dict[int, float], after: dict[int, float], window_s: float, requests: int
    ) -> dict[str, Any]:
        """What `stop` gives, between two `reading`s (one burst round's, say)."""
        out: dict[str, Any] = {}
        for pid, label in self.processes.items():
            used = max(0.0, after.get(pid, 0.0) - before.get(pid, 0.0))
            name = label if label not in out else f"{label} ({pid})"
            out[name] = {
                "cpu_s": round(used, 4),
                "cores": round(used / window_s, 3) if window_s > 0 else None,
                "us_per_request": round(used * 1e6 / requests, 1) if requests else None,
            }
        return {"window_s": round(window_s, 3), "processes": out}


def py_spy() -> str | None:
    """The py-spy executable (next to this interpreter, or on PATH), or None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` on each process for ``duration_s``, raw (collapsed-stack) output in ``out_dir``.

    Raises:
        RuntimeError: py-spy is not installed.
    """

    def __init__(self, processes: dict[int, str], out_dir: str | Path, duration_s: float) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self._exe = exe
        self.processes = processes
        self.out_dir = Path(out_dir)
        self.duration_s = max(1, round(duration_s))
        self._running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        """Start one py-spy per process."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid, label in self.processes.items():
            path = self.out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{pid}.txt"
            argv = [
                self._exe, "record", "--pid", str(pid), "--duration", str(self.duration_s),
                "--rate", str(PROFILE_RATE), "--format", "raw", "--nonblocking", "-o", str(path),
            ]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._running.append((label, path, proc))

    def finish(self) -> dict[str, Any]:
        """Wait for every py-spy; the summary of each profile by process label."""
        summaries: dict[str, Any] = {}
        for label, path, proc in self._running:
            try:
                proc.wait(self.duration_s + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if path.exists():
                summaries[label] = {"file": str(path), **summarize_collapsed(path.read_text())}
        self._running.clear()
        return summaries


def _frame_name(frame: str) -> str:
    """``fn (path/to/module.py:12)`` -> ``fn (module.py)``: the same function on any line counts once."""
    frame = frame.strip()
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0] if re.search(r":\d+$", where) else where
    for marker in ("site-packages/", "/main/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name


def summarize_collapsed(text: str, top: int = TOP) -> dict[str, Any]:
    """Top functions of a collapsed-stack profile (``frame;frame;... count`` per line).

    Returns:
        ``samples``, ``self`` and ``total``: lists of ``[function, percent of samples]``, highest first
        (``self``: samples with the function on top; ``total``: samples with it anywhere on the stack).
    """
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            anywhere[name] += count

    if not samples:
        return {"samples": 0}

    def ranked(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / samples, 1)] for name, n in counter.most_common(top)]

    # "with callees" leaves out what is on (nearly) every stack: entry points, the event loop's run
    # call, interpreter frames; they say nothing about where the time goes.
    for name, n in list(anywhere.items()):
        if n >= ROOT_SHARE * samples or _BOILERPLATE.search(name):
            del anywhere[name]
    return {"samples": samples, "self": ranked(own), "total": ranked(anywhere)}


def engine_model_stats(host: str, rest_port: int, model: str) -> dict[str, Any] | None:
    """The engine's statistics of ``model`` (REST ``/v2/models/{model}/stats``), or None when unavailable."""
    import http.client

    import orjson

    try:
        conn = http.client.HTTPConnection(host, rest_port, timeout=5.0)
        try:
            conn.request("GET", f"/v2/models/{model}/stats")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            return None
        stats: dict[str, Any] = orjson.loads(body)["model_stats"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return stats


def _flatten(stats: dict[str, Any]) -> dict[str, int]:
    """Counters of one stats document, in either shape the engine has served: its own
    (``batch_stats: {"8": count | {"count", "compute_ns"}}``, ``queue_ns``) or Triton's
    (``batch_stats: [{"batch_size", "compute_infer": {"count", "ns"}}]``, ``inference_stats``)."""
    flat = {
        "batches": int(stats.get("execution_count", 0) or 0),
        "rows": int(stats.get("inference_count", 0) or 0),
        "queue_ns": int(stats.get("queue_ns", 0) or 0),
        "compute_ns": 0,
    }
    queue = (stats.get("inference_stats") or {}).get("queue") or {}
    flat["queue_ns"] = flat["queue_ns"] or int(queue.get("ns", 0) or 0)
    raw = stats.get("batch_stats") or {}
    entries = (
        [(str(e.get("batch_size")), e.get("compute_infer") or {}) for e in raw]
        if isinstance(raw, list)
        else list(raw.items())
    )
    for size, entry in entries:
        count = entry.get("count", 0) if isinstance(entry, dict) else entry
        flat[f"size:{size}"] = int(count or 0)
        if isinstance(entry, dict):
            flat["compute_ns"] += int(entry.get("compute_ns", entry.get("ns", 0)) or 0)
    return flat


def batch_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the worker did between two `engine_model_stats` readings: batches, rows, mean batch size,
    batches per size bucket (``"8"``: 5 to 8 rows), mean queue time per request and compute time per
    batch (ms, when the engine reports them)."""
    if not before or not after:
        return None
    a, b = _flatten(before), _flatten(after)
    d = {key: value - a.get(key, 0) for key, value in b.items()}
    batches, rows = d["batches"], d["rows"]
    sizes = {k.removeprefix("size:"): v for k, v in d.items() if k.startswith("size:") and v}
    return {
        "batches": batches,
        "rows": rows,
        "mean_batch": round(rows / batches, 2) if batches else None,
        "sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
        "queue_ms_per_request": round(d["queue_ns"] / rows / 1e6, 3) if rows and d["queue_ns"] else None,
        "compute_ms_per_batch": round(d["compute_ns"] / batches / 1e6, 3)
        if batches and d["compute_ns"]
        else None,
    }
