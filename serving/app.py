"""The Ray Serve application: a gateway ingress plus one pool per extra device class.

``Gateway`` is the only ingress. HTTP requests reach its ``__call__`` through Ray Serve's HTTP
proxy, gRPC calls reach the method named after the RPC through Ray Serve's gRPC proxy. Each
replica hosts the gateway's own device class (``cpu``) in-process, so routing and inference on
the common path cost a single hop. Other device classes (``gpu``, ...) are
``DeviceClassHost`` deployments with their own Ray resources, reached only when chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from gearbox.compression.devices import DeviceClass
from gearbox.compression.repository import ModelRepository
from gearbox.serving.batching import BatchResult
from gearbox.serving.config import GatewayConfig
from gearbox.serving.dataplane import Catalog, DataPlane
from gearbox.serving.grpc.adapter import GrpcAdapter
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.hosting import Arrays, Backend, LocalBackend, RemoteBackend, ReplicaLoad
from gearbox.serving.metrics import RayServeMetrics
from gearbox.serving.rest.adapter import HttpAdapter

logger = logging.getLogger(__name__)

GRPC_SERVICER = (
    "gearbox.serving.grpc.generated.grpc_service_pb2_grpc"
    ".add_GRPCInferenceServiceServicer_to_server"
)


def _local_backend(
    config: GatewayConfig, device: DeviceClass, metrics: RayServeMetrics, load: ReplicaLoad
) -> LocalBackend:
    repository = ModelRepository(config.repository)
    return LocalBackend(
        repository,
        Catalog.load(repository).ready_manifests(),
        device,
        config.batching,
        on_batch=lambda model, variant, rows: metrics.batch_formed(
            model, variant, device.name, rows
        ),
        load=load,
    )


@serve.deployment
class DeviceClassHost:
    """Replicas of one extra device class (their Ray resources come from its definition)."""

    def __init__(self, config: GatewayConfig, device_class: str) -> None:
        device = next(d for d in config.device_classes if d.name == device_class)
        self._load = ReplicaLoad()
        self._backend = _local_backend(config, device, RayServeMetrics(), self._load)

    async def infer(self, model: str, variant: str, inputs: Arrays) -> BatchResult:
        with self._load.request():
            return await self._backend.infer(model, variant, inputs)


@serve.deployment
class Gateway:
    """The ingress: protocol adapters over one data plane, with the router inside."""

    def __init__(self, config: GatewayConfig, remote: Mapping[str, DeploymentHandle]) -> None:
        metrics = RayServeMetrics()
        repository = ModelRepository(config.repository)
        catalog = Catalog.load(repository)
        self._load = ReplicaLoad()
        backends: list[Backend] = [
            _local_backend(config, config.gateway_device_class, metrics, self._load)
        ]
        backends += [RemoteBackend(name, handle) for name, handle in remote.items()]
        plane = DataPlane(
            catalog,
            backends,
            [device.name for device in config.device_classes],
            metrics,
            shadow_fraction=config.shadow_fraction,
        )
        self._http = HttpAdapter(plane)
        self._grpc = GrpcAdapter(plane)

    async def __call__(self, request: Request) -> Response:
        with self._load.request():
            reply = await self._http.handle(
                request.method, request.url.path, request.headers, await request.body()
            )
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))

    # gRPC: Ray Serve's proxy calls the method named after the RPC, passing its context.
    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.server_live(request, grpc_context)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.server_ready(request, grpc_context)

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.model_ready(request, grpc_context)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.server_metadata(request, grpc_context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.model_metadata(request, grpc_context)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Any) -> Any:
        with self._load.request():
            return await self._grpc.model_infer(request, grpc_context)


def _actor_options(device: DeviceClass) -> dict[str, Any]:
    resources = dict(device.ray_resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0),
        "num_gpus": resources.pop("GPU", 0),
    }
    if resources:
        options["resources"] = resources
    return options


def servable_device_classes(
    config: GatewayConfig, cluster_resources: Mapping[str, float]
) -> tuple[list[DeviceClass], dict[str, str]]:
    """The device classes this cluster can host, and why each other one is left out."""
    served = [config.gateway_device_class]
    skipped = {}
    for device in config.device_classes[1:]:
        missing = [
            name for name, amount in device.ray_resources.items()
            if cluster_resources.get(name, 0) < amount
        ]  # fmt: skip
        if missing:
            skipped[device.name] = f"the cluster has no {', '.join(missing)} to give it"
        else:
            served.append(device)
    return served, skipped


def build_app(
    config: GatewayConfig, extra_device_classes: list[DeviceClass] | None = None
) -> serve.Application:
    """The Gearbox application; ``extra_device_classes`` defaults to every configured one."""
    extra = config.device_classes[1:] if extra_device_classes is None else extra_device_classes
    remote = {
        device.name: DeviceClassHost.options(
            name=f"DeviceClass-{device.name}",
            ray_actor_options=_actor_options(device),
            max_ongoing_requests=config.max_ongoing_requests,
        ).bind(config, device.name)
        for device in extra
        if device.name != config.gateway_device_class.name
    }
    return Gateway.options(
        num_replicas=config.replicas,
        ray_actor_options=_actor_options(config.gateway_device_class),
        max_ongoing_requests=config.max_ongoing_requests,
    ).bind(config, remote)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files (``import_path: gearbox.serving.app:app_builder``).

    ``args``: ``repository`` (required), ``device_classes_file``, ``replicas``.
    """
    options = {k: v for k, v in args.items() if k in {"replicas", "shadow_fraction"}}
    config = GatewayConfig.create(args["repository"], args.get("device_classes_file"), **options)
    # Serve builds the app inside the cluster: a class it cannot host (no GPU) is left out
    # rather than leaving the application waiting forever for resources.
    if not ray.is_initialized():
        return build_app(config)
    served, skipped = servable_device_classes(config, ray.cluster_resources())
    for name, reason in skipped.items():
        logger.warning("device class %s is not served: %s", name, reason)
    return build_app(config, served[1:])
