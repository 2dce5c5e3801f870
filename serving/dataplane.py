"""The data plane: one protocol-neutral implementation of every OIP endpoint.

The HTTP and gRPC adapters convert their wire format to :mod:`gearbox.serving.inference` values,
call a :class:`DataPlane` method, and convert the result back. Validation, routing, batching,
metrics and shadow agreement all happen here, once, for both protocols.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from gearbox.compression.errors import (
    ErrorCode,
    GearboxError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.serving.hosting import Backend
from gearbox.serving.inference import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ParameterValue,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from gearbox.serving.metrics import OK, GatewayMetrics
from gearbox.serving.router import (
    BUDGET_PARAMETER,
    LatencyEstimator,
    Route,
    Router,
    RoutingRequest,
    VariantChoice,
)

PLATFORM = "onnxruntime_onnx"
OVERHEAD_SMOOTHING = 0.1
EXTENSIONS = ("binary_tensor_data", "parameters", "gearbox_routing", "gearbox_variants")


def _gearbox_version() -> str:
    try:
        return version("gearbox")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class CatalogEntry:
    record: ModelRecord
    manifests: Mapping[str, VariantManifest]
    """Every published variant, rejected ones included (to say why they are not served)."""

    @property
    def ready(self) -> tuple[str, ...]:
        return tuple(name for name, m in sorted(self.manifests.items()) if m.is_ready)


@dataclass(frozen=True)
class Catalog:
    """A snapshot of the model repository as the gateway serves it."""

    models: Mapping[str, CatalogEntry]

    @classmethod
    def load(cls, repository: ModelRepository) -> Catalog:
        entries = {}
        for name in repository.models():
            manifests = {m.variant: m for m in repository.variants(name)}
            entries[name] = CatalogEntry(repository.model(name), manifests)
        return cls(entries)

    def ready_manifests(self) -> list[VariantManifest]:
        return [
            entry.manifests[variant] for entry in self.models.values() for variant in entry.ready
        ]


def seed_latency_ms(manifest: VariantManifest, device_class: str) -> float:
    """The manifest's batch-1 p50 on ``device_class``; the fastest profiled class otherwise.

    An unprofiled class starts from the best figure known and is corrected by live measurements
    after its first requests.
    """
    profile = manifest.latency_ms.get(device_class, {}).get("1")
    if profile is not None:
        return float(profile["p50"])
    known = [float(p["1"]["p50"]) for p in manifest.latency_ms.values() if "1" in p]
    return min(known, default=0.0)


class _Agreement:
    """Running share of rows on which a variant's answer matches the reference's."""

    def __init__(self, offline: float) -> None:
        self.offline = offline
        self.matched = 0.0
        self.rows = 0

    @property
    def value(self) -> float:
        return self.matched / self.rows if self.rows else self.offline

    def add(self, matched: float, rows: int) -> None:
        self.matched += matched
        self.rows += rows


@dataclass
class _ServedModel:
    entry: CatalogEntry
    router: Router | None
    agreement: dict[str, _Agreement]
    estimator: LatencyEstimator
    """Live service time of this model's variants per device class."""


class DataPlane:
    def __init__(
        self,
        catalog: Catalog,
        backends: Sequence[Backend],
        configured_device_classes: Sequence[str],
        metrics: GatewayMetrics,
        shadow_fraction: float = 0.0,
    ) -> None:
        if not backends:
            raise InvalidArgumentError("a data plane needs at least one device-class backend")
        self._backends = {backend.device_class: backend for backend in backends}
        # The first backend is the gateway's own device class: no hop to reach it.
        self._local = backends[0]
        self._configured = tuple(configured_device_classes)
        self._metrics = metrics
        self._shadow_fraction = shadow_fraction
        self._shadow_credit = 0.0
        self._overhead_ms = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._models: dict[str, _ServedModel] = {}
        for name, entry in catalog.models.items():
            self._models[name] = self._serve(name, entry)

    def _serve(self, name: str, entry: CatalogEntry) -> _ServedModel:
        reference = entry.record.reference_variant
        choices = []
        agreement = {}
        estimator = LatencyEstimator()
        for variant in entry.ready:
            manifest = entry.manifests[variant]
            choices.append(VariantChoice(variant, manifest.quality.value, variant == reference))
            agreement[variant] = _Agreement(manifest.quality.agreement)
            self._metrics.variant_figures(
                name, variant, manifest.quality.value, manifest.size_bytes
            )
            self._metrics.agreement(name, variant, manifest.quality.agreement)
            for device in self._backends:
                estimator.seed(variant, device, seed_latency_ms(manifest, device))
        router = None
        if choices:
            router = Router(
                name,
                choices,
                list(self._backends),
                estimator,
                lambda _variant, device: self._backends[device].depth(),
                lambda: self._overhead_ms,
            )
        return _ServedModel(entry, router, agreement, estimator)

    # -- health and metadata -------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("gearbox", _gearbox_version(), EXTENSIONS)

    def model_ready(self, model: str, version: str = "") -> bool:
        served = self._model(model)
        if version:
            return self._manifest(served, version).is_ready
        return served.router is not None

    def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        served = self._model(model)
        signature = served.entry.record.signature
        parameters: dict[str, ParameterValue] = {
            "reference_variant": served.entry.record.reference_variant,
            "task": served.entry.record.task,
            "metric": served.entry.record.metric,
        }
        if version:
            self._require_ready(served, version)
            versions: tuple[str, ...] = (version,)
            parameters.update(_manifest_parameters(served.entry.manifests[version]))
        else:
            versions = served.entry.ready
        return ModelMetadata(
            name=model,
            versions=versions,
            platform=PLATFORM,
            inputs=tuple(TensorMetadata(t.name, t.datatype, t.shape) for t in signature.inputs),
            outputs=tuple(TensorMetadata(t.name, t.datatype, t.shape) for t in signature.outputs),
            parameters=parameters,
        )

    def variants(self, model: str) -> dict[str, Any]:
        """The ``gearbox_variants`` extension: every manifest plus live routing figures."""
        served = self._model(model)
        rows = []
        for name, manifest in sorted(served.entry.manifests.items()):
            row = manifest.to_json()
            row["served"] = manifest.is_ready and served.router is not None
            if row["served"]:
                assert served.router is not None
                row["predicted_latency_ms"] = {
                    device: round(served.router.predicted_ms(name, device), 4)
                    for device in served.router.device_classes
                }
                row["live_agreement"] = served.agreement[name].value
            rows.append(row)
        return {
            "model": model,
            "reference_variant": served.entry.record.reference_variant,
            "variants": rows,
        }

    # -- inference -----------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter()
        model_label = variant = device = ""
        code = OK
        try:
            served = self._model(request.model)
            model_label = request.model
            router = self._router(served, request.version)
            inputs = _check_inputs(served.entry.record, request.inputs)
            requested = _check_outputs(served.entry.record, request)
            routing = RoutingRequest.from_parameters(request.parameters, self._configured)
            route = router.choose(routing, request.version)
            variant, device = route.variant, route.device_class
            self._metrics.variant_selected(request.model, variant, route.reason)
            outputs, service_ms = await self._run(served, route, inputs)
            observed_ms = (time.perf_counter() - started) * 1000
            self._overhead_ms += OVERHEAD_SMOOTHING * (
                max(observed_ms - service_ms, 0.0) - self._overhead_ms
            )
            budget = routing.latency_budget_ms
            met = budget is None or observed_ms <= budget
            if budget is not None:
                self._metrics.budget_outcome(request.model, variant, met)
            self._maybe_shadow(served, route, inputs, outputs)
            return InferResponse(
                model=request.model,
                version=variant,
                id=request.id,
                outputs=tuple(Tensor(name, outputs[name]) for name in requested),
                parameters={
                    "variant": variant,
                    "device_class": device,
                    "predicted_latency_ms": round(route.predicted_ms, 4),
                    "latency_ms": round(observed_ms, 4),
                    "budget_met": met,
                },
                binary_outputs=frozenset(o.name for o in request.outputs if o.binary),
                all_outputs_binary=request.all_outputs_binary and not request.outputs,
            )
        except GearboxError as error:
            code = error.code.value
            raise
        except Exception:
            code = ErrorCode.INTERNAL.value
            raise
        finally:
            self._metrics.request_finished(
                model_label, variant, device, request.protocol, code,
                time.perf_counter() - started,
            )  # fmt: skip

    async def _run(
        self, served: _ServedModel, route: Route, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float]:
        """The variant's outputs and the time spent waiting for and running it, in ms."""
        model = served.entry.record.name
        backend = self._backends[route.device_class]
        self._metrics.inflight(model, route.device_class, 1)
        started = time.perf_counter()
        try:
            result = await backend.infer(model, route.variant, inputs)
        finally:
            self._metrics.inflight(model, route.device_class, -1)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # The estimate tracks the run itself, like the manifest figures that seed it: queueing
        # enters the prediction through the queue depth, the gateway's overhead separately.
        # A remote device class also pays the hop, so it is charged its whole round trip.
        local = backend is self._local
        service_ms = result.service_s * 1000 if local else elapsed_ms - result.queue_s * 1000
        served.estimator.observe(route.variant, route.device_class, service_ms)
        return result.outputs, elapsed_ms

    def _maybe_shadow(
        self,
        served: _ServedModel,
        route: Route,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        reference = served.entry.record.reference_variant
        if route.variant == reference or reference not in served.agreement:
            return
        self._shadow_credit += self._shadow_fraction
        if self._shadow_credit < 1.0:
            return
        self._shadow_credit -= 1.0
        task = asyncio.get_running_loop().create_task(
            self._shadow(served, route.variant, inputs, outputs)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(
        self,
        served: _ServedModel,
        variant: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        record = served.entry.record
        try:  # on the gateway's own device class: a shadow run never costs a hop
            reference = await self._local.infer(record.name, record.reference_variant, inputs)
        except (ResourceExhaustedError, UnavailableError):
            return  # Under load the comparison waits for a quieter moment.
        name = record.signature.outputs[0].name
        matched, rows = _agreement(record.task, outputs[name], reference.outputs[name])
        tracker = served.agreement[variant]
        tracker.add(matched, rows)
        self._metrics.agreement(record.name, variant, tracker.value)

    # -- lookups -------------------------------------------------------------------------------

    def _model(self, model: str) -> _ServedModel:
        served = self._models.get(model)
        if served is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFoundError(f"model '{model}' not found (served models: {known})")
        return served

    def _manifest(self, served: _ServedModel, version: str) -> VariantManifest:
        manifest = served.entry.manifests.get(version)
        if manifest is None:
            known = ", ".join(served.entry.ready) or "none"
            raise NotFoundError(
                f"variant '{version}' of model '{served.entry.record.name}' not found "
                f"(ready variants: {known})"
            )
        return manifest

    def _require_ready(self, served: _ServedModel, version: str) -> None:
        manifest = self._manifest(served, version)
        if not manifest.is_ready:
            raise NotFoundError(
                f"variant '{version}' of model '{served.entry.record.name}' was rejected at "
                f"compression ({manifest.reason}) and is not served"
            )

    def _router(self, served: _ServedModel, version: str) -> Router:
        if version:
            self._require_ready(served, version)
        if served.router is None:
            raise UnavailableError(
                f"model '{served.entry.record.name}' has no ready variant to serve"
            )
        return served.router


def _manifest_parameters(manifest: VariantManifest) -> dict[str, ParameterValue]:
    parameters: dict[str, ParameterValue] = {
        "technique": manifest.technique,
        "size_bytes": manifest.size_bytes,
        "param_count": manifest.param_count,
        "quality": manifest.quality.value,
        "agreement": manifest.quality.agreement,
    }
    for device, by_batch in manifest.latency_ms.items():
        for batch, figures in by_batch.items():
            for stat in ("p50", "p95"):
                parameters[f"latency_ms_{device}_b{batch}_{stat}"] = figures[stat]
    return parameters


def _check_inputs(record: ModelRecord, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
    where = f"model '{record.name}'"
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidArgumentError(f"{where}: input '{tensor.name}' is given twice")
        arrays[tensor.name] = tensor.data
    specs = {spec.name: spec for spec in record.signature.inputs}
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise InvalidArgumentError(f"{where}: missing input(s) {', '.join(missing)}")
    unexpected = sorted(set(arrays) - set(specs))
    if unexpected:
        raise InvalidArgumentError(
            f"{where}: unexpected input(s) {', '.join(unexpected)} (inputs: {', '.join(specs)})"
        )
    for tensor in tensors:
        spec = specs[tensor.name]
        if tensor.datatype != spec.datatype:
            raise InvalidArgumentError(
                f"{where}: input '{tensor.name}' has datatype {tensor.datatype}, "
                f"the model expects {spec.datatype}"
            )
        if not spec.accepts(tensor.shape):
            raise InvalidArgumentError(
                f"{where}: input '{tensor.name}' has shape {list(tensor.shape)}, "
                f"the model expects {list(spec.shape)} (-1: any size)"
            )
    rows = {array.shape[0] for array in arrays.values()}
    if len(rows) > 1:
        raise InvalidArgumentError(f"{where}: inputs disagree on the batch size: {sorted(rows)}")
    if 0 in rows:
        raise InvalidArgumentError(f"{where}: the batch is empty (first dimension 0)")
    return arrays


def _check_outputs(record: ModelRecord, request: InferRequest) -> tuple[str, ...]:
    names = record.signature.output_names
    if not request.outputs:
        return tuple(names)
    unknown = [o.name for o in request.outputs if o.name not in names]
    if unknown:
        raise InvalidArgumentError(
            f"model '{record.name}': unknown output(s) {', '.join(unknown)} "
            f"(outputs: {', '.join(names)})"
        )
    return tuple(dict.fromkeys(o.name for o in request.outputs))


def _agreement(task: str, answer: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Matched rows: equal top-1 for classification, cosine similarity otherwise."""
    rows = answer.shape[0]
    flat_answer = answer.reshape(rows, -1).astype(np.float64)
    flat_reference = reference.reshape(rows, -1).astype(np.float64)
    if task == "classification":
        same = flat_answer.argmax(axis=1) == flat_reference.argmax(axis=1)
        return float(same.sum()), rows
    norms = np.linalg.norm(flat_answer, axis=1) * np.linalg.norm(flat_reference, axis=1)
    cosine = (flat_answer * flat_reference).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(cosine.sum()), rows


__all__ = [
    "BUDGET_PARAMETER",
    "Catalog",
    "CatalogEntry",
    "DataPlane",
    "seed_latency_ms",
]
