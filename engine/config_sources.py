"""The config sources (YAML file, ``ENGINE_*`` environment, command-line flags), layered into `EngineConfig`.

Precedence, lowest first: built-in defaults < YAML file < environment < flags (see `engine.config`).
Each source only turns text into typed values and names itself as the source; validation is left to
`EngineConfig`, so every source gets the same `ConfigError` messages. An unknown key is an error that
suggests the closest known one.
"""

from __future__ import annotations

import argparse
import difflib
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.config_error import ConfigError
from engine.config_keys import LOG_LEVELS, split_list
from engine.config_schema import KEYS, EngineConfig

ENV_PREFIX = "ENGINE_"
#: ENGINE_* variables that are not config keys: the YAML file to read, build switches of setup.py, and
#: the test suite's switches (which reach servers the tests launch).
ENV_NOT_KEYS = frozenset(
    {"ENGINE_CONFIG", "ENGINE_DEBUG", "ENGINE_SANITIZE", "ENGINE_BENCH_QUICK", "ENGINE_TEST_SEED"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

# --- parsing text (env, flags) into typed values ---------------------------------------------------

_HINTS = typing.get_type_hints(EngineConfig)


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
        return split_list(text)
    return text  # str, Path, and devices ("auto" or a comma list: its check splits it)


# --- reading the sources ------------------------------------------------------------------------


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
