"""Metrics, dashboard, statistics, `gearbox top` and an A/B experiment on a live gateway.

`gearbox serve` runs on the two-node cluster as a user starts it; a real Prometheus (Debian's
package) scrapes it with the shipped scrape config. Every declared series is checked for its
value against what this module's own clients sent and were answered, and every Grafana panel's
query must return data from Prometheus.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families

from gearbox.compression import ModelRepository
from gearbox.compression.examples.digits import load_splits
from gearbox.serving.dashboard import panel_queries, substitute_variables
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
)
from tests.fixtures.prometheus import PrometheusServer, prometheus_binary
from tests.integration.conftest import (
    ROOT,
    launch_serve,
    run_gearbox,
    stop_serve,
    wait_gateway_ready,
)

MODEL = "digits"
TOKEN = "integration-admin-token-0123456789"
EXPERIMENT = "int8-vs-fp32"
DASHBOARD = ROOT / "deploy" / "grafana" / "gearbox-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Gateway:
    http: str
    grpc: str
    metrics: str
    repository: ModelRepository
    process: subprocess.Popen
    log: Path

    def scrape(self) -> Samples:
        text = urllib.request.urlopen(self.metrics, timeout=10).read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def _ready(repository: ModelRepository) -> list[str]:
    return sorted(m.variant for m in repository.variants(MODEL) if m.is_ready)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def _gearbox(*args: str) -> subprocess.CompletedProcess:
    return run_gearbox(*args, timeout=120, env={"GEARBOX_ADMIN_TOKEN": TOKEN})


@pytest.fixture(scope="module")
def gateway(ray_address, digits_repository, tmp_path_factory) -> Iterator[Gateway]:
    repository, compressed = digits_repository
    assert compressed.returncode == 0, compressed.stderr
    launched = launch_serve(
        repository.root, ray_address, tmp_path_factory.mktemp("observability") / "serve.log",
        # No shadow runs: every batch then comes from this module's own requests.
        "--shadow-fraction", "0", env={"GEARBOX_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    gateway = Gateway(
        f"http://127.0.0.1:{launched.http_port}",
        f"127.0.0.1:{launched.grpc_port}",
        launched.metrics,
        repository,
        launched.process,
        launched.log,
    )
    try:
        wait_gateway_ready(gateway.http, gateway.grpc, gateway.process, gateway.log)
        yield gateway
    finally:
        stop_serve(gateway.process, gateway.log)


@pytest.fixture(scope="module")
def prometheus(gateway) -> Iterator[PrometheusServer]:
    if prometheus_binary() is None:
        pytest.skip("Prometheus is not installed: `make prometheus` installs Debian's package")
    server = PrometheusServer(gateway.metrics.split("/")[2], interval_s=1.0)
    try:
        server.wait_scraping()
        yield server
    finally:
        server.stop()


@dataclass
class Sent:
    """What the clients sent and were answered."""

    answered: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(variant, protocol) -> requests answered OK."""
    gateway_ms: dict[str, list[float]] = field(default_factory=dict)
    """variant -> the latency_ms each answer reported."""
    budget: Counter[tuple[str, bool]] = field(default_factory=Counter)
    """(variant, met) of the answers to requests with a budget."""
    pinned: int = 0
    rows: int = 0
    scraped_before: float = 0.0
    """A wall-clock time whose latest Prometheus scrape saw none of these requests."""
    scraped_after: float = 0.0
    """A wall-clock time whose latest Prometheus scrape saw all of them, and nothing later."""

    def http(self, session: requests.Session, url: str, image: np.ndarray, **parameters) -> dict:
        body = {
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                        "data": image.ravel().tolist()}],
            "parameters": parameters,
        }  # fmt: skip
        reply = session.post(url, json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        self.note(answer["model_version"], "http", answer["parameters"], parameters)
        return answer

    def note(self, variant: str, protocol: str, answered: dict, asked: dict) -> None:
        self.answered[(variant, protocol)] += 1
        self.gateway_ms.setdefault(variant, []).append(answered["latency_ms"])
        self.rows += 1
        if "latency_budget_ms" in asked:
            self.budget[(variant, answered["budget_met"])] += 1


@pytest.fixture(scope="module")
def traffic(gateway, prometheus) -> tuple[Sent, Samples, Samples]:
    """Routed, pinned and budgeted requests over both protocols; the exported figures before
    and after them."""
    images = load_splits().heldout.inputs["images"]
    before = gateway.scrape()
    sent = Sent()
    prometheus.wait_for_scrapes(1)
    sent.scraped_before = time.time()
    session = requests.Session()
    routed = f"{gateway.http}/v2/models/{MODEL}/infer"
    for i in range(60):
        budget = (0.05, 5.0, 1000.0)[i % 3]  # missed, mostly met, always met
        sent.http(session, routed, images[i], latency_budget_ms=budget)
    for i in range(20):
        sent.http(session, routed, images[i])
    versions = sorted(_ready(gateway.repository))
    for i, variant in enumerate(versions * 5):
        sent.http(session, f"{gateway.http}/v2/models/{MODEL}/versions/{variant}/infer", images[i])
        sent.pinned += 1
    client = grpcclient.InferenceServerClient(gateway.grpc)
    for i in range(15):
        tensor = grpcclient.InferInput("images", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(images[i : i + 1])
        result = client.infer(MODEL, [tensor], parameters={"latency_budget_ms": 1000.0})
        response = result.get_response()
        parameters = {k: getattr(v, v.WhichOneof("parameter_choice"))
                      for k, v in response.parameters.items()}  # fmt: skip
        sent.note(response.model_version, "grpc", parameters, {"latency_budget_ms": 1000.0})
    after = _caught_up(gateway, before, sum(sent.answered.values()))
    prometheus.wait_for_scrapes(1)
    sent.scraped_after = time.time()
    return sent, before, after


def _caught_up(gateway: Gateway, before: Samples, answered: int) -> Samples:
    """The exported figures once they count ``answered`` more OK requests (replicas write
    theirs every second)."""
    deadline = time.monotonic() + 30
    while True:
        after = gateway.scrape()
        counted = total(after, REQUESTS.sample_name, code="ok") - total(
            before, REQUESTS.sample_name, code="ok"
        )
        if counted >= answered:
            return after
        assert time.monotonic() < deadline, f"{counted} of {answered} answers were counted"
        time.sleep(0.3)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_every_declared_metric_is_exported(gateway, traffic):
    _sent, _before, after = traffic
    names = {name for name, _ in after}
    for spec in ALL_METRICS:
        sample = spec.sample_name + ("_count" if spec.buckets else "")
        assert sample in names, f"{sample} is not exported"
    labels = {key for (_, found) in after for key, _ in found}
    # Nothing that changes on a restart: only the labels the design gives the series.
    assert labels <= {label for spec in ALL_METRICS for label in spec.labels} | {"le"}


def test_request_counts_latency_and_budgets_equal_what_the_clients_saw(gateway, traffic):
    sent, before, after = traffic
    for (variant, protocol), count in sent.answered.items():
        counted = delta(before, after, REQUESTS.sample_name, model=MODEL, variant=variant,
                        protocol=protocol, code="ok")  # fmt: skip
        assert counted == count, (variant, protocol)
    for variant, spans in sent.gateway_ms.items():
        count = delta(before, after, f"{REQUEST_LATENCY.name}_count", model=MODEL, variant=variant)
        seconds = delta(before, after, f"{REQUEST_LATENCY.name}_sum", model=MODEL, variant=variant)
        assert count == len(spans)
        # The exact mean: the sum of the latency_ms each caller was told (rounded to 0.1 us).
        assert seconds * 1000 == pytest.approx(sum(spans), abs=1e-4 * len(spans) + 1e-6)
        buckets = {
            dict(found)["le"]: value
            for (name, found), value in after.items()
            if name == f"{REQUEST_LATENCY.name}_bucket"
            and {("model", MODEL), ("variant", variant)} <= found
        }
        assert "0.00025" in buckets and "10.0" in buckets
    for (variant, met), count in sent.budget.items():
        outcome = "met" if met else "missed"
        counted = delta(before, after, BUDGET.sample_name, model=MODEL, variant=variant,
                        outcome=outcome)  # fmt: skip
        assert counted == count, (variant, outcome)
    assert sum(count for (_, met), count in sent.budget.items() if not met) >= 20
    assert delta(before, after, VARIANT_SELECTED.sample_name, model=MODEL, reason="pinned") == (
        sent.pinned
    )
    assert delta(before, after, VARIANT_SELECTED.sample_name, model=MODEL) == sum(
        sent.answered.values()
    )


def test_variant_figures_agreement_inflight_and_batches_hold_their_values(gateway, traffic):
    sent, before, after = traffic
    for variant in _ready(gateway.repository):
        manifest = gateway.repository.manifest(MODEL, variant)
        labels = {"model": MODEL, "variant": variant}
        assert total(after, VARIANT_QUALITY.name, **labels) == manifest.quality.value
        assert total(after, VARIANT_SIZE.name, **labels) == manifest.size_bytes
        # No shadow runs in this gateway: the manifest's offline agreement, exactly.
        assert total(after, VARIANT_AGREEMENT.name, **labels) == manifest.quality.agreement
    assert total(after, INFLIGHT.name, model=MODEL, device_class="cpu") == 0
    rows = delta(before, after, f"{BATCH_SIZE.name}_sum", model=MODEL)
    batches = delta(before, after, f"{BATCH_SIZE.name}_count", model=MODEL)
    assert rows == sent.rows  # every request is one row, each run once
    assert 1 <= batches <= rows


def test_the_gauges_do_not_vanish_while_the_gateway_runs(gateway, traffic):
    time.sleep(12)  # longer than Ray's exporter used to keep an unrefreshed gauge
    later = gateway.scrape()
    for variant in _ready(gateway.repository):
        assert total(later, VARIANT_QUALITY.name, model=MODEL, variant=variant) > 0


@pytest.fixture(scope="module")
def experiment(gateway, traffic, tmp_path_factory) -> dict[str, Any]:
    """An A/B experiment created, fed and ended through the `gearbox experiments` command,
    with feedback from the held-out labels; returns its report."""
    definition = tmp_path_factory.mktemp("experiment") / "ab.json"
    definition.write_text(
        json.dumps(
            {"name": EXPERIMENT, "model": MODEL,
             "arms": [{"variant": "fp32", "weight": 0.5}, {"variant": "int8", "weight": 0.5}]}
        )
    )  # fmt: skip
    created = _gearbox("experiments", "create", str(definition), "--url", gateway.http)
    assert created.returncode == 0, created.stderr
    heldout = load_splits().heldout
    session = requests.Session()
    arms: Counter[str] = Counter()
    for i in range(200):
        answer = Sent().http(
            session,
            f"{gateway.http}/v2/models/{MODEL}/infer",
            heldout.inputs["images"][i],
            routing_key=f"user-{i}",
        )
        arms[answer["parameters"]["arm"]] += 1
        feedback = session.post(
            f"{gateway.http}/v2/feedback",
            json={"id": answer["id"], "label": int(heldout.labels[i])},
            timeout=30,
        )
        assert feedback.status_code == 200, feedback.text
    report = _gearbox("experiments", "report", EXPERIMENT, "--json", "--url", gateway.http)
    assert report.returncode == 0, report.stderr
    ended = _gearbox("experiments", "end", EXPERIMENT, "--url", gateway.http)
    assert ended.returncode == 0, ended.stderr
    return {"report": json.loads(report.stdout), "arms": arms}


def test_an_experiment_splits_by_key_and_reports_feedback(gateway, experiment):
    report, arms = experiment["report"], experiment["arms"]
    assert set(arms) == {"fp32", "int8"} and min(arms.values()) >= 60
    by_arm = {arm["name"]: arm for arm in report["arms"]}
    for name, count in arms.items():
        assert by_arm[name]["requests"] == count
        assert by_arm[name]["feedback"] == count
        assert 0.8 < by_arm[name]["accuracy"] <= 1.0
    assert report["verdict"]


def test_admin_calls_without_the_token_are_refused(gateway):
    arms = [{"variant": "fp32", "weight": 1}, {"variant": "int8", "weight": 1}]
    definition = {"name": "x", "model": MODEL, "arms": arms}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        reply = requests.post(
            f"{gateway.http}/v2/experiments", json=definition, headers=headers, timeout=30
        )
        assert reply.status_code == 401, reply.text
    listing = requests.get(f"{gateway.http}/v2/experiments", timeout=30).json()
    assert "x" not in [entry["name"] for entry in listing["experiments"]]
    reply = requests.post(f"{gateway.http}/v2/feedback", json={"id": "nope", "label": 1})
    assert reply.status_code == 404 and "nope" in reply.json()["error"]


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_dashboard_panel_has_data_in_prometheus(prometheus, traffic, experiment):
    dashboard = json.loads(DASHBOARD.read_text())
    prometheus.wait_for_scrapes(3)
    variables = {"job": "gearbox", "model": MODEL, "__rate_interval": "5m", "__interval": "5s"}
    empty = []
    for query in panel_queries(dashboard):
        expr = substitute_variables(query.expr, variables)
        if not _finite(prometheus.query(expr)):
            empty.append(f"{query.panel_title} [{query.ref_id}]: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_promql_latency_quantiles_come_from_the_same_clock(prometheus, traffic):
    sent, _before, _after = traffic
    buckets = f'{REQUEST_LATENCY.name}_bucket{{model="{MODEL}"}}'
    # Exactly this fixture's requests: later tests send more to the same series.
    window = f"{buckets} @ {sent.scraped_after:.3f} - {buckets} @ {sent.scraped_before:.3f}"
    p95 = prometheus.values(
        f"histogram_quantile(0.95, sum by (le, variant) ({window}))", by="variant"
    )
    bounds = (0.0, *LATENCY_BUCKETS_S)
    for variant, spans in sent.gateway_ms.items():
        # Prometheus interpolates inside the bucket that holds the observation of rank
        # ceil(0.95 n); the latency_ms the caller was told must fall in that same bucket.
        rank = math.ceil(0.95 * len(spans))
        # latency_ms is rounded to 0.1 µs: near a bound, either neighbouring bucket.
        told_s = sorted(spans)[rank - 1] / 1000
        low = bounds[int(np.searchsorted(LATENCY_BUCKETS_S, told_s - 1e-7))]
        high = bounds[int(np.searchsorted(LATENCY_BUCKETS_S, told_s + 1e-7)) + 1]
        assert low <= p95[variant] <= high, (variant, told_s, p95[variant])


def test_triton_statistics_through_unmodified_clients(gateway, traffic):
    sent, _before, _after = traffic
    over_http = httpclient.InferenceServerClient(gateway.http.removeprefix("http://"))
    stats = over_http.get_inference_statistics(MODEL)["model_stats"]
    by_version = {entry["version"]: entry for entry in stats}
    answered = Counter()
    for (variant, _protocol), count in sent.answered.items():
        answered[variant] += count
    for variant, count in answered.items():
        assert int(by_version[variant]["inference_stats"]["success"]["count"]) >= count
    over_grpc = grpcclient.InferenceServerClient(gateway.grpc)
    reply = over_grpc.get_inference_statistics(MODEL, "fp32")
    (entry,) = reply.model_stats
    assert entry.version == "fp32" and entry.inference_stats.success.count >= answered["fp32"]


def test_gearbox_top_shows_the_live_traffic(gateway, traffic):
    stop = time.monotonic() + 4

    def background_load() -> None:
        session = requests.Session()
        image = load_splits().heldout.inputs["images"][0]
        while time.monotonic() < stop:
            Sent().http(session, f"{gateway.http}/v2/models/{MODEL}/infer", image)

    thread = threading.Thread(target=background_load)
    thread.start()
    shown = _gearbox("top", "--url", gateway.metrics, "--once", "--interval", "2")
    thread.join()
    assert shown.returncode == 0, shown.stderr
    assert MODEL in shown.stdout and "fp32" in shown.stdout and "req/s" in shown.stdout
