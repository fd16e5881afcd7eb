"""EngineConfig: defaults, source precedence, parsing, and one clear error per bad value or unknown key."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from engine import config_schema
from engine.config import (
    ConfigError,
    EngineConfig,
    build_arg_parser,
    load_config,
    main_exit_on_error,
    resolve_devices,
    resolve_spin_s,
)
from engine.models import builtin_repository


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load_config([], {})
    assert cfg.host == "127.0.0.1"
    assert (cfg.grpc_port, cfg.zmq_port, cfg.rest_port) == (7212, 7211, 8008)
    assert cfg.protocols == ("grpc", "rest", "zmq")
    assert cfg.devices == "auto"
    assert cfg.model_repository == builtin_repository()
    assert cfg.ring_capacity == 4096
    assert (cfg.frontend_arena_mb, cfg.worker_arena_mb, cfg.max_message_mb) == (256, 256, 64)
    assert (cfg.restart_budget, cfg.restart_window_s, cfg.log_level) == (5, 60.0, "INFO")
    assert cfg.auth_tokens == ()
    assert cfg == EngineConfig()


@pytest.mark.parametrize(("cpus", "grpc"), [(None, 1), (1, 1), (2, 1), (6, 3), (16, 4), (64, 4)])
def test_grpc_frontends_default_follows_cpu_count(
    monkeypatch: pytest.MonkeyPatch, cpus: int | None, grpc: int
) -> None:
    monkeypatch.setattr(config_schema.os, "cpu_count", lambda: cpus)
    cfg = EngineConfig()
    assert (cfg.grpc_frontends, cfg.rest_frontends, cfg.zmq_frontends) == (grpc, 1, 1)


def test_worker_spin_defaults_to_300_us_and_takes_an_explicit_value() -> None:
    assert resolve_spin_s(EngineConfig()) == pytest.approx(300e-6)
    assert resolve_spin_s(load_config(["--set", "worker_spin_us=0"], {})) == 0.0
    assert resolve_spin_s(load_config(["--set", "worker_spin_us=50"], {})) == pytest.approx(50e-6)


def test_grpc_transport_defaults_to_h2_and_takes_either_name() -> None:
    assert EngineConfig().grpc_transport == "h2"
    assert load_config(["--set", "grpc_transport=GRPCIO"], {}).grpc_transport == "grpcio"
    assert load_config([], {"ENGINE_GRPC_TRANSPORT": "h2"}).grpc_transport == "h2"


def test_in_container_binds_every_interface_unless_host_is_given() -> None:
    assert load_config([], {"ENGINE_IN_CONTAINER": "1"}).host == "0.0.0.0"
    assert load_config(["--host", "10.0.0.5"], {"ENGINE_IN_CONTAINER": "1"}).host == "10.0.0.5"
    assert load_config([], {"ENGINE_IN_CONTAINER": "0"}).host == "127.0.0.1"


def test_precedence_defaults_yaml_env_cli(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "grpc_port: 1000\nrest_port: 1001\nzmq_port: 1002\nlog_level: debug\n")
    env = {"ENGINE_REST_PORT": "2001", "ENGINE_ZMQ_PORT": "2002"}
    cfg = load_config(["--config", str(path), "--zmq-port", "3002"], env)
    assert (cfg.grpc_port, cfg.rest_port, cfg.zmq_port) == (1000, 2001, 3002)
    assert cfg.log_level == "DEBUG"
    assert cfg.ring_capacity == 4096  # untouched default


def test_yaml_file_from_env_and_set_flag(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "ring_capacity: 1024\nprotocols: [zmq]\n")
    cfg = load_config(
        ["--set", "worker_threads=3", "--set", "drain-grace-s=1.5"], {"ENGINE_CONFIG": str(path)}
    )
    assert (cfg.ring_capacity, cfg.protocols) == (1024, ("zmq",))
    assert (cfg.worker_threads, cfg.drain_grace_s) == (3, 1.5)


def test_dedicated_flag_wins_over_set() -> None:
    assert load_config(["--set", "grpc_port=1", "--grpc-port", "2"], {}).grpc_port == 2


def test_lists_are_comma_separated() -> None:
    env = {
        "ENGINE_DEVICES": "cuda:0, cuda:1",
        "ENGINE_PROTOCOLS": "grpc,zmq",
        "ENGINE_AUTH_TOKENS": "s3cret,other",
    }
    cfg = load_config([], env)
    assert cfg.devices == ("cuda:0", "cuda:1")
    assert cfg.protocols == ("grpc", "zmq")
    assert cfg.auth_tokens == ("s3cret", "other")
    assert load_config(["--devices", "cpu"], {}).devices == ("cpu",)
    assert load_config([], {"ENGINE_PROTOCOLS": ""}).protocols == ()
    assert "s3cret" not in repr(cfg.as_dict())


def test_model_repository_flag_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config(["--model-repository", "models"], {}).model_repository == tmp_path / "models"


def test_foreign_and_build_env_vars_are_ignored() -> None:
    env = {"PATH": "/bin", "GRPC_PORT": "nonsense", "ENGINE_DEBUG": "1", "ENGINE_SANITIZE": "1"}
    assert load_config([], env) == EngineConfig()


def test_booleans() -> None:
    for text, want in [("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)]:
        assert load_config([], {"ENGINE_IN_CONTAINER": text}).in_container is want


BAD_VALUES = [
    # (argv, env, key, value shown, reason fragment)
    (["--grpc-port", "-1"], {}, "grpc_port", "-1", "between 0 and 65535"),
    (["--rest-port", "70000"], {}, "rest_port", "70000", "between 0 and 65535"),
    ([], {"ENGINE_ZMQ_PORT": "abc"}, "zmq_port", "abc", "expected an integer"),
    (["--set", "ring_capacity=1000"], {}, "ring_capacity", "1000", "power of two"),
    (["--set", "grpc_transport=http3"], {}, "grpc_transport", "http3", "choose from grpcio, h2"),
    ([], {"ENGINE_RING_CAPACITY": "0"}, "ring_capacity", "0", "between 2"),
    (["--log-level", "loud"], {}, "log_level", "loud", "DEBUG, INFO"),
    ([], {"ENGINE_PROTOCOLS": "grpc,http"}, "protocols", "http", "unknown protocol"),
    ([], {"ENGINE_PROTOCOLS": "grpc,grpc"}, "protocols", "grpc", "twice"),
    (["--devices", "gpu0"], {}, "devices", "gpu0", "cuda:N"),
    (["--devices", "auto,cpu"], {}, "devices", "auto", "cuda:N"),
    (["--model-repository", "/no/such/dir"], {}, "model_repository", "/no/such/dir", "no such folder"),
    ([], {"ENGINE_HEARTBEAT_INTERVAL_S": "0"}, "heartbeat_interval_s", "0", "> 0"),
    ([], {"ENGINE_DRAIN_GRACE_S": "nan"}, "drain_grace_s", "nan", "finite"),
    ([], {"ENGINE_HANG_TIMEOUT_S": "0.2"}, "hang_timeout_s", "0.2", "heartbeat_interval_s"),
    (["--set", "max_message_mb=512"], {}, "max_message_mb", "512", "frontend_arena_mb"),
    ([], {"ENGINE_IN_CONTAINER": "maybe"}, "in_container", "maybe", "boolean"),
    (["--set", "grpc_frontends=0"], {}, "grpc_frontends", "0", "between 1"),
    (["--set", "worker_threads=-1"], {}, "worker_threads", "-1", ">= 0"),
    (["--host", "a b"], {}, "host", "a b", "address"),
]


@pytest.mark.parametrize(("argv", "env", "key", "shown", "reason"), BAD_VALUES)
def test_bad_value_names_key_value_source_and_fix(
    argv: list[str], env: dict[str, str], key: str, shown: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, env)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key == key
    message = str(err)
    assert "\n" not in message
    assert key in message and shown in message and reason in message
    assert err.source and err.source in message


def test_bad_yaml_values(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "grpc_port: '7000'\nring_capacity: 3\n")
    with pytest.raises(ConfigError, match=r"ring_capacity=3 \(from file .*engine.yaml\): must be a power"):
        load_config(["--config", str(path)], {})
    path = write_yaml(tmp_path, "grpc_port: true\n")
    with pytest.raises(ConfigError, match=r"grpc_port=True .*expected an integer"):
        load_config(["--config", str(path)], {})


def test_secret_values_are_redacted() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["--set", "auth_tokens=has space"], {})
    assert "has space" not in str(info.value)
    assert "auth_tokens" in str(info.value)


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "grpc_prot: 1\n")
    with pytest.raises(ConfigError, match=r"grpc_prot.*unknown setting; did you mean 'grpc_port'") as info:
        load_config(["--config", str(path)], {})
    assert info.value.key == "grpc_prot"


def test_unknown_key_in_env() -> None:
    with pytest.raises(ConfigError, match=r"ENGINE_GRPC_PROT.*did you mean 'ENGINE_GRPC_PORT'"):
        load_config([], {"ENGINE_GRPC_PROT": "1"})


def test_unknown_key_in_set() -> None:
    with pytest.raises(ConfigError, match=r"zzz.*unknown setting; known keys: host"):
        load_config(["--set", "zzz=1"], {})
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(["--set", "ring_capacity"], {})


@pytest.mark.parametrize(
    ("text", "reason"),
    [("[1, 2]\n", "must hold a mapping"), ("grpc_port: [\n", "not valid YAML")],
)
def test_malformed_yaml_file(tmp_path: Path, text: str, reason: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=reason):
        load_config(["--config", str(path)], {})


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config=.*cannot read the file"):
        load_config(["--config", str(tmp_path / "absent.yaml")], {})


def test_empty_yaml_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(["--config", str(write_yaml(tmp_path, ""))], {}) == EngineConfig()


def test_construction_in_code_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"grpc_port"):
        EngineConfig(grpc_port=-1)
    with pytest.raises(ConfigError, match=r"ring_capacity"):
        dataclasses.replace(EngineConfig(), ring_capacity=3)
    cfg = EngineConfig(devices=["cpu"], protocols=["REST"])  # type: ignore[arg-type]
    assert (cfg.devices, cfg.protocols) == (("cpu",), ("rest",))


def test_unknown_flag_exits_like_argparse() -> None:
    with pytest.raises(SystemExit):
        load_config(["--no-such-flag"], {})
    assert "--set" in build_arg_parser().format_help()


def test_main_exit_on_error_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    @main_exit_on_error
    def main() -> int:
        load_config(["--grpc-port", "-5"], {})
        return 0

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grpc_port=" in err and "-5" in err


def test_resolve_devices() -> None:
    import torch

    want = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    assert resolve_devices(EngineConfig()) == want
    assert resolve_devices(EngineConfig(devices=("cpu",))) == ["cpu"]
    with pytest.raises(ConfigError, match=r"cuda:999 not present"):
        resolve_devices(EngineConfig(devices=("cuda:999",)))


def test_importable_without_torch() -> None:
    code = "import sys, engine.config; engine.config.load_config([], {}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_survives_pickling_for_spawned_children() -> None:
    # multiprocessing's spawn pickles process arguments (locally, never over a socket).
    cfg = load_config(["--devices", "cpu"], {"ENGINE_AUTH_TOKENS": "t"})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
