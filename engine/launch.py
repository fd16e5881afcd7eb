"""`python -m engine.launch`: start the supervisor, print the endpoints, run until SIGTERM/SIGINT.

Exit status: 0 after a graceful stop, 2 for a bad config, 1 when start-up fails or a child crash-loops
past its restart budget (so systemd or Kubernetes restarts the whole server).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from engine.config import ConfigError, load_config
from engine.logs import setup_logging
from engine.supervisor import StartupError, Supervisor

log = logging.getLogger("engine.launch")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, "supervisor", config.log_format)
    try:
        from setproctitle import setproctitle

        setproctitle("engine: supervisor")
    except ImportError:  # pragma: no cover
        pass
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    supervisor = Supervisor(config)
    try:
        supervisor.start()
    except StartupError as err:
        log.error("%s", err.message)
        print(f"error: {err.message}", file=sys.stderr)
        supervisor.stop(grace_s=0)
        return 1
    except BaseException:
        supervisor.stop(grace_s=0)
        raise
    try:
        # inside the try: a closed stdout (BrokenPipeError) must still stop the children and unlink
        endpoints = supervisor.endpoints()
        for proto, port in sorted(endpoints.items()):
            print(f"{proto:5s} listening on {config.host}:{port}", flush=True)
        if supervisor.telemetry.port is not None:
            print(f"metrics listening on {config.host}:{supervisor.telemetry.port}", flush=True)
        log.info("ready: %s", endpoints, extra={"event": "ready", "endpoints": endpoints})
        print("ready", flush=True)
        while not stop.is_set() and supervisor.failed is None:
            supervisor.poll(0.1)
    finally:
        log.info("stopping (drain grace %.1f s)", config.drain_grace_s)
        supervisor.stop()
    return 1 if supervisor.failed else 0


if __name__ == "__main__":
    sys.exit(main())
