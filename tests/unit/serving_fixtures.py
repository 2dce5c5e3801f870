"""A tiny served repository for the serving unit tests: variants, a data plane, metrics.

The repository holds model ``tiny`` (:data:`~tests.unit.tiny_model.CONV_SIGNATURE`) with three
ready variants of different quality and profiled latency plus one rejected variant that would
win on both if it were ever routed to, and model ``broken`` whose only variant is rejected.
Every artifact is a real ONNX graph (:func:`~tests.unit.tiny_model.linear_onnx`); each variant
has its own weights, so which variant answered shows in the numbers.

A :class:`Served` stack is what a gateway replica builds: a :class:`LocalBackend` (whose
:class:`~gearbox.serving.executor.DeviceExecutor` owns worker threads) and a warmed-up
:class:`DataPlane`. Build one with :func:`start` inside a test's event loop, with :func:`serve`
from synchronous code, or take the ``served`` / ``serving`` fixtures (registered in
``tests/unit/conftest.py``), which close the backend after the test. A stack binds to no event
loop: the executor hands each result to the loop of the request that asked for it.

The variants of ``tiny`` all run in microseconds, so a warm-up measures them as equally fast.
For routing tests to mean something, the stack's service times are pinned to the manifests'
profiled figures after the warm-up (``pin_profiled_times``): ``fp32`` then costs 400 ms,
``int8`` 100 ms and ``small`` 25 ms at batch 1, far above the measured per-request overhead and
worker hop (even on a loaded machine), so the routing choice does not depend on its speed. They
also keep every request off the executor's inline path: all of them run on the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gearbox.compression import ModelRepository, VariantManifest
from gearbox.compression.devices import DeviceClass
from gearbox.compression.repository import Quality
from gearbox.serving.catalog import Catalog, profiled_cost, profiled_costs_by_tokens
from gearbox.serving.clock import RequestClock
from gearbox.serving.config import BatchingConfig
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.executor import DeviceExecutor, Lane
from gearbox.serving.experiment_store import ReplicaExperiments
from gearbox.serving.hosting import LocalBackend
from gearbox.serving.inference import InferRequest, InferResponse, Tensor
from gearbox.serving.queue_model import BatchCost, ServiceTimes, variant_key
from gearbox.serving.rest.adapter import HttpAdapter
from tests.unit.tiny_model import linear_onnx, make_manifest, make_record

MODEL = "tiny"
BROKEN_MODEL = "broken"
"""A registered model with no ready variant."""
REFERENCE = "fp32"
INPUT = "images"
OUTPUT = "logits"
DEVICE = "cpu"


@dataclass(frozen=True)
class VariantSeed:
    name: str
    seed: int
    quality: float
    p50_ms: float
    status: str = "ready"
    reason: str | None = None


VARIANTS: tuple[VariantSeed, ...] = (
    VariantSeed(REFERENCE, seed=0, quality=0.90, p50_ms=400.0),
    VariantSeed("int8", seed=1, quality=0.88, p50_ms=100.0),
    VariantSeed("small", seed=2, quality=0.80, p50_ms=25.0),
    # Best quality and fastest: routing to it would be noticed at once.
    VariantSeed(
        "pruned",
        seed=3,
        quality=0.95,
        p50_ms=10.0,
        status="rejected",
        reason="agreement 0.41 below the floor 0.90",
    ),
)
READY = ("fp32", "int8", "small")
REJECTED = "pruned"
FASTEST = "small"
SEEDED_MS = {v.name: v.p50_ms for v in VARIANTS}
"""Batch-1 p50 of each variant's manifest (batch 8 is three times that)."""
MIDDLE_BUDGET_MS = 200.0
"""Excludes only fp32: predicted above 400 ms, int8 at 100-130 ms (1-2 rows) plus overhead."""
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
            DEVICE: {
                "1": {"p50": seed.p50_ms, "p95": seed.p50_ms * 2},
                "8": {"p50": seed.p50_ms * 3, "p95": seed.p50_ms * 4},
            }
        },
    )


def publish_tiny_repository(
    root: Any, variants: tuple[VariantSeed, ...] = VARIANTS
) -> ModelRepository:
    repository = ModelRepository(root)
    repository.ensure_writable()
    repository.register_model(make_record(MODEL))
    for seed in variants:
        artifact = linear_onnx(seed.seed)
        repository.publish_variant(variant_manifest(seed, artifact), artifact)
    repository.register_model(make_record(BROKEN_MODEL))
    artifact = linear_onnx(9)
    rejected = VariantSeed(REFERENCE, 9, 0.1, 1.0, status="rejected", reason="does not export")
    repository.publish_variant(variant_manifest(rejected, artifact, BROKEN_MODEL), artifact)
    return repository


class RecordingMetrics:
    """An in-memory :class:`~gearbox.serving.metrics.GatewayMetrics`: every call, in order.

    ``batch_formed`` is called from the executor's worker threads (list appends are atomic).
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, str, str]] = []
        self.request_seconds: list[float] = []
        self.budgets: list[tuple[str, str, bool]] = []
        self.selections: list[tuple[str, str, str]] = []
        self.figures: dict[tuple[str, str], tuple[float, int]] = {}
        self.agreements: list[tuple[str, str, float]] = []
        self.arms: list[str] = []
        self.declared: list[tuple[str, str, tuple[str, ...]]] = []
        self.inflight_deltas: list[tuple[str, str, int]] = []
        self.batches: list[tuple[str, str, str, int]] = []
        self.loaded: dict[tuple[str, str, str], bool] = {}
        self.ignored: list[tuple[str, int]] = []

    def declare(self, model: str, variant: str, device_classes: Sequence[str]) -> None:
        self.declared.append((model, variant, tuple(device_classes)))

    def request_finished(
        self,
        model: str,
        variant: str,
        device_class: str,
        protocol: str,
        code: str,
        seconds: float,
        arm: str = "",
    ) -> None:
        self.requests.append((model, variant, device_class, protocol, code))
        self.request_seconds.append(seconds)
        self.arms.append(arm)

    def budget_outcome(self, model: str, variant: str, met: bool, arm: str = "") -> None:
        self.budgets.append((model, variant, met))

    def variant_selected(self, model: str, variant: str, reason: str, arm: str = "") -> None:
        self.selections.append((model, variant, reason))

    def parameters_ignored(self, model: str, count: int) -> None:
        self.ignored.append((model, count))

    def variant_figures(self, model: str, variant: str, quality: float, size_bytes: int) -> None:
        self.figures[(model, variant)] = (quality, size_bytes)

    def agreement(
        self, model: str, variant: str, matched: float, rows: int, offline: float
    ) -> None:
        self.agreements.append((model, variant, matched / rows if rows else offline))

    def variant_loaded(self, model: str, variant: str, device_class: str, loaded: bool) -> None:
        self.loaded[(model, variant, device_class)] = loaded

    def inflight(self, model: str, device_class: str, delta: int) -> None:
        self.inflight_deltas.append((model, device_class, delta))

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None:
        self.batches.append((model, variant, device_class, rows))

    def on_batch(self, device_class: str) -> Callable[[str, str, int, float], None]:
        """The executor's ``on_batch`` callback for ``device_class``, as the app wires it."""

        def formed(model: str, variant: str, rows: int, _seconds: float) -> None:
            self.batch_formed(model, variant, device_class, rows)

        return formed

    def forget_traffic(self) -> None:
        """Drops what the warm-up's own requests left (batches and in-flight deltas)."""
        self.batches.clear()
        self.inflight_deltas.clear()

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

    async def answer(
        self, request: InferRequest, clock: RequestClock | None = None
    ) -> InferResponse:
        """``infer`` then ``answered``, as an adapter does: the response with its final
        parameters (``latency_ms``, ``budget_met``, ...)."""
        response = await self.plane.infer(request, clock or RequestClock.start())
        return dataclasses.replace(response, parameters=self.plane.answered(response))

    def predicted_ms(self, variant: str, rows: int = 1, lane: Lane = Lane.STANDARD) -> float:
        """What the plane would predict for ``variant`` on ``lane`` now, rounded as responses
        carry it."""
        predicted = self.backend.predict_ms(MODEL, variant, rows, lane=lane)
        return round(self.plane.overhead_ms + predicted, 4)

    def close(self) -> None:
        self.backend.close()


def pin_profiled_times(backend: LocalBackend, catalog: Catalog) -> None:
    """Puts the manifests' profiled costs back in place of what the warm-up measured."""
    for manifest in catalog.ready_manifests():
        key = variant_key(manifest.model, manifest.variant)
        backend.times.seed(
            key,
            backend.device_class,
            profiled_cost(manifest, DEVICE),
            profiled_costs_by_tokens(manifest, DEVICE),
        )


async def start(
    repository: ModelRepository,
    batching: BatchingConfig | None = None,
    configured: tuple[str, ...] = (DEVICE,),
    shadow_fraction: float = 1.0,
    warm: bool = True,
    pin: bool = True,
    transport_allowance_ms: float = 0.0,
    direct_ingress: bool = False,
    experiments: ReplicaExperiments | None = None,
) -> Served:
    """Builds a stack in the running event loop and warms it up as a replica does (unless
    ``warm`` is false: then the plane is not ready). Close it with :meth:`Served.close`."""
    catalog = Catalog.load(repository)
    metrics = RecordingMetrics()
    backend = LocalBackend(
        repository,
        catalog,
        DeviceClass(DEVICE),
        batching or BatchingConfig(),
        on_batch=metrics.on_batch(DEVICE),
    )
    catalog = backend.served(catalog)
    try:
        plane = DataPlane(
            catalog,
            [backend],
            list(configured),
            metrics,
            shadow_fraction=shadow_fraction,
            transport_allowance_ms=transport_allowance_ms,
            direct_ingress=direct_ingress,
            experiments=experiments,
        )
        if warm:
            await backend.warm_up()
            await plane.warm_up()
            # The worker books a batch as finished a moment after answering it: wait, so that
            # no warm-up batch still shows in the work state a test's first prediction sees.
            await until(lambda: backend.depth() == 0 and not backend.executor.work_state().running)
        if pin:
            pin_profiled_times(backend, catalog)
        metrics.forget_traffic()
    except BaseException:
        backend.close()
        raise
    return Served(repository, catalog, backend, plane, metrics)


@contextlib.asynccontextmanager
async def started(repository: ModelRepository, **options: Any) -> AsyncIterator[Served]:
    stack = await start(repository, **options)
    try:
        yield stack
    finally:
        stack.close()


def serve(repository: ModelRepository, **options: Any) -> Served:
    """:func:`start` from synchronous code (the stack outlives that event loop)."""
    return run(start(repository, **options))


# --- requests and answers -------------------------------------------------------------------


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


# --- waiting and holding ----------------------------------------------------------------------

PATIENCE_S = 30.0
"""How long a test waits for something that takes microseconds (a generous safety net: a test
that waits this long has failed, it never passes because of it)."""


async def until(predicate: Callable[[], bool], timeout_s: float = PATIENCE_S) -> None:
    """Yields to the event loop (and so to worker threads) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never came true")
        await asyncio.sleep(0.001)


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


GATE_MODEL = "gate"
GATE_VARIANT = "hold"
GATE_KEY = variant_key(GATE_MODEL, GATE_VARIANT)


class Gate:
    """Keeps a one-worker executor busy on a batch of its own until opened.

    Requests submitted while the gate is held queue up behind it, so a test decides exactly
    what is queued when the worker next forms a batch. The gate's variant is seeded as slow,
    so it always runs on the worker (never inline).
    """

    def __init__(self, executor: DeviceExecutor, times: ServiceTimes, rows: int = 1) -> None:
        self.executor = executor
        self.rows = rows
        self.running = threading.Event()
        self._open = threading.Event()
        self.task: asyncio.Task[Any] | None = None
        executor.host(GATE_MODEL, GATE_VARIANT, self._run)
        times.seed(GATE_KEY, executor.device_class, BatchCost(60_000.0, 0.0))

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        if not self._open.wait(PATIENCE_S):
            raise TimeoutError("the gate was never opened")
        return {"held": inputs["held"]}

    async def hold(self) -> None:
        """Returns once the worker runs the gate's batch."""
        inputs = {"held": np.zeros((self.rows, 1), np.float32)}
        self.task = asyncio.ensure_future(self.executor.submit(GATE_MODEL, GATE_VARIANT, inputs))
        await until(self.running.is_set)

    async def open(self) -> None:
        self._open.set()
        if self.task is not None:
            await self.task

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[Gate]:
        await self.hold()
        try:
            yield self
        finally:
            await self.open()


@contextlib.contextmanager
def closing_all() -> Iterator[list[Served]]:
    stacks: list[Served] = []
    try:
        yield stacks
    finally:
        for stack in stacks:
            stack.close()


# --- fixtures (registered in conftest.py) --------------------------------------------------


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """Read-only for the tests: build a repository of your own to change one."""
    return publish_tiny_repository(tmp_path_factory.mktemp("serving") / "repo")


@pytest.fixture
def served(tiny_repository: ModelRepository) -> Iterator[Served]:
    """A warmed-up stack with the default configuration; its backend is closed afterwards."""
    stack = serve(tiny_repository)
    yield stack
    stack.close()


@pytest.fixture
def serving(tiny_repository: ModelRepository) -> Iterator[Callable[..., Served]]:
    """``serving(**options)`` builds a stack like :func:`serve`; all are closed afterwards."""
    with closing_all() as stacks:

        def make(**options: Any) -> Served:
            stack = serve(tiny_repository, **options)
            stacks.append(stack)
            return stack

        yield make


# --- stand-ins for what carries a request to an adapter -------------------------------------


class GrpcContext:
    """Records what an adapter tells the gRPC context."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self.metadata = tuple(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata


class _TritonReply:
    """What tritonclient.http reads of geventhttpclient's response."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self._body = body

    def read(self) -> bytes:
        return self._body


class TritonHttpStub:
    """Stands in for tritonclient.http's connection: each request goes to ``adapter``, and
    ``requests`` lists (method, URI) as the client sent them."""

    def __init__(self, adapter: HttpAdapter) -> None:
        self.adapter = adapter
        self.requests: list[tuple[str, str]] = []

    def _send(self, method: str, request_uri: str, body: bytes) -> _TritonReply:
        self.requests.append((method, request_uri))
        reply = run(self.adapter.handle(method, request_uri, {}, body))
        return _TritonReply(reply.status, reply.body)

    def get(self, request_uri: str, headers: Any = None) -> _TritonReply:
        return self._send("GET", request_uri, b"")

    def post(self, request_uri: str, body: str | bytes, headers: Any = None) -> _TritonReply:
        return self._send("POST", request_uri, body.encode() if isinstance(body, str) else body)

    def close(self) -> None:
        """Nothing to close."""


def triton_http_client(adapter: HttpAdapter) -> tuple[Any, TritonHttpStub]:
    """An unmodified ``tritonclient.http`` client whose connection is ``adapter``."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient("localhost:8000")
    client._client_stub.close()
    stub = client._client_stub = TritonHttpStub(adapter)
    return client, stub
