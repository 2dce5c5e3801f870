"""Starting, waiting on and stopping a Gearbox gateway on a Ray cluster (``gearbox serve``)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import grpc
import ray
from ray import serve
from ray.serve.config import HTTPOptions, ProxyLocation, gRPCOptions

from gearbox.compression.errors import InvalidArgumentError, UnavailableError
from gearbox.compression.repository import ModelRepository
from gearbox.serving.app import GRPC_SERVICER, build_app, servable_device_classes
from gearbox.serving.config import APP_NAME, GatewayConfig
from gearbox.serving.dataplane import REJECTED_PREFIX
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from gearbox.serving.ingress import (
    TLS_UPSTREAM_PORT_RANGE,
    Ingress,
    free_port,
    ingress_in_effect,
)
from gearbox.serving.tls import name_to_verify, pinned_client_context
from gearbox.serving.tls_terminator import GRPC_ALPN, HTTP_ALPN, TlsRoute, TlsTerminator

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class TlsEndpoint:
    """How the gateway's HTTPS and gRPC-with-TLS ports are served and verified."""

    certificate: str
    """The certificate (chain) both ports present."""
    server_name: str
    """A name that certificate is valid for, which a gRPC client on this machine checks."""
    terminator_pid: int
    """The process of Gearbox's TLS terminator (HAProxy), stopped with the gateway."""


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: tuple[str, ...]
    device_classes: tuple[str, ...]
    skipped_device_classes: dict[str, str]
    ingress: Ingress = Ingress.HAPROXY
    tls: TlsEndpoint | None = None
    """None: both ports speak plaintext."""
    unserved: tuple[str, ...] = ()
    """``model/variant: why`` of each ready variant the gateway could not load."""

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
    """The repository's models, those with a ready variant first (the examples name them)."""
    repository = ModelRepository(path)
    models = repository.models()
    if not models:
        raise InvalidArgumentError(
            f"repository {path} holds no models; publish some with `gearbox compress` first"
        )

    def servable(model: str) -> bool:
        return any(manifest.is_ready for manifest in repository.variants(model))

    return sorted(models, key=lambda model: not servable(model))


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


_TLS_TERMINATORS: dict[str, TlsTerminator] = {}
"""The TLS terminator of each gateway this process started (by ``GatewayConfig.instance``),
until :func:`stop_gateway` stops it."""


def start_gateway(config: GatewayConfig, http_port: int, grpc_port: int) -> Endpoints:
    """Deploys the gateway on the Ray this process is connected to; returns once ready. With
    ``config.tls``, ``http_port`` and ``grpc_port`` serve TLS from Gearbox's own terminator
    in front of Serve's plaintext ingress (see :mod:`gearbox.serving.tls_terminator`)."""
    # Serve's own start-up lines are not true of this gateway ("New http_options will not be
    # applied" after the start just above; "ready at http://..." before the ingress is): the
    # caller prints the endpoints once both protocols answer ready.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    served, skipped = servable_device_classes(config, ray.cluster_resources())
    serve_http_port, serve_grpc_port = http_port, grpc_port
    tls = None
    try:
        if config.tls is not None:
            # Serve's ingress moves to internal plaintext ports; the terminator takes the
            # user's. It is outside the budget's clock, like the ingress behind it.
            serve_http_port = free_port(TLS_UPSTREAM_PORT_RANGE)
            serve_grpc_port = free_port(TLS_UPSTREAM_PORT_RANGE, serve_http_port)
            terminator = TlsTerminator.start(
                config.tls,
                [
                    TlsRoute("http", http_port, serve_http_port, HTTP_ALPN),
                    TlsRoute("grpc", grpc_port, serve_grpc_port, GRPC_ALPN),
                ],
                LOOPBACK,
            )
            _TLS_TERMINATORS[config.instance] = terminator
            tls = TlsEndpoint(
                certificate=config.tls.certificate,
                server_name=name_to_verify(terminator.peer_certificate, LOOPBACK),
                terminator_pid=terminator.pid,
            )
        serve.start(
            proxy_location=_proxy_location(),
            http_options=HTTPOptions(host=LOOPBACK, port=serve_http_port),
            grpc_options=gRPCOptions(port=serve_grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
        )
        serve.run(build_app(config, served[1:]), name=APP_NAME, route_prefix="/", blocking=False)
        endpoints = Endpoints(
            http=f"{'https' if tls else 'http'}://{LOOPBACK}:{http_port}",
            grpc=f"{LOOPBACK}:{grpc_port}",
            metrics=metrics_urls(config),
            device_classes=tuple(device.name for device in served),
            skipped_device_classes=skipped,
            ingress=ingress_in_effect(),
            tls=tls,
        )
        wait_ready(endpoints)
        endpoints = dataclasses.replace(endpoints, unserved=unserved_variants(endpoints))
    except BaseException:
        # Half started: the caller may never call stop_gateway.
        _stop_tls_terminator(config.instance)
        raise
    return endpoints


def unserved_variants(endpoints: Endpoints) -> tuple[str, ...]:
    """``model/variant: why`` of each variant ready at compression that the gateway does not
    serve, from its repository index (variants rejected at compression are not listed)."""
    context = pinned_client_context(endpoints.tls.certificate) if endpoints.tls else None
    request = urllib.request.Request(
        f"{endpoints.http}/v2/repository/index", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30, context=context) as reply:
        rows = json.load(reply)
    return tuple(
        f"{row['name']}/{row['version']}: {row.get('reason', '')}"
        for row in rows
        if row.get("state") == "UNAVAILABLE"
        and row.get("version")
        and not row.get("reason", "").startswith(REJECTED_PREFIX)
    )


def wait_ready(endpoints: Endpoints, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Returns once both protocols answer ready through the ingress (and the TLS terminator in
    front of it, if any). Behind HAProxy a replica says ready only to a probe that reached it
    directly, so this also waits out the seconds in which Ray Serve's fallback proxy still
    carries each protocol."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    # With TLS the probes trust only the gateway's own certificate: ready then also means both
    # ports speak TLS with that certificate, not plaintext.
    context = pinned_client_context(endpoints.tls.certificate) if endpoints.tls else None
    while time.monotonic() < deadline:
        last = (
            _http_not_ready(endpoints.ready_url, context)
            or _grpc_not_ready(endpoints.grpc, endpoints.tls)
            or ""
        )
        if not last:
            return
        time.sleep(0.5)
    raise UnavailableError(f"gateway not ready after {timeout_s:.0f} s ({last})")


def _http_not_ready(url: str, context: ssl.SSLContext | None = None) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"{url}: HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def _grpc_channel(target: str, tls: TlsEndpoint | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    with open(tls.certificate, "rb") as file:
        # gRPC accepts a certificate that is not a root as the trust anchor.
        credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
    # gRPC always checks the server's name: check the one the certificate holds.
    options = [("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.secure_channel(target, credentials, options)


def _grpc_not_ready(target: str, tls: TlsEndpoint | None = None) -> str | None:
    with _grpc_channel(target, tls) as channel:
        try:
            reply = GRPCInferenceServiceStub(channel).ServerReady(
                pb.ServerReadyRequest(), timeout=5
            )
        except grpc.RpcError as error:
            return f"gRPC {target}: {error.code().name}"  # type: ignore[attr-defined]
    return None if reply.ready else f"gRPC {target}: not ready"


def stop_gateway(started_serve: bool, config: GatewayConfig | None = None) -> None:
    """Drains the gateway's replicas; stops Serve too if this process started it. With the
    gateway's ``config``, also stops its TLS terminator (after the drain, which it carries)
    and removes its metrics snapshots on this machine; without, every terminator this process
    started."""
    try:
        with contextlib.suppress(Exception):
            if started_serve:
                _drop_controller_exit_note()
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
    finally:
        for instance in [config.instance] if config else list(_TLS_TERMINATORS):
            _stop_tls_terminator(instance)
    if config is not None:
        shutil.rmtree(config.metrics_directory, ignore_errors=True)


CONTROLLER_EXIT_NOTE = "ServeController.graceful_shutdown"
"""Serve's controller ends its graceful shutdown by killing itself, and Ray then tells the
driver that the shutdown "failed ... killed by ray.kill": untrue of a clean stop."""


class _WithoutNote(io.TextIOBase):
    """A text stream that passes everything but the lines holding ``note`` (Ray prints a
    line and its newline in two writes: the newline of a dropped line goes too)."""

    def __init__(self, stream: TextIO, note: str) -> None:
        self._stream = stream
        self._note = note
        self._dropped = False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, self._note in text
        if self._dropped or (dropped and text == "\n"):
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def _drop_controller_exit_note() -> None:
    """From now on this process's standard streams leave out :data:`CONTROLLER_EXIT_NOTE`
    (it arrives asynchronously, until Ray is shut down)."""
    if not isinstance(sys.stdout, _WithoutNote):
        sys.stdout = _WithoutNote(sys.stdout, CONTROLLER_EXIT_NOTE)
    if not isinstance(sys.stderr, _WithoutNote):
        sys.stderr = _WithoutNote(sys.stderr, CONTROLLER_EXIT_NOTE)


def _stop_tls_terminator(instance: str) -> None:
    terminator = _TLS_TERMINATORS.pop(instance, None)
    if terminator is not None:
        terminator.stop()


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
