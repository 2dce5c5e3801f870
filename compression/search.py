"""Accuracy-gated Pareto search over compression recipes, run as a Ray Tune experiment.

Each trial is one candidate recipe: a model step (structured pruning to a width, optionally
followed by distillation from the reference at a temperature, or low-rank factorisation at an
energy), optionally followed by int8 quantisation of the exported graph. A trial builds its
candidate with :func:`~gearbox.compression.techniques.apply_technique`, scores it on the
held-out split, times it at batch 1 and reports quality, latency p50 and stored size to Tune.

The driver trains the reference once (or takes its weights from the repository's cache) and
hands the weights to every trial through the object store. Trials whose quality falls outside
the accuracy gate are dropped; the others leave their build with a store actor. Once every
trial is done, the driver profiles those builds one at a time (a trial's own timing ran beside
other trials training on the same cores, so it only ranks candidates roughly), computes the
Pareto front over (quality up, latency down, stored size down) together with the reference,
and publishes the front exactly as :func:`gearbox.compression.pipeline.compress` publishes a
variant, plus the reference ``fp32`` where the repository lacks it.

The search space is a finite grid (:class:`SearchSpace`); Tune's random sampler would repeat
its points, wasting trials, so the driver draws distinct points (seeded) and gives them to
Tune as the points to evaluate, one per trial. A new technique is one more
:class:`SearchEntry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
from ray import tune
from ray.exceptions import RayError
from ray.tune.search.basic_variant import BasicVariantGenerator

from gearbox.compression.devices import DEFAULT_DEVICE_CLASSES, DeviceClass
from gearbox.compression.errors import (
    CompressionError,
    InvalidArgumentError,
    NotFoundError,
)
from gearbox.compression.evaluation import (
    DEFAULT_TOKEN_LENGTH,
    LatencyBudget,
    evaluate_quality,
    measure_latency,
)
from gearbox.compression.pareto import ParetoPoint, pareto_front, point_of
from gearbox.compression.pipeline import (
    TRAINING_JOB,
    TrainedReference,
    VariantBuild,
    _build_variant,
    _cause,
    _gate,
    _largest_node_cpus,
    _profile_variant,
    _reference_model,
    _train_reference,
    _use_assigned_cpus,
)
from gearbox.compression.progress import ProgressBoard, ProgressListener, SilentProgress
from gearbox.compression.provenance import (
    BuildCache,
    code_version,
    reference_digest,
    variant_digests,
)
from gearbox.compression.quality import get_metric
from gearbox.compression.registration import verify_declared_signature
from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.compression.spec import DataSplits, ModelSpec
from gearbox.compression.techniques import (
    REFERENCE_VARIANT,
    ComposedConfig,
    DistilledConfig,
    Fp32Config,
    Int8Config,
    PrunedConfig,
    TechniqueConfig,
    TechniqueInput,
    apply_technique,
)
from gearbox.compression.techniques.lowrank import LowRankConfig

SEARCH_PREFIX = "search"
"""Every variant the search publishes is named ``search-<its steps>``."""

TRIAL_LATENCY_BUDGET = LatencyBudget(
    warmup=5, min_iterations=30, max_iterations=500, min_seconds=0.1, max_seconds=1.0
)
"""A trial's own batch-1 timing: short, since it only ranks candidates until the driver
profiles the ones inside the gate with the full budget."""

DEFAULT_FINETUNE_EPOCHS = 2

SearchPoint = dict[str, Any]
"""One point of the grid: ``{"technique": key, "<key>.<knob>": value, ..., "int8": bool}``."""

StepBuilder = Callable[[Mapping[str, Any], ModelSpec, int], tuple[TechniqueConfig, ...]]
"""(the entry's knob values, the spec, fine-tuning epochs) -> the candidate's model steps."""


# --- the search space -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchEntry:
    """One technique a candidate may start with: the values of its searched parameters, and
    how a choice of them becomes the candidate's model steps (named so that the variant's name
    says what it is)."""

    technique: str
    knobs: tuple[tuple[str, tuple[Any, ...]], ...]
    steps: StepBuilder

    def grid(self) -> list[dict[str, Any]]:
        names = [name for name, _ in self.knobs]
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(values for _, values in self.knobs))
        ]


@dataclass(frozen=True)
class SearchSpace:
    entries: tuple[SearchEntry, ...]
    int8: tuple[bool, ...] = (False, True)
    """Whether the exported graph is then quantised to int8 (static for convolutions,
    dynamic for Linear-heavy graphs, as ``Int8Config`` chooses)."""

    def __post_init__(self) -> None:
        keys = [entry.technique for entry in self.entries]
        if not keys or len(set(keys)) != len(keys):
            raise InvalidArgumentError(f"a search space needs distinct techniques, got {keys}")

    def points(self) -> list[SearchPoint]:
        """Every point of the grid, in a fixed order."""
        return [
            {
                "technique": entry.technique,
                **{f"{entry.technique}.{name}": value for name, value in knobs.items()},
                "int8": int8,
            }
            for entry in self.entries
            for knobs in entry.grid()
            for int8 in self.int8
        ]

    def param_space(self) -> dict[str, Any]:
        """The same dimensions as Tune domains; a point fixes the knobs of its own technique,
        Tune fills the others' (which that point ignores)."""
        space: dict[str, Any] = {
            "technique": tune.choice([entry.technique for entry in self.entries]),
            "int8": tune.choice(list(self.int8)),
        }
        for entry in self.entries:
            for name, values in entry.knobs:
                space[f"{entry.technique}.{name}"] = tune.choice(list(values))
        return space

    def candidate(self, point: Mapping[str, Any], spec: ModelSpec, epochs: int) -> TechniqueConfig:
        """The recipe a point describes, named ``search-<step>-<step>...``."""
        entry = next((e for e in self.entries if e.technique == point["technique"]), None)
        if entry is None:
            raise InvalidArgumentError(f"the search space has no technique {point['technique']}")
        knobs = {name: point[f"{entry.technique}.{name}"] for name, _ in entry.knobs}
        steps = entry.steps(knobs, spec, epochs)
        if point["int8"]:
            steps = (*steps, Int8Config(name="int8"))
        name = "-".join((SEARCH_PREFIX, *(step.name for step in steps)))
        if len(steps) == 1:
            return dataclasses.replace(steps[0], name=name)
        return ComposedConfig(name=name, steps=steps)


def _percent(fraction: float) -> int:
    return round(fraction * 100)


def pruned_steps(
    knobs: Mapping[str, Any], spec: ModelSpec, epochs: int
) -> tuple[TechniqueConfig, ...]:
    """The teacher shrunk to width ``1 - amount`` (its channels of largest L1 norm), then
    trained on the labels, or, with a ``teacher_temperature``, distilled from the reference
    after one epoch on the labels."""
    amount: float = knobs["amount"]
    temperature: float | None = knobs["teacher_temperature"]
    name = f"pruned{_percent(amount)}"
    if temperature is None:
        return (PrunedConfig(name=name, amount=amount, finetune_epochs=epochs),)
    # An embedding student learns the teacher's vectors; a temperature means nothing there.
    distilled = "distilled" if spec.task == "embedding" else f"distilled-t{temperature:g}"
    return (
        PrunedConfig(name=name, amount=amount, finetune_epochs=1),
        DistilledConfig(name=distilled, temperature=temperature, epochs=epochs),
    )


def lowrank_steps(
    knobs: Mapping[str, Any], spec: ModelSpec, epochs: int
) -> tuple[TechniqueConfig, ...]:
    """Every layer factorised at the rank that keeps ``energy`` of its squared singular values
    (where that pays), then fine-tuned from the reference."""
    energy: float = knobs["energy"]
    return (
        LowRankConfig(name=f"lowrank{_percent(energy)}", energy=energy, finetune_epochs=epochs),
    )


def default_space(spec: ModelSpec) -> SearchSpace:
    """Width by structured pruning (0.5 to 0.8 of the channels removed), with or without
    distillation, and low-rank energy; each with or without int8.

    Depth is not searched: no technique drops blocks yet.
    """
    temperatures: tuple[float | None, ...] = (
        (None, DistilledConfig.temperature) if spec.task == "embedding" else (None, 2.0, 4.0)
    )
    return SearchSpace(
        entries=(
            SearchEntry(
                technique="pruned",
                knobs=(
                    ("amount", (0.5, 0.6, 0.7, 0.8)),
                    ("teacher_temperature", temperatures),
                ),
                steps=pruned_steps,
            ),
            SearchEntry(
                technique="lowrank",
                knobs=(("energy", (0.4, 0.6, 0.8)),),
                steps=lowrank_steps,
            ),
        )
    )


def draw_points(space: SearchSpace, trials: int, seed: int) -> list[SearchPoint]:
    """``trials`` distinct points of the grid (all of it if it has fewer), drawn at random
    without replacement."""
    grid = space.points()
    order = np.random.default_rng(seed).permutation(len(grid))
    return [grid[index] for index in order[:trials]]


# --- trials -----------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class CandidateStore:
    """Holds the builds of the trials inside the gate until the driver has profiled them.

    Each build is put in the object store by this actor, which then owns it: a trial's own
    objects would be lost when its worker exits, and the object store can spill to disk.
    """

    def __init__(self) -> None:
        self._builds: dict[str, ray.ObjectRef] = {}

    def keep(self, variant: str, build: VariantBuild) -> None:
        self._builds[variant] = ray.put(build)

    def builds(self) -> dict[str, ray.ObjectRef]:
        return dict(self._builds)


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, sent once through the object store."""

    space: SearchSpace
    spec: ModelSpec
    data: DataSplits
    trained: TrainedReference | None
    reference: VariantBuild
    max_accuracy_drop: float
    finetune_epochs: int
    device_classes: tuple[DeviceClass, ...]
    board: Any
    store: Any


def _node() -> str:
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"


def run_trial(point: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: build the point's candidate, score it, time it, report."""
    _use_assigned_cpus()
    started = time.perf_counter()
    spec, data = context.spec, context.data
    config = context.space.candidate(point, spec, context.finetune_epochs)
    trial_id = tune.get_context().get_trial_id()

    def report(stage: str, fraction: float) -> None:
        context.board.update.remote(trial_id, stage, fraction)

    report("starting", 0.0)
    weights = None if context.trained is None else context.trained.weights
    compressed = apply_technique(
        config,
        TechniqueInput(
            spec=spec, data=data, reference_model=_reference_model(spec, weights), report=report
        ),
    )
    report("evaluating held-out quality", 0.9)
    build = VariantBuild(
        config=config,
        compressed=compressed,
        evaluation=evaluate_quality(compressed.onnx, spec, data),
        node=_node(),
        seconds=time.perf_counter() - started,
    )
    judged = _gate(build, {}, context.reference, spec, context.max_accuracy_drop)
    report("timing batch 1", 0.95)
    device = next(d for d in context.device_classes if d.is_available())
    latency = measure_latency(
        compressed.onnx,
        device,
        data.heldout,
        batch_sizes=(1,),
        budget=TRIAL_LATENCY_BUDGET,
        signature=spec.signature,
        token_lengths=(DEFAULT_TOKEN_LENGTH,),
    )
    if judged.is_ready:
        ray.get(context.store.keep.remote(config.name, build))
    tune.report(
        {
            "variant": config.name,
            "quality": judged.quality.value,
            "within_gate": judged.is_ready,
            "latency_p50_ms": latency["1"]["p50"],
            "stored_bytes": compressed.stored_size,
            "param_count": compressed.param_count,
            "node": build.node,
            "build_seconds": round(build.seconds, 2),
        }
    )


class _TrialProgress(tune.Callback):
    """Shows each trial as one progress job (``trial 03/20``) while Tune runs them."""

    def __init__(
        self,
        progress: ProgressListener,
        board: Any,
        labels: Mapping[str, str],
        space: SearchSpace,
        spec: ModelSpec,
        epochs: int,
    ) -> None:
        self._progress = progress
        self._board = board
        self._label_of_variant = labels
        self._space = space
        self._spec = spec
        self._epochs = epochs
        self._labels: dict[str, str] = {}
        self._variants: dict[str, str] = {}
        self._finished: set[str] = set()
        self._last_poll = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment's state; a terminal's progress display
        # (locks, a live console) cannot be, and a restored copy has nothing to show anyway.
        return {**self.__dict__, "_progress": SilentProgress()}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        variant = self._space.candidate(trial.config, self._spec, self._epochs).name
        self._labels[trial.trial_id] = self._label_of_variant[variant]
        self._variants[trial.trial_id] = variant
        self._progress.update(self._labels[trial.trial_id], f"{variant}: starting", 0.0)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_poll < 0.2:
            return
        self._last_poll = now
        for trial_id, (stage, fraction) in ray.get(self._board.snapshot.remote()).items():
            if trial_id in self._labels and trial_id not in self._finished:
                variant = self._variants[trial_id]
                self._progress.update(self._labels[trial_id], f"{variant}: {stage}", fraction)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished.add(trial.trial_id)
        result = trial.last_result or {}
        label, variant = self._labels[trial.trial_id], self._variants[trial.trial_id]
        if result.get("within_gate"):
            self._progress.update(label, f"{variant}: built; waiting to profile latency", 0.95)
        else:
            quality = result.get("quality", float("nan"))
            summary = f"{variant}: outside the gate ({self._spec.metric} {quality:.4f})"
            self._progress.finished(label, False, summary)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished.add(trial.trial_id)
        label, variant = self._labels[trial.trial_id], self._variants[trial.trial_id]
        self._progress.finished(label, False, f"{variant}: failed")


# --- the driver -------------------------------------------------------------------------


TrialStatus = Literal["on the front", "dominated", "outside the gate", "failed"]


@dataclass(frozen=True)
class TrialOutcome:
    """One trial, as the search judged it."""

    label: str
    variant: str
    status: TrialStatus
    quality: float | None = None
    latency_p50_ms: float | None = None
    """Batch 1, first device class: the driver's profile for candidates inside the gate,
    the trial's own (rougher) timing for the others."""
    stored_bytes: int | None = None
    node: str | None = None
    build_seconds: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SearchReport:
    model: str
    published: list[VariantManifest]
    """The front's candidates, and the reference if the repository lacked it."""
    trials: list[TrialOutcome]
    grid_size: int
    reference: VariantManifest
    seconds: float

    @property
    def front(self) -> list[str]:
        return [t.variant for t in self.trials if t.status == "on the front"]


def _wait(ref: ray.ObjectRef, job: str, board: Any, progress: ProgressListener) -> Any:
    """``ray.get(ref)``, showing the board's progress of ``job`` meanwhile."""
    while True:
        done, _ = ray.wait([ref], timeout=0.2)
        stage = ray.get(board.snapshot.remote()).get(job)
        if stage is not None and not done:
            progress.update(job, *stage)
        if done:
            return ray.get(ref)


def _trained_reference(
    spec: ModelSpec,
    data: DataSplits,
    data_ref: ray.ObjectRef,
    cache: BuildCache,
    board: Any,
    progress: ProgressListener,
) -> TrainedReference | None:
    """The reference's weights: from the repository's cache when the same inputs trained them
    before, else trained once in a Ray task (and cached)."""
    if spec.training is None:
        return None
    digest = reference_digest(spec, data)
    weights = cache.load_reference(digest)
    if weights is not None:
        progress.finished(TRAINING_JOB, True, "trained by an earlier run (cached)")
        return TrainedReference(weights=weights, heldout_quality=float("nan"))
    train_cpus = min(spec.training.num_cpus, _largest_node_cpus())
    ref = _train_reference.options(num_cpus=train_cpus, name=f"gearbox-train:{spec.name}").remote(
        spec, data_ref, board
    )
    try:
        trained: TrainedReference = _wait(ref, TRAINING_JOB, board, progress)
    except RayError as exc:
        progress.finished(TRAINING_JOB, False, f"failed: {_cause(exc)}")
        raise CompressionError(f"model '{spec.name}': training failed: {_cause(exc)}") from exc
    cache.save_reference(digest, trained.weights)
    summary = f"trained: held-out {spec.metric} {trained.heldout_quality:.4f}"
    progress.finished(TRAINING_JOB, True, summary)
    return trained


def _with_provenance(
    manifest: VariantManifest,
    spec: ModelSpec,
    data: DataSplits,
    config: TechniqueConfig,
    search: Mapping[str, Any] | None,
) -> VariantManifest:
    extra: dict[str, Any] = {
        "code_version": code_version(),
        "inputs_digest": variant_digests(spec, data, [config])[config.name],
    }
    if search is not None:
        extra["search"] = dict(search)
    return dataclasses.replace(manifest, build={**manifest.build, **extra})


def _fails(results: Any, space: SearchSpace, spec: ModelSpec, epochs: int) -> dict[str, str]:
    """Variant -> why its trial failed."""
    failed = {}
    for result in results:
        if result.error is not None:
            variant = space.candidate(result.config, spec, epochs).name
            failed[variant] = _cause(result.error)
    return failed


def search(
    spec: ModelSpec,
    repository: ModelRepository,
    trials: int,
    max_accuracy_drop: float | None = None,
    progress: ProgressListener | None = None,
    seed: int = 0,
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS,
    cpus_per_trial: float = 1.0,
    space: SearchSpace | None = None,
    device_classes: Sequence[DeviceClass] = DEFAULT_DEVICE_CLASSES,
    latency_budget: LatencyBudget | None = None,
) -> SearchReport:
    """Search ``trials`` recipes of ``spec`` with Ray Tune and publish the Pareto front of the
    ones inside the accuracy gate (Ray must be initialised).

    ``max_accuracy_drop`` defaults to the metric's own gate; ``finetune_epochs`` bounds each
    trial's training; each trial asks Ray for ``cpus_per_trial`` CPUs, so that trials run side
    by side on whichever nodes have room. ``space`` defaults to :func:`default_space`.
    """
    if max_accuracy_drop is None:
        max_accuracy_drop = get_metric(spec.metric).default_max_drop
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise InvalidArgumentError(
            f"--max-accuracy-drop must be between 0 and 1, got {max_accuracy_drop}"
        )
    if trials < 1:
        raise InvalidArgumentError(f"--trials must be at least 1, got {trials}")
    if finetune_epochs < 1:
        raise InvalidArgumentError(f"fine-tuning needs at least one epoch, got {finetune_epochs}")
    if cpus_per_trial <= 0:
        raise InvalidArgumentError(f"cpus_per_trial must be positive, got {cpus_per_trial}")
    space = space or default_space(spec)
    progress = progress or SilentProgress()
    started = time.perf_counter()
    repository.ensure_writable()
    tokenizer = spec.read_tokenizer()
    data = spec.load_data()
    verify_declared_signature(spec, data)  # a wrong declaration fails before any trial
    points = draw_points(space, trials, seed)
    configs = [space.candidate(point, spec, finetune_epochs) for point in points]
    labels = {config.name: f"trial {i + 1:02d}/{len(points)}" for i, config in enumerate(configs)}
    progress.started(
        [
            *([TRAINING_JOB] if spec.training is not None else []),
            REFERENCE_VARIANT,
            *labels.values(),
        ]
    )

    board = ProgressBoard.remote()
    store = CandidateStore.remote()
    storage = tempfile.mkdtemp(prefix="gearbox-search-")
    try:
        data_ref = ray.put(data)
        cache = BuildCache(repository, spec.name)
        trained = _trained_reference(spec, data, data_ref, cache, board, progress)
        cpus = min(cpus_per_trial, _largest_node_cpus())
        reference_ref = _build_variant.options(
            num_cpus=cpus, name=f"gearbox-variant:{spec.name}/{REFERENCE_VARIANT}"
        ).remote(spec, Fp32Config(), data_ref, trained, None, board)
        try:
            reference: VariantBuild = _wait(reference_ref, REFERENCE_VARIANT, board, progress)
        except RayError as exc:
            progress.finished(REFERENCE_VARIANT, False, f"failed: {_cause(exc)}")
            raise CompressionError(
                f"reference variant '{REFERENCE_VARIANT}' failed: {_cause(exc)}"
            ) from exc
        progress.update(REFERENCE_VARIANT, "built; waiting to profile latency", 0.95)

        context = TrialContext(
            space=space,
            spec=spec,
            data=data,
            trained=trained,
            reference=reference,
            max_accuracy_drop=max_accuracy_drop,
            finetune_epochs=finetune_epochs,
            device_classes=tuple(device_classes),
            board=board,
            store=store,
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": cpus}),
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=len(points),
                search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=seed),
            ),
            run_config=tune.RunConfig(
                name=f"gearbox-search-{spec.name}",
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_TrialProgress(progress, board, labels, space, spec, finetune_epochs)],
            ),
        )
        # Tune prints an experiment banner even when silent; the progress listener shows trials.
        with contextlib.redirect_stdout(io.StringIO()):
            results = tuner.fit()
        failed = _fails(results, space, spec, finetune_epochs)
        reported = {
            result.metrics["variant"]: result.metrics
            for result in results
            if result.error is None and "variant" in result.metrics
        }

        # Latency is profiled one build at a time now that no trial trains beside it.
        budget = latency_budget or LatencyBudget()
        kept = ray.get(store.builds.remote())
        judged: dict[str, tuple[VariantManifest, VariantBuild]] = {}
        for name, build_ref in [(REFERENCE_VARIANT, reference_ref), *kept.items()]:
            job = labels.get(name, REFERENCE_VARIANT)
            progress.update(job, f"{name}: profiling latency", 0.97)
            try:
                latency = ray.get(
                    _profile_variant.options(num_cpus=cpus).remote(
                        build_ref, data_ref, device_classes, budget, spec.signature
                    )
                )
            except RayError as exc:
                if name == REFERENCE_VARIANT:
                    raise CompressionError(
                        f"profiling the reference failed: {_cause(exc)}"
                    ) from exc
                failed[name] = _cause(exc)
                progress.finished(job, False, f"{name}: failed: {failed[name]}")
                continue
            build = reference if name == REFERENCE_VARIANT else ray.get(build_ref)
            judged[name] = (_gate(build, latency, reference, spec, max_accuracy_drop), build)
    finally:
        for actor in (board, store):
            ray.kill(actor)
        shutil.rmtree(storage, ignore_errors=True)

    reference_manifest = judged[REFERENCE_VARIANT][0]
    device = next(iter(reference_manifest.latency_ms))
    candidates = {name: pair for name, pair in judged.items() if name != REFERENCE_VARIANT}
    objectives = [point_of(manifest, device) for manifest, _ in judged.values()]
    front_points = pareto_front([p for p in objectives if p is not None])
    front = {p.name for p in front_points}

    repository.register_model(
        ModelRecord.for_spec(spec, reference_variant=REFERENCE_VARIANT, tokenizer=tokenizer),
        tokenizer,
    )
    published: list[VariantManifest] = []
    try:
        repository.manifest(spec.name, REFERENCE_VARIANT)
    except NotFoundError:
        manifest = _with_provenance(reference_manifest, spec, data, Fp32Config(), None)
        repository.publish_variant(manifest, reference.compressed.onnx)
        published.append(manifest)
    summary = f"held-out {spec.metric} {reference_manifest.quality.value:.4f}"
    progress.finished(REFERENCE_VARIANT, True, summary)

    outcomes: list[TrialOutcome] = []
    for config in configs:
        name, label = config.name, labels[config.name]
        if name in candidates:
            manifest, build = candidates[name]
            point = point_of(manifest, device)
            on_front = name in front
            if on_front:
                manifest = _with_provenance(
                    manifest, spec, data, config, {"trial": label, "seed": seed}
                )
                repository.publish_variant(manifest, build.compressed.onnx)
                published.append(manifest)
            outcomes.append(
                _outcome(label, manifest, point, "on the front" if on_front else "dominated")
            )
            if on_front:
                status = "on the Pareto front: published"
            else:
                better = [p.name for p in front_points if point and p.dominates(point)]
                status = f"dominated by {', '.join(better)}"
            progress.finished(label, True, f"{name}: {status}")
        elif name in reported:
            metrics = reported[name]
            outcomes.append(
                TrialOutcome(
                    label=label,
                    variant=name,
                    status="outside the gate",
                    quality=metrics["quality"],
                    latency_p50_ms=metrics["latency_p50_ms"],
                    stored_bytes=metrics["stored_bytes"],
                    node=metrics["node"],
                    build_seconds=metrics["build_seconds"],
                )
            )
        else:
            reason = failed.get(name, "the trial reported nothing")
            outcomes.append(TrialOutcome(label, name, "failed", reason=reason))
            progress.finished(label, False, f"{name}: failed: {reason}")
    return SearchReport(
        model=spec.name,
        published=published,
        trials=outcomes,
        grid_size=len(space.points()),
        reference=reference_manifest,
        seconds=time.perf_counter() - started,
    )


def _outcome(
    label: str, manifest: VariantManifest, point: ParetoPoint | None, status: TrialStatus
) -> TrialOutcome:
    return TrialOutcome(
        label=label,
        variant=manifest.variant,
        status=status,
        quality=manifest.quality.value,
        latency_p50_ms=None if point is None else point.latency_ms,
        stored_bytes=manifest.stored_size,
        node=str(manifest.build.get("node")),
        build_seconds=manifest.build.get("seconds"),
    )
