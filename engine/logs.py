"""Logging set-up shared by every process: one line per event with the process role as prefix."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, role: str) -> None:
    """Configure the root logger of this process: ``<time> <level> [<role>] <message>`` on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
