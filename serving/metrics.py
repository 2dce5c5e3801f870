"""Prometheus metrics of DESIGN.md §7: recorded per replica, exported exactly per machine.

Why not ``ray.serve.metrics``: Ray 2.60 hands histograms to its exporter as bucket counts and
rebuilds each observation from its bucket's midpoint, so ``_sum`` (and every mean) is wrong; it
drops a gauge a few seconds after its last update; and it labels every series with worker, node
and replica ids that change on each restart.

So each replica keeps its own cumulative figures (:class:`ReplicaMetrics`, owned by the object
that creates it, nothing registered at import) and writes them every second as a small JSON
snapshot into a directory shared by the gateway's replicas on one machine. One replica per
machine holds the metrics port and serves the sum of every snapshot there
(:class:`SnapshotCollector`, through ``prometheus_client``): counters and histograms add up
exactly, a stopped replica's counts stay counted, and when the holder stops another replica
takes the port over within a retry interval. On a cluster each machine serves its own; Ray's
service-discovery file lists the machines (``deploy/prometheus/prometheus.yml``).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gearbox.serving.metric_names import (
    ALL_METRICS,
    BATCH_SIZE,
    BUDGET,
    IGNORED_PARAMETERS,
    INFLIGHT,
    REQUEST_LATENCY,
    REQUESTS,
    VARIANT_AGREEMENT,
    VARIANT_LOADED,
    VARIANT_QUALITY,
    VARIANT_SELECTED,
    VARIANT_SIZE,
    GaugeMode,
    Kind,
    MetricSpec,
)
from gearbox.serving.processes import process_running

logger = logging.getLogger(__name__)

OK = "ok"
"""The ``code`` label of a successful request; failures carry their ErrorCode value."""
CANCELLED = "cancelled"
"""The ``code`` label of a request whose caller went away before it was answered."""

PROTOCOLS = ("http", "grpc")
"""The ``protocol`` label's values."""
SNAPSHOT_SUFFIX = ".metrics.json"
STALE_AFTER_S = 30.0
"""A snapshot not rewritten for this long belongs to a replica that is gone (its process may
live on another machine's node that shares this directory's name, so its pid says nothing)."""


class GatewayMetrics(Protocol):
    def declare(self, model: str, variant: str, device_classes: Sequence[str]) -> None: ...

    def request_finished(
        self,
        model: str,
        variant: str,
        device_class: str,
        protocol: str,
        code: str,
        seconds: float,
        arm: str = "",
    ) -> None: ...

    def budget_outcome(self, model: str, variant: str, met: bool, arm: str = "") -> None: ...

    def variant_selected(self, model: str, variant: str, reason: str, arm: str = "") -> None: ...

    def parameters_ignored(self, model: str, count: int) -> None: ...

    def variant_figures(
        self, model: str, variant: str, quality: float, size_bytes: int
    ) -> None: ...

    def agreement(
        self, model: str, variant: str, matched: float, rows: int, offline: float
    ) -> None: ...

    def variant_loaded(self, model: str, variant: str, device_class: str, loaded: bool) -> None:
        """Whether this replica serves ``variant`` on ``device_class`` (False: it could not
        load it, or stopped serving it)."""
        ...

    def inflight(self, model: str, device_class: str, delta: int) -> None: ...

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None: ...


def metrics_directory(instance: str) -> Path:
    """Where the replicas of one gateway on this machine keep their snapshots."""
    return Path(tempfile.gettempdir()) / "gearbox-metrics" / instance


Labels = tuple[str, ...]


@dataclass
class _Histogram:
    counts: list[int]
    """Per bucket, not cumulative; the last one is +Inf."""
    total: float = 0.0

    @classmethod
    def empty(cls, spec: MetricSpec) -> _Histogram:
        return cls([0] * (len(spec.buckets) + 1))

    def observe(self, spec: MetricSpec, value: float) -> None:
        # Prometheus buckets are upper-inclusive (le): a value on a bound belongs to it.
        self.counts[bisect.bisect_left(spec.buckets, value)] += 1
        self.total += value


@dataclass
class _Figures:
    """One replica's cumulative figures, keyed by metric name and label values."""

    counters: dict[tuple[str, Labels], float] = field(default_factory=dict)
    histograms: dict[tuple[str, Labels], _Histogram] = field(default_factory=dict)
    latest: dict[tuple[str, Labels], tuple[float, float]] = field(default_factory=dict)
    """Gauge value and when it was set."""
    live: dict[tuple[str, Labels], float] = field(default_factory=dict)
    ratios: dict[tuple[str, Labels], tuple[float, float, float]] = field(default_factory=dict)
    """Numerator, denominator, and the value to show while the denominator is 0."""

    def to_json(self, pid: int) -> dict[str, Any]:
        return {
            "pid": pid,
            "written_at": time.time(),
            "counters": [[n, list(k), v] for (n, k), v in self.counters.items()],
            "histograms": [
                [n, list(k), h.counts, h.total] for (n, k), h in self.histograms.items()
            ],
            "latest": [[n, list(k), v, t] for (n, k), (v, t) in self.latest.items()],
            "live": [[n, list(k), v] for (n, k), v in self.live.items()],
            "ratios": [[n, list(k), *r] for (n, k), r in self.ratios.items()],
        }


class ReplicaMetrics:
    """:class:`GatewayMetrics` of one replica: cumulative figures in memory, written to
    ``directory`` every ``flush_interval_s``. With ``port``, it also competes for the
    machine's metrics port and serves every snapshot in ``directory`` while it holds it.

    Recording costs a dict update under a lock (a few microseconds), so it stays on the
    request path; the file is written by a background thread.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        flush_interval_s: float = 1.0,
    ) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / f"{os.getpid()}-{id(self):x}{SNAPSHOT_SUFFIX}"
        self._figures = _Figures()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._exporter = MetricsExporter(directory, host, port) if port is not None else None
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_interval_s,), daemon=True,
            name="gearbox-metrics",
        )  # fmt: skip
        self._flusher.start()

    # -- recording -------------------------------------------------------------------------

    def declare(self, model: str, variant: str, device_classes: Sequence[str]) -> None:
        """Starts a served variant's main series at zero: a series that first appears with
        its counts already in it has no earlier sample, so PromQL's rate() and increase()
        would miss everything it counted before the first scrape."""
        with self._lock:
            for device in device_classes:
                for protocol in PROTOCOLS:
                    key = (REQUESTS.name, (model, variant, device, protocol, OK, ""))
                    self._figures.counters.setdefault(key, 0.0)
                for spec, labels in (
                    (REQUEST_LATENCY, (model, variant, device, "")),
                    (BATCH_SIZE, (model, variant, device)),
                ):
                    self._figures.histograms.setdefault((spec.name, labels), _Histogram.empty(spec))
                self._figures.live.setdefault((INFLIGHT.name, (model, device)), 0.0)
            for outcome in ("met", "missed"):
                self._figures.counters.setdefault((BUDGET.name, (model, variant, outcome, "")), 0.0)
            self._figures.counters.setdefault((IGNORED_PARAMETERS.name, (model,)), 0.0)

    def _count(self, spec: MetricSpec, labels: Labels, amount: float = 1.0) -> None:
        key = (spec.name, labels)
        with self._lock:
            self._figures.counters[key] = self._figures.counters.get(key, 0.0) + amount

    def _observe(self, spec: MetricSpec, labels: Labels, value: float) -> None:
        key = (spec.name, labels)
        with self._lock:
            histogram = self._figures.histograms.get(key)
            if histogram is None:
                histogram = self._figures.histograms[key] = _Histogram.empty(spec)
            histogram.observe(spec, value)

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
        self._count(REQUESTS, (model, variant, device_class, protocol, code, arm))
        if code == OK:
            self._observe(REQUEST_LATENCY, (model, variant, device_class, arm), seconds)

    def budget_outcome(self, model: str, variant: str, met: bool, arm: str = "") -> None:
        self._count(BUDGET, (model, variant, "met" if met else "missed", arm))

    def variant_selected(self, model: str, variant: str, reason: str, arm: str = "") -> None:
        self._count(VARIANT_SELECTED, (model, variant, reason, arm))

    def parameters_ignored(self, model: str, count: int) -> None:
        self._count(IGNORED_PARAMETERS, (model,), count)

    def variant_figures(self, model: str, variant: str, quality: float, size_bytes: int) -> None:
        now = time.time()
        with self._lock:
            self._figures.latest[(VARIANT_QUALITY.name, (model, variant))] = (quality, now)
            self._figures.latest[(VARIANT_SIZE.name, (model, variant))] = (size_bytes, now)

    def agreement(
        self, model: str, variant: str, matched: float, rows: int, offline: float
    ) -> None:
        with self._lock:
            self._figures.ratios[(VARIANT_AGREEMENT.name, (model, variant))] = (
                matched, rows, offline,
            )  # fmt: skip

    def variant_loaded(self, model: str, variant: str, device_class: str, loaded: bool) -> None:
        key = (VARIANT_LOADED.name, (model, variant, device_class))
        with self._lock:
            self._figures.live[key] = float(loaded)

    def inflight(self, model: str, device_class: str, delta: int) -> None:
        key = (INFLIGHT.name, (model, device_class))
        with self._lock:
            self._figures.live[key] = self._figures.live.get(key, 0.0) + delta

    def batch_formed(self, model: str, variant: str, device_class: str, rows: int) -> None:
        self._observe(BATCH_SIZE, (model, variant, device_class), rows)

    # -- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Writes the snapshot now (atomically: a scrape never reads half a file)."""
        with self._lock:
            payload = self._figures.to_json(os.getpid())
        text = json.dumps(payload, separators=(",", ":"))
        partial = self._path.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(self._path)

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # a metrics hiccup must never stop serving
                logger.exception("writing the metrics snapshot failed")

    def close(self) -> None:
        """Writes the last snapshot (a stopped replica's counts stay counted) and gives up
        the metrics port, if held, for another replica to take."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.flush()
        if self._exporter is not None:
            self._exporter.close()


# -- exporting ---------------------------------------------------------------------------------


def _read_snapshots(directory: Path) -> Iterator[dict[str, Any]]:
    for path in directory.glob(f"*{SNAPSHOT_SUFFIX}"):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed or replaced between listing and reading: the next scrape has it


class SnapshotCollector:
    """A ``prometheus_client`` collector over every replica snapshot in one directory."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        counters: dict[tuple[str, Labels], float] = {}
        histograms: dict[tuple[str, Labels], tuple[list[int], float]] = {}
        latest: dict[tuple[str, Labels], tuple[float, float]] = {}
        live: dict[tuple[str, Labels], float] = {}
        ratios: dict[tuple[str, Labels], tuple[float, float, float]] = {}
        now = time.time()
        for snapshot in _read_snapshots(self._directory):
            running = process_running(snapshot["pid"]) and (
                now - snapshot["written_at"] < STALE_AFTER_S
            )
            for name, labels, value in snapshot["counters"]:
                key = (name, tuple(labels))
                counters[key] = counters.get(key, 0.0) + value
            for name, labels, counts, total in snapshot["histograms"]:
                key = (name, tuple(labels))
                summed, summed_total = histograms.get(key, ([0] * len(counts), 0.0))
                histograms[key] = ([a + b for a, b in zip(summed, counts, strict=True)],
                                   summed_total + total)  # fmt: skip
            for name, labels, value, written in snapshot["latest"]:
                key = (name, tuple(labels))
                if key not in latest or written >= latest[key][1]:
                    latest[key] = (value, written)
            if running:
                for name, labels, value in snapshot["live"]:
                    key = (name, tuple(labels))
                    live[key] = live.get(key, 0.0) + value
            for name, labels, numerator, denominator, fallback in snapshot["ratios"]:
                key = (name, tuple(labels))
                n, d, _ = ratios.get(key, (0.0, 0.0, fallback))
                ratios[key] = (n + numerator, d + denominator, fallback)
        for spec in ALL_METRICS:
            yield _family(spec, counters, histograms, latest, live, ratios)


def _family(
    spec: MetricSpec,
    counters: dict[tuple[str, Labels], float],
    histograms: dict[tuple[str, Labels], tuple[list[int], float]],
    latest: dict[tuple[str, Labels], tuple[float, float]],
    live: dict[tuple[str, Labels], float],
    ratios: dict[tuple[str, Labels], tuple[float, float, float]],
) -> Metric:
    labels = list(spec.labels)
    if spec.kind is Kind.COUNTER:
        counter = CounterMetricFamily(spec.name, spec.help, labels=labels)
        for (name, values), total in sorted(counters.items()):
            if name == spec.name:
                counter.add_metric(list(values), total)
        return counter
    if spec.kind is Kind.HISTOGRAM:
        histogram = HistogramMetricFamily(spec.name, spec.help, labels=labels)
        bounds = [*(repr(float(b)) for b in spec.buckets), "+Inf"]
        for (name, values), (counts, total) in sorted(histograms.items()):
            if name != spec.name:
                continue
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric(list(values), cumulative, sum_value=total)
        return histogram
    gauge = GaugeMetricFamily(spec.name, spec.help, labels=labels)
    if spec.gauge_mode is GaugeMode.LATEST:
        for (name, values), (value, _) in sorted(latest.items()):
            if name == spec.name:
                gauge.add_metric(list(values), value)
    elif spec.gauge_mode is GaugeMode.LIVE_SUM:
        for (name, values), value in sorted(live.items()):
            if name == spec.name:
                gauge.add_metric(list(values), value)
    else:
        for (name, values), (numerator, denominator, fallback) in sorted(ratios.items()):
            if name == spec.name:
                gauge.add_metric(list(values), numerator / denominator if denominator else fallback)
    return gauge


class MetricsExporter:
    """Holds ``host:port`` for the snapshots in ``directory`` whenever no other replica does.

    Every replica of a gateway runs one; the first to bind serves, the others retry every
    ``retry_s`` and take over when the holder stops.
    """

    def __init__(self, directory: Path, host: str, port: int, retry_s: float = 2.0) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(directory))  # type: ignore[arg-type]
        self._host, self._port = host, port
        self._server: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._hold, args=(retry_s,), daemon=True, name="gearbox-metrics-port"
        )
        self._thread.start()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def _hold(self, retry_s: float) -> None:
        while not self._closed.is_set():
            try:
                server, _ = start_http_server(self._port, self._host, registry=self._registry)
            except OSError:
                self._closed.wait(retry_s)
                continue
            self._server = server
            if self._closed.is_set():
                self._release()
            return

    def _release(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def close(self) -> None:
        self._closed.set()
        self._release()
