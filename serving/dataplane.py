"""The data plane: one protocol-neutral implementation of every OIP endpoint.

The HTTP and gRPC adapters convert their wire format to :mod:`gearbox.serving.inference` values,
call a :class:`DataPlane` method, and convert the result back. Validation, routing, batching,
the budget's clock, metrics and shadow agreement all happen here, once, for both protocols.

An inference answer is finished in two steps so that its latency covers the whole span the
caller waits for inside the gateway: :meth:`DataPlane.infer` routes and runs the request, the
adapter encodes the outputs, then :meth:`DataPlane.answered` stops the clock, records the
request and returns the response parameters (``latency_ms``, ``budget_met``, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import uuid
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
    UnavailableError,
)
from gearbox.compression.repository import ModelRecord, VariantManifest
from gearbox.compression.signature import oip_datatype
from gearbox.serving.catalog import Catalog, CatalogEntry
from gearbox.serving.clock import RequestClock
from gearbox.serving.executor import BatchResult, Lane
from gearbox.serving.experiment_store import Assignment, ReplicaExperiments
from gearbox.serving.experiments import Experiment, Outcome
from gearbox.serving.hosting import Backend, synthetic_inputs
from gearbox.serving.inference import (
    BYTES,
    ConfigTensor,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ParameterValue,
    RepositoryEntry,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from gearbox.serving.metrics import CANCELLED, OK, GatewayMetrics
from gearbox.serving.queue_model import PredictionErrors, variant_key
from gearbox.serving.router import (
    DEVICE_CLASS_PARAMETER,
    REQUEST_PARAMETERS,
    Reason,
    Route,
    Router,
    RoutingRequest,
    VariantChoice,
)
from gearbox.serving.shadow import Agreement, Shadow
from gearbox.serving.statistics import ModelStatistics, Phases, Statistics
from gearbox.serving.text import TOKENS_PARAMETER, TRUNCATED_PARAMETER, SentenceTokenizer

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
READY_STATE = "READY"
UNAVAILABLE_STATE = "UNAVAILABLE"
LOADING_STATE = "LOADING"
REJECTED_PREFIX = "rejected at compression: "
"""How the repository index's reason for a variant the accuracy gate rejected begins."""
OVERHEAD_SMOOTHING = 0.1
SELF_TEST_REQUESTS = 20
IGNORED_PARAMETERS = "ignored_parameters"
"""The response parameter naming the request parameters Gearbox did not use."""
KNOWN_REQUEST_PARAMETERS = REQUEST_PARAMETERS | {
    # The binary-data extension's request parameter, read by the HTTP adapter.
    "binary_data_output",
}
EXTENSIONS = (
    "binary_tensor_data",
    "parameters",
    "statistics",
    "gearbox_routing",
    "gearbox_variants",
)


def gearbox_version() -> str:
    try:
        return version("gearbox")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class _ServedModel:
    entry: CatalogEntry
    router: Router | None
    agreement: dict[str, Agreement]
    tokenizer: SentenceTokenizer | None = None


@dataclass(frozen=True)
class Answer:
    """What :meth:`DataPlane.answered` needs to finish a response: its clock and route."""

    clock: RequestClock
    route: Route
    budget_ms: float | None
    work_ms: float
    """How long the backend took (queueing, hop, run): the rest of the span is the gateway's
    own per-request overhead."""
    protocol: str
    phases: Phases | None = None
    """Where its time went up to the backend's answer, for the statistics extension."""
    assignment: Assignment | None = None
    """The A/B experiment arm that chose its variant, if any."""
    prediction: int | None = None
    """Its top-1 class (a one-row classification request in an experiment), for feedback."""


class DataPlane:
    def __init__(
        self,
        catalog: Catalog,
        backends: Sequence[Backend],
        configured_device_classes: Sequence[str],
        metrics: GatewayMetrics,
        shadow_fraction: float = 0.0,
        prediction_quantile: float = 0.95,
        transport_allowance_ms: float = 0.0,
        direct_ingress: bool = False,
        experiments: ReplicaExperiments | None = None,
    ) -> None:
        """``prediction_quantile``: a budget is met by a variant whose prediction plus this
        quantile of its recent prediction errors fits. ``transport_allowance_ms``: time the
        caller's budget also spends outside the clock (ingress, network), kept free as well.
        ``direct_ingress``: the HAProxy ingress is in front, so requests should reach this
        replica's own servers (see :meth:`ready`). ``experiments``: the A/B experiments this
        replica follows; a request without a pinned version joins its model's experiment."""
        if not backends:
            raise InvalidArgumentError("a data plane needs at least one device-class backend")
        self._backends = {backend.device_class: backend for backend in backends}
        # The first backend is the gateway's own device class: no hop to reach it.
        self._local = backends[0]
        self._configured = tuple(configured_device_classes)
        self._metrics = metrics
        self._shadow = Shadow(
            shadow_fraction,
            self._local.run_in_background,
            metrics,
            idle=lambda: self._local.depth() == 0,
        )
        self._overhead_ms = 0.0
        self._direct_ingress = direct_ingress
        if transport_allowance_ms < 0:
            raise InvalidArgumentError("transport_allowance_ms must not be negative")
        self._errors = PredictionErrors(prediction_quantile)
        self._transport_allowance_ms = transport_allowance_ms
        self._ready = False
        self._models: dict[str, _ServedModel] = {}
        self._statistics = Statistics({})
        self._loaded_reported: set[tuple[str, str]] = set()
        self.serve(catalog)
        self._experiments = experiments
        if experiments is not None:
            experiments.follow_agreement(self.agreement_totals)

    def serve(self, catalog: Catalog) -> None:
        """Serves ``catalog`` from the next request on (a repository update: its backends
        host its variants already). A variant served before, from the same artifact, keeps
        its live agreement; requests already routed finish where they were sent."""
        models = {name: self._serve(name, entry) for name, entry in catalog.models.items()}
        self._statistics.serve({name: served.entry.ready for name, served in models.items()})
        loaded = set()
        for name, served in models.items():
            for variant, manifest in served.entry.manifests.items():
                if manifest.is_ready:
                    loaded.add((name, variant))
                    self._metrics.variant_loaded(
                        name, variant, self._local.device_class, variant in served.entry.ready
                    )
        for name, variant in self._loaded_reported - loaded:
            self._metrics.variant_loaded(name, variant, self._local.device_class, False)
        self._loaded_reported = loaded
        self._models = models

    def _serve(self, name: str, entry: CatalogEntry) -> _ServedModel:
        reference = entry.record.reference_variant
        before = self._models.get(name)
        choices = []
        agreement = {}
        for variant in entry.ready:
            manifest = entry.manifests[variant]
            choices.append(VariantChoice(variant, manifest.quality.value, variant == reference))
            if before is not None and _same_artifact(before.entry, entry, variant):
                agreement[variant] = before.agreement[variant]
            else:
                agreement[variant] = Agreement(manifest.quality.agreement)
            self._metrics.variant_figures(
                name, variant, manifest.quality.value, manifest.size_bytes
            )
            self._metrics.agreement(name, variant, 0.0, 0, manifest.quality.agreement)
            self._metrics.declare(name, variant, self._configured)
        router = None
        if choices:

            def predict(
                variant: str,
                device: str,
                rows: int,
                tokens: int | None,
                lane: Lane = Lane.STANDARD,
            ) -> float:
                backend = self._backends[device]
                return self._overhead_ms + backend.predict_ms(name, variant, rows, tokens, lane)

            def margin(variant: str, device: str) -> float:
                return self._margin_ms(name, variant, device)

            priority_lanes = [d for d, b in self._backends.items() if Lane.PRIORITY in b.lanes]
            router = Router(
                name, choices, list(self._backends), predict, margin, priority_lanes=priority_lanes
            )
        text = entry.record.text
        tokenizer = None
        if text is not None:
            if entry.tokenizer is None:
                raise InvalidArgumentError(f"text model '{name}' is served without its tokenizer")
            tokenizer = SentenceTokenizer(text, entry.tokenizer)
        return _ServedModel(entry, router, agreement, tokenizer)

    def _margin_ms(self, model: str, variant: str, device: str) -> float:
        """The room a budget must leave beyond a prediction: its errors' quantile + transport."""
        return (
            self._errors.margin_ms(variant_key(model, variant), device)
            + self._transport_allowance_ms
        )

    # -- readiness -----------------------------------------------------------------------------

    async def warm_up(self, requests: int = SELF_TEST_REQUESTS) -> None:
        """Measures the per-request overhead with synthetic requests through the whole plane
        (nothing is recorded), then declares the plane ready. The sessions themselves are
        warmed by their backend."""
        spans = []
        errors: list[tuple[str, str, float]] = []
        overhead_then = self._overhead_ms
        for served in self._models.values():
            if served.router is None:
                continue
            record = served.entry.record
            inputs = tuple(
                Tensor(name, array) for name, array in synthetic_inputs(record, 1).items()
            )
            # On this replica's own device class: the overhead measured is this replica's, and
            # a class behind a handle, still on its manifest's figures, would teach the
            # prediction errors nothing but its first slow answers.
            request = InferRequest(
                record.name,
                inputs,
                version=record.reference_variant,
                parameters={DEVICE_CLASS_PARAMETER: self._local.device_class},
            )
            for _ in range(requests):
                clock = RequestClock.start()
                response = await self._infer(request, clock, recorded=False)
                answer = response.answer
                assert answer is not None
                elapsed_ms = clock.elapsed_ms()
                spans.append(elapsed_ms - answer.work_ms)
                key = variant_key(record.name, answer.route.variant)
                errors.append(
                    (key, answer.route.device_class, elapsed_ms - answer.route.predicted_ms)
                )
        if spans:
            self._overhead_ms = statistics.median(spans)
        for key, device, error_ms in errors:
            # Judged against what the prediction will be now that the overhead is known.
            self._errors.observe(key, device, error_ms - (self._overhead_ms - overhead_then))
        for backend in self._backends.values():
            backend.settle()
        self._ready = True

    # -- health and metadata -------------------------------------------------------------------

    def live(self) -> bool:
        """Whether this replica can still answer: its own device class's worker threads run
        (Ray Serve's health check restarts a replica that is not live)."""
        return self._local.live()

    def ready(self, arrived_directly: bool = True) -> bool:
        """Warmed up and, behind the HAProxy ingress, reached directly. Until HAProxy's health
        check admits a replica's own server, Ray Serve's fallback proxy forwards its requests:
        a path about 3 ms slower that drops gRPC deadlines, so a probe that came that way is
        told not ready."""
        return self._ready and (arrived_directly or not self._direct_ingress)

    @property
    def overhead_ms(self) -> float:
        return self._overhead_ms

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("gearbox", gearbox_version(), EXTENSIONS)

    def model_ready(self, model: str, version: str = "") -> bool:
        served = self._model(model)
        if version:
            self._manifest(served, version)  # an unknown variant is not found, not unready
            return version in served.entry.ready and self._ready
        return served.router is not None and self._ready

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
            if served.entry.unavailable:
                parameters["unavailable_variants"] = "; ".join(
                    f"{variant}: {why}" for variant, why in sorted(served.entry.unavailable.items())
                )
        inputs = tuple(TensorMetadata(t.name, t.datatype, t.shape) for t in signature.inputs)
        text = served.entry.record.text
        if text is not None:
            # Sentences first: most callers send text; token ids remain for those who tokenize.
            inputs = (TensorMetadata(text.name, BYTES, (-1,)), *inputs)
            parameters["text_input"] = text.name
            parameters["max_tokens"] = text.max_tokens
        return ModelMetadata(
            name=model,
            versions=versions,
            platform=PLATFORM,
            inputs=inputs,
            outputs=tuple(TensorMetadata(t.name, t.datatype, t.shape) for t in signature.outputs),
            parameters=parameters,
        )

    def variants(self, model: str) -> dict[str, Any]:
        """The ``gearbox_variants`` extension: every manifest plus live routing figures."""
        served = self._model(model)
        rows = []
        for name, manifest in sorted(served.entry.manifests.items()):
            row = manifest.to_json()
            row["served"] = name in served.entry.ready
            if name in served.entry.unavailable:
                row["unavailable"] = served.entry.unavailable[name]
            if row["served"]:
                assert served.router is not None
                row["predicted_latency_ms"] = {
                    device: round(served.router.predicted_ms(name, device), 4)
                    for device in served.router.device_classes
                }
                row["prediction_margin_ms"] = {
                    device: round(self._margin_ms(model, name, device), 4)
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

    async def infer(self, request: InferRequest, clock: RequestClock) -> InferResponse:
        """Routes and runs ``request``; finish it with :meth:`answered` once its outputs are
        encoded. A request that fails is recorded here, with its error's code."""
        return await self._infer(request, clock, recorded=True)

    async def _infer(
        self, request: InferRequest, clock: RequestClock, recorded: bool
    ) -> InferResponse:
        model_label = variant = device = arm = ""
        try:
            served = self._model(request.model)
            model_label = request.model
            router = self._router(served, request.version)
            record = served.entry.record
            inputs = _arrays(request.inputs, record)
            tokens: int | None = None
            text_parameters: dict[str, ParameterValue] = {}
            if served.tokenizer is not None:
                inputs, tokens, text_parameters = _tokenized(inputs, served.tokenizer, record.name)
            rows = record.signature.check_inputs(inputs, f"model '{record.name}'")
            requested = _check_outputs(record, request)
            routing = RoutingRequest.from_parameters(request.parameters, self._configured)
            if routing.latency_budget_ms is None and clock.deadline_ms is not None:
                # A gRPC deadline is the caller's budget when it names none itself.
                routing = dataclasses.replace(
                    routing, latency_budget_ms=max(clock.deadline_ms, 1e-3)
                )
            assignment = None
            if self._experiments is not None and not request.version and recorded:
                assignment = self._experiments.assignment(request.model, routing.routing_key)
            if assignment is None:
                route = router.choose(routing, request.version, rows, tokens)
            else:
                arm = assignment.arm.name
                route = router.choose(
                    routing, assignment.arm.variant, rows, tokens, Reason.EXPERIMENT
                )
            variant, device = route.variant, route.device_class
            if recorded:
                self._metrics.variant_selected(request.model, variant, route.reason, arm)
            result, work_ms = await self._run(record.name, route, inputs)
            phases = Phases(clock.arrived, work_ms, result, rows)
            if recorded:
                self._shadow.maybe_compare(
                    record, variant, served.agreement[variant], inputs, result.outputs
                )
            ignored = request.parameters.keys() - KNOWN_REQUEST_PARAMETERS
            if ignored:
                # Echoed and counted, so that a misspelt parameter (latency_budget) does not
                # pass unseen.
                text_parameters = {**text_parameters, IGNORED_PARAMETERS: ",".join(sorted(ignored))}
                if recorded:
                    self._metrics.parameters_ignored(request.model, len(ignored))
            experiment_parameters: dict[str, ParameterValue] = {}
            prediction = None
            if assignment is not None:
                experiment_parameters = {"experiment": assignment.experiment, "arm": arm}
                prediction = _top1(record, result.outputs, rows)
            return InferResponse(
                model=request.model,
                version=variant,
                # Feedback names a request by its id: one the caller did not give is made up.
                id=request.id or (uuid.uuid4().hex if assignment is not None else ""),
                outputs=tuple(Tensor(name, result.outputs[name]) for name in requested),
                parameters={
                    "variant": variant,
                    "device_class": device,
                    "predicted_latency_ms": round(route.predicted_ms, 4),
                    **experiment_parameters,
                    **text_parameters,
                },
                binary_outputs=frozenset(o.name for o in request.outputs if o.binary),
                all_outputs_binary=request.all_outputs_binary and not request.outputs,
                answer=Answer(
                    clock,
                    route,
                    routing.latency_budget_ms,
                    work_ms,
                    request.protocol,
                    phases,
                    assignment,
                    prediction,
                ),
            )
        except BaseException as error:
            if recorded:
                self._statistics.failed(
                    request.model, variant or request.version, clock.elapsed_ms()
                )
                self._metrics.request_finished(
                    model_label, variant, device, request.protocol, _code_of(error),
                    clock.elapsed_ms() / 1000, arm,
                )  # fmt: skip
            raise

    def answered(self, response: InferResponse) -> dict[str, ParameterValue]:
        """Stops the clock of a response whose outputs are encoded, records it, and returns
        its parameters with ``latency_ms`` and ``budget_met``."""
        answer = response.answer
        if answer is None:
            return dict(response.parameters)
        latency_ms = answer.clock.elapsed_ms()
        self._statistics.succeeded(response.model, answer.route.variant, answer.phases, latency_ms)
        self._errors.observe(
            variant_key(response.model, answer.route.variant),
            answer.route.device_class,
            latency_ms - answer.route.predicted_ms,
        )
        self._overhead_ms += OVERHEAD_SMOOTHING * (
            max(latency_ms - answer.work_ms, 0.0) - self._overhead_ms
        )
        met = answer.budget_ms is None or latency_ms <= answer.budget_ms
        model, variant = response.model, answer.route.variant
        assignment = answer.assignment
        arm = assignment.arm.name if assignment is not None else ""
        if answer.budget_ms is not None:
            self._metrics.budget_outcome(model, variant, met, arm)
        self._metrics.request_finished(
            model, variant, answer.route.device_class, answer.protocol, OK, latency_ms / 1000, arm
        )
        if assignment is not None and self._experiments is not None:
            self._experiments.record(
                Outcome(
                    request_id=response.id,
                    experiment=assignment.experiment,
                    arm=arm,
                    variant=variant,
                    latency_ms=latency_ms,
                    budget_met=met if answer.budget_ms is not None else None,
                    prediction=answer.prediction,
                )
            )
        parameters = {**response.parameters, "latency_ms": round(latency_ms, 4), "budget_met": met}
        if answer.budget_ms is not None:
            # Echoed so a caller sees the budget in force (a gRPC deadline becomes one).
            parameters["latency_budget_ms"] = answer.budget_ms
        return parameters

    async def _run(
        self, model: str, route: Route, inputs: Mapping[str, np.ndarray]
    ) -> tuple[BatchResult, float]:
        """The variant's result, and how long the backend took to give it (ms)."""
        self._metrics.inflight(model, route.device_class, 1)
        started = time.perf_counter()
        try:
            backend = self._backends[route.device_class]
            result = await backend.infer(model, route.variant, inputs, route.lane)
        finally:
            self._metrics.inflight(model, route.device_class, -1)
        return result, (time.perf_counter() - started) * 1000

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self, model: str = "", version: str = "") -> list[ModelStatistics]:
        """Triton's statistics extension: cumulative figures of one variant (``version``), of
        every served variant of ``model``, or of every model when ``model`` is empty (see
        :mod:`gearbox.serving.statistics` for what each means). They are this replica's alone:
        behind the ingress each replica counts what it answered; Prometheus is the
        cluster-wide view."""
        if not model:
            if version:
                raise InvalidArgumentError("statistics of a version need the model's name too")
            return [
                figures
                for name in sorted(self._models)
                for figures in self._statistics.report(
                    name, self._models[name].entry.ready, unattributed=True
                )
            ]
        served = self._model(model)
        if version:
            self._require_ready(served, version)
            return self._statistics.report(model, (version,))
        return self._statistics.report(model, served.entry.ready, unattributed=True)

    # -- model configuration and repository index (Triton's extensions) -----------------------

    def model_config(self, model: str, version: str = "") -> ModelConfig:
        """Triton's model configuration of ``model``, as the gateway accepts its requests.

        ``max_batch_size`` is 0 and ``dims`` keep the signature's -1 batch dimension: a request
        may carry any number of rows (the executor splits and merges them under a limit set per
        gateway, which is no per-request limit), and Triton's 0 means exactly "the first
        dimension is the model's own". Triton's versions are numbers and Gearbox's are variant
        names, so ``version_policy`` is left out and the ready variants are listed in the
        ``variants`` parameter. A text model's sentences and token ids are alternatives, so
        each of those inputs is ``optional``."""
        served = self._model(model)
        if version:
            self._require_ready(served, version)
        record = served.entry.record
        inputs = tuple(
            ConfigTensor(t.name, _triton_datatype(t.datatype), t.shape)
            for t in record.signature.inputs
        )
        parameters = {
            "variants": ",".join(served.entry.ready),
            "reference_variant": record.reference_variant,
            "task": record.task,
            "metric": record.metric,
        }
        text = record.text
        if text is not None:
            inputs = (
                ConfigTensor(text.name, _triton_datatype(BYTES), (-1,), optional=True),
                *(dataclasses.replace(t, optional=True) for t in inputs),
            )
            parameters["text_input"] = text.name
            parameters["max_tokens"] = str(text.max_tokens)
        return ModelConfig(
            name=model,
            platform=PLATFORM,
            backend=BACKEND,
            max_batch_size=0,
            inputs=inputs,
            outputs=tuple(
                ConfigTensor(t.name, _triton_datatype(t.datatype), t.shape)
                for t in record.signature.outputs
            ),
            parameters=parameters,
        )

    def repository_index(self, ready: bool = False, repository: str = "") -> list[RepositoryEntry]:
        """Triton's repository index: one row per published variant (Triton lists one per model
        version), ``READY`` where it is served, ``UNAVAILABLE`` with the reason where it was
        rejected at compression, ``LOADING`` before the warm-up; a model with no variant at all
        is one row with an empty version. ``ready`` keeps only the ``READY`` rows.
        ``repository``: Gearbox serves one repository, named by no name."""
        if repository:
            raise InvalidArgumentError(
                f"repository '{repository}' not found: Gearbox serves one repository, "
                "asked for without a name"
            )
        rows = []
        for name in sorted(self._models):
            manifests = self._models[name].entry.manifests
            if not manifests:
                rows.append(RepositoryEntry(name, "", UNAVAILABLE_STATE, "no variant published"))
            unavailable = self._models[name].entry.unavailable
            for variant, manifest in sorted(manifests.items()):
                if not manifest.is_ready:
                    reason = f"{REJECTED_PREFIX}{manifest.reason or 'no reason given'}"
                    rows.append(RepositoryEntry(name, variant, UNAVAILABLE_STATE, reason))
                elif variant in unavailable:
                    rows.append(
                        RepositoryEntry(name, variant, UNAVAILABLE_STATE, unavailable[variant])
                    )
                elif not self._ready:
                    rows.append(RepositoryEntry(name, variant, LOADING_STATE, "warming up"))
                else:
                    rows.append(RepositoryEntry(name, variant, READY_STATE))
        return [row for row in rows if row.state == READY_STATE or not ready]

    # -- experiments ---------------------------------------------------------------------------

    def agreement_totals(self) -> list[tuple[str, str, float, int]]:
        """(model, variant, matched, rows) of every variant's live shadow agreement so far."""
        return [
            (model, variant, tracker.matched, tracker.rows)
            for model, served in self._models.items()
            for variant, tracker in served.agreement.items()
            if tracker.rows
        ]

    def check_experiment(self, experiment: Experiment) -> None:
        """Refuses an experiment whose model or arms this gateway does not serve."""
        served = self._model(experiment.model)
        for arm in experiment.arms:
            self._require_ready(served, arm.variant)

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
        why = served.entry.unavailable.get(version)
        if why is not None:
            raise UnavailableError(
                f"variant '{version}' of model '{served.entry.record.name}' is not served: {why}"
            )

    def _router(self, served: _ServedModel, version: str) -> Router:
        if version:
            self._require_ready(served, version)
        if served.router is None:
            raise UnavailableError(
                f"model '{served.entry.record.name}' has no ready variant to serve"
            )
        return served.router


def _same_artifact(before: CatalogEntry, after: CatalogEntry, variant: str) -> bool:
    previous = before.manifests.get(variant)
    return (
        previous is not None
        and variant in before.ready
        and previous.sha256 == after.manifests[variant].sha256
    )


def _top1(record: ModelRecord, outputs: Mapping[str, np.ndarray], rows: int) -> int | None:
    """The predicted class of a one-row classification answer (what a feedback label is
    checked against); None for embeddings and batches of several rows."""
    if record.task != "classification" or rows != 1:
        return None
    return int(np.argmax(outputs[record.signature.outputs[0].name]))


def _triton_datatype(datatype: str) -> str:
    """Triton's configuration name of an OIP datatype (``FP32`` -> ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}"


def _code_of(error: BaseException) -> str:
    if isinstance(error, GearboxError):
        return error.code.value
    if isinstance(error, asyncio.CancelledError):
        return CANCELLED  # the caller went away: never counted as answered
    return ErrorCode.INTERNAL.value


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


def _arrays(tensors: Sequence[Tensor], record: ModelRecord) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidArgumentError(
                f"model '{record.name}': input '{tensor.name}' is given twice"
            )
        arrays[tensor.name] = tensor.data
    return arrays


def _tokenized(
    inputs: dict[str, np.ndarray], tokenizer: SentenceTokenizer, model: str
) -> tuple[dict[str, np.ndarray], int | None, dict[str, ParameterValue]]:
    """A text model's inputs as token ids (sentences tokenized here), the token length they
    run at, and what the response says of them (that length, how many sentences were cut)."""
    text = tokenizer.text
    sentences = inputs.get(text.name)
    if sentences is None:
        ids = inputs.get(text.ids_input)
        if ids is None or ids.ndim != 2 or ids.shape[1] == 0:
            return inputs, None, {}  # the signature check names what is wrong
        return inputs, int(ids.shape[1]), {TOKENS_PARAMETER: int(ids.shape[1])}
    given = sorted(set(inputs) - {text.name})
    if given:
        raise InvalidArgumentError(
            f"model '{model}': give sentences in '{text.name}' or token ids in "
            f"'{text.ids_input}' and '{text.mask_input}', not both (also got {', '.join(given)})"
        )
    if sentences.dtype != object:
        raise InvalidArgumentError(
            f"model '{model}': input '{text.name}' has datatype "
            f"{oip_datatype(sentences.dtype)}, the model expects BYTES"
        )
    tokenized = tokenizer.tokenize(sentences)
    return (
        tokenized.inputs,
        tokenized.tokens,
        {
            TOKENS_PARAMETER: tokenized.tokens,
            TRUNCATED_PARAMETER: tokenized.truncated,
        },
    )


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


__all__ = ["Answer", "DataPlane"]
