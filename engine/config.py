"""Engine configuration: the one typed, validated `EngineConfig` and its loaders (YAML, env, CLI).

Precedence, lowest first::

    built-in defaults  <-  YAML file (--config FILE, or ENGINE_CONFIG=FILE)
                       <-  environment (ENGINE_<KEY>: ENGINE_GRPC_PORT=9000, ENGINE_DEVICES=cuda:0,cuda:1)
                       <-  command line (--grpc-port 9000 ..., or --set key=value for any key)

Every source only parses text into `EngineConfig`; all validation lives in `EngineConfig.__post_init__`,
so a config built in code (tests, embedding) is checked exactly like one read from the command line.
A bad value or an unknown key raises `ConfigError`, whose one-line message names the key, the value,
where it came from and how to fix it; `main_exit_on_error` turns it into exit status 2.

Pure Python: importable without torch (only `resolve_devices` imports it, lazily).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine.logs import LOG_FORMATS
from engine.models import builtin_repository

ENV_PREFIX = "ENGINE_"
#: ENGINE_* variables that are not config keys: the YAML file to read, build switches of setup.py, and
#: the test suite's switches (which reach servers the tests launch).
ENV_NOT_KEYS = frozenset(
    {"ENGINE_CONFIG", "ENGINE_DEBUG", "ENGINE_SANITIZE", "ENGINE_BENCH_QUICK", "ENGINE_TEST_SEED"}
)
PROTOCOLS = ("grpc", "rest", "zmq")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Keys whose values never appear in error messages or `as_dict()`.
SECRET_KEYS = frozenset({"auth_tokens"})
LOCAL_HOST = "127.0.0.1"
CONTAINER_HOST = "0.0.0.0"
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+)$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A config value is invalid or a key is unknown.

    Attributes:
        key: the config key (or the unknown name as written: ``ENGINE_GRPC_PROT``, ``--set`` key...).
        value: the offending value (redacted for secret keys).
        reason: what is wrong and how to fix it.
        source: where the value came from (``environment ENGINE_GRPC_PORT``, ``file x.yaml``...), or "".
    """

    def __init__(self, key: str, value: object, reason: str, source: str = "") -> None:
        self.key = key
        self.value = "<redacted>" if key in SECRET_KEYS else value
        self.reason = reason
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key}={self.value!r}{where}: {reason}")

    def with_source(self, source: str) -> ConfigError:
        """The same error, saying where the value came from (unless it already does)."""
        if self.source or not source:
            return self
        return ConfigError(self.key, self.value, self.reason, source)


def _default_grpc_frontends() -> int:
    # gRPC parsing is the most CPU-hungry front-end; spread it when there are cores to spare.
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus // 2)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the supervisor, workers and front-ends are configured with.

    Attributes:
        host: address the front-ends bind; empty (the default) means 127.0.0.1, or 0.0.0.0 when
            ``in_container`` is set.
        in_container: running inside a container (env ENGINE_IN_CONTAINER=1): bind every interface.
        grpc_port: gRPC (KServe v2) port; 0 picks a free port, reported back at start.
        zmq_port: ZMQ ROUTER port; 0 picks a free port.
        rest_port: REST (KServe v2 HTTP) port; 0 picks a free port.
        protocols: front-end protocols to serve, any of ``grpc``, ``rest``, ``zmq``; empty serves
            none (embedding: workers only).
        grpc_frontends: gRPC front-end processes sharing the port (SO_REUSEPORT); default 1 on
            machines with <= 2 CPUs, else min(4, cpus // 2).
        rest_frontends: REST front-end processes.
        zmq_frontends: ZMQ front-end processes.
        devices: ``"auto"`` (every CUDA device, else the CPU; see `resolve_devices`) or a tuple of
            device names (``cpu``, ``cuda:0``...); one worker process per device.
        model_repository: folder with one subfolder per model; default the built-in demo models.
        frontend_arena_mb: shared-memory tensor arena per front-end, for request payloads (MiB).
        worker_arena_mb: shared-memory tensor arena per worker, for outputs (MiB).
        ring_capacity: descriptor slots of each shared-memory ring; a power of two.
        max_message_mb: largest request accepted on any protocol (MiB); at most ``frontend_arena_mb``.
        max_inflight_per_model: admission bound per model and front-end; beyond it requests are
            refused at once with RESOURCE_EXHAUSTED.
        max_inflight_per_frontend: admission bound per front-end process over all models; 0 (the
            default) means half of ``ring_capacity``, the most allowed (the other half of each ring
            carries region releases).
        drain_grace_s: on SIGTERM, how long in-flight requests may finish before children are killed.
        heartbeat_interval_s: how often each child stamps its heartbeat in shared memory.
        hang_timeout_s: a child whose heartbeat is older than this is deemed hung and restarted;
            must exceed ``heartbeat_interval_s``.
        restart_backoff_s: first delay before restarting a crashed child (doubles per restart).
        restart_budget: restarts allowed per child within ``restart_window_s`` before the supervisor
            gives up on it.
        restart_window_s: the sliding window of ``restart_budget``.
        log_level: DEBUG, INFO, WARNING, ERROR or CRITICAL.
        log_format: ``json`` (one JSON object per line), ``text``, or ``auto`` (default): text when
            stderr is a terminal, else JSON (see `engine.logs`).
        access_log: log one ``access`` line per inference request (protocol, model, status code,
            duration, request id).
        access_log_sample: the fraction of requests the access log keeps, in (0, 1].
        metrics: count and time every request for Prometheus (``/metrics``); off saves the few
            microseconds per request this costs. Board gauges (processes, arenas, rings, worker
            counters) are served either way.
        metrics_port: also serve ``/metrics`` on this port from the supervisor; -1 (default) does
            not, 0 picks a free port (reported on stdout as ``metrics listening on host:port``).
        worker_threads: torch intra-op threads per CPU worker; 0 (default) means the CPUs left
            after one per front-end process, at least 1: torch's threads spin between parallel
            regions and would take the cores the front-ends need.
        breaker_failures: consecutive failed batches of a model that open its circuit breaker
            (requests then fail fast with UNAVAILABLE); 0 disables the breaker.
        breaker_cooldown_s: how long an open breaker refuses before one probe batch is let through.
        worker_spin_us: how long an idle worker spins on its rings before it sleeps on the futex;
            -1 (default) means 50 on machines with more than 2 CPUs and 0 otherwise: spinning buys
            microseconds only when a core is free, and on a small machine it takes the CPU the
            front-ends need.
        auth_tokens: accepted bearer tokens; empty disables authentication. Never logged.
        auth_health_open: health endpoints (gRPC ``grpc.health.v1``, REST ``/v2/health/*``, ZMQ PING)
            answer without a token, so orchestrator probes need no secret; false makes them need one.
    """

    host: str = ""
    in_container: bool = False
    grpc_port: int = 7212
    zmq_port: int = 7211
    rest_port: int = 8008
    protocols: tuple[str, ...] = PROTOCOLS
    grpc_frontends: int = field(default_factory=_default_grpc_frontends)
    rest_frontends: int = 1
    zmq_frontends: int = 1
    devices: str | tuple[str, ...] = "auto"
    model_repository: Path = field(default_factory=builtin_repository)
    frontend_arena_mb: int = 256
    worker_arena_mb: int = 256
    ring_capacity: int = 4096
    max_message_mb: int = 64
    max_inflight_per_model: int = 2048
    max_inflight_per_frontend: int = 0
    drain_grace_s: float = 10.0
    heartbeat_interval_s: float = 0.5
    hang_timeout_s: float = 10.0
    restart_backoff_s: float = 0.5
    restart_budget: int = 5
    restart_window_s: float = 60.0
    log_level: str = "INFO"
    log_format: str = "auto"
    access_log: bool = False
    access_log_sample: float = 1.0
    metrics: bool = True
    metrics_port: int = -1
    worker_threads: int = 0
    worker_spin_us: int = -1
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    auth_tokens: tuple[str, ...] = ()
    auth_health_open: bool = True

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            # Frozen: normalised values (list -> tuple, str -> Path...) go in through object.__setattr__.
            object.__setattr__(self, name, check(name, getattr(self, name)))
        if not self.host:
            object.__setattr__(self, "host", CONTAINER_HOST if self.in_container else LOCAL_HOST)
        if self.max_message_mb > self.frontend_arena_mb:
            raise ConfigError(
                "max_message_mb",
                self.max_message_mb,
                f"a message must fit the front-end arena; set it <= frontend_arena_mb "
                f"({self.frontend_arena_mb}) or raise frontend_arena_mb",
            )
        if self.max_inflight_per_frontend == 0:
            object.__setattr__(self, "max_inflight_per_frontend", self.ring_capacity // 2)
        if self.max_inflight_per_frontend > self.ring_capacity // 2:
            raise ConfigError(
                "max_inflight_per_frontend",
                self.max_inflight_per_frontend,
                f"must be at most half of ring_capacity ({self.ring_capacity}); raise ring_capacity "
                "or lower this bound",
            )
        if self.hang_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "hang_timeout_s",
                self.hang_timeout_s,
                f"must exceed heartbeat_interval_s ({self.heartbeat_interval_s}), or every child "
                "looks hung; use a few heartbeats' worth",
            )

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON-able values (for logs and the status command); secrets redacted."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_KEYS:
                value = f"<{len(value)} redacted>"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


# --- per-field validation ------------------------------------------------------------------------


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
        return _split(value)
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

_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "host": _host,
    "in_container": _bool,
    "grpc_port": _PORT,
    "zmq_port": _PORT,
    "rest_port": _PORT,
    "protocols": _protocols,
    "grpc_frontends": _COUNT,
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

KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineConfig))
if set(KEYS) != set(_CHECKS):  # a new field without a check would go unvalidated
    raise RuntimeError(f"config fields without a check: {set(KEYS) ^ set(_CHECKS)}")


# --- parsing text (env, flags) into typed values ---------------------------------------------------

_HINTS = typing.get_type_hints(EngineConfig)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse(key: str, raw: Any) -> Any:
    """Turn text from env/flags/YAML into the field's type; non-text YAML values pass to the checks."""
    if isinstance(raw, list):
        return tuple(raw)
    if not isinstance(raw, str):
        return raw
    hint = _HINTS[key]
    text = raw.strip()
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(key, raw, "expected a boolean (true/false, 1/0, yes/no, on/off)")
    if hint is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(key, raw, "expected an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, raw, "expected a number") from None
    if typing.get_origin(hint) is tuple:
        return _split(text)
    return text  # str, Path, and devices ("auto" or a comma list: its check splits it)


def _unknown(name: str, value: object, source: str, candidates: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name.lower().removeprefix("engine_").replace("-", "_"), KEYS, n=1)
    hint = f"did you mean {candidates[KEYS.index(close[0])]!r}?" if close else "known keys:"
    known = "" if close else " " + ", ".join(candidates)
    return ConfigError(name, value, f"unknown setting; {hint}{known}", source)


def _read_yaml(path: Path) -> dict[str, Any]:
    source = f"file {path}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError("config", str(path), f"cannot read the file: {err.strerror}") from None
    except yaml.YAMLError as err:
        reason = f"not valid YAML: {' '.join(str(err).split())}"
        raise ConfigError("config", str(path), reason) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "the file must hold a mapping of key: value")
    for key, value in data.items():
        if key not in KEYS:
            raise _unknown(str(key), value, source, KEYS)
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue  # variables the engine does not own are none of its business
        key = name[len(ENV_PREFIX) :].lower()
        source = f"environment {name}"
        if key not in KEYS:
            raise _unknown(name, value, source, [ENV_PREFIX + k.upper() for k in KEYS])
        found[key] = (value, source)
    return found


def _from_set(items: Sequence[str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        key = name.strip().lower().replace("-", "_")
        if not sep or not key:
            raise ConfigError("--set", item, "expected key=value, e.g. --set ring_capacity=8192")
        if key not in KEYS:
            raise _unknown(name.strip(), value, "--set", KEYS)
        found[key] = (value, f"--set {key}")
    return found


#: dedicated flag dest -> config key
_FLAGS = {
    "model_repository": "model_repository",
    "devices": "devices",
    "grpc_port": "grpc_port",
    "zmq_port": "zmq_port",
    "rest_port": "rest_port",
    "host": "host",
    "log_level": "log_level",
}


def build_arg_parser() -> argparse.ArgumentParser:
    """The engine's command-line flags; `launch` may add its own before parsing.

    Values stay text here: `config_from_args` parses and validates them like env values, so a bad
    flag value gets the same `ConfigError` message as a bad env value.
    """
    parser = argparse.ArgumentParser(
        prog="python -m engine.launch",
        description="Multiprocess shared-memory inference engine (gRPC, REST and ZMQ front-ends).",
        epilog="Precedence: defaults < --config YAML < ENGINE_<KEY> environment < flags. "
        f"Keys: {', '.join(KEYS)}.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of key: value (env ENGINE_CONFIG)")
    parser.add_argument("--model-repository", metavar="DIR", help="folder of model subfolders")
    parser.add_argument("--devices", metavar="LIST", help="auto, cpu, or cuda:0[,cuda:1...]")
    parser.add_argument("--grpc-port", metavar="PORT", help="gRPC port (0 = free port)")
    parser.add_argument("--zmq-port", metavar="PORT", help="ZMQ port (0 = free port)")
    parser.add_argument("--rest-port", metavar="PORT", help="REST port (0 = free port)")
    parser.add_argument("--host", metavar="ADDR", help="bind address")
    parser.add_argument("--log-level", metavar="LEVEL", help=", ".join(LOG_LEVELS))
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set any config key (repeatable); lists are comma-separated",
    )
    return parser


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EngineConfig:
    """Build the config from parsed flags (see `build_arg_parser`), the environment and the YAML file.

    Dedicated flags win over ``--set`` for the same key.

    Raises:
        ConfigError: a bad value or an unknown key, from any source.
    """
    env = os.environ if env is None else env
    layers: dict[str, tuple[Any, str]] = {}
    yaml_file = getattr(args, "config", None) or env.get("ENGINE_CONFIG")
    if yaml_file:
        path = Path(yaml_file).expanduser()
        layers.update((k, (v, f"file {path}")) for k, v in _read_yaml(path).items())
    layers.update(_from_env(env))
    layers.update(_from_set(getattr(args, "set", None) or []))
    for dest, key in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            layers[key] = (value, "--" + dest.replace("_", "-"))
    values: dict[str, Any] = {}
    for key, (raw, source) in layers.items():
        try:
            values[key] = _parse(key, raw)
        except ConfigError as err:
            raise err.with_source(source) from None
    try:
        return EngineConfig(**values)
    except ConfigError as err:
        if err.key not in layers:
            raise  # a default (or a cross-field check on one) failed: no source to name
        raw, source = layers[err.key]
        raise ConfigError(err.key, raw, err.reason, source) from None


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> EngineConfig:
    """Load the config from defaults, the YAML file, the environment and command-line flags.

    Args:
        argv: command-line arguments *without* the program name. None means no flags (not
            ``sys.argv``), so embedding code and tests never pick up the host program's arguments;
            `engine.launch` passes ``sys.argv[1:]``.
        env: the environment; None means ``os.environ``. Only ``ENGINE_*`` names are read.

    Raises:
        ConfigError: a bad value or an unknown key.
        SystemExit: an unknown flag (argparse prints usage and exits 2).
    """
    args = build_arg_parser().parse_args(list(argv) if argv is not None else [])
    return config_from_args(args, env)


def resolve_spin_s(cfg: EngineConfig) -> float:
    """The worker's spin time in seconds (``worker_spin_us``, with -1 resolved by core count)."""
    if cfg.worker_spin_us >= 0:
        return cfg.worker_spin_us / 1e6
    return 50e-6 if (os.cpu_count() or 1) > 2 else 0.0


def resolve_devices(cfg: EngineConfig) -> list[str]:
    """The devices to start one worker each on.

    ``"auto"`` means every CUDA device (``cuda:0``...) when torch sees one, else ``["cpu"]``. An
    explicit list is returned as is, after checking that its CUDA devices exist. Imports torch, lazily.

    Raises:
        ConfigError: a named CUDA device is not present.
    """
    # torch.cuda.is_available() initialises the driver in this process; safe because children are
    # started with `spawn`, never `fork`.
    if cfg.devices == "auto":
        try:
            import torch
        except ImportError:
            return ["cpu"]
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    devices = list(cfg.devices)
    wanted = [d for d in devices if d.startswith("cuda:")]
    if wanted:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [d for d in wanted if int(d.split(":")[1]) >= count]
        if missing:
            raise ConfigError(
                "devices",
                ",".join(devices),
                f"{', '.join(missing)} not present (this machine has {count} CUDA device(s)); "
                "use auto, cpu or an existing cuda:N",
            )
    return devices


_F = TypeVar("_F", bound=Callable[..., Any])


def main_exit_on_error(main: _F) -> _F:
    """Decorate a ``main()``: a `ConfigError` prints one line on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"engine: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return typing.cast(_F, wrapper)


__all__ = [
    "KEYS",
    "ConfigError",
    "EngineConfig",
    "build_arg_parser",
    "config_from_args",
    "load_config",
    "main_exit_on_error",
    "resolve_devices",
]
