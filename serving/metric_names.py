"""Every Prometheus series Gearbox exports (DESIGN.md §7), declared once.

The exporter (:mod:`gearbox.serving.metrics`), the tests, ``gearbox top`` and the Grafana
dashboard all read these declarations, so a name or a label is spelt in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class GaugeMode(StrEnum):
    """How one gauge's values from several replicas become the exported value."""

    LIVE_SUM = "live_sum"
    """Summed over the replicas that are running now (a stopped replica holds nothing)."""
    LATEST = "latest"
    """The value written last by any replica (figures every replica reads from a manifest)."""
    RATIO = "ratio"
    """Sum of numerators over sum of denominators across every replica that has run, so a
    running share (agreement) is exact however the requests were spread."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """The family name; a counter's samples are exported as ``<name>_total``."""
    kind: Kind
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()
    gauge_mode: GaugeMode | None = None

    @property
    def sample_name(self) -> str:
        """The series name to query: ``_total`` for counters; a histogram adds ``_bucket``,
        ``_sum`` and ``_count`` to it."""
        return f"{self.name}_total" if self.kind is Kind.COUNTER else self.name


# Seconds: resolve 0.25 ms ... 10 s, finest where the fast variants answer.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)

ARM = "arm"
"""The label a request in an A/B experiment carries on every request metric (empty outside)."""

REQUESTS = MetricSpec(
    "gearbox_requests",
    Kind.COUNTER,
    ("model", "variant", "device_class", "protocol", "code", ARM),
    "Inference requests answered, by variant, device class, protocol and code "
    "(ok, cancelled, or the error's code).",
)
REQUEST_LATENCY = MetricSpec(
    "gearbox_request_latency_seconds",
    Kind.HISTOGRAM,
    ("model", "variant", "device_class", ARM),
    "Time from a request reaching the gateway's server (before its body is read) to its "
    "encoded answer: the span latency_ms and budget_met report.",
    buckets=LATENCY_BUCKETS_S,
)
BUDGET = MetricSpec(
    "gearbox_budget",
    Kind.COUNTER,
    ("model", "variant", "outcome", ARM),
    "Requests with a latency budget, by whether the budget was met (outcome met or missed).",
)
IGNORED_PARAMETERS = MetricSpec(
    "gearbox_ignored_parameters",
    Kind.COUNTER,
    ("model",),
    "Request parameters Gearbox does not read (a misspelt latency_budget_ms, say); each "
    "response names its own in ignored_parameters.",
)
VARIANT_SELECTED = MetricSpec(
    "gearbox_variant_selected",
    Kind.COUNTER,
    ("model", "variant", "reason", ARM),
    "Router choices, by variant and the reason it was chosen.",
)
VARIANT_QUALITY = MetricSpec(
    "gearbox_variant_quality",
    Kind.GAUGE,
    ("model", "variant"),
    "Held-out quality of each served variant, from its manifest.",
    gauge_mode=GaugeMode.LATEST,
)
VARIANT_SIZE = MetricSpec(
    "gearbox_variant_size_bytes",
    Kind.GAUGE,
    ("model", "variant"),
    "Artifact size of each served variant, in bytes.",
    gauge_mode=GaugeMode.LATEST,
)
VARIANT_AGREEMENT = MetricSpec(
    "gearbox_variant_agreement",
    Kind.GAUGE,
    ("model", "variant"),
    "Live agreement with the reference variant from shadow comparisons (top-1 match, or "
    "cosine for embeddings); the manifest's offline figure until a comparison has run.",
    gauge_mode=GaugeMode.RATIO,
)
VARIANT_LOADED = MetricSpec(
    "gearbox_variant_loaded",
    Kind.GAUGE,
    ("model", "variant", "device_class"),
    "Running replicas that serve each ready variant on each device class: 0 where its "
    "artifact failed its sha256 or would not load (the log and the repository index say why).",
    gauge_mode=GaugeMode.LIVE_SUM,
)
INFLIGHT = MetricSpec(
    "gearbox_inflight_requests",
    Kind.GAUGE,
    ("model", "device_class"),
    "Requests routed and not yet answered by their device class, over running replicas.",
    gauge_mode=GaugeMode.LIVE_SUM,
)
BATCH_SIZE = MetricSpec(
    "gearbox_batch_size",
    Kind.HISTOGRAM,
    ("model", "variant", "device_class"),
    "Rows per ONNX Runtime call after dynamic batching.",
    buckets=BATCH_SIZE_BUCKETS,
)

ALL_METRICS: tuple[MetricSpec, ...] = (
    REQUESTS,
    REQUEST_LATENCY,
    BUDGET,
    IGNORED_PARAMETERS,
    VARIANT_SELECTED,
    VARIANT_QUALITY,
    VARIANT_SIZE,
    VARIANT_AGREEMENT,
    VARIANT_LOADED,
    INFLIGHT,
    BATCH_SIZE,
)
