"""Variant hosting: ONNX Runtime sessions of the ready variants, one set per device class.

A :class:`LocalBackend` holds the sessions in this process, run by a
:class:`~gearbox.serving.executor.DeviceExecutor` (the gateway replica hosts its own device
class this way, so the common path has no second hop). A :class:`RemoteBackend` reaches the
replicas of another device class (a GPU pool, say) through a Ray Serve handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from ray.exceptions import RayTaskError

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import GearboxError, NotFoundError, UnavailableError
from gearbox.compression.repository import ModelRecord, ModelRepository, VariantManifest
from gearbox.serving.catalog import Catalog, profiled_cost, profiled_costs_by_tokens
from gearbox.serving.config import MAX_NICENESS, BatchingConfig
from gearbox.serving.executor import Arrays, BatchResult, DeviceExecutor, Lane, OnBatch
from gearbox.serving.queue_model import BatchCost, ServiceTimes, predict_ms, variant_key

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
        try:
            self._load(repository, catalog, device)
        except BaseException:
            self.close()  # no worker thread outlives a replica that failed to start
            raise

    def _load(self, repository: ModelRepository, catalog: Catalog, device: DeviceClass) -> None:
        for manifest in catalog.ready_manifests():
            session = load_session(repository, manifest, device)
            runner = _SessionRunner(session, tuple(o.name for o in session.get_outputs()))
            key = variant_key(manifest.model, manifest.variant)
            self._runners[key] = runner
            self._profiled[key] = profiled_cost(manifest, device.name)
            self._by_tokens[key] = profiled_costs_by_tokens(manifest, device.name)
            self.times.seed(key, device.name, self._profiled[key], self._by_tokens[key])
            record = catalog.models[manifest.model].record
            for executor in self._lanes.values():
                executor.host(
                    manifest.model, manifest.variant, runner, pads_sequences=record.text is not None
                )
            self._records[manifest.model] = record

    @property
    def hosted(self) -> list[tuple[str, str]]:
        return self.executor.hosted

    async def warm_up(self, runs: int = WARM_UP_RUNS) -> None:
        """Runs every session at batch 1 and at the largest batch, and calibrates the live
        service times from what this machine measured, so predictions hold from the first
        request rather than after the first few; then measures the worker hop.

        A model with dynamic dimensions beyond the batch (tokens of a sentence, say) is warmed
        but keeps its manifest's figures: zeros one token long would time a request no caller
        sends, where the manifest was profiled on the model's own held-out rows."""
        for model, variant in self.hosted:
            record = self._records[model]
            measured = {}
            for rows in sorted({1, self._batching.max_batch_size}):
                inputs = synthetic_inputs(record, rows)
                self.executor.run_now(model, variant, inputs)  # the first run allocates
                measured[rows] = statistics.median(
                    self.executor.run_now(model, variant, inputs)[1] * 1000 for _ in range(runs)
                )
            if not _has_dynamic_row_shape(record):
                self.times.calibrate(variant_key(model, variant), self.device_class, measured)
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

    def close(self) -> None:
        for executor in self._lanes.values():
            executor.close()
        self._background.shutdown(wait=False, cancel_futures=True)


class RemoteBackend:
    """A device class served by replicas of its own, reached through a Ray Serve handle.

    Its service time is the whole round trip (the hop included), learnt from each answer and
    seeded from the manifests; requests in flight queue ahead of a new one.
    """

    lanes = (Lane.STANDARD,)

    def __init__(self, device_class: str, handle: Any, catalog: Catalog) -> None:
        self.device_class = device_class
        self._handle = handle
        self._inflight = 0
        self.times = ServiceTimes()
        for manifest in catalog.ready_manifests():
            key = variant_key(manifest.model, manifest.variant)
            self.times.seed(key, device_class, profiled_cost(manifest, device_class))

    def settle(self) -> None:
        """Nothing to forget here: its own replicas settle their predictions."""

    async def infer(
        self, model: str, variant: str, inputs: Arrays, lane: Lane = Lane.STANDARD
    ) -> BatchResult:
        self._inflight += 1
        started = time.perf_counter()
        try:
            result: BatchResult = await self._handle.infer.remote(model, variant, dict(inputs))
        except Exception as error:
            raise unwrap_remote_error(
                error, f"device class '{self.device_class}' failed to answer"
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
