"""Deployment files: Kubernetes manifests, the KServe runtime and docker-compose.yml.

- Every core Kubernetes object in deploy/ validates, strictly (unknown fields are errors), against the
  OpenAPI schemas that the PyPI package ``kubernetes-validate`` bundles (offline), for the newest
  Kubernetes it knows and an older one; ``kubectl kustomize`` builds the kustomization when kubectl
  is installed.
- The KServe ServingRuntime and InferenceService (custom resources: no bundled schema) are checked for
  the fields their CRDs require and for agreeing with each other; their containers validate as core
  Containers.
- What the files say is checked against the engine itself: flags, ENGINE_* variables and the
  ConfigMap's YAML make a valid `EngineConfig`; the /dev/shm each gives (emptyDir sizeLimit,
  shm_size) passes the supervisor's own start-up check for that config; probes hit the health routes
  on the REST port; the grace period outlasts drain_grace_s; the user is the image's non-root user.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import PROTOCOLS, EngineConfig, build_arg_parser, config_from_args
from engine.shm import BoardLayout
from engine.supervisor import ShmTooSmall, Supervisor
from tests.unit.test_dockerfile import final_user, parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve"
COMPOSE = REPO / "docker-compose.yml"
#: Kubernetes releases validated against: the newest the validator knows, and an older one still common.
OLDER_KUBERNETES = "1.28.0"
PORTS = {"zmq": 7211, "grpc": 7212, "http": 8008}
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
DOCKER_DEFAULT_SHM = 64 * 1000 * 1000


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) of every Kubernetes object in deploy/kubernetes but the Kustomization."""
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in load_docs(path):
            if doc["kind"] != "Kustomization":
                found.append((path.name, doc))
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec["containers"]
    return next(c for c in containers if name in (None, c["name"]))


def quantity(text: str | int) -> int:
    """Bytes of a Kubernetes quantity (``2Gi``, ``512Mi``, ``1G``) or a Docker size (``2gb``, ``512m``)."""
    match = re.fullmatch(r"(\d+)\s*([KMGTkmgt]i?|[kmgt]b?|b)?", str(text))
    assert match, f"not a size: {text!r}"
    number, unit = int(match[1]), (match[2] or "")
    binary = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    decimal = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    if not unit or unit == "b":
        return number
    if unit.endswith("i") or unit.lower().endswith("b") or unit.islower():
        return number * binary[unit[0].lower()]  # Ki/Mi/Gi; Docker's k/m/g and kb/mb/gb are binary too
    return number * decimal[unit[0].lower()]


def engine_config(
    args: list[str], env: dict[str, str], repository: Path, config_file: Path | None = None
) -> EngineConfig:
    """The config an engine started with these flags and ENGINE_* variables would run (the model
    repository and config file paths of the container replaced by local ones)."""
    parsed = build_arg_parser().parse_args(args)
    if parsed.model_repository is not None:
        parsed.model_repository = str(repository)
    if parsed.config is not None:
        assert config_file is not None, f"flags name a config file ({parsed.config}) the test lacks"
        parsed.config = str(config_file)
    engine_env = {k: v for k, v in env.items() if k.startswith("ENGINE_")}
    if "ENGINE_MODEL_REPOSITORY" in engine_env:
        engine_env["ENGINE_MODEL_REPOSITORY"] = str(repository)
    return config_from_args(parsed, env=engine_env)


def check_shm(config: EngineConfig, n_workers: int, shm_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's start-up check of /dev/shm, for a /dev/shm of ``shm_bytes``.

    Raises:
        ShmTooSmall: the arenas of ``config`` would not fit.
    """
    counts = {"grpc": config.grpc_frontends, "rest": config.rest_frontends, "zmq": config.zmq_frontends}
    n_frontends = sum(counts[p] for p in config.protocols)
    supervisor = Supervisor(config)
    supervisor.layout = BoardLayout(n_workers, n_frontends, config.ring_capacity)
    real = os.statvfs
    blocks = shm_bytes // 4096

    def statvfs(path: Any) -> os.statvfs_result:
        st = real("/")
        return os.statvfs_result(
            (4096, 4096, blocks, blocks, blocks, st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax)
        )

    with monkeypatch.context() as patch:
        patch.setattr(os, "statvfs", statvfs)
        supervisor._check_shm_space(n_workers, n_frontends)


def env_list(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


def image_uid() -> int:
    _, stages = parse_dockerfile((REPO / "Dockerfile").read_text())
    production = next(s for s in stages if s.name == "production")
    return int(final_user(production).split(":")[0])


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


# ---- schema validation of the core kinds ---------------------------------------------------------


@pytest.fixture(scope="module")
def validate() -> Iterator[Any]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    def check(doc: dict[str, Any]) -> None:
        for version in (latest_version() + ".0", OLDER_KUBERNETES):
            kv.validate(doc, version, strict=True)

    yield check


def test_core_manifests_validate_strictly(validate: Any) -> None:
    kinds = set()
    for name, doc in manifests():
        try:
            validate(doc)
        except Exception as err:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {err}")
        kinds.add(doc["kind"])
    assert kinds >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    }


def test_the_validator_rejects_unknown_fields_and_bad_types(validate: Any) -> None:
    from kubernetes_validate.utils import ValidationError

    deployment = one("Deployment")
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    container(typo["spec"]["template"]["spec"])["imagePullPolicyy"] = "Always"
    with pytest.raises(ValidationError):
        validate(typo)
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        validate(wrong)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_docs(KUBERNETES / "kustomization.yaml")
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert sorted(d["kind"] for d in built) == sorted(d["kind"] for _, d in manifests())


# ---- the Deployment and what goes with it --------------------------------------------------------


def test_deployment_requests_a_gpu_and_runs_as_the_image_user() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    engine = container(pod)
    resources = engine["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_uid() != 0
    assert engine["securityContext"]["allowPrivilegeEscalation"] is False
    assert engine["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "shm-inference-engine" in engine["image"]


def test_deployment_mounts_memory_backed_dev_shm() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # the emptyDir is memory charged to the container: the limit must hold it and the processes
    assert quantity(container(pod)["resources"]["limits"]["memory"]) > 2 * quantity(shm["sizeLimit"])
    # a read-only root file system needs a writable /tmp
    if container(pod)["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_deployment_probes_and_ports() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    engine = container(pod)
    ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert ports == PORTS
    assert engine["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert engine["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # the liveness probe must not kill a pod that is still loading its models
    assert engine["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = engine["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def deployment_config(tmp_path: Path, repository: Path) -> tuple[EngineConfig, dict[str, Any]]:
    """The engine config of the Deployment (its flags, env and the ConfigMap's file) and its pod spec."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    engine = container(pod)
    args = list(engine["args"])
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = volumes[mounts[str(config_path.parent)]]["configMap"]["name"]
    data = one("ConfigMap", config_map)["data"]
    local = tmp_path / config_path.name
    local.write_text(data[config_path.name])
    assert args[args.index("--model-repository") + 1] in mounts, "the model repository is not mounted"
    return engine_config(args, env_list(engine), repository, local), pod


def test_deployment_flags_env_and_configmap_make_a_valid_config(tmp_path: Path, repository: Path) -> None:
    config, _ = deployment_config(tmp_path, repository)
    assert config.in_container and config.host == "0.0.0.0"
    assert (config.zmq_port, config.grpc_port, config.rest_port) == tuple(PORTS.values())
    assert set(config.protocols) == set(PROTOCOLS)
    assert isinstance(config.grpc_frontends, int)


def test_grace_period_outlasts_the_drain(tmp_path: Path, repository: Path) -> None:
    config, pod = deployment_config(tmp_path, repository)
    assert pod["terminationGracePeriodSeconds"] >= config.drain_grace_s + 5


def test_dev_shm_of_the_deployment_holds_its_arenas(
    tmp_path: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, pod = deployment_config(tmp_path, repository)
    assert config.devices == "auto"  # one worker per GPU of the pod
    workers = int(container(pod)["resources"]["limits"]["nvidia.com/gpu"])
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    size = quantity(volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"])
    check_shm(config, workers, size, monkeypatch)
    with pytest.raises(ShmTooSmall):  # and a container's default /dev/shm would not do
        check_shm(config, workers, DOCKER_DEFAULT_SHM, monkeypatch)


def test_services_expose_the_three_ports_of_the_pods() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("sie", "sie-headless"):
        service = one("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {n: (port, n) for n, port in PORTS.items()}
    assert one("Service", "sie-headless")["spec"]["clusterIP"] == "None"


def test_hpa_and_pdb_target_the_deployment() -> None:
    deployment = one("Deployment")
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sie"}
    assert deployment["metadata"]["name"] == "sie"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]  # else no node could ever be drained


def test_model_claim_is_mounted_read_only() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    claim = one("PersistentVolumeClaim")
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


# ---- KServe ----------------------------------------------------------------------------------------


def serving_runtime() -> dict[str, Any]:
    (doc,) = load_docs(KSERVE / "servingruntime.yaml")
    return doc


def inference_service() -> dict[str, Any]:
    (doc,) = load_docs(KSERVE / "inferenceservice.yaml")
    return doc


def test_serving_runtime_has_the_required_fields() -> None:
    runtime = serving_runtime()
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ServingRuntime" and runtime["metadata"]["name"]
    spec = runtime["spec"]
    assert spec["containers"], "spec.containers is required by the CRD"
    assert all(c.get("name") for c in spec["containers"])
    assert all(f.get("name") for f in spec["supportedModelFormats"])
    protocols = set(spec["protocolVersions"])
    assert protocols <= KSERVE_PROTOCOLS and {"v2", "grpc-v2"} <= protocols
    engine = container(spec, "kserve-container")  # the name KServe looks for
    assert "shm-inference-engine" in engine["image"]


def test_serving_runtime_container_is_a_valid_core_container(validate: Any) -> None:
    spec = serving_runtime()["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    validate(pod)


def test_serving_runtime_flags_make_a_valid_config_on_kserves_ports(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = serving_runtime()["spec"]
    engine = container(spec, "kserve-container")
    args = build_arg_parser().parse_args(engine["args"])
    assert args.model_repository == "/mnt/models"  # where KServe's storage initializer puts it
    config = engine_config(engine["args"], env_list(engine), repository)
    assert config.in_container
    assert {"grpc", "rest"} <= set(config.protocols)
    assert config.rest_port == 8080 and config.grpc_port == 9000  # KServe's conventions
    assert {p["containerPort"] for p in engine["ports"]} <= {config.rest_port, config.grpc_port}
    probe = engine["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v2/health/ready", "port": config.rest_port}
    # its /dev/shm holds the arenas for the GPUs the InferenceService asks for
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in engine["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = volumes[mount["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    gpus = int(inference_service()["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"])
    check_shm(config, gpus, quantity(shm["sizeLimit"]), monkeypatch)


def test_inference_service_has_the_required_fields_and_uses_the_runtime() -> None:
    service = inference_service()
    runtime = serving_runtime()
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService" and service["metadata"]["name"]
    predictor = service["spec"]["predictor"]  # required by the CRD
    model = predictor["model"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert re.match(r"^(pvc|s3|gs|https?|hdfs|webhdfs|oci)://", model["storageUri"])
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    drain = build_arg_parser().parse_args(container(runtime["spec"])["args"]).set
    drain_s = float(next(s.split("=", 1)[1] for s in drain if s.startswith("drain_grace_s=")))
    assert predictor["terminationGracePeriodSeconds"] >= drain_s + 5


def test_inference_service_resources_are_valid(validate: Any) -> None:
    model = inference_service()["spec"]["predictor"]["model"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {"containers": [{"name": "kserve-container", "resources": model["resources"]}]},
    }
    validate(pod)


# ---- docker-compose.yml ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    """The compose file with ``${VAR:-default}`` interpolated to the defaults."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m[2], COMPOSE.read_text())
    assert "${" not in text, "a compose variable without a default"
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def test_compose_services_ports_volume_and_build() -> None:
    services = compose()["services"]
    assert set(services) == {"engine", "engine-gpu"}
    for name, service in services.items():
        assert {p.split(":")[-1] for p in service["ports"]} == {"7211", "7212", "8008"}, name
        assert any(v.split(":")[1] == "/models" for v in service["volumes"]), name
        assert service["environment"]["ENGINE_MODEL_REPOSITORY"] == "/models"
        assert service["build"]["target"] == "production"
    assert "gpu" in services["engine-gpu"]["profiles"] and "profiles" not in services["engine"]
    assert "/whl/cu" in services["engine-gpu"]["build"]["args"]["TORCH_INDEX"]


def test_compose_gpu_service_reserves_gpus_and_shares_the_host_ipc() -> None:
    gpu = compose()["services"]["engine-gpu"]
    assert gpu["ipc"] == "host"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_env_is_valid_config_and_shm_holds_the_arenas(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    for name, service in services.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        config = engine_config([], env, repository)
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace[1]) >= config.drain_grace_s + 5, name
        if name == "engine":
            assert config.devices == ("cpu",)
            check_shm(config, 1, quantity(service["shm_size"]), monkeypatch)
            with pytest.raises(ShmTooSmall):
                check_shm(config, 1, DOCKER_DEFAULT_SHM, monkeypatch)
        else:
            assert "shm_size" not in service  # ipc: host shares the host's /dev/shm


def test_quantity_units() -> None:
    assert quantity("2Gi") == quantity("2gb") == quantity("2g") == 2 << 30
    assert quantity("512Mi") == 512 << 20 and quantity("1G") == 10**9 and quantity(4096) == 4096
