"""Prometheus metrics of DESIGN.md §7, owned by an object the data plane is given.

:class:`RayServeMetrics` records through ``ray.serve.metrics``, so every replica's figures reach
its node's metrics export port (``ray_``-prefixed) and one Prometheus scrape config covers all
replicas. Nothing is registered at import time: a metrics object exists only where a replica
creates one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Histogram boundaries in seconds: resolve 0.5 ms ... 10 s.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

OK = "ok"
"""The ``code`` label of a successful request; failures carry their ErrorCode value."""
CANCELLED = "cancelled"
"""The ``code`` label of a request whose caller went away before it was answered."""


class GatewayMetrics(Protocol):
    def request_finished(
        self,
        model: str,
        variant: str,
        device_class: str,
        protocol: str,
        code: str,
        seconds: float,
    ) -> None: ...

    def budget_outcome(self, model: str, variant: str, met: bool) -> None: ...

    def variant_selected(self, model: str, variant: str, reason: str) -> None: ...

    def variant_figures(
        self, model: str, variant: str, quality: float, size_bytes: int
    ) -> None: ...

    def agreement(self, model: str, variant: str, value: float) -> None: ...

    def inflight(self, model: str, device_class: str, delta: int) -> None: ...

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None: ...


class RayServeMetrics:
    """:class:`GatewayMetrics` on ``ray.serve.metrics`` (create inside a Serve replica).

    Recording a Serve metric costs ~60 us in a replica, more than the smallest variant's whole
    run, so requests only update in-memory tallies and a background thread hands them to Ray
    every ``flush_interval_s`` (Ray exports them every few seconds anyway).
    """

    def __init__(self, flush_interval_s: float = 1.0) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "gearbox_requests",
            description="Inference requests answered, by variant, device class, protocol, code.",
            tag_keys=("model", "variant", "device_class", "protocol", "code"),
        )
        self._latency = metrics.Histogram(
            "gearbox_request_latency_seconds",
            description="Time from a request entering the gateway replica to its answer.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("model", "variant", "device_class"),
        )
        self._budget = metrics.Counter(
            "gearbox_budget",
            description="Requests with a latency budget, by whether the budget was met.",
            tag_keys=("model", "variant", "outcome"),
        )
        self._selected = metrics.Counter(
            "gearbox_variant_selected",
            description="Router choices, by variant and the reason it was chosen.",
            tag_keys=("model", "variant", "reason"),
        )
        self._quality = metrics.Gauge(
            "gearbox_variant_quality",
            description="Held-out quality of each served variant (from its manifest).",
            tag_keys=("model", "variant"),
        )
        self._size = metrics.Gauge(
            "gearbox_variant_size_bytes",
            description="Artifact size of each served variant.",
            tag_keys=("model", "variant"),
        )
        self._agreement = metrics.Gauge(
            "gearbox_variant_agreement",
            description="Live top-1 agreement with the reference variant (shadow comparison).",
            tag_keys=("model", "variant"),
        )
        self._inflight = metrics.Gauge(
            "gearbox_inflight_requests",
            description="Requests inside the gateway replica, per model and device class.",
            tag_keys=("model", "device_class"),
        )
        self._batch_size = metrics.Histogram(
            "gearbox_batch_size",
            description="Rows per ONNX Runtime call after dynamic batching.",
            boundaries=list(BATCH_SIZE_BUCKETS),
            tag_keys=("model", "variant", "device_class"),
        )
        self._lock = threading.Lock()
        self._counts: Tally[tuple[Any, tuple[tuple[str, str], ...]]] = Tally()
        self._observations: list[tuple[Any, tuple[tuple[str, str], ...], float]] = []
        self._gauges: dict[tuple[Any, tuple[tuple[str, str], ...]], float] = {}
        self._inflight_counts: Tally[tuple[str, str]] = Tally()
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_interval_s,), daemon=True,
            name="gearbox-metrics",
        )  # fmt: skip
        self._flusher.start()

    # -- recording (request path: in-memory only) ----------------------------------------------

    def _count(self, metric: Any, **tags: str) -> None:
        key = (metric, tuple(tags.items()))
        with self._lock:
            self._counts[key] += 1

    def _observe(self, metric: Any, value: float, **tags: str) -> None:
        with self._lock:
            self._observations.append((metric, tuple(tags.items()), value))

    def _set(self, metric: Any, value: float, **tags: str) -> None:
        with self._lock:
            self._gauges[(metric, tuple(tags.items()))] = value

    def request_finished(
        self,
        model: str,
        variant: str,
        device_class: str,
        protocol: str,
        code: str,
        seconds: float,
    ) -> None:
        self._count(
            self._requests, model=model, variant=variant, device_class=device_class,
            protocol=protocol, code=code,
        )  # fmt: skip
        if code == OK:
            self._observe(
                self._latency, seconds, model=model, variant=variant, device_class=device_class
            )

    def budget_outcome(self, model: str, variant: str, met: bool) -> None:
        self._count(self._budget, model=model, variant=variant, outcome="met" if met else "missed")

    def variant_selected(self, model: str, variant: str, reason: str) -> None:
        self._count(self._selected, model=model, variant=variant, reason=reason)

    def variant_figures(self, model: str, variant: str, quality: float, size_bytes: int) -> None:
        self._set(self._quality, quality, model=model, variant=variant)
        self._set(self._size, size_bytes, model=model, variant=variant)

    def agreement(self, model: str, variant: str, value: float) -> None:
        self._set(self._agreement, value, model=model, variant=variant)

    def inflight(self, model: str, device_class: str, delta: int) -> None:
        key = (model, device_class)
        self._inflight_counts[key] += delta
        self._set(
            self._inflight, self._inflight_counts[key], model=model, device_class=device_class
        )

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None:
        self._observe(
            self._batch_size, rows, model=model, variant=variant, device_class=device_class
        )

    # -- flushing (background thread) ----------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Tally()
            observations, self._observations = self._observations, []
            gauges, self._gauges = self._gauges, {}
        for (metric, tags), amount in counts.items():
            metric.inc(amount, tags=dict(tags))
        for metric, tags, value in observations:
            metric.observe(value, tags=dict(tags))
        for (metric, tags), value in gauges.items():
            metric.set(value, tags=dict(tags))

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # a metrics hiccup must never stop serving
                logger.exception("flushing metrics failed")

    def close(self) -> None:
        self._stop.set()
        self.flush()
