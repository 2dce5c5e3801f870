"""The metrics exporter: exact sums across replicas, persistent gauges, one port per machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gearbox.serving.metric_names import (
    ALL_METRICS,
    BATCH_SIZE,
    BUDGET,
    INFLIGHT,
    LATENCY_BUCKETS_S,
    REQUEST_LATENCY,
    REQUESTS,
    VARIANT_AGREEMENT,
    VARIANT_QUALITY,
    VARIANT_SELECTED,
    VARIANT_SIZE,
    Kind,
)
from gearbox.serving.metrics import (
    OK,
    MetricsExporter,
    ReplicaMetrics,
    SnapshotCollector,
)


def _exposition(directory: Path) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(directory))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _replica(directory: Path, **kwargs) -> ReplicaMetrics:
    # A long interval: the tests flush explicitly, so nothing races them.
    return ReplicaMetrics(directory, flush_interval_s=3600, **kwargs)


def test_every_declared_family_is_exported_with_its_labels(tmp_path):
    replica = _replica(tmp_path)
    replica.request_finished("m", "fp32", "cpu", "http", OK, 0.002, arm="a")
    replica.budget_outcome("m", "fp32", True, arm="a")
    replica.variant_selected("m", "fp32", "fits_budget", arm="a")
    replica.parameters_ignored("m", 2)
    replica.variant_figures("m", "fp32", 0.97, 1234)
    replica.agreement("m", "int8", 9.0, 10, 0.8)
    replica.inflight("m", "cpu", 1)
    replica.variant_loaded("m", "fp32", "cpu", True)
    replica.batch_formed("m", "fp32", "cpu", 3)
    replica.flush()
    families = {f.name: f for f in text_string_to_metric_families(_exposition(tmp_path))}
    assert set(families) == {spec.name for spec in ALL_METRICS}
    for spec in ALL_METRICS:
        family = families[spec.name]
        assert family.type == spec.kind.value
        assert family.samples, spec.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(spec.labels), spec.name
    replica.close()


def test_counters_and_histograms_add_up_exactly_across_replicas(tmp_path):
    first, second = _replica(tmp_path), _replica(tmp_path)
    latencies = {first: [0.0003, 0.0011, 0.0042], second: [0.0007, 0.25, 12.0]}
    for replica, seconds in latencies.items():
        for value in seconds:
            replica.request_finished("m", "fp32", "cpu", "grpc", OK, value)
        replica.request_finished("m", "fp32", "cpu", "grpc", "resource_exhausted", 0.001)
        replica.flush()
    samples = _samples(_exposition(tmp_path))
    labels = {"model": "m", "variant": "fp32", "device_class": "cpu", "arm": ""}
    everything = [v for values in latencies.values() for v in values]
    assert _value(samples, f"{REQUEST_LATENCY.name}_count", **labels) == len(everything)
    assert _value(samples, f"{REQUEST_LATENCY.name}_sum", **labels) == pytest.approx(
        sum(everything), rel=1e-12
    )
    for bound in LATENCY_BUCKETS_S:
        expected = sum(value <= bound for value in everything)
        le = repr(float(bound))
        assert _value(samples, f"{REQUEST_LATENCY.name}_bucket", **labels, le=le) == expected
    assert _value(samples, f"{REQUEST_LATENCY.name}_bucket", **labels, le="+Inf") == 6
    ok = {**labels, "protocol": "grpc", "code": OK}
    refused = {**ok, "code": "resource_exhausted"}
    assert _value(samples, REQUESTS.sample_name, **ok) == 6
    assert _value(samples, REQUESTS.sample_name, **refused) == 2
    # A refused request has no latency worth a histogram: only answers are timed.
    first.close()
    second.close()


def test_a_value_on_a_bucket_bound_falls_in_that_bucket(tmp_path):
    replica = _replica(tmp_path)
    replica.batch_formed("m", "fp32", "cpu", 4)
    replica.flush()
    samples = _samples(_exposition(tmp_path))
    labels = {"model": "m", "variant": "fp32", "device_class": "cpu"}
    assert _value(samples, f"{BATCH_SIZE.name}_bucket", **labels, le="3.0") == 0
    assert _value(samples, f"{BATCH_SIZE.name}_bucket", **labels, le="4.0") == 1
    assert _value(samples, f"{BATCH_SIZE.name}_sum", **labels) == 4


def test_budget_selection_and_arm_labels(tmp_path):
    replica = _replica(tmp_path)
    for met in (True, True, False):
        replica.budget_outcome("m", "int8", met, arm="treatment")
    replica.variant_selected("m", "int8", "experiment", arm="treatment")
    replica.flush()
    samples = _samples(_exposition(tmp_path))
    met = {"model": "m", "variant": "int8", "outcome": "met", "arm": "treatment"}
    assert _value(samples, BUDGET.sample_name, **met) == 2
    assert _value(samples, BUDGET.sample_name, **{**met, "outcome": "missed"}) == 1
    chosen = {"model": "m", "variant": "int8", "reason": "experiment", "arm": "treatment"}
    assert _value(samples, VARIANT_SELECTED.sample_name, **chosen) == 1


def test_gauges_persist_and_combine_by_their_mode(tmp_path):
    first, second = _replica(tmp_path), _replica(tmp_path)
    first.variant_figures("m", "int8", 0.95, 1000)
    first.agreement("m", "int8", 0.0, 0, 0.9)  # no comparison yet: the offline figure
    first.inflight("m", "cpu", 1)
    first.inflight("m", "cpu", 1)
    second.inflight("m", "cpu", 1)
    first.flush()
    second.flush()
    samples = _samples(_exposition(tmp_path))
    variant = {"model": "m", "variant": "int8"}
    assert _value(samples, VARIANT_QUALITY.name, **variant) == 0.95
    assert _value(samples, VARIANT_SIZE.name, **variant) == 1000
    assert _value(samples, VARIANT_AGREEMENT.name, **variant) == 0.9
    assert _value(samples, INFLIGHT.name, model="m", device_class="cpu") == 3
    # Live agreement is exact over replicas: (8 + 1) matched of (10 + 5) rows.
    first.agreement("m", "int8", 8.0, 10, 0.9)
    second.agreement("m", "int8", 1.0, 5, 0.9)
    first.inflight("m", "cpu", -2)
    time.sleep(0.01)
    second.variant_figures("m", "int8", 0.96, 1000)
    first.flush()
    second.flush()
    # Still there on a later scrape: nothing expires while the gateway runs.
    for _ in range(2):
        samples = _samples(_exposition(tmp_path))
        assert _value(samples, VARIANT_AGREEMENT.name, **variant) == pytest.approx(9 / 15)
        assert _value(samples, INFLIGHT.name, model="m", device_class="cpu") == 1
        assert _value(samples, VARIANT_QUALITY.name, **variant) == 0.96


def test_a_stopped_replica_keeps_its_counts_but_holds_nothing_in_flight(tmp_path):
    script = (
        "import sys; from pathlib import Path;"
        "from gearbox.serving.metrics import ReplicaMetrics, OK;"
        "r = ReplicaMetrics(Path(sys.argv[1]), flush_interval_s=3600);"
        "[r.request_finished('m', 'fp32', 'cpu', 'http', OK, 0.001) for _ in range(5)];"
        "r.inflight('m', 'cpu', 4); r.flush()"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    alive = _replica(tmp_path)
    alive.request_finished("m", "fp32", "cpu", "http", OK, 0.001)
    alive.inflight("m", "cpu", 1)
    alive.flush()
    samples = _samples(_exposition(tmp_path))
    ok = {"model": "m", "variant": "fp32", "device_class": "cpu", "protocol": "http"}
    assert _value(samples, REQUESTS.sample_name, **ok, code=OK, arm="") == 6
    assert _value(samples, INFLIGHT.name, model="m", device_class="cpu") == 1


def test_a_half_written_or_foreign_file_is_never_read(tmp_path):
    replica = _replica(tmp_path)
    replica.request_finished("m", "fp32", "cpu", "http", OK, 0.001)
    replica.flush()
    (tmp_path / "broken.metrics.json").write_text('{"pid": 1, "count')
    (tmp_path / "x.partial").write_text("garbage")
    samples = _samples(_exposition(tmp_path))
    ok = {"model": "m", "variant": "fp32", "device_class": "cpu", "protocol": "http"}
    assert _value(samples, REQUESTS.sample_name, **ok, code=OK, arm="") == 1


def test_the_snapshot_is_written_in_the_background(tmp_path):
    replica = ReplicaMetrics(tmp_path, flush_interval_s=0.05)
    replica.request_finished("m", "fp32", "cpu", "http", OK, 0.001)
    deadline = time.monotonic() + 5
    ok = {"model": "m", "variant": "fp32", "device_class": "cpu", "protocol": "http"}
    key = (REQUESTS.sample_name, frozenset({**ok, "code": OK, "arm": ""}.items()))
    while key not in _samples(_exposition(tmp_path)):
        assert time.monotonic() < deadline, "the flusher never wrote a snapshot"
        time.sleep(0.02)
    replica.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_one_replica_holds_the_port_and_another_takes_over_when_it_stops(tmp_path):
    port = _free_port()
    first = ReplicaMetrics(tmp_path, port=port, flush_interval_s=3600)
    _wait_for(lambda: first._exporter is not None and first._exporter.serving)
    second = ReplicaMetrics(tmp_path, port=port, flush_interval_s=3600)
    second._exporter._closed.wait(0.3)  # let it try, and fail, to bind
    assert not second._exporter.serving
    for replica, count in ((first, 2), (second, 3)):
        for _ in range(count):
            replica.request_finished("m", "fp32", "cpu", "http", OK, 0.001)
        replica.flush()
    ok = {"model": "m", "variant": "fp32", "device_class": "cpu", "protocol": "http"}
    assert _value(_samples(_scrape(port)), REQUESTS.sample_name, **ok, code=OK, arm="") == 5
    first.close()
    # The retry interval is 2 s: within it the second replica serves, first's counts kept.
    _wait_for(lambda: second._exporter.serving)
    assert _value(_samples(_scrape(port)), REQUESTS.sample_name, **ok, code=OK, arm="") == 5
    second.close()
    with pytest.raises(OSError):
        _scrape(port)


def test_an_exporter_closed_before_binding_never_binds(tmp_path):
    port = _free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        exporter = MetricsExporter(tmp_path, "127.0.0.1", port, retry_s=0.05)
        time.sleep(0.2)
        exporter.close()
    time.sleep(0.2)
    assert not exporter.serving
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # still free: nobody took it after close


def test_every_spec_is_well_formed():
    names = [spec.name for spec in ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in ALL_METRICS:
        assert spec.name.startswith("gearbox_")
        assert (spec.kind is Kind.HISTOGRAM) == bool(spec.buckets)
        assert (spec.kind is Kind.GAUGE) == (spec.gauge_mode is not None)
        assert list(spec.buckets) == sorted(spec.buckets)
    assert LATENCY_BUCKETS_S[0] <= 0.00025 and LATENCY_BUCKETS_S[-1] >= 10.0


def test_a_declared_variant_starts_its_series_at_zero(tmp_path):
    replica = _replica(tmp_path)
    replica.declare("m", "int8", ["cpu", "gpu"])
    replica.request_finished("m", "int8", "cpu", "http", OK, 0.001)
    replica.flush()
    samples = _samples(_exposition(tmp_path))
    for device in ("cpu", "gpu"):
        labels = {"model": "m", "variant": "int8", "device_class": device, "arm": ""}
        answered = 1 if device == "cpu" else 0
        assert _value(samples, f"{REQUEST_LATENCY.name}_count", **labels) == answered
        assert _value(samples, REQUESTS.sample_name, **labels, protocol="grpc", code=OK) == 0
        assert _value(samples, INFLIGHT.name, model="m", device_class=device) == 0
        batch = {"model": "m", "variant": "int8", "device_class": device}
        assert _value(samples, f"{BATCH_SIZE.name}_count", **batch) == 0
    for outcome in ("met", "missed"):
        budget = {"model": "m", "variant": "int8", "outcome": outcome, "arm": ""}
        assert _value(samples, BUDGET.sample_name, **budget) == 0
