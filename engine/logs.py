"""Logging set-up shared by every process: text lines or one JSON object per line, with role and request id.

Every process calls `setup_logging` once with the config's level and format and its role
(``supervisor``, ``worker cpu``, ``frontend grpc#0``). Formats:

- ``text``: ``<time> <level> [<role>] <logger>: <message>`` for people at a terminal.
- ``json``: one JSON object per line for log shippers::

      {"ts": "2025-01-01T12:00:00.123+00:00", "level": "INFO", "role": "worker cpu", "pid": 4242,
       "logger": "engine.worker", "event": "model_load", "msg": "loaded model mlp on cpu", "model": "mlp"}

  ``event`` names what happened (``start``, ``ready``, ``model_load``, ``restart``, ``access``, ...;
  ``error`` for any record at ERROR or above that names none, ``log`` otherwise). Fields passed with
  ``extra=`` become keys, ``request_id`` is added while a request is being handled (`request_id`
  context variable, set by the front-ends), and a traceback goes in ``exc`` (escaped, so still one line).
- ``auto``: ``text`` when stderr is a terminal, else ``json`` (containers, systemd, files).
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

LOG_FORMATS = ("auto", "json", "text")

#: The id of the request the current asyncio task is handling ("" outside a request). Front-ends set
#: it when a request arrives; every record logged in that task carries it.
request_id: ContextVar[str] = ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """``json`` or ``text`` for a configured format (``auto`` looks at whether ``stream`` is a terminal).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose from {', '.join(LOG_FORMATS)}")
    if fmt != "auto":
        return fmt
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream: machines read it
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys).

    Args:
        role: this process's role, logged as ``role`` on every line.
    """

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": self.role,
            "pid": self.pid,
            "logger": record.name,
            "event": "error" if record.levelno >= logging.ERROR else "log",
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        # default=str: an odd extra value must not lose the record
        return orjson.dumps(doc, default=str).decode()


def text_formatter(role: str) -> logging.Formatter:
    """The ``text`` format's formatter."""
    return logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")


def setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Configure the root logger of this process: ``fmt`` lines on stderr at ``level``.

    Args:
        level: DEBUG, INFO, WARNING, ERROR or CRITICAL.
        role: the process's role (``supervisor``, ``worker cpu``, ``frontend rest#0``).
        fmt: ``text``, ``json`` or ``auto`` (see the module docstring).
    """
    handler = logging.StreamHandler(sys.stderr)
    resolved = resolve_format(fmt, sys.stderr)
    handler.setFormatter(JsonFormatter(role) if resolved == "json" else text_formatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # warnings.warn() output goes through the same handler, so a JSON log stays all JSON.
    logging.captureWarnings(True)
