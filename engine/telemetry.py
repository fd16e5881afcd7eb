"""Telemetry plumbing of the supervisor: the metrics folder, what each child is told, the metrics port.

`Telemetry` lives in the supervisor. When ``metrics`` is on it creates a private folder
(``engine-metrics-<pid>-*`` in the temp dir, mode 0700) where every child's prometheus_client writes
its multiprocess files, tells each child about it in `TelemetrySettings` (the folder travels in the
child's arguments, not in the supervisor's environment, so an embedding program's environment and
its own prometheus_client are left alone; the child sets it in its own environment, see
`engine.metrics.enable_multiprocess`), marks a dead child's live gauges gone
(``multiprocess.mark_process_dead``), optionally serves ``/metrics`` on ``metrics_port`` from a thread
of the supervisor, and removes the folder on stop. Folders of supervisors that died without stopping
(SIGKILL) are swept at the next start, as shared-memory segments are.

Importable without prometheus_client, torch or the protocol libraries: children import it early.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("engine.telemetry")

DIR_PREFIX = "engine-metrics-"
_DIR_RE = re.compile(rf"^{DIR_PREFIX}(\d+)-")


@dataclass(frozen=True)
class TelemetrySettings:
    """What every child process is told about metrics and logs.

    Attributes:
        metrics_dir: prometheus_client's multiprocess folder; empty when metrics are off.
        log_format: ``json`` or ``text`` (resolved; see `engine.logs`).
        access_log: log one line per inference request (front-ends).
        access_log_sample: the fraction of requests the access log keeps, in (0, 1].
        workers: a label per worker slot (device), in board order.
        frontends: a label per front-end slot (``grpc#0``, ``rest#0``...), in board order.
    """

    metrics_dir: str = ""
    log_format: str = "text"
    access_log: bool = False
    access_log_sample: float = 1.0
    workers: tuple[str, ...] = ()
    frontends: tuple[str, ...] = ()

    @property
    def metrics(self) -> bool:
        """Whether per-request metrics are collected."""
        return bool(self.metrics_dir)


def sweep_stale_dirs(root: str | None = None) -> list[str]:
    """Remove metrics folders of supervisors that are gone (same user only); their names."""
    root_path = Path(root or tempfile.gettempdir())
    removed = []
    for path in root_path.glob(f"{DIR_PREFIX}*"):
        match = _DIR_RE.match(path.name)
        try:
            if not match or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Telemetry:
    """The supervisor's side of metrics and logs (see the module docstring).

    Args:
        config: the engine config (``metrics``, ``metrics_port``, ``log_format``, ``access_log``...).
        log_format: the resolved log format the children use (``json`` or ``text``).
    """

    def __init__(self, config: Any, log_format: str = "text") -> None:
        self.config = config
        self.log_format = log_format
        self.directory = ""
        self.port: int | None = None
        self._http: Any = None
        self._reader: Any = None

    def open(self) -> str:
        """Create the metrics folder (once; nothing when metrics are off); returns it."""
        if self.config.metrics and not self.directory:
            sweep_stale_dirs()
            # mkdtemp creates it with mode 0700: only this user's processes read or write the files
            self.directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        return self.directory

    def settings(self, supervisor: Any) -> TelemetrySettings:
        """What the children of ``supervisor`` are told (its devices and front-end slots name them)."""
        cfg = self.config
        return TelemetrySettings(
            metrics_dir=self.open(),
            log_format=self.log_format,
            access_log=cfg.access_log,
            access_log_sample=cfg.access_log_sample,
            workers=tuple(supervisor.devices),
            frontends=tuple(
                c.name.removeprefix("frontend ") for c in supervisor.children_by_role("frontend")
            ),
        )

    def process_exited(self, pid: int | None) -> None:
        """A child died: its live gauges (in-flight, queue depth) must stop counting."""
        if self.directory and pid:
            from prometheus_client import multiprocess

            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, self.directory)

    def serve(self, supervisor: Any) -> int | None:
        """Serve ``/metrics`` on ``metrics_port`` (when >= 0) from a thread; returns the bound port."""
        port = self.config.metrics_port
        if port < 0 or self._http is not None or supervisor.control is None:
            return self.port
        from prometheus_client import start_http_server

        from engine.stats import BoardReader
        from servers.metrics_http import build_registry

        s = self.settings(supervisor)
        self._reader = BoardReader(
            supervisor.control, supervisor.layout, supervisor.base, supervisor.specs, s.workers, s.frontends
        )
        registry = build_registry(self._reader, self.directory or None)
        server, _thread = start_http_server(port, addr=self.config.host, registry=registry)
        self._http = server
        self.port = int(server.server_port)
        log.info(
            "metrics on http://%s:%d/metrics", self.config.host, self.port, extra={"event": "metrics_ready"}
        )
        return self.port

    def close(self) -> None:
        """Stop the metrics port and remove the folder. Safe to call twice."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        directory, self.directory = self.directory, ""
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
