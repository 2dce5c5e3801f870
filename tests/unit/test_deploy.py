"""Keeps deploy/ honest: its files parse and name what the code and DESIGN.md §7 define.

No Ray is started: import paths are resolved with importlib, the Serve config is validated with
Ray Serve's own schema, and building the application only binds deployments.
"""

from __future__ import annotations

import importlib
import re
import socket
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gearbox.compression.devices import load_device_classes
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
    resource = _one(path, kind)
    cluster = resource["spec"]["rayClusterConfig"] if kind == "RayService" else resource["spec"]
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
    declared = dict(re.findall(r"\b(RAY_(?:SERVE_[A-Z_]+|worker_niceness))=(\S+)", text))
    assert declared == ray_environment(Ingress.HAPROXY)


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
