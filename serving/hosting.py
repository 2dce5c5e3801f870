"""Variant hosting: ONNX Runtime sessions of the ready variants, one set per device class.

A :class:`LocalBackend` holds the sessions in this process, run by a
:class:`~gearbox.serving.executor.DeviceExecutor` (the gateway replica hosts its own device
class this way, so the common path has no second hop). A :class:`RemoteBackend` reaches the
replicas of another device class (a GPU pool, say) through a Ray Serve handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentResponse

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import GearboxError, NotFoundError, UnavailableError
from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.serving.catalog import Catalog, profiled_cost, profiled_costs_by_tokens
from gearbox.serving.config import MAX_NICENESS, REMOTE_ANSWER_TIMEOUT_S, BatchingConfig
from gearbox.serving.executor import Arrays, BatchResult, DeviceExecutor, Lane, OnBatch
from gearbox.serving.queue_model import BatchCost, ServiceTimes, predict_ms, variant_key

logger = logging.getLogger(__name__)

WARM_UP_RUNS = 5
"""Timed runs per session and batch size before a replica says ready (after one untimed)."""


class Backend(Protocol):
    """Runs variants of one device class."""

    device_class: str
    lanes: tuple[Lane, ...]
    """The lanes requests may be sent to (:class:`~gearbox.serving.executor.Lane`)."""

    async def infer(
        self, model: str, variant: str, inputs: Arrays, lane: Lane = Lane.STANDARD
    ) -> BatchResult: ...

    def predict_ms(
        self,
        model: str,
        variant: str,
        rows: int,
        tokens: int | None = None,
        lane: Lane = Lane.STANDARD,
    ) -> float:
        """How long ``infer`` would take for a request of ``rows`` rows (of ``tokens`` tokens,
        for a text model) arriving now on ``lane``: queueing, the hop to the session and back,
        and the run (the gateway's own overhead is not included)."""
        ...

    def depth(self) -> int:
        """Requests admitted on this device class and not yet answered."""
        ...

    def live(self) -> bool:
        """Whether it can still answer (its worker threads run)."""
        ...

    async def run_in_background(
        self, model: str, variant: str, inputs: Arrays
    ) -> dict[str, np.ndarray]:
        """The variant's outputs for work no caller waits for, run so that it delays none."""
        ...

    def settle(self) -> None:
        """Called once the gateway's own warm-up requests have run: forget what synthetic
        requests taught the predictions where they time no real request."""
        ...


@dataclass(frozen=True)
class _SessionRunner:
    session: ort.InferenceSession
    output_names: tuple[str, ...]

    def __call__(self, inputs: Arrays) -> dict[str, np.ndarray]:
        results = self.session.run(list(self.output_names), dict(inputs))
        return dict(zip(self.output_names, results, strict=True))


def _run_only_when_idle() -> None:
    """Puts the calling thread in Linux's SCHED_IDLE class (elsewhere: the lowest priority)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MAX_NICENESS)


def load_session(
    repository: ModelRepository, manifest: VariantManifest, device: DeviceClass
) -> ort.InferenceSession:
    """The variant's artifact, verified against its sha256, in a session for ``device``."""
    if not manifest.is_ready:
        raise UnavailableError(
            f"variant '{manifest.variant}' of model '{manifest.model}' is rejected "
            f"({manifest.reason}) and is never loaded"
        )
    if not device.is_available():
        raise UnavailableError(
            f"device class '{device.name}' needs {device.execution_provider}, which this "
            f"ONNX Runtime lacks (has: {', '.join(ort.get_available_providers())})"
        )
    return device.create_session(repository.read_artifact(manifest))


def synthetic_inputs(record: ModelRecord, rows: int) -> dict[str, np.ndarray]:
    """Zeros of the model's signature (dynamic dimensions 1), ``rows`` deep: warm-up input."""
    return {
        spec.name: np.zeros((rows, *(max(d, 1) for d in spec.shape[1:])), dtype=spec.numpy_dtype)
        for spec in record.signature.inputs
    }


def _has_dynamic_row_shape(record: ModelRecord) -> bool:
    return any(-1 in spec.shape[1:] for spec in record.signature.inputs)


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message, short enough for a log line, a metadata field and a metric's help."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class _Prepared:
    """A variant's session, loaded and timed, not yet hosted."""

    record: ModelRecord
    manifest: VariantManifest
    runner: _SessionRunner
    measured_ms: dict[int, float]


class LocalBackend:
    """Every ready variant of the catalog, in sessions on this process's device class."""

    def __init__(
        self,
        repository: ModelRepository,
        catalog: Catalog,
        device: DeviceClass,
        batching: BatchingConfig,
        on_batch: OnBatch | None = None,
    ) -> None:
        self.device_class = device.name
        self.times = ServiceTimes()
        # Both lanes learn from every batch: one variant costs the same on either.
        self.executor = DeviceExecutor(
            device.name,
            device.worker_threads,
            batching,
            self.times,
            on_batch=on_batch,
            niceness=batching.standard_niceness if batching.priority_lane else 0,
        )
        self._lanes = {Lane.STANDARD: self.executor}
        if batching.priority_lane:
            self._lanes[Lane.PRIORITY] = DeviceExecutor(
                device.name, 1, batching, self.times, on_batch=on_batch, lane=Lane.PRIORITY
            )
        self.lanes = tuple(self._lanes)
        self._batching = batching
        self._runners: dict[str, _SessionRunner] = {}
        # Work no caller waits for (shadow comparisons) runs here, on a thread the kernel
        # schedules only when no other thread wants the core: it never holds a serving worker,
        # never queues ahead of a request, and never takes a core from one.
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix=f"gearbox-{device.name}-background",
            initializer=_run_only_when_idle,
        )  # fmt: skip
        self._records: dict[str, ModelRecord] = {}
        self._profiled: dict[str, BatchCost] = {}
        self._by_tokens: dict[str, dict[int, BatchCost]] = {}
        self._artifacts: dict[tuple[str, str], str] = {}
        """(model, variant) -> the sha256 of the artifact its hosted session was loaded from."""
        self.unavailable: dict[tuple[str, str], str] = {}
        """Ready variants this backend could not host, and why."""
        self._repository = repository
        self._device = device
        try:
            self._install(self._prepare(catalog))
        except BaseException:
            self.close()  # no worker thread outlives a replica that failed to start
            raise

    def _prepare(self, catalog: Catalog) -> list[_Prepared]:
        """Loads and warms a session for every variant ``catalog`` serves that this backend
        does not hold from the same artifact; touches nothing a request reads, so it may run
        on any thread while the hosted variants serve. A variant that fails (its artifact
        fails its sha256, ONNX Runtime refuses it or its first runs) is recorded in
        ``unavailable`` and left out, so the others serve."""
        prepared = []
        for manifest in catalog.ready_manifests():
            key = (manifest.model, manifest.variant)
            if self._artifacts.get(key) == manifest.sha256:
                continue
            record = catalog.models[manifest.model].record
            try:
                prepared.append(self._load_variant(record, manifest))
            except UnavailableError:
                raise  # the device class itself is missing: no variant can load
            except Exception as error:
                reason = f"failed to load on {self.device_class}: {_first_line(error)}"
                logger.error("variant %s of model %s %s", manifest.variant, manifest.model, reason)
                self.unavailable[key] = reason
            else:
                self.unavailable.pop(key, None)
        return prepared

    def _load_variant(self, record: ModelRecord, manifest: VariantManifest) -> _Prepared:
        session = load_session(self._repository, manifest, self._device)
        runner = _SessionRunner(session, tuple(o.name for o in session.get_outputs()))
        # The first run allocates; then timed runs at batch 1 and at the largest batch.
        measured = {}
        for rows in sorted({1, self._batching.max_batch_size}):
            inputs = synthetic_inputs(record, rows)
            runner(inputs)
            spans = []
            for _ in range(WARM_UP_RUNS):
                started = time.perf_counter()
                runner(inputs)
                spans.append((time.perf_counter() - started) * 1000)
            measured[rows] = statistics.median(spans)
        return _Prepared(record, manifest, runner, measured)

    def _install(self, prepared: Sequence[_Prepared]) -> None:
        """Hosts what :meth:`_prepare` loaded (on the thread that serves requests: the
        figures predictions read change only there). A variant hosted already switches to
        its new session from its next batch."""
        for loaded in prepared:
            manifest, record = loaded.manifest, loaded.record
            key = variant_key(manifest.model, manifest.variant)
            self._runners[key] = loaded.runner
            self._profiled[key] = profiled_cost(manifest, self.device_class)
            self._by_tokens[key] = profiled_costs_by_tokens(manifest, self.device_class)
            self.times.seed(key, self.device_class, self._profiled[key], self._by_tokens[key])
            if not _has_dynamic_row_shape(record):
                self.times.calibrate(key, self.device_class, loaded.measured_ms)
            self._records[manifest.model] = record
            for executor in self._lanes.values():
                executor.host(
                    manifest.model,
                    manifest.variant,
                    loaded.runner,
                    pads_sequences=record.text is not None,
                )
            self._artifacts[(manifest.model, manifest.variant)] = manifest.sha256

    async def update(self, catalog: Catalog) -> None:
        """Serves ``catalog`` from now on: variants published or re-published since are loaded
        and warmed off the event loop, then hosted; variants it no longer serves stop being
        hosted once no request waits for them."""
        prepared = await asyncio.to_thread(self._prepare, catalog)
        self._install(prepared)
        served = {(m.model, m.variant) for m in catalog.ready_manifests()}
        for model, variant in self.hosted:
            if (model, variant) in served:
                continue
            if all(executor.unhost(model, variant) for executor in self._lanes.values()):
                self._runners.pop(variant_key(model, variant), None)
                self._artifacts.pop((model, variant), None)
        # What the catalog no longer serves is no longer this backend's to report.
        self.unavailable = {k: v for k, v in self.unavailable.items() if k in served}

    @property
    def hosted(self) -> list[tuple[str, str]]:
        return self.executor.hosted

    def served(self, catalog: Catalog) -> Catalog:
        """``catalog`` as this backend serves it: what it could not host marked unavailable."""
        return catalog.with_unavailable(self.unavailable)

    async def warm_up(self) -> None:
        """Measures the hop from the event loop to a worker and back; every session was run
        and timed when it was loaded, so predictions hold from the first request rather than
        after the first few.

        A model with dynamic dimensions beyond the batch (tokens of a sentence, say) keeps its
        manifest's figures: zeros one token long would time a request no caller sends, where
        the manifest was profiled on the model's own held-out rows."""
        if self.hosted:
            model, variant = min(
                self.hosted,
                key=lambda mv: self.times.batch_ms(variant_key(*mv), self.device_class, 1),
            )
            inputs = synthetic_inputs(self._records[model], 1)
            for executor in self._lanes.values():
                await executor.measure_hop(model, variant, inputs)
        self.settle()

    def settle(self) -> None:
        """Every model with dynamic dimensions beyond the batch goes back to its manifest's
        figures (the warm-up's runs, the hop's included, are observed like any other)."""
        for model, variant in self.hosted:
            if _has_dynamic_row_shape(self._records[model]):
                key = variant_key(model, variant)
                self.times.seed(key, self.device_class, self._profiled[key], self._by_tokens[key])

    async def infer(
        self, model: str, variant: str, inputs: Arrays, lane: Lane = Lane.STANDARD
    ) -> BatchResult:
        return await self._lane(lane).submit(model, variant, inputs)

    async def run_in_background(
        self, model: str, variant: str, inputs: Arrays
    ) -> dict[str, np.ndarray]:
        """The variant's outputs, computed only with CPU time no request wants (see
        ``_background``); unbatched, and invisible to the queue model."""
        runner = self._runners.get(variant_key(model, variant))
        if runner is None:
            raise NotFoundError(f"variant '{variant}' of model '{model}' is not hosted here")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._background, runner, dict(inputs))

    def predict_ms(
        self,
        model: str,
        variant: str,
        rows: int,
        tokens: int | None = None,
        lane: Lane = Lane.STANDARD,
    ) -> float:
        executor = self._lane(lane)
        key = variant_key(model, variant)
        if executor.runs_inline(key, rows):  # on the event loop, beside any worker's batch
            return self.times.batch_ms(key, self.device_class, rows, tokens)
        state = executor.work_state()
        queued = predict_ms(state, self.times, self.device_class, key, rows, tokens=tokens)
        return queued + executor.hop_ms

    def _lane(self, lane: Lane) -> DeviceExecutor:
        executor = self._lanes.get(lane)
        if executor is None:
            raise UnavailableError(f"device class '{self.device_class}' has no {lane.value} lane")
        return executor

    def depth(self) -> int:
        return sum(executor.depth() for executor in self._lanes.values())

    def live(self) -> bool:
        return all(executor.live() for executor in self._lanes.values())

    def close(self) -> None:
        for executor in self._lanes.values():
            executor.close()
        self._background.shutdown(wait=False, cancel_futures=True)


class RemoteBackend:
    """A device class served by replicas of its own, reached through a Ray Serve handle.

    Its service time is the whole round trip (the hop included), learnt from each answer and
    seeded from the manifests; requests in flight queue ahead of a new one. A call not answered
    within ``timeout_s`` is cancelled there and fails with UNAVAILABLE.
    """

    lanes = (Lane.STANDARD,)

    def __init__(
        self,
        device_class: str,
        handle: Any,
        catalog: Catalog,
        timeout_s: float = REMOTE_ANSWER_TIMEOUT_S,
    ) -> None:
        self.device_class = device_class
        self._handle = handle
        self._timeout_s = timeout_s
        self._inflight = 0
        self.times = ServiceTimes()
        self._seeded: set[str] = set()
        self.update(catalog)

    def update(self, catalog: Catalog) -> None:
        """Seeds the figures of variants published since (its own replicas load them)."""
        for manifest in catalog.ready_manifests():
            key = variant_key(manifest.model, manifest.variant)
            if key not in self._seeded:
                self.times.seed(key, self.device_class, profiled_cost(manifest, self.device_class))
                self._seeded.add(key)

    def settle(self) -> None:
        """Nothing to forget here: its own replicas settle their predictions."""

    async def infer(
        self, model: str, variant: str, inputs: Arrays, lane: Lane = Lane.STANDARD
    ) -> BatchResult:
        self._inflight += 1
        started = time.perf_counter()
        response = self._handle.infer.remote(model, variant, dict(inputs))
        deadline = asyncio.timeout(self._timeout_s)
        try:
            async with deadline:
                result: BatchResult = await response
        except Exception as error:
            if not deadline.expired():
                failure = unwrap_remote_error(
                    error, f"device class '{self.device_class}' failed to answer"
                )
                if isinstance(failure, NotFoundError):
                    # The router routes only variants it serves: the class's replicas have
                    # not loaded this one yet (a repository update under way).
                    raise UnavailableError(
                        f"device class '{self.device_class}' does not serve it yet: "
                        f"{failure.message}"
                    ) from None
                raise failure from None
            if isinstance(response, DeploymentResponse):
                response.cancel()  # best effort: the replica stops working for nobody
            raise UnavailableError(
                f"device class '{self.device_class}' did not answer within "
                f"{self._timeout_s:g} s (remote_answer_timeout_s)"
            ) from None
        finally:
            self._inflight -= 1
        round_trip_ms = (time.perf_counter() - started) * 1000 - result.queue_s * 1000
        self.times.observe(
            variant_key(model, variant), self.device_class, result.batch_rows, round_trip_ms
        )
        return result

    async def run_in_background(
        self, model: str, variant: str, inputs: Arrays
    ) -> dict[str, np.ndarray]:
        """Through the class's own replicas like a request: they run it on a standard lane."""
        return (await self.infer(model, variant, inputs)).outputs

    def predict_ms(
        self,
        model: str,
        variant: str,
        rows: int,
        tokens: int | None = None,
        lane: Lane = Lane.STANDARD,
    ) -> float:
        own = self.times.batch_ms(variant_key(model, variant), self.device_class, rows, tokens)
        return own * (1 + self._inflight)

    def depth(self) -> int:
        return self._inflight

    def live(self) -> bool:
        """Its own replicas are health-checked by Ray Serve: reaching them is never this
        replica's failure."""
        return True


def unwrap_remote_error(error: Exception, what: str) -> GearboxError:
    """The Gearbox error behind a failed handle call, or UNAVAILABLE.

    Ray re-raises a replica's exception as a class deriving from both RayTaskError and the
    original class, whose attributes are looked up on a ``cause`` that is not always the
    original exception; so the Gearbox class is found in its bases and rebuilt plainly.
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, GearboxError):
        return type(cause)(cause.message)
    gearbox_class = next(
        (
            c
            for c in type(error).__mro__
            if issubclass(c, GearboxError) and not issubclass(c, RayTaskError)
        ),
        None,
    )
    if gearbox_class is not None:
        message = error.__dict__.get("message") or (cause if isinstance(cause, str) else None)
        return gearbox_class(message or what)
    return UnavailableError(f"{what}: {type(error).__name__}")
