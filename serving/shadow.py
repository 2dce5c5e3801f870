"""Live agreement with the reference variant, from shadow runs off the response path.

A share of the requests answered by a non-reference variant is run again on the reference
variant after the caller has its answer; the running share of matching rows (equal top-1 for
classification, mean cosine otherwise) is ``gearbox_variant_agreement``. A comparison starts
only while the gateway's own device class has nothing queued or running, one at a time, and
runs on the device class's background thread (``Backend.run_in_background``: Linux's
SCHED_IDLE class), never on a serving worker: no request waits behind it in a queue, and none
loses a core to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from gearbox.compression.errors import ResourceExhaustedError, UnavailableError
from gearbox.compression.repository import ModelRecord
from gearbox.serving.executor import Arrays
from gearbox.serving.metrics import GatewayMetrics

RunReference = Callable[[str, str, Arrays], Awaitable[dict[str, np.ndarray]]]
"""Runs (model, variant, inputs) for no caller: ``Backend.run_in_background``."""


class Agreement:
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


def agreement(task: str, answer: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
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


class Shadow:
    """Samples ``fraction`` of non-reference answers and compares them with the reference."""

    def __init__(
        self,
        fraction: float,
        run_reference: RunReference,
        metrics: GatewayMetrics,
        idle: Callable[[], bool] = lambda: True,
    ) -> None:
        self._fraction = fraction
        self._run_reference = run_reference
        self._idle = idle
        self._metrics = metrics
        self._credit = 0.0
        self._background: set[asyncio.Task[None]] = set()

    def maybe_compare(
        self,
        record: ModelRecord,
        variant: str,
        tracker: Agreement,
        inputs: Arrays,
        outputs: dict[str, np.ndarray],
    ) -> None:
        if variant == record.reference_variant:
            return
        # Capped: a busy spell postpones comparisons, it does not bank a burst of them.
        self._credit = min(self._credit + self._fraction, 1.0)
        # One at a time: while the last still waits for an idle core, a new one would only
        # queue behind it.
        if self._credit < 1.0 or self._background or not self._idle():
            return
        self._credit -= 1.0
        task = asyncio.get_running_loop().create_task(
            self._compare(record, variant, tracker, inputs, outputs)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compare(
        self,
        record: ModelRecord,
        variant: str,
        tracker: Agreement,
        inputs: Arrays,
        outputs: dict[str, np.ndarray],
    ) -> None:
        try:  # on the gateway's own device class: a shadow run never costs a hop
            reference = await self._run_reference(record.name, record.reference_variant, inputs)
        except (ResourceExhaustedError, UnavailableError, RuntimeError):
            return  # Under load, or while the replica stops: a quieter moment will come.
        name = record.signature.outputs[0].name
        matched, rows = agreement(record.task, outputs[name], reference[name])
        tracker.add(matched, rows)
        self._metrics.agreement(
            record.name, variant, tracker.matched, tracker.rows, tracker.offline
        )
