"""Evaluation of one variant: held-out quality, outputs for agreement, latency per device class."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gearbox.compression.devices import DeviceClass
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.quality import get_metric
from gearbox.compression.spec import DataSplits, ModelSpec, Split

PROFILE_BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class LatencyBudget:
    """How long to time one (device class, batch size) pair."""

    warmup: int = 10
    min_iterations: int = 100
    max_iterations: int = 2000
    min_seconds: float = 0.3
    max_seconds: float = 3.0


LatencyProfile = dict[str, dict[str, dict[str, float]]]
"""``{device_class: {batch_size: {"p50": ms, "p95": ms}}}``, batch sizes as strings (JSON)."""


@dataclass(frozen=True)
class Evaluation:
    quality: float | None
    """The absolute metric on the held-out split; None for a relative metric, which is scored
    against the reference variant's outputs once both are built."""
    outputs: np.ndarray
    """First output on the held-out split, for agreement with the reference variant."""


def _batch(split: Split, size: int) -> dict[str, np.ndarray]:
    rows = np.arange(size) % len(split)
    return {name: np.ascontiguousarray(array[rows]) for name, array in split.inputs.items()}


def measure_latency(
    model_bytes: bytes,
    device: DeviceClass,
    split: Split,
    batch_sizes: Sequence[int] = PROFILE_BATCH_SIZES,
    budget: LatencyBudget = LatencyBudget(),
) -> dict[str, dict[str, float]]:
    """p50/p95 of single ``session.run`` calls, in milliseconds, per batch size."""
    session = device.create_session(model_bytes)
    profile: dict[str, dict[str, float]] = {}
    for size in batch_sizes:
        feed = _batch(split, size)
        for _ in range(budget.warmup):
            session.run(None, feed)
        samples: list[float] = []
        started = time.perf_counter()
        while len(samples) < budget.max_iterations:
            begin = time.perf_counter()
            session.run(None, feed)
            samples.append(time.perf_counter() - begin)
            elapsed = time.perf_counter() - started
            if len(samples) >= budget.min_iterations and elapsed >= budget.min_seconds:
                break
            if elapsed >= budget.max_seconds:
                break
        millis = np.array(samples) * 1e3
        profile[str(size)] = {
            "p50": round(float(np.percentile(millis, 50)), 4),
            "p95": round(float(np.percentile(millis, 95)), 4),
        }
    return profile


def evaluate_quality(model_bytes: bytes, spec: ModelSpec, data: DataSplits) -> Evaluation:
    """The spec's quality metric on the held-out split, and the outputs it was computed from."""
    outputs = run_onnx(model_bytes, spec, data.heldout)
    metric = get_metric(spec.metric)
    quality = None if metric.relative else metric.score(outputs, data.heldout.labels)
    return Evaluation(quality=quality, outputs=outputs)


def profile_latency(
    model_bytes: bytes,
    split: Split,
    device_classes: Sequence[DeviceClass],
    budget: LatencyBudget = LatencyBudget(),
) -> LatencyProfile:
    """Latency on every device class whose execution provider is present on this node."""
    return {
        device.name: measure_latency(model_bytes, device, split, budget=budget)
        for device in device_classes
        if device.is_available()
    }
