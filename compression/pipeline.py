"""Compression on Ray: train the reference once, build and evaluate each variant in its own task.

Every task declares its CPUs, so variants run in parallel on whichever nodes have room. Tasks
return artifacts and evaluations to the driver, which applies the accuracy gate and publishes
to the repository; workers therefore never need the repository's filesystem.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayError, RayTaskError

from gearbox.compression.devices import DEFAULT_DEVICE_CLASSES, DeviceClass
from gearbox.compression.errors import (
    CompressionError,
    GearboxError,
    InvalidArgumentError,
    NotFoundError,
)
from gearbox.compression.evaluation import (
    Evaluation,
    LatencyBudget,
    LatencyProfile,
    evaluate_quality,
    profile_latency,
)
from gearbox.compression.onnx_export import check_graph_signature
from gearbox.compression.progress import ProgressBoard, ProgressListener, SilentProgress
from gearbox.compression.provenance import (
    BuildCache,
    CachedBuild,
    code_version,
    reference_digest,
    variant_digests,
)
from gearbox.compression.quality import get_metric
from gearbox.compression.registration import build_torch_model, verify_declared_signature
from gearbox.compression.repository import (
    ModelRecord,
    ModelRepository,
    Quality,
    VariantManifest,
    sha256_hex,
)
from gearbox.compression.signature import Signature
from gearbox.compression.spec import DataSplits, ModelSpec
from gearbox.compression.techniques import (
    REFERENCE_VARIANT,
    CompressedModel,
    Stage,
    TechniqueConfig,
    TechniqueInput,
    apply_technique,
    config_to_params,
)
from gearbox.compression.training import fit, predict

TRAINING_JOB = "reference model"

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainedReference:
    """What the training task sends back: the reference weights and their held-out quality."""

    weights: Weights
    heldout_quality: float


@dataclass(frozen=True)
class VariantBuild:
    """What a variant task sends back to the driver."""

    config: TechniqueConfig
    compressed: CompressedModel
    evaluation: Evaluation
    node: str
    seconds: float


@dataclass(frozen=True)
class CompressionReport:
    model: str
    published: list[VariantManifest]
    """Variants built and published by this run."""
    unchanged: list[VariantManifest]
    """Published variants whose inputs had not changed: kept, not rebuilt."""
    failed: dict[str, str]
    """Variant -> why it failed."""
    seconds: float


# --- Ray tasks ------------------------------------------------------------------------------


def _use_assigned_cpus() -> None:
    """Give torch as many threads as the CPUs Ray assigned to this task, and no more."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def _reference_model(spec: ModelSpec, weights: Weights | None) -> torch.nn.Module:
    model = build_torch_model(spec)
    if weights is not None:
        # Arrays from Ray's object store are read-only; torch wants tensors it may write.
        model.load_state_dict(
            {name: torch.from_numpy(array.copy()) for name, array in weights.items()}
        )
    return model.eval()


@ray.remote
def _train_reference(spec: ModelSpec, data: DataSplits, board: Any) -> TrainedReference:
    _use_assigned_cpus()
    assert spec.training is not None
    model = _reference_model(spec, None)
    board.update.remote(TRAINING_JOB, "training", 0.0)
    fit(
        model,
        spec,
        data.train,
        spec.training,
        on_epoch=lambda done, total: board.update.remote(
            TRAINING_JOB, f"training epoch {done}/{total}", done / total
        ),
    )
    heldout_outputs = predict(model, spec, data.heldout)
    accuracy = get_metric(spec.metric).score(heldout_outputs, data.heldout.labels)
    return TrainedReference(
        weights={name: t.detach().cpu().numpy() for name, t in model.state_dict().items()},
        heldout_quality=accuracy,
    )


@ray.remote
def _build_variant(
    spec: ModelSpec,
    config: TechniqueConfig,
    data: DataSplits,
    trained: TrainedReference | None,
    parent: VariantBuild | None,
    board: Any,
) -> VariantBuild:
    _use_assigned_cpus()
    started = time.perf_counter()

    def report(stage: str, fraction: float) -> None:
        board.update.remote(config.name, stage, fraction)

    report("starting", 0.0)
    compressed = apply_technique(
        config,
        TechniqueInput(
            spec=spec,
            data=data,
            reference_model=_reference_model(spec, None if trained is None else trained.weights),
            parent_artifact=None if parent is None else parent.compressed.onnx,
            parent_param_count=None if parent is None else parent.compressed.param_count,
            report=report,
        ),
    )
    # Serving asks the graph for the declared tensors: a graph that differs is not published.
    check_graph_signature(compressed.onnx, spec, config.name)
    report("evaluating held-out quality", 0.9)
    evaluation = evaluate_quality(compressed.onnx, spec, data)
    return VariantBuild(
        config=config,
        compressed=compressed,
        evaluation=evaluation,
        node=f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}",
        seconds=time.perf_counter() - started,
    )


@ray.remote
def _profile_variant(
    build: VariantBuild,
    data: DataSplits,
    device_classes: Sequence[DeviceClass],
    budget: LatencyBudget,
    signature: Signature,
) -> LatencyProfile:
    return profile_latency(
        build.compressed.onnx, data.heldout, device_classes, budget, signature=signature
    )


# --- driver ---------------------------------------------------------------------------------


def _largest_node_cpus() -> float:
    return max(
        (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")),
        default=1.0,
    )


def _cause(error: BaseException) -> str:
    """The innermost readable message of a task failure."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    if isinstance(error, GearboxError):
        return error.message
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _gate(
    build: VariantBuild,
    latency_ms: LatencyProfile,
    reference: VariantBuild,
    spec: ModelSpec,
    max_accuracy_drop: float,
) -> VariantManifest:
    metric = get_metric(spec.metric)
    outputs, reference_outputs = build.evaluation.outputs, reference.evaluation.outputs
    if metric.relative:
        value = metric.score_against(outputs, reference_outputs)
        reference_value = metric.score_against(reference_outputs, reference_outputs)
    else:
        assert build.evaluation.quality is not None and reference.evaluation.quality is not None
        value, reference_value = build.evaluation.quality, reference.evaluation.quality
    drop = reference_value - value
    reason = None
    # The tolerance keeps a variant exactly at the limit (0.90 vs 0.88 with a 0.02 gate)
    # from being rejected by floating-point rounding.
    if drop > max_accuracy_drop + 1e-9:
        reason = (
            f"{spec.metric} {value:.4f} is {drop:.4f} below the reference {reference_value:.4f}; "
            f"the gate allows {max_accuracy_drop:.4f}"
        )
    artifact = build.compressed.onnx
    config = build.config
    agreement = metric.agreement(outputs, reference_outputs)
    return VariantManifest(
        model=spec.name,
        variant=config.name,
        technique=config.technique,
        params=config_to_params(config),
        parent=None if config.name == REFERENCE_VARIANT else (config.parent or REFERENCE_VARIANT),
        status="rejected" if reason else "ready",
        reason=reason,
        sha256=sha256_hex(artifact),
        size_bytes=len(artifact),
        param_count=build.compressed.param_count,
        details=dict(build.compressed.details),
        storage_bytes=build.compressed.storage_bytes,
        quality=Quality(
            metric=spec.metric,
            value=round(value, 6),
            reference=round(reference_value, 6),
            agreement=round(agreement, 6),
            details={
                key: round(figure, 6)
                for key, figure in metric.details(outputs, reference_outputs).items()
            },
        ),
        latency_ms=latency_ms,
        build={"node": build.node, "seconds": round(build.seconds, 2)},
    )


def _to_cached(build: VariantBuild) -> CachedBuild:
    return CachedBuild(
        onnx=build.compressed.onnx,
        param_count=build.compressed.param_count,
        details=build.compressed.details,
        storage_bytes=build.compressed.storage_bytes,
        quality=build.evaluation.quality,
        outputs=build.evaluation.outputs,
        node=build.node,
        seconds=build.seconds,
    )


def _from_cached(config: TechniqueConfig, cached: CachedBuild) -> VariantBuild:
    return VariantBuild(
        config=config,
        compressed=CompressedModel(
            onnx=cached.onnx,
            param_count=cached.param_count,
            details=cached.details,
            storage_bytes=cached.storage_bytes,
        ),
        evaluation=Evaluation(quality=cached.quality, outputs=cached.outputs),
        node=cached.node,
        seconds=cached.seconds,
    )


def _published_build(
    repository: ModelRepository,
    manifest: VariantManifest,
    config: TechniqueConfig,
    spec: ModelSpec,
    data: DataSplits,
) -> VariantBuild:
    """An unchanged published variant as a build: a parent to transform or the reference to
    gate against. Its held-out outputs are computed again from the verified artifact."""
    artifact = repository.read_artifact(manifest)
    return VariantBuild(
        config=config,
        compressed=CompressedModel(
            onnx=artifact,
            param_count=manifest.param_count,
            details=manifest.details,
            storage_bytes=manifest.storage_bytes,
        ),
        evaluation=evaluate_quality(artifact, spec, data),
        node=str(manifest.build.get("node", "")),
        seconds=float(manifest.build.get("seconds", 0.0)),
    )


def _unchanged_variants(
    repository: ModelRepository, spec: ModelSpec, digests: dict[str, str]
) -> dict[str, VariantManifest]:
    """Published variants whose inputs digest is the one this run would build from."""
    try:
        published = {manifest.variant: manifest for manifest in repository.variants(spec.name)}
    except NotFoundError:
        return {}
    return {
        name: manifest
        for name, manifest in published.items()
        if name in digests and manifest.build.get("inputs_digest") == digests[name]
    }


def compress(
    spec: ModelSpec,
    repository: ModelRepository,
    recipes: Sequence[TechniqueConfig],
    max_accuracy_drop: float | None = None,
    progress: ProgressListener | None = None,
    device_classes: Sequence[DeviceClass] = DEFAULT_DEVICE_CLASSES,
    latency_budget: LatencyBudget | None = None,
    cpus_per_variant: float = 1.0,
    rebuild: bool = False,
) -> CompressionReport:
    """Build, evaluate, gate and publish ``recipes`` of ``spec`` (Ray must be initialised).

    The reference variant must succeed, or nothing is published. Other variants that fail are
    listed in the report; the ones that succeed are published, each atomically.
    ``max_accuracy_drop`` defaults to the metric's own gate (accuracy 0.02, cosine 0.05).

    A published variant whose inputs (model, data, config, code version, parent) are unchanged
    is kept as it is, unless ``rebuild``; a build finished by an interrupted run is taken from
    the repository's build cache instead of being built again.
    """
    if max_accuracy_drop is None:
        max_accuracy_drop = get_metric(spec.metric).default_max_drop
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise InvalidArgumentError(
            f"--max-accuracy-drop must be between 0 and 1, got {max_accuracy_drop}"
        )
    names = [recipe.name for recipe in recipes]
    if REFERENCE_VARIANT not in names:
        raise InvalidArgumentError(f"the reference variant '{REFERENCE_VARIANT}' must be built")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"two recipes publish the same variant name: {names}")
    progress = progress or SilentProgress()
    started = time.perf_counter()
    repository.ensure_writable()
    tokenizer = spec.read_tokenizer()  # before any training: a missing file fails at once
    data = spec.load_data()
    verify_declared_signature(spec, data)  # a wrong declaration fails here, before any Ray work
    by_name = {recipe.name: recipe for recipe in recipes}
    digests = variant_digests(spec, data, recipes)
    cache = BuildCache(repository, spec.name)
    unchanged = {} if rebuild else _unchanged_variants(repository, spec, digests)
    results: dict[str, Any] = {}
    for name in names:
        if name not in unchanged and (cached := cache.load_build(digests[name])) is not None:
            results[name] = _from_cached(by_name[name], cached)
    to_build = [r for r in recipes if r.name not in unchanged and r.name not in results]

    board = ProgressBoard.remote()
    data_ref = ray.put(data)
    jobs: dict[str, ray.ObjectRef] = {}
    trained_ref = None
    training_digest = reference_digest(spec, data)
    if spec.training is not None and any(r.stage is Stage.MODEL for r in to_build):
        weights = cache.load_reference(training_digest)
        if weights is not None:
            trained_ref = ray.put(TrainedReference(weights=weights, heldout_quality=float("nan")))
        else:
            # Asking for more CPUs than any node has would leave the task pending forever.
            train_cpus = min(spec.training.num_cpus, _largest_node_cpus())
            trained_ref = _train_reference.options(
                num_cpus=train_cpus, name=f"gearbox-train:{spec.name}"
            ).remote(spec, data_ref, board)
            jobs[TRAINING_JOB] = trained_ref

    def parent_of(recipe: TechniqueConfig) -> Any:
        if recipe.stage is not Stage.ARTIFACT or recipe.parent is None:
            return None
        if recipe.parent in jobs:
            return jobs[recipe.parent]
        if recipe.parent in results:
            return results[recipe.parent]
        if recipe.parent in unchanged:
            return _published_build(
                repository, unchanged[recipe.parent], by_name[recipe.parent], spec, data
            )
        return None

    for recipe in to_build:
        build_cpus = min(recipe.num_cpus(spec) or cpus_per_variant, _largest_node_cpus())
        jobs[recipe.name] = _build_variant.options(
            num_cpus=build_cpus, name=f"gearbox-variant:{spec.name}/{recipe.name}"
        ).remote(spec, recipe, data_ref, trained_ref, parent_of(recipe), board)

    progress.started(names if TRAINING_JOB not in jobs else [TRAINING_JOB, *names])
    for name, manifest in unchanged.items():
        progress.finished(name, manifest.is_ready, f"unchanged: {manifest.status}")
    for name in results:
        progress.update(name, "built by an earlier run; waiting to profile latency", 0.95)
    failed: dict[str, str] = {}
    by_ref = {ref: job for job, ref in jobs.items()}
    pending = list(jobs.values())
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            for job, (stage, fraction) in ray.get(board.snapshot.remote()).items():
                if job not in results and job not in failed:
                    progress.update(job, stage, fraction)
            for ref in done:
                job = by_ref[ref]
                try:
                    results[job] = ray.get(ref)
                except RayError as exc:
                    failed[job] = _cause(exc)
                    progress.finished(job, False, f"failed: {failed[job]}")
                    if job in (TRAINING_JOB, REFERENCE_VARIANT):
                        # Nothing can be published without the reference: stop the rest now.
                        for other in pending:
                            ray.cancel(other, force=True)
                        pending = []
                    continue
                if job == TRAINING_JOB:
                    cache.save_reference(training_digest, results[job].weights)
                    summary = f"trained: held-out {spec.metric} {results[job].heldout_quality:.4f}"
                    progress.finished(job, True, summary)
                else:
                    cache.save_build(digests[job], _to_cached(results[job]))
                    progress.update(job, "built; waiting to profile latency", 0.95)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)

    if TRAINING_JOB in failed:
        raise CompressionError(f"model '{spec.name}': training failed: {failed[TRAINING_JOB]}")
    if REFERENCE_VARIANT in failed:
        raise CompressionError(
            f"reference variant '{REFERENCE_VARIANT}' failed: {failed[REFERENCE_VARIANT]}"
        )

    to_publish = [name for name in names if name in results]
    reference: VariantBuild | None = results.get(REFERENCE_VARIANT)
    if reference is None and to_publish:
        reference = _published_build(
            repository, unchanged[REFERENCE_VARIANT], by_name[REFERENCE_VARIANT], spec, data
        )
    repository.register_model(
        ModelRecord.for_spec(spec, reference_variant=REFERENCE_VARIANT, tokenizer=tokenizer),
        tokenizer,
    )
    # Latency is profiled one variant at a time once every build is done, so that no
    # variant is timed while another one trains on the same cores.
    budget = latency_budget or LatencyBudget()
    published: list[VariantManifest] = []
    for name in to_publish:
        assert reference is not None
        progress.update(name, "profiling latency", 0.97)
        build: VariantBuild = results[name]
        try:
            latency = ray.get(
                _profile_variant.options(num_cpus=cpus_per_variant).remote(
                    jobs.get(name, build), data_ref, device_classes, budget, spec.signature
                )
            )
        except RayError as exc:
            failed[name] = _cause(exc)
            progress.finished(name, False, f"failed: {failed[name]}")
            continue
        manifest = _gate(build, latency, reference, spec, max_accuracy_drop)
        manifest = dataclasses.replace(
            manifest,
            build={
                **manifest.build,
                "code_version": code_version(),
                "inputs_digest": digests[name],
            },
        )
        repository.publish_variant(manifest, build.compressed.onnx)
        cache.drop_build(digests[name])
        published.append(manifest)
        summary = f"{manifest.status}: held-out {spec.metric} {manifest.quality.value:.4f}"
        progress.finished(name, manifest.is_ready, summary)
    return CompressionReport(
        model=spec.name,
        published=published,
        unchanged=[unchanged[name] for name in names if name in unchanged],
        failed={name: reason for name, reason in failed.items() if name != TRAINING_JOB},
        seconds=time.perf_counter() - started,
    )
