"""Keeps deploy/ honest: its files parse and name what the code and DESIGN.md §7 define.

No Ray is started: import paths are resolved with importlib, the Serve config is validated with
Ray Serve's own schema, building the application only binds deployments, and the Kubernetes
manifests are checked against Kubernetes' own schemas with kubernetes-validate.
tests/integration/test_deploy_config.py deploys the Serve config on a real Ray cluster.
"""

from __future__ import annotations

import copy
import importlib
import re
import socket
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gearbox.compression.devices import load_device_classes
from gearbox.serving.haproxy_launcher import LAUNCHER, RAY_BINARY_ENV
from gearbox.serving.ingress import HAPROXY_PORT_RANGE, Ingress, ray_environment

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
DEVICE_CLASSES = DEPLOY / "device_classes.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PODMONITOR = DEPLOY / "prometheus" / "podmonitor.yaml"
DASHBOARD = DEPLOY / "grafana" / "gearbox-dashboard.json"

IMPORT_PATH = "gearbox.serving.app:app_builder"
GRPC_SERVICER = "gearbox.serving.clock.add_inference_service"
SERVICE_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    docs = [doc for doc in _yaml_documents(path) if doc.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _resolve(dotted: str) -> Callable[..., Any]:
    module, _, attribute = dotted.replace(":", ".").rpartition(".")
    target = getattr(importlib.import_module(module), attribute)
    assert callable(target), f"{dotted} is not callable"
    return target


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _gearbox_app(config: dict[str, Any]) -> dict[str, Any]:
    apps = [app for app in config["applications"] if app["name"] == "gearbox"]
    assert len(apps) == 1, "exactly one application named 'gearbox'"
    return apps[0]


def _pod_templates(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _ray_cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    """A RayCluster's spec, or the one a RayService embeds."""
    spec = resource["spec"]
    return spec["rayClusterConfig"] if resource["kind"] == "RayService" else spec


def _first_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def _container_ports(group: dict[str, Any]) -> dict[str, int]:
    (container,) = group["template"]["spec"]["containers"]
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


# --- every file parses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_yaml_parses(path):
    assert _yaml_documents(path), f"{path} holds no YAML document"


def test_expected_files_exist():
    for path in (SERVE_CONFIG, DEVICE_CLASSES, CONTAINERFILE, RAYSERVICE, RAYCLUSTER,
                 PROMETHEUS, PODMONITOR, DASHBOARD, DEPLOY / "README.md"):  # fmt: skip
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


# --- Serve config ---------------------------------------------------------------------------


def test_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.parse_obj(_serve_config())


def test_serve_config_import_path_and_grpc_servicer_resolve():
    config = _serve_config()
    app = _gearbox_app(config)
    assert app["import_path"] == IMPORT_PATH
    assert app["route_prefix"] == "/"
    _resolve(app["import_path"])
    assert config["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER]
    for servicer in config["grpc_options"]["grpc_servicer_functions"]:
        _resolve(servicer)


def test_serve_config_ports_and_host():
    config = _serve_config()
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["grpc_options"]["port"] == 9000


def test_serve_config_args_build_the_application(tmp_path):
    from ray.serve import Application

    args = dict(_gearbox_app(_serve_config())["args"])
    accepted = importlib.import_module("gearbox.serving.app").APP_ARGS
    assert set(args) <= accepted, f"unknown app args {set(args) - accepted}"
    assert args["repository"] == "/models"
    # The builder accepts the file's args (and the device classes file); binding starts no Ray.
    args.update(repository=str(tmp_path), device_classes_file=str(DEVICE_CLASSES))
    assert isinstance(_resolve(IMPORT_PATH)(args), Application)


def test_device_classes_file_loads():
    classes = {device.name: device for device in load_device_classes(DEVICE_CLASSES)}
    assert set(classes) == {"cpu", "gpu"}
    assert classes["cpu"].execution_provider == "CPUExecutionProvider"
    assert dict(classes["cpu"].ray_resources) == {"CPU": 1}
    assert classes["gpu"].execution_provider == "CUDAExecutionProvider"
    assert dict(classes["gpu"].ray_resources) == {"GPU": 1}


# --- KubeRay --------------------------------------------------------------------------------


def test_rayservice_embeds_the_serve_config():
    service = _one(RAYSERVICE, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert _gearbox_app(embedded)["import_path"] == IMPORT_PATH
    config = _serve_config()
    for key in ("proxy_location", "http_options", "grpc_options", "applications"):
        assert embedded[key] == config[key], f"serveConfigV2 {key} differs from serve_config.yaml"


@pytest.mark.parametrize("path, kind", [(RAYSERVICE, "RayService"), (RAYCLUSTER, "RayCluster")])
def test_ray_pods_serve_gearbox_metrics_on_8080_and_mount_models(path, kind):
    cluster = _ray_cluster_spec(_one(path, kind))
    assert cluster["rayVersion"] == "2.60.0"
    for name, group in _pod_templates(cluster):
        # Gearbox's replicas hold 8080: Ray's own exporter must not.
        assert group["rayStartParams"].get("metrics-export-port") == "8081", name
        assert _container_ports(group).get("metrics") == 8080, name
        (container,) = group["template"]["spec"]["containers"]
        mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        assert "/models" in mounts, f"{kind} group {name} does not mount /models"


def test_rayservice_head_exposes_serving_ports():
    cluster = _one(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    ports = _container_ports(cluster["headGroupSpec"])
    assert {ports.get("serve"), ports.get("grpc"), ports.get("metrics")} == {8000, 9000, 8080}


def test_containerfile_pins_the_same_torch_and_exposes_ports():
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in dependencies if d.replace(" ", "").startswith("torch==")]
    version = torch_pin.split("==", 1)[1].strip()
    assert f"ARG TORCH_VERSION={version}" in text
    assert "download.pytorch.org/whl/cpu" in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)
               for p in line.split()}  # fmt: skip
    assert {8000, 9000, 8080} <= exposed
    for copied in ("deploy/serve_config.yaml", "deploy/device_classes.yaml"):
        assert copied in text


# --- Kubernetes schemas ---------------------------------------------------------------------
#
# kubernetes-validate ships Kubernetes' own OpenAPI schemas for the built-in kinds, in a strict
# form in which an unknown field is an error (as `kubectl apply --validate=strict` makes it), so
# a built-in manifest (the PersistentVolumeClaim) is validated whole. It has no schema for custom
# resources: RayService and RayCluster (KubeRay) and PodMonitor (Prometheus Operator) are
# defined by their operators' CRDs, which are not at hand offline. Their parts that ARE
# Kubernetes types are validated for real instead, each placed where a built-in kind holds that
# same type, so a misspelt or mistyped field there fails exactly as it would in a built-in:
#   - metadata: ObjectMeta, the same type in every kind (checked as a ConfigMap's);
#   - headGroupSpec.template and every workerGroupSpecs[].template: the CRD embeds a core
#     PodTemplateSpec (checked as a PodTemplate's template);
#   - a RayService's serveService: a core Service;
#   - a PodMonitor's selector: a meta/v1 LabelSelector over pods (checked as a NetworkPolicy's
#     podSelector, which is one).
# The operators' own fields (rayStartParams, replica bounds, scrape endpoints) are held to the
# rules their CRDs and Prometheus state, further below. Only the spelling of those own field
# names goes unchecked: that needs the operators' CRD schemas.

KUBERNETES_VERSION = "1.30"
"""The Kubernetes release whose schemas every manifest must satisfy: none uses a newer field."""


def _kubernetes_manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under deploy/: each YAML document with an apiVersion and a kind."""
    return [
        (f"{path.relative_to(DEPLOY)}:{doc['kind']}", doc)
        for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
        for doc in _yaml_documents(path)
        if isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys()
    ]


def _built_in(api_version: str, kind: str, name: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, **fields}


def _pod_template_objects(name: str, cluster_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group_name, group in _pod_templates(cluster_spec):
        yield _built_in("v1", "PodTemplate", f"{name}-{group_name}", template=group["template"])


def _rayservice_parts(service: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield {"apiVersion": "v1", "kind": "Service", **service["spec"]["serveService"]}
    yield from _pod_template_objects(
        service["metadata"]["name"], service["spec"]["rayClusterConfig"]
    )


def _raycluster_parts(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from _pod_template_objects(cluster["metadata"]["name"], cluster["spec"])


def _podmonitor_parts(monitor: dict[str, Any]) -> Iterator[dict[str, Any]]:
    selector = monitor["spec"]["selector"]
    name = monitor["metadata"]["name"]
    yield _built_in("networking.k8s.io/v1", "NetworkPolicy", name, spec={"podSelector": selector})


CUSTOM_RESOURCE_PARTS: dict[
    tuple[str, str], Callable[[dict[str, Any]], Iterator[dict[str, Any]]]
] = {
    ("ray.io/v1", "RayService"): _rayservice_parts,
    ("ray.io/v1", "RayCluster"): _raycluster_parts,
    ("monitoring.coreos.com/v1", "PodMonitor"): _podmonitor_parts,
}


def _validate_against_kubernetes(resource: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError on the first part that breaks its schema."""
    parts = CUSTOM_RESOURCE_PARTS.get((resource["apiVersion"], resource["kind"]))
    if parts is None:
        checked = [resource]
    else:
        checked = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource["metadata"]}]
        checked.extend(parts(resource))
    for part in checked:
        kubernetes_validate.validate(part, KUBERNETES_VERSION, strict=True)


def test_every_kind_of_manifest_is_found():
    kinds = {resource["kind"] for _name, resource in _kubernetes_manifests()}
    assert {"PersistentVolumeClaim", "RayService", "RayCluster", "PodMonitor"} <= kinds


@pytest.mark.parametrize(
    "resource",
    [r for _n, r in _kubernetes_manifests()],
    ids=[n for n, _r in _kubernetes_manifests()],
)
def test_manifest_satisfies_the_kubernetes_schemas(resource):
    try:
        _validate_against_kubernetes(resource)
    except kubernetes_validate.SchemaNotFoundError as missing:
        pytest.fail(f"{missing.message}: list its Kubernetes-typed parts in CUSTOM_RESOURCE_PARTS")


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    "path, kind, mistake, reported",
    [
        (RAYSERVICE, "RayService",
         lambda r: _rename(_first_container(_ray_cluster_spec(r)["workerGroupSpecs"][0]),
                           "imagePullPolicy", "imagePulPolicy"),
         "'imagePulPolicy' was unexpected"),
        (RAYCLUSTER, "RayCluster",
         lambda r: _first_container(r["spec"]["headGroupSpec"])["ports"][0].update(
             containerPort="6379"),
         "'6379' is not of type 'integer'"),
        (RAYCLUSTER, "RayCluster",
         lambda r: _rename(r["spec"]["headGroupSpec"]["template"]["spec"], "volumes", "volume"),
         "'volume' was unexpected"),
        (RAYSERVICE, "RayService",
         lambda r: _rename(r["spec"]["serveService"]["spec"]["ports"][0], "targetPort", "target"),
         "'target' was unexpected"),
        (RAYSERVICE, "RayService",
         lambda r: _rename(r["metadata"], "labels", "label"),
         "'label' was unexpected"),
        (PODMONITOR, "PodMonitor",
         lambda r: _rename(r["spec"]["selector"], "matchLabels", "matchLabel"),
         "'matchLabel' was unexpected"),
        (DEPLOY / "kuberay" / "models-pvc.yaml", "PersistentVolumeClaim",
         lambda r: _rename(r["spec"], "accessModes", "accessMode"),
         "'accessMode' was unexpected"),
    ],
    ids=["container-field", "port-type", "pod-field", "service-port", "metadata", "selector",
         "pvc-field"],
)  # fmt: skip
def test_a_mistake_in_a_copy_of_a_manifest_is_rejected(path, kind, mistake, reported):
    broken = copy.deepcopy(_one(path, kind))
    mistake(broken)
    with pytest.raises(kubernetes_validate.ValidationError) as rejected:
        _validate_against_kubernetes(broken)
    assert reported in rejected.value.message


# The operators' own fields, held to the rules their CRDs (and Prometheus) state.

PROMETHEUS_DURATION = re.compile(
    r"^(?:0|(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?)$"
)
"""Prometheus' duration syntax, which the PodMonitor CRD requires of interval and scrapeTimeout."""
DURATION_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
PROMETHEUS_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _duration_seconds(text: str) -> float | None:
    """Seconds in a Prometheus duration; None when ``text`` is not one."""
    match = PROMETHEUS_DURATION.fullmatch(text)
    if not (match and text):
        return None
    units = zip(match.groups(), DURATION_UNIT_SECONDS, strict=True)
    return sum(int(count) * seconds for count, seconds in units if count)


def _kuberay_rule_violations(resource: dict[str, Any]) -> list[str]:
    violations = []
    cluster = _ray_cluster_spec(resource)
    for name, group in _pod_templates(cluster):
        # map[string]string in the CRD: an unquoted number or boolean is refused on apply.
        unquoted = [k for k, v in group.get("rayStartParams", {}).items() if not isinstance(v, str)]
        if unquoted:
            violations.append(f"group {name}: rayStartParams {unquoted} must be strings")
    for group in cluster.get("workerGroupSpecs", []):
        low, wanted, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        if not low <= wanted <= high:
            violations.append(f"group {group['groupName']}: replicas outside min/max")
    return violations


@pytest.mark.parametrize("path, kind", [(RAYSERVICE, "RayService"), (RAYCLUSTER, "RayCluster")])
def test_kuberay_fields_keep_the_crd_rules(path, kind):
    resource = _one(path, kind)
    assert _kuberay_rule_violations(resource) == []
    broken = copy.deepcopy(resource)
    _ray_cluster_spec(broken)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    _ray_cluster_spec(broken)["workerGroupSpecs"][0]["replicas"] = 99
    assert len(_kuberay_rule_violations(broken)) == 2


def _podmonitor_rule_violations(monitor: dict[str, Any]) -> list[str]:
    violations = []
    # Every Ray pod the selector picks (both manifests label theirs alike) must name the port.
    groups = [group for path, kind in ((RAYSERVICE, "RayService"), (RAYCLUSTER, "RayCluster"))
              for _name, group in _pod_templates(_ray_cluster_spec(_one(path, kind)))]  # fmt: skip
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        missing = [
            g.get("groupName", "head")
            for g in groups
            if endpoint["port"] not in _container_ports(g)
        ]
        if missing:
            violations.append(f"port {endpoint['port']!r} is not a container port of {missing}")
        durations = {
            field: _duration_seconds(endpoint[field])
            for field in ("interval", "scrapeTimeout")
            if field in endpoint
        }
        malformed = sorted(field for field, seconds in durations.items() if seconds is None)
        if malformed:
            violations.append(f"{malformed} must be Prometheus durations")
        elif durations.get("scrapeTimeout", 0) > durations.get("interval", float("inf")):
            violations.append("scrapeTimeout exceeds interval (Prometheus refuses the job)")
        for relabeling in endpoint.get("relabelings", []):
            target = relabeling.get("targetLabel", "")
            if not PROMETHEUS_LABEL_NAME.fullmatch(target):
                violations.append(f"targetLabel {target!r} is not a Prometheus label name")
    return violations


def test_podmonitor_endpoints_keep_the_crd_and_prometheus_rules():
    monitor = _one(PODMONITOR, "PodMonitor")
    assert _podmonitor_rule_violations(monitor) == []
    broken = copy.deepcopy(monitor)
    endpoint = broken["spec"]["podMetricsEndpoints"][0]
    endpoint.update(port="metric", scrapeTimeout="6s")
    endpoint["relabelings"][0]["targetLabel"] = "ray.io/cluster"
    assert len(_podmonitor_rule_violations(broken)) == 3
    endpoint["interval"] = "5 s"
    assert "['interval'] must be Prometheus durations" in _podmonitor_rule_violations(broken)


# --- Prometheus -----------------------------------------------------------------------------


def test_prometheus_scrapes_local_port_and_ray_service_discovery():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = config["scrape_configs"]
    static = {
        target
        for job in jobs
        for group in job.get("static_configs", [])
        for target in group["targets"]
    }
    assert "127.0.0.1:8080" in static
    discovered = {
        file for job in jobs for sd in job.get("file_sd_configs", []) for file in sd["files"]
    }
    assert SERVICE_DISCOVERY_FILE in discovered
    names = [job["job_name"] for job in jobs]
    assert len(names) == len(set(names)), "job names must be unique"


def test_podmonitor_selects_the_ray_pods_metrics_port():
    monitor = _one(PODMONITOR, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    cluster = _one(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    for name, group in _pod_templates(cluster):
        labels = group["template"]["metadata"]["labels"]
        own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
        assert own.items() <= labels.items(), f"PodMonitor misses RayService group {name}"


def test_the_image_runs_the_ingress_gearbox_serve_runs():
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    found = re.findall(r"\b(RAY_(?:SERVE_[A-Z_]+|worker_niceness))=(\"[^\"]*\"|\S+)", text)
    declared = {name: value.strip('"') for name, value in found}
    expected = ray_environment(Ingress.HAPROXY)
    # The launcher's path is the image's, not this checkout's: where pip puts the scripts of
    # the base image's Python.
    assert declared.pop(RAY_BINARY_ENV) == f"/usr/local/bin/{LAUNCHER}"
    assert Path(expected.pop(RAY_BINARY_ENV)).name == LAUNCHER
    assert declared == expected
    assert re.search(r"^FROM python:[\d.]+-slim$", CONTAINERFILE.read_text(), re.MULTILINE)


def test_a_local_clusters_haproxy_ports_lie_outside_the_ranges_ray_binds_at_random(tmp_path):
    env = ray_environment(Ingress.HAPROXY, tmp_path / "haproxy")
    ports = [int(env[f"RAY_SERVE_HAPROXY_{name}_PORT"]) for name in ("METRICS", "STATS")]
    assert len(set(ports)) == 2
    for port in ports:
        assert port in HAPROXY_PORT_RANGE
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", port))  # free on every interface, as HAProxy binds it
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert HAPROXY_PORT_RANGE.stop <= min(low, 30000)  # 30000 up: Serve's direct ingress
