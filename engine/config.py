"""Engine configuration: the one typed, validated `EngineConfig`, its loaders and resolution helpers.

Precedence, lowest first::

    built-in defaults  <-  YAML file (--config FILE, or ENGINE_CONFIG=FILE)
                       <-  environment (ENGINE_<KEY>: ENGINE_GRPC_PORT=9000, ENGINE_DEVICES=cuda:0,cuda:1)
                       <-  command line (--grpc-port 9000 ..., or --set key=value for any key)

Every source only parses text into `EngineConfig`; all validation lives in `EngineConfig.__post_init__`,
so a config built in code (tests, embedding) is checked exactly like one read from the command line.
A bad value or an unknown key raises `ConfigError`, whose one-line message names the key, the value,
where it came from and how to fix it; `main_exit_on_error` turns it into exit status 2.

This module is the public entry point; import from here. It holds the helpers that resolve a config
against the machine (`resolve_spin_s`, `resolve_devices`) and re-exports the rest, which lives in:

- `engine.config_schema`: `EngineConfig`, every key with its default and meaning, `KEYS`;
- `engine.config_keys`: the per-key value checks (`CHECKS`), `PROTOCOLS`, `LOG_LEVELS`;
- `engine.config_sources`: YAML, environment and flag loading (`load_config`, `config_from_args`,
  `build_arg_parser`);
- `engine.config_error`: `ConfigError`, `SECRET_KEYS`, `main_exit_on_error`.

Pure Python: importable without torch (only `resolve_devices` imports it, lazily).
"""

from __future__ import annotations

from engine.config_error import SECRET_KEYS, ConfigError, main_exit_on_error
from engine.config_keys import LOG_LEVELS, PROTOCOLS
from engine.config_schema import CONTAINER_HOST, KEYS, LOCAL_HOST, EngineConfig
from engine.config_sources import (
    ENV_NOT_KEYS,
    ENV_PREFIX,
    build_arg_parser,
    config_from_args,
    load_config,
)

#: The worker's spin when ``worker_spin_us`` is -1. It spins only at light traffic
#: (`engine.worker.core.SPIN_INFLIGHT_AT_MOST`): an idle engine spends nothing on it, and a loaded
#: one leaves the CPU to its front-ends.
#: At concurrency 1 on the 2-core VM, against no spin (alternating runs, 2 noisy minutes left out),
#: gRPC p50 through grpc.aio's client 1.18-1.37 -> 0.88-1.18 ms, through the lean one 0.67-0.92 ->
#: 0.52-0.83, ZMQ and REST 0.05-0.2 ms less; 1000 us did no better. There the worker never sleeps:
#: the front-end's release of each answer lands within one spin and the next request within the
#: next, so it holds a core (0.98 against ~0.6 without), and it spares the futex wakes. The client
#: and front-end spent less CPU per request too (grpc.aio's client 390-460 -> 260-350 us), likely
#: because one vCPU stays awake: on a VM a wake-up on a halted vCPU is dearer.
DEFAULT_SPIN_US = 300


def resolve_spin_s(cfg: EngineConfig) -> float:
    """The worker's spin time in seconds (``worker_spin_us``, with -1 meaning `DEFAULT_SPIN_US`)."""
    if cfg.worker_spin_us >= 0:
        return cfg.worker_spin_us / 1e6
    return DEFAULT_SPIN_US / 1e6


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


__all__ = [
    "CONTAINER_HOST",
    "ENV_NOT_KEYS",
    "ENV_PREFIX",
    "KEYS",
    "LOCAL_HOST",
    "LOG_LEVELS",
    "PROTOCOLS",
    "SECRET_KEYS",
    "ConfigError",
    "EngineConfig",
    "build_arg_parser",
    "config_from_args",
    "load_config",
    "main_exit_on_error",
    "resolve_devices",
    "resolve_spin_s",
]
