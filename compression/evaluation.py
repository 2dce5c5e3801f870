"""Evaluation of one variant: held-out quality, outputs for agreement, latency per device class."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.quality import get_metric
from gearbox.compression.repository import BatchLatency, LatencyFigures, LatencyProfile
from gearbox.compression.signature import Signature
from gearbox.compression.spec import DataSplits, ModelSpec, Split

PROFILE_BATCH_SIZES = (1, 8)
PROFILE_TOKEN_LENGTHS = (16, 32, 64, 128)
"""The sequence lengths a model whose inputs have a dynamic axis beyond the batch (token
sequences) is timed at: its cost grows with them."""
DEFAULT_TOKEN_LENGTH = 64
"""The length whose figures stand at the batch level, where readers that know nothing of
lengths look (the length the minilm example's sentences are padded to)."""


@dataclass(frozen=True)
class LatencyBudget:
    """How long to time one (device class, batch size) pair."""

    warmup: int = 10
    min_iterations: int = 100
    max_iterations: int = 2000
    min_seconds: float = 0.3
    max_seconds: float = 3.0


@dataclass(frozen=True)
class Evaluation:
    quality: float | None
    """The absolute metric on the held-out split; None for a relative metric, which is scored
    against the reference variant's outputs once both are built."""
    outputs: np.ndarray
    """First output on the held-out split, for agreement with the reference variant."""


def sequence_axes(signature: Signature) -> dict[str, tuple[int, ...]]:
    """The inputs with dynamic axes beyond the batch (a token sequence's length), and those
    axes; empty for a model of fixed shapes."""
    axes = {
        spec.name: tuple(axis for axis, size in enumerate(spec.shape) if axis > 0 and size == -1)
        for spec in signature.inputs
    }
    return {name: dynamic for name, dynamic in axes.items() if dynamic}


def _batch(split: Split, size: int) -> dict[str, np.ndarray]:
    rows = np.arange(size) % len(split)
    return {name: np.ascontiguousarray(array[rows]) for name, array in split.inputs.items()}


def _with_length(
    feed: Mapping[str, np.ndarray], axes: Mapping[str, tuple[int, ...]], tokens: int
) -> dict[str, np.ndarray]:
    """``feed`` with every axis in ``axes`` made ``tokens`` long.

    The graph's time follows the shape, not the token ids: the feed's own columns, repeated
    where the length exceeds them, keep every id one the model knows and the mask aligned with
    the ids.
    """
    resized = dict(feed)
    for name, dynamic in axes.items():
        array = resized[name]
        for axis in dynamic:
            array = np.take(array, np.arange(tokens) % array.shape[axis], axis=axis)
        resized[name] = np.ascontiguousarray(array)
    return resized


def _time_calls(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray], budget: LatencyBudget
) -> LatencyFigures:
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
    return LatencyFigures(
        p50=round(float(np.percentile(millis, 50)), 4),
        p95=round(float(np.percentile(millis, 95)), 4),
    )


def measure_latency(
    model_bytes: bytes,
    device: DeviceClass,
    split: Split,
    batch_sizes: Sequence[int] = PROFILE_BATCH_SIZES,
    budget: LatencyBudget = LatencyBudget(),
    signature: Signature | None = None,
    token_lengths: Sequence[int] = PROFILE_TOKEN_LENGTHS,
) -> dict[str, BatchLatency]:
    """p50/p95 of single ``session.run`` calls, in milliseconds, per batch size.

    A model whose ``signature`` has dynamic axes beyond the batch is timed at every one of
    ``token_lengths`` too (a ``tokens`` level per batch size; its p50/p95 are those at
    :data:`DEFAULT_TOKEN_LENGTH`). Without a signature the split's shapes are timed as they are.
    """
    axes = {} if signature is None else sequence_axes(signature)
    if axes and DEFAULT_TOKEN_LENGTH not in token_lengths:
        raise InvalidArgumentError(
            f"profiled token lengths {list(token_lengths)} must include the default length "
            f"{DEFAULT_TOKEN_LENGTH}"
        )
    session = device.create_session(model_bytes)
    profile: dict[str, BatchLatency] = {}
    for size in batch_sizes:
        if not axes:
            figures = _time_calls(session, _batch(split, size), budget)
            profile[str(size)] = BatchLatency(p50=figures["p50"], p95=figures["p95"])
            continue
        feed = _batch(split, size)
        by_tokens = {
            str(tokens): _time_calls(session, _with_length(feed, axes, tokens), budget)
            for tokens in token_lengths
        }
        default = by_tokens[str(DEFAULT_TOKEN_LENGTH)]
        profile[str(size)] = BatchLatency(p50=default["p50"], p95=default["p95"], tokens=by_tokens)
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
    signature: Signature | None = None,
    token_lengths: Sequence[int] = PROFILE_TOKEN_LENGTHS,
) -> LatencyProfile:
    """Latency on every device class whose execution provider is present on this node, at
    every one of ``token_lengths`` where ``signature`` says the inputs have a length."""
    return {
        device.name: measure_latency(
            model_bytes,
            device,
            split,
            budget=budget,
            signature=signature,
            token_lengths=token_lengths,
        )
        for device in device_classes
        if device.is_available()
    }
