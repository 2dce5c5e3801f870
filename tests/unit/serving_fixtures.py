"""A tiny served repository for the serving unit tests: variants, a data plane, metrics.

The repository holds model ``tiny`` (:data:`~tests.unit.tiny_model.CONV_SIGNATURE`) with three
ready variants of different quality and seeded latency plus one rejected variant that would win
on both if it were ever routed to, and model ``broken`` whose only variant is rejected. Every
artifact is a real ONNX graph (:func:`~tests.unit.tiny_model.linear_onnx`); each variant has its
own weights, so which variant answered shows in the numbers.

The fixtures are registered in ``tests/unit/conftest.py``. A :class:`Served` stack is built per
test: its batchers bind to the event loop of their first request, so one test drives one stack
inside one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gearbox.compression import ModelRepository, VariantManifest
from gearbox.compression.devices import DeviceClass
from gearbox.compression.repository import Quality
from gearbox.serving.config import BatchingConfig
from gearbox.serving.dataplane import Catalog, DataPlane
from gearbox.serving.hosting import LocalBackend
from gearbox.serving.inference import InferRequest, Tensor
from tests.unit.tiny_model import linear_onnx, make_manifest, make_record

MODEL = "tiny"
BROKEN_MODEL = "broken"
"""A registered model with no ready variant."""
REFERENCE = "fp32"
INPUT = "images"
OUTPUT = "logits"


@dataclass(frozen=True)
class VariantSeed:
    name: str
    seed: int
    quality: float
    p50_ms: float
    status: str = "ready"
    reason: str | None = None


VARIANTS: tuple[VariantSeed, ...] = (
    VariantSeed(REFERENCE, seed=0, quality=0.90, p50_ms=4.0),
    VariantSeed("int8", seed=1, quality=0.88, p50_ms=1.0),
    VariantSeed("small", seed=2, quality=0.80, p50_ms=0.25),
    # Best quality and fastest: routing to it would be noticed at once.
    VariantSeed(
        "pruned",
        seed=3,
        quality=0.95,
        p50_ms=0.1,
        status="rejected",
        reason="agreement 0.41 below the floor 0.90",
    ),
)
READY = ("fp32", "int8", "small")
REJECTED = "pruned"
FASTEST = "small"
SEEDED_MS = {v.name: v.p50_ms for v in VARIANTS}
OFFLINE_AGREEMENT = 0.97
"""The agreement every manifest records (see :func:`tests.unit.tiny_model.make_manifest`)."""


def variant_manifest(seed: VariantSeed, artifact: bytes, model: str = MODEL) -> VariantManifest:
    manifest = make_manifest(
        artifact,
        variant=seed.name,
        model=model,
        status=seed.status,
        reason=seed.reason,
        technique="export" if seed.name == REFERENCE else "quantize",
    )
    return dataclasses.replace(
        manifest,
        quality=Quality("accuracy", seed.quality, 0.90, OFFLINE_AGREEMENT),
        latency_ms={
            "cpu": {
                "1": {"p50": seed.p50_ms, "p95": seed.p50_ms * 2},
                "8": {"p50": seed.p50_ms * 3, "p95": seed.p50_ms * 4},
            }
        },
    )


def publish_tiny_repository(root: Any) -> ModelRepository:
    repository = ModelRepository(root)
    repository.ensure_writable()
    repository.register_model(make_record(MODEL))
    for seed in VARIANTS:
        artifact = linear_onnx(seed.seed)
        repository.publish_variant(variant_manifest(seed, artifact), artifact)
    repository.register_model(make_record(BROKEN_MODEL))
    artifact = linear_onnx(9)
    rejected = VariantSeed(REFERENCE, 9, 0.1, 1.0, status="rejected", reason="does not export")
    repository.publish_variant(variant_manifest(rejected, artifact, BROKEN_MODEL), artifact)
    return repository


class RecordingMetrics:
    """An in-memory :class:`~gearbox.serving.metrics.GatewayMetrics`: every call, in order."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, str, str]] = []
        self.request_seconds: list[float] = []
        self.budgets: list[tuple[str, str, bool]] = []
        self.selections: list[tuple[str, str, str]] = []
        self.figures: dict[tuple[str, str], tuple[float, int]] = {}
        self.agreements: list[tuple[str, str, float]] = []
        self.inflight_deltas: list[tuple[str, str, int]] = []
        self.batches: list[tuple[str, str, str, int]] = []

    def request_finished(
        self,
        model: str,
        variant: str,
        device_class: str,
        protocol: str,
        code: str,
        seconds: float,
    ) -> None:
        self.requests.append((model, variant, device_class, protocol, code))
        self.request_seconds.append(seconds)

    def budget_outcome(self, model: str, variant: str, met: bool) -> None:
        self.budgets.append((model, variant, met))

    def variant_selected(self, model: str, variant: str, reason: str) -> None:
        self.selections.append((model, variant, reason))

    def variant_figures(self, model: str, variant: str, quality: float, size_bytes: int) -> None:
        self.figures[(model, variant)] = (quality, size_bytes)

    def agreement(self, model: str, variant: str, value: float) -> None:
        self.agreements.append((model, variant, value))

    def inflight(self, model: str, device_class: str, delta: int) -> None:
        self.inflight_deltas.append((model, device_class, delta))

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None:
        self.batches.append((model, variant, device_class, rows))

    def codes(self) -> list[str]:
        return [code for *_, code in self.requests]

    def latest_agreement(self, model: str, variant: str) -> float | None:
        values = [v for m, name, v in self.agreements if (m, name) == (model, variant)]
        return values[-1] if values else None


@dataclass
class Served:
    repository: ModelRepository
    catalog: Catalog
    backend: LocalBackend
    plane: DataPlane
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)


def serve(
    repository: ModelRepository,
    batching: BatchingConfig | None = None,
    configured: tuple[str, ...] = ("cpu",),
    shadow_fraction: float = 1.0,
) -> Served:
    catalog = Catalog.load(repository)
    metrics = RecordingMetrics()
    backend = LocalBackend(
        repository,
        catalog.ready_manifests(),
        DeviceClass("cpu"),
        batching or BatchingConfig(),
        on_batch=lambda model, variant, rows: metrics.batch_formed(model, variant, "cpu", rows),
    )
    plane = DataPlane(
        catalog, [backend], list(configured), metrics, shadow_fraction=shadow_fraction
    )
    return Served(repository, catalog, backend, plane, metrics)


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 8, 8), dtype=np.float32)


def infer_request(
    data: np.ndarray | None = None,
    version: str = "",
    model: str = MODEL,
    **parameters: Any,
) -> InferRequest:
    data = images(2) if data is None else data
    return InferRequest(
        model=model, inputs=(Tensor(INPUT, data),), version=version, parameters=parameters
    )


def run_artifact(repository: ModelRepository, variant: str, data: np.ndarray) -> np.ndarray:
    """The variant's logits from a plain ONNX Runtime session on its published artifact."""
    artifact = repository.read_artifact(repository.manifest(MODEL, variant))
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: data})[0]


async def until(predicate: Callable[[], bool], steps: int = 1000) -> None:
    """Yields to the event loop until ``predicate`` holds (background tasks ran)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never came true")


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


# --- fixtures (registered in conftest.py) --------------------------------------------------


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """Read-only for the tests: build a repository of your own to change one."""
    return publish_tiny_repository(tmp_path_factory.mktemp("serving") / "repo")


@pytest.fixture
def served(tiny_repository: ModelRepository) -> Served:
    return serve(tiny_repository)
