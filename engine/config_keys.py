"""The key table: `CHECKS`, one value check per config key, and the checks it is built from.

A check takes ``(key, value)`` with the value already typed (YAML gives types; env and flag text is
parsed first, see `engine.config_sources`) and returns it normalised (list -> tuple, str -> Path, log
level upper-cased...) or raises `ConfigError` naming the key, the value and the fix.
`EngineConfig.__post_init__` runs every check, so a config built in code is checked the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config_error import ConfigError
from engine.logs import LOG_FORMATS

PROTOCOLS = ("grpc", "rest", "zmq")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GRPC_TRANSPORTS = ("grpcio", "h2")
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+)$")


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated list (as env and flags write lists), items stripped, empty items dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _int(lo: int, hi: int | None = None, fix: str = "") -> Callable[[str, Any], int]:
    bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"

    def check(key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, value, f"expected an integer {bound}{fix}")
        if value < lo or (hi is not None and value > hi):
            raise ConfigError(key, value, f"must be {bound}{fix}")
        return value

    return check


def _float(lo: float, strict: bool = False) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(key, value, "expected a finite number of seconds")
        if value < lo or (strict and value == lo):
            raise ConfigError(key, value, f"must be {'>' if strict else '>='} {lo}")
        return float(value)

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "expected a boolean (true/false, 1/0, yes/no, on/off)")
    return value


def _str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return split_list(value)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, value, "expected a list of strings (comma-separated in env and flags)")
    return tuple(value)


def _host(key: str, value: Any) -> str:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ConfigError(key, value, "expected an address such as 127.0.0.1, 0.0.0.0 or a host name")
    return value


def _protocols(key: str, value: Any) -> tuple[str, ...]:
    protocols = tuple(p.lower() for p in _str_tuple(key, value))
    for p in protocols:
        if p not in PROTOCOLS:
            raise ConfigError(key, value, f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if len(set(protocols)) != len(protocols):
        raise ConfigError(key, value, "a protocol is listed twice; list each once")
    return protocols


def _devices(key: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    devices = _str_tuple(key, value)
    if not devices:
        raise ConfigError(key, value, "no device given; use auto, cpu or cuda:N[,cuda:M...]")
    for d in devices:
        if not _DEVICE_RE.match(d):
            raise ConfigError(key, value, f"bad device {d!r}; use auto, cpu or cuda:N (e.g. cuda:0)")
    if len(set(devices)) != len(devices):
        raise ConfigError(key, value, "a device is listed twice; list each once")
    return devices


def _repository(key: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(key, value, "expected a folder path")
    # Absolute, so children started with another working directory find the same folder.
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(key, str(value), "no such folder; point it at a folder of model subfolders")
    return path


def _log_level(key: str, value: Any) -> str:
    level = value.upper() if isinstance(value, str) else value
    if level not in LOG_LEVELS:
        raise ConfigError(key, value, f"unknown log level; choose from {', '.join(LOG_LEVELS)}")
    return str(level)


def _log_format(key: str, value: Any) -> str:
    fmt = value.lower() if isinstance(value, str) else value
    if fmt not in LOG_FORMATS:
        raise ConfigError(key, value, f"unknown log format; choose from {', '.join(LOG_FORMATS)}")
    return str(fmt)


def _grpc_transport(key: str, value: Any) -> str:
    name = value.lower() if isinstance(value, str) else value
    if name not in GRPC_TRANSPORTS:
        raise ConfigError(key, value, f"unknown gRPC transport; choose from {', '.join(GRPC_TRANSPORTS)}")
    return str(name)


def _fraction(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(key, value, "expected a fraction in (0, 1], e.g. 0.01 to keep one request in 100")
    return float(value)


def _ring_capacity(key: str, value: Any) -> int:
    _int(2, 1 << 24)(key, value)
    if value & (value - 1):
        lower = 1 << (value.bit_length() - 1)
        raise ConfigError(key, value, f"must be a power of two (e.g. {lower} or {lower * 2})")
    return int(value)


def _tokens(key: str, value: Any) -> tuple[str, ...]:
    tokens = _str_tuple(key, value)
    if any(not t or any(c.isspace() or c == "," for c in t) for t in tokens):
        raise ConfigError(key, value, "each token must be non-empty, without spaces or commas")
    return tokens


_PORT = _int(0, 65535, " (0 picks a free port)")
_COUNT = _int(1, 64)

#: config key -> its check: takes (key, value), returns the normalised value or raises ConfigError.
CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "host": _host,
    "in_container": _bool,
    "grpc_port": _PORT,
    "zmq_port": _PORT,
    "rest_port": _PORT,
    "protocols": _protocols,
    "grpc_frontends": _COUNT,
    "grpc_transport": _grpc_transport,
    "rest_frontends": _COUNT,
    "zmq_frontends": _COUNT,
    "devices": _devices,
    "model_repository": _repository,
    "frontend_arena_mb": _int(1, 1 << 20),
    "worker_arena_mb": _int(1, 1 << 20),
    "ring_capacity": _ring_capacity,
    "max_message_mb": _int(1),
    "max_inflight_per_model": _int(1),
    "max_inflight_per_frontend": _int(0),
    "drain_grace_s": _float(0.0),
    "heartbeat_interval_s": _float(0.0, strict=True),
    "hang_timeout_s": _float(0.0, strict=True),
    "restart_backoff_s": _float(0.0),
    "restart_budget": _int(0),
    "restart_window_s": _float(0.0, strict=True),
    "log_level": _log_level,
    "log_format": _log_format,
    "access_log": _bool,
    "access_log_sample": _fraction,
    "metrics": _bool,
    "metrics_port": _int(-1, 65535, " (-1 turns it off, 0 picks a free port)"),
    "worker_threads": _int(0),
    "worker_spin_us": _int(-1, 100_000),
    "breaker_failures": _int(0),
    "breaker_cooldown_s": _float(0.0),
    "auth_tokens": _tokens,
    "auth_health_open": _bool,
}
