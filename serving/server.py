"""Starting, waiting on and stopping a Gearbox gateway on a Ray cluster (``gearbox serve``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import ray
from ray import serve
from ray.serve.config import HTTPOptions, ProxyLocation, gRPCOptions

from gearbox.compression.errors import InvalidArgumentError, UnavailableError
from gearbox.compression.repository import ModelRepository
from gearbox.serving.app import GRPC_SERVICER, build_app, servable_device_classes
from gearbox.serving.config import APP_NAME, GatewayConfig
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from gearbox.serving.ingress import Ingress, ingress_in_effect

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: tuple[str, ...]
    device_classes: tuple[str, ...]
    skipped_device_classes: dict[str, str]
    ingress: Ingress = Ingress.HAPROXY

    @property
    def ready_url(self) -> str:
        return f"{self.http}/v2/health/ready"


def check_port_free(port: int, what: str) -> None:
    """Fail with a clear line now rather than with a proxy that never becomes healthy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers themselves do: a port whose last connections linger in TIME_WAIT
        # after a previous run is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            raise InvalidArgumentError(
                f"{what} port {port} is already in use (choose another with --{what}-port)"
            ) from None


def check_repository(path: str) -> list[str]:
    models = ModelRepository(path).models()
    if not models:
        raise InvalidArgumentError(
            f"repository {path} holds no models; publish some with `gearbox compress` first"
        )
    return models


def metrics_urls(config: GatewayConfig) -> tuple[str, ...]:
    """The metrics endpoint of every machine in the cluster (one per machine, however many
    nodes and replicas it runs: see :mod:`gearbox.serving.metrics`)."""
    if config.metrics_port is None:
        return ()
    local_ips = _this_machine_ips()
    urls = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        host = node["NodeManagerAddress"]
        # On this machine the replicas bind the configured host (loopback by default).
        host = config.metrics_host if host in local_ips else host
        urls.append(f"http://{host}:{config.metrics_port}/metrics")
    return tuple(sorted(set(urls)))


def _this_machine_ips() -> set[str]:
    ips = {LOOPBACK, "localhost"}
    with contextlib.suppress(OSError):
        ips.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    with contextlib.suppress(Exception):
        ips.add(ray.util.get_node_ip_address())
    return ips


def _proxy_location() -> ProxyLocation:
    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    # Several nodes on one machine would fight over the same proxy ports.
    return ProxyLocation.HeadOnly if len(hosts) <= 1 else ProxyLocation.EveryNode


def start_gateway(config: GatewayConfig, http_port: int, grpc_port: int) -> Endpoints:
    """Deploys the gateway on the Ray this process is connected to; returns once ready."""
    # Serve's own start-up lines are not true of this gateway ("New http_options will not be
    # applied" after the start just above; "ready at http://..." before the ingress is): the
    # caller prints the endpoints once both protocols answer ready.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    served, skipped = servable_device_classes(config, ray.cluster_resources())
    serve.start(
        proxy_location=_proxy_location(),
        http_options=HTTPOptions(host=LOOPBACK, port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(config, served[1:]), name=APP_NAME, route_prefix="/", blocking=False)
    endpoints = Endpoints(
        http=f"http://{LOOPBACK}:{http_port}",
        grpc=f"{LOOPBACK}:{grpc_port}",
        metrics=metrics_urls(config),
        device_classes=tuple(device.name for device in served),
        skipped_device_classes=skipped,
        ingress=ingress_in_effect(),
    )
    wait_ready(endpoints)
    return endpoints


def wait_ready(endpoints: Endpoints, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Returns once both protocols answer ready through the ingress. Behind HAProxy a replica
    says ready only to a probe that reached it directly, so this also waits out the seconds in
    which Ray Serve's fallback proxy still carries each protocol."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        last = _http_not_ready(endpoints.ready_url) or _grpc_not_ready(endpoints.grpc) or ""
        if not last:
            return
        time.sleep(0.5)
    raise UnavailableError(f"gateway not ready after {timeout_s:.0f} s ({last})")


def _http_not_ready(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"{url}: HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def _grpc_not_ready(target: str) -> str | None:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = GRPCInferenceServiceStub(channel).ServerReady(
                pb.ServerReadyRequest(), timeout=5
            )
        except grpc.RpcError as error:
            return f"gRPC {target}: {error.code().name}"  # type: ignore[attr-defined]
    return None if reply.ready else f"gRPC {target}: not ready"


def stop_gateway(started_serve: bool, config: GatewayConfig | None = None) -> None:
    """Drains the gateway's replicas; stops Serve too if this process started it. With the
    gateway's ``config``, also removes its metrics snapshots on this machine."""
    with contextlib.suppress(Exception):
        if started_serve:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    if config is not None:
        shutil.rmtree(config.metrics_directory, ignore_errors=True)


SERVE_NAMESPACE = "serve"
"""Where Ray Serve keeps its controller actor (a detached actor named by Serve)."""


def serve_was_running() -> bool:
    """Whether Ray Serve already runs on this cluster (then Gearbox must not shut it down)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return any(actor.get("namespace") == SERVE_NAMESPACE for actor in actors)


@contextlib.contextmanager
def until_stopped() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM while the block runs."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
