"""Static checks of the Kubernetes base (deploy/k8s), as test_deploy_files.py does for compose.

No cluster runs here: the manifests are read as YAML and held against the code they deploy.
Every file is valid YAML listed in the kustomization; every TEACHERCACHE_* variable a container
gets is a setting and its value validates; every command exists in the CLI; the API is ready
on /healthz; each worker Deployment serves a teacher the registry knows, with the GPUs its
engine needs and a grace period longer than its drain; each has a KEDA ScaledObject (0..N)
whose Prometheus query reads that teacher's series of an autoscaling metric; PDBs select pods.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import PROJECT_ROOT, ServiceSettings
from service.teachers.registry import load_registry
from tests.unit.test_deploy_files import ENV_NAME, KNOWN_ENV, cli, load_settings, resolve_cli  # noqa: F401 (cli: a fixture)
from workers.fleet.settings import FleetSettings
from workers.settings import WorkerSettings

K8S = PROJECT_ROOT / "deploy" / "k8s"

# The per-teacher gauges /metrics exports for autoscalers (names fixed by the metrics work; see
# docs/scaling.md). A KEDA query must read at least one of them.
AUTOSCALING_METRICS = {"teachercache_pending_requests", "teachercache_pending_tokens",
                       "teachercache_running_leases", "teachercache_oldest_pending_age_seconds"}
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def manifests(kustomization) -> list[dict]:
    documents = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            if document is not None:
                documents.append(document)
    return documents


def of_kind(manifests, kind: str) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def pod_specs(manifests) -> list[tuple[str, dict]]:
    """(owner name, pod spec) of every Deployment and Job."""
    return [(m["metadata"]["name"], m["spec"]["template"]["spec"]) for m in manifests
            if m["kind"] in ("Deployment", "Job")]


def container_env(container: dict, manifests) -> dict[str, str]:
    """What the container's environment holds: envFrom ConfigMaps and Secrets, then `env`."""
    configmaps, secrets = of_kind(manifests, "ConfigMap"), of_kind(manifests, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names a ConfigMap {name!r} that is not in the base"
            env.update(configmaps[name]["data"])
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            assert name in secrets, f"envFrom names a Secret {name!r} that is not in the base"
            env.update(secrets[name].get("stringData", {}))
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def worker_teacher(container: dict) -> str | None:
    argv = container["command"] + container.get("args", [])
    if argv[:2] != ["teachercache", "worker"]:
        return None
    return argv[argv.index("--teacher") + 1]


@pytest.fixture(scope="module")
def registry(manifests, tmp_path_factory):
    """The built-in teachers plus the ones config.yaml's teachers file adds."""
    text = of_kind(manifests, "ConfigMap")["teachercache-teachers"]["data"]["teachers.yaml"]
    path = tmp_path_factory.mktemp("k8s") / "teachers.yaml"
    path.write_text(text)
    return load_registry(path)


@pytest.fixture(scope="module")
def workers(manifests) -> dict[str, tuple[dict, dict]]:
    """teacher -> (worker Deployment, its container)."""
    found = {}
    for deployment in of_kind(manifests, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if teacher := worker_teacher(container):
                assert teacher not in found, f"two worker Deployments for {teacher}"
                found[teacher] = (deployment, container)
    return found


def test_every_file_is_yaml_listed_in_the_kustomization(kustomization, manifests):
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not listed: {on_disk - listed}; missing: {listed - on_disk}"
    for document in manifests:
        assert {"apiVersion", "kind", "metadata"} <= set(document) and document["metadata"]["name"]


def test_every_teachercache_variable_is_a_setting_and_validates(manifests, monkeypatch):
    for owner, spec in pod_specs(manifests):
        for container in spec["containers"]:
            env = container_env(container, manifests)
            unknown = {name for name in env if ENV_NAME.fullmatch(name)} - KNOWN_ENV
            assert not unknown, f"{owner}: {unknown} are not settings"
            with monkeypatch.context() as patch:
                worker = load_settings(WorkerSettings, env, patch)
                load_settings(ServiceSettings, env, patch)
            if container["command"][1:3] != ["teacher", "prepare"]:  # the only command without a database
                assert worker.database_url, f"{owner}: no database URL (the Secret)"
    # The teachers file the ConfigMap mounts is the one the settings point at.
    config = of_kind(manifests, "ConfigMap")["teachercache-config"]["data"]
    assert Path(config["TEACHERCACHE_TEACHERS_FILE"]).parent == Path("/etc/teachercache")


def test_every_command_exists_in_the_cli(manifests, cli):
    commands = set()
    for owner, spec in pod_specs(manifests):
        for container in spec["containers"]:
            assert container.get("command"), f"{owner}: give the command explicitly"
            path, _ = resolve_cli(cli, container["command"] + container.get("args", []))
            commands.add(" ".join(path))
    assert {"serve", "db upgrade", "worker", "teacher prepare"} <= commands


def test_api_is_ready_on_healthz_behind_a_service(manifests, monkeypatch):
    api = of_kind(manifests, "Deployment")["teachercache-api"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    with monkeypatch.context() as patch:
        settings = load_settings(ServiceSettings, container_env(container, manifests), patch)
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == settings.port
    service = of_kind(manifests, "Service")["teachercache-api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert any(p["targetPort"] in (probe["port"], settings.port) for p in service["spec"]["ports"])


def test_migrations_job_upgrades_the_database(manifests):
    jobs = of_kind(manifests, "Job")
    commands = [c["command"] for job in jobs.values() for c in job["spec"]["template"]["spec"]["containers"]]
    assert ["teachercache", "db", "upgrade"] in commands


def test_one_worker_deployment_per_known_teacher_with_its_gpus(workers, registry, manifests, monkeypatch):
    assert workers, "no worker Deployment"
    for teacher, (deployment, container) in workers.items():
        spec = registry.get(teacher)  # raises for a teacher the registry does not know
        limits = container.get("resources", {}).get("limits", {})
        assert int(limits.get(GPU, 0)) == spec.gpus_per_engine(), f"{teacher}: GPUs != tensor_parallel_size"
        with monkeypatch.context() as patch:
            settings = load_settings(WorkerSettings, container_env(container, manifests), patch)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= settings.drain_s + 10, f"{teacher}: no time to drain {settings.drain_s} s"
        if spec.is_remote and spec.remote.api_key_env:
            assert spec.remote.api_key_env in container_env(container, manifests), f"{teacher}: no API key"
    assert any(registry.get(t).is_remote for t in workers) and any(not registry.get(t).is_remote for t in workers)


def test_each_worker_scales_from_zero_on_its_own_teachers_metric(workers, manifests):
    scaled = {}
    for scaled_object in of_kind(manifests, "ScaledObject").values():
        scaled[scaled_object["spec"]["scaleTargetRef"]["name"]] = scaled_object
    for teacher, (deployment, _) in workers.items():
        scaled_object = scaled.get(deployment["metadata"]["name"])
        assert scaled_object, f"no ScaledObject for {deployment['metadata']['name']}"
        spec = scaled_object["spec"]
        assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        series = re.findall(r"(teachercache_\w+)\{([^}]*)\}", query)
        assert series and {name for name, _ in series} <= AUTOSCALING_METRICS, query
        assert "teachercache_pending_requests" in {name for name, _ in series}
        assert all(labels == f'teacher="{teacher}"' for _, labels in series), f"{teacher}: {query}"
        assert float(trigger["metadata"]["threshold"]) >= 1 and float(trigger["metadata"]["activationThreshold"]) == 0


def test_disruption_budgets_select_the_api_and_each_workers_pods(workers, manifests):
    budgets = of_kind(manifests, "PodDisruptionBudget").values()

    def covered(labels: dict) -> bool:
        return any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets)

    api = of_kind(manifests, "Deployment")["teachercache-api"]
    assert covered(api["spec"]["template"]["metadata"]["labels"])
    for deployment, _ in workers.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert covered(labels) and deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_volumes_and_config_references_exist(manifests):
    claims = set(of_kind(manifests, "PersistentVolumeClaim"))
    configmaps = set(of_kind(manifests, "ConfigMap"))
    for owner, spec in pod_specs(manifests):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}: mount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps


def test_fleet_command_exists_with_the_documented_options(cli):
    _, command = resolve_cli(cli, ["teachercache", "fleet", "--teacher", "--min-replicas", "--max-replicas",
                                   "--gpus-per-replica", "--address"])
    assert command.name == "fleet"
    assert FleetSettings(min_replicas=0, max_replicas=3).policy().max_replicas == 3
