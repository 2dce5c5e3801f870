"""The Ray Serve application: a gateway ingress plus one pool per extra device class.

``Gateway`` is the only ingress. Under the HAProxy ingress each replica runs its own HTTP and
gRPC servers behind HAProxy; HTTP requests reach its ``__call__``, gRPC calls the method named
after the RPC. Each replica hosts the gateway's own device class (``cpu``) in-process, so
routing and inference on the common path cost a single hop. Other device classes (``gpu``, ...) are
``DeviceClassHost`` deployments with their own Ray resources, reached only when chosen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import Response

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import GearboxError, PayloadTooLargeError, UnavailableError
from gearbox.compression.repository import ModelRepository
from gearbox.serving.admin import Administration
from gearbox.serving.catalog import Catalog
from gearbox.serving.clock import arrival
from gearbox.serving.config import ADMIN_TOKEN_VARIABLE, GatewayConfig
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.executor import Arrays, BatchResult
from gearbox.serving.experiment_store import (
    AgreementTotals,
    Feedback,
    LedgerStore,
    ReplicaExperiments,
    declared_experiments,
)
from gearbox.serving.experiments import Experiment, ExperimentLedger, Outcome
from gearbox.serving.grpc.adapter import GrpcServicer
from gearbox.serving.hosting import LocalBackend, RemoteBackend, unwrap_remote_error
from gearbox.serving.ingress import Ingress, ingress_in_effect
from gearbox.serving.metrics import GatewayMetrics, ReplicaMetrics
from gearbox.serving.repository_control import (
    ReplicaRepository,
    RepositoryControl,
    RepositoryState,
    Version,
    gateway_update,
)
from gearbox.serving.rest.adapter import HttpAdapter, error_response

logger = logging.getLogger(__name__)

GRPC_SERVICER = "gearbox.serving.clock.add_inference_service"
"""Ray Serve's ``grpc_servicer_functions`` entry: OIP's service, with the arrival clock."""

CONTROL_TIMEOUT_S = 30.0
"""The longest a replica waits for the experiment ledger or the repository control (they are
off the request path: a call that takes longer fails, and is tried again by the next sync)."""

# A worker thread that finished a batch waits for the GIL at most this long before its callers
# are answered (Python's default, 5 ms, is longer than most variants run).
GIL_SWITCH_INTERVAL_S = 0.0002


async def _local_backend(
    config: GatewayConfig,
    catalog: Catalog,
    device: DeviceClass,
    metrics: GatewayMetrics,
    routed_here: bool = True,
) -> LocalBackend:
    """``routed_here``: the router runs in this replica and may use a priority lane; a device
    class reached through a handle runs everything on its standard lane."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    batching = config.batching
    if not routed_here:
        batching = dataclasses.replace(batching, priority_lane=False)
    backend = LocalBackend(
        ModelRepository(config.repository),
        catalog,
        device,
        batching,
        on_batch=lambda model, variant, rows, _seconds: metrics.batch_formed(
            model, variant, device.name, rows
        ),
    )
    await backend.warm_up()
    return backend


def _replica_metrics(config: GatewayConfig) -> ReplicaMetrics:
    return ReplicaMetrics(config.metrics_directory, config.metrics_port, config.metrics_host)


@serve.deployment
class DeviceClassHost:
    """Replicas of one extra device class (their Ray resources come from its definition)."""

    async def __init__(
        self, config: GatewayConfig, device_class: str, control: DeploymentHandle
    ) -> None:
        device = next(d for d in config.device_classes if d.name == device_class)
        repository = ModelRepository(config.repository)
        replica = serve.get_replica_context().replica_id.unique_id
        updates = HandleControl(control)
        state = await updates.sync(replica, None)
        catalog = state.applied_to(Catalog.load(repository))
        self._metrics = _replica_metrics(config)
        self._backend = await _local_backend(
            config, catalog, device, self._metrics, routed_here=False
        )
        self._report_loaded(catalog)

        async def apply(state: RepositoryState) -> None:
            catalog = state.applied_to(await asyncio.to_thread(Catalog.load, repository))
            await self._backend.update(catalog)
            self._report_loaded(catalog)

        self._repository = ReplicaRepository(
            updates, apply, replica, repository.models, serving=state.version
        )
        self._repository.start()

    def _report_loaded(self, catalog: Catalog) -> None:
        served = self._backend.served(catalog)
        for manifest in catalog.ready_manifests():
            loaded = manifest.variant in served.models[manifest.model].ready
            self._metrics.variant_loaded(
                manifest.model, manifest.variant, self._backend.device_class, loaded
            )

    async def infer(self, model: str, variant: str, inputs: Arrays) -> BatchResult:
        return await self._backend.infer(model, variant, inputs)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose workers died is replaced."""
        if not self._backend.live():
            raise UnavailableError("a worker thread of this replica's executor has stopped")

    def __del__(self) -> None:
        self._repository.cancel()
        self._backend.close()
        self._metrics.close()


class _OperationsHost:
    """A singleton deployment whose ``call`` runs one operation of its ``_target``."""

    _target: Any

    async def call(self, operation: str, *args: Any) -> tuple[bool, Any]:
        """(True, the result) or (False, the Gearbox error): an error travels back as a value,
        since Ray re-raises a replica's exceptions in a form that loses their message."""
        try:
            return True, await getattr(self._target, operation)(*args)
        except GearboxError as error:
            return False, error


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ExperimentHost(_OperationsHost):
    """The one ledger of every A/B experiment, its outcomes and feedback (see
    :mod:`gearbox.serving.experiment_store`). Reached off the request path only."""

    def __init__(self, declared: tuple[Experiment, ...]) -> None:
        self._target = LedgerStore(ExperimentLedger(), declared)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class RepositoryHost(_OperationsHost):
    """The one record of repository updates every replica follows (see
    :mod:`gearbox.serving.repository_control`). Reached off the request path only."""

    def __init__(self) -> None:
        self._target = RepositoryControl()


class _HandleCalls:
    """Calls of an :class:`_OperationsHost` through its handle, its errors raised again."""

    def __init__(self, handle: DeploymentHandle, what: str) -> None:
        self._handle = handle
        self._what = what

    async def __call__(self, operation: str, *args: Any) -> Any:
        response = self._handle.call.remote(operation, *args)
        try:
            succeeded, value = await asyncio.wait_for(_awaited(response), CONTROL_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            raise UnavailableError(
                f"{self._what} did not answer its {operation} within {CONTROL_TIMEOUT_S:g} s"
            ) from None
        except Exception as error:
            raise unwrap_remote_error(error, f"{self._what}'s {operation} failed") from None
        if not succeeded:
            raise value
        return value


async def _awaited(response: Any) -> Any:
    return await response


class HandleControl:
    """:class:`~gearbox.serving.repository_control.Control` through a handle to
    :class:`RepositoryHost`."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._call = _HandleCalls(handle, "the repository control")

    async def sync(self, replica: str, serving: Version | None) -> RepositoryState:
        return await self._call("sync", replica, serving)

    async def load(self, model: str) -> RepositoryState:
        return await self._call("load", model)

    async def unload(self, model: str) -> RepositoryState:
        return await self._call("unload", model)

    async def behind(self, version: Version) -> list[str]:
        return await self._call("behind", version)

    async def forget(self, replica: str) -> None:
        await self._call("forget", replica)


class HandleStore:
    """:class:`ExperimentStore` through a handle to :class:`ExperimentHost`."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._call = _HandleCalls(handle, "the experiment ledger")

    async def active(self) -> tuple[Experiment, ...]:
        return await self._call("active")

    async def create(self, experiment: Experiment) -> None:
        await self._call("create", experiment)

    async def end(self, name: str) -> None:
        await self._call("end", name)

    async def listing(self) -> list[dict[str, Any]]:
        return await self._call("listing")

    async def record(
        self,
        source: str,
        outcomes: Sequence[Outcome],
        agreement: Sequence[AgreementTotals],
        feedback: Sequence[Feedback] = (),
    ) -> None:
        await self._call("record", source, list(outcomes), list(agreement), list(feedback))

    async def feedback(self, request_id: str, label: int | None, score: float | None) -> None:
        await self._call("feedback", request_id, label, score)

    async def report(self, name: str, confidence: float) -> dict[str, Any]:
        return await self._call("report", name, confidence)


@serve.deployment
class Gateway(GrpcServicer):
    """The ingress: where a request enters (``__call__`` for HTTP, the RPC-named methods of
    :class:`GrpcServicer` for gRPC), with the data plane and the router inside."""

    async def __init__(
        self,
        config: GatewayConfig,
        remote: Mapping[str, DeploymentHandle],
        ledger: DeploymentHandle,
        control: DeploymentHandle,
    ) -> None:
        metrics = self._metrics = _replica_metrics(config)
        repository = ModelRepository(config.repository)
        replica = serve.get_replica_context().replica_id.unique_id
        updates = HandleControl(control)
        state = await updates.sync(replica, None)
        catalog = state.applied_to(Catalog.load(repository))
        local = await _local_backend(config, catalog, config.gateway_device_class, metrics)
        remotes = [
            RemoteBackend(name, handle, catalog, config.remote_answer_timeout_s)
            for name, handle in remote.items()
        ]
        experiments = ReplicaExperiments(HandleStore(ledger), source=replica)
        plane = DataPlane(
            local.served(catalog),
            [local, *remotes],
            [device.name for device in config.device_classes],
            metrics,
            shadow_fraction=config.shadow_fraction,
            prediction_quantile=config.prediction_quantile,
            transport_allowance_ms=config.transport_allowance_ms,
            direct_ingress=ingress_in_effect() is Ingress.HAPROXY,
            experiments=experiments,
        )
        await plane.warm_up()
        # Declared experiments hold from the first request; later changes follow in the
        # background.
        await experiments.sync()
        experiments.start()

        self._repository = ReplicaRepository(
            updates,
            gateway_update(repository, local, plane, remotes),
            replica,
            repository.models,
            serving=state.version,
        )
        self._repository.start()
        administration = Administration(plane, experiments, config.admin_token, self._repository)
        super().__init__(plane, config.tensor_limits, administration)
        self._local = local
        self._experiments = experiments
        self._max_request_bytes = config.max_request_bytes
        self._http = HttpAdapter(plane, administration, config.tensor_limits)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose workers died is replaced."""
        if not self._local.live():
            raise UnavailableError("a worker thread of this replica's executor has stopped")

    async def __call__(self, request: Request) -> Response:
        clock = arrival()
        try:
            body = await read_body(request, self._max_request_bytes)
        except PayloadTooLargeError as error:
            reply = error_response(error.code, error.message)
        else:
            reply = await self._http.handle(
                request.method, request.url.path, request.headers, body, clock, request.url.query
            )
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))

    def __del__(self) -> None:
        self._repository.cancel()
        self._local.close()
        self._metrics.close()


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused once it is known to exceed ``limit`` bytes: from its
    Content-Length before a byte is read, or as a streamed body grows past it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"request body of {int(declared)} bytes exceeds the gateway's limit of {limit} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the gateway's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
    logging_config = LoggingConfig(enable_access_log=config.access_log)
    control = RepositoryHost.options(logging_config=logging_config).bind()
    remote = {
        device.name: DeviceClassHost.options(
            name=f"DeviceClass-{device.name}",
            ray_actor_options=_actor_options(device),
            max_ongoing_requests=config.max_ongoing_requests,
            logging_config=logging_config,
        ).bind(config, device.name, control)
        for device in extra
        if device.name != config.gateway_device_class.name
    }
    ledger = ExperimentHost.options(logging_config=logging_config).bind(config.experiments)
    return Gateway.options(
        num_replicas=config.replicas,
        ray_actor_options=_actor_options(config.gateway_device_class),
        max_ongoing_requests=config.max_ongoing_requests,
        logging_config=logging_config,
    ).bind(config, remote, ledger, control)


CONFIG_ARGS = frozenset(
    {
        "replicas",
        "shadow_fraction",
        "access_log",
        "prediction_quantile",
        "transport_allowance_ms",
        "metrics_port",
        "metrics_host",
        "max_request_bytes",
        "max_request_rows",
        "max_tensor_elements",
    }
)
"""The :class:`GatewayConfig` fields a Serve config file may set as application args."""
APP_ARGS = CONFIG_ARGS | {"repository", "device_classes_file", "experiments"}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files (``import_path: gearbox.serving.app:app_builder``).

    ``args``: ``repository`` (required), ``device_classes_file``, ``replicas``,
    ``shadow_fraction``, ``access_log``, ``prediction_quantile``, ``transport_allowance_ms``,
    ``metrics_port``, ``metrics_host``, ``max_request_bytes``, ``max_request_rows``,
    ``max_tensor_elements``, ``experiments`` (a list of experiment definitions, as
    ``POST /v2/experiments`` takes them). The admin token comes from the environment variable
    ``GEARBOX_ADMIN_TOKEN`` (set it in the application's ``runtime_env``), never from the file.
    """
    options: dict[str, Any] = {k: v for k, v in args.items() if k in CONFIG_ARGS}
    options["experiments"] = declared_experiments(args.get("experiments") or ())
    options["admin_token"] = os.environ.get(ADMIN_TOKEN_VARIABLE) or None
    config = GatewayConfig.create(args["repository"], args.get("device_classes_file"), **options)
    # Serve builds the app inside the cluster: a class it cannot host (no GPU) is left out
    # rather than leaving the application waiting forever for resources.
    if not ray.is_initialized():
        return build_app(config)
    served, skipped = servable_device_classes(config, ray.cluster_resources())
    for name, reason in skipped.items():
        logger.warning("device class %s is not served: %s", name, reason)
    return build_app(config, served[1:])
