"""``gearbox top`` against real exposition text written by prometheus_client from metric_names."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from rich.console import Console

from gearbox.compression.errors import UnavailableError
from gearbox.serving import top
from gearbox.serving.metric_names import (
    ALL_METRICS,
    BUDGET,
    INFLIGHT,
    LATENCY_BUCKETS_S,
    REQUEST_LATENCY,
    REQUESTS,
    VARIANT_AGREEMENT,
    VARIANT_QUALITY,
    Kind,
)
from gearbox.serving.top import Snapshot, TopRow, histogram_quantile, render, window

MODEL = "digits"
WINDOW_S = 10.0


class Exporter:
    """A private registry holding every declared metric, as the gateway exports them."""

    def __init__(self, prefix: str = "", extra: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.extra = extra or {}
        self.metrics = {}
        for spec in ALL_METRICS:
            name, labels = prefix + spec.name, (*spec.labels, *self.extra)
            if spec.kind is Kind.COUNTER:
                metric = Counter(name, spec.help, labels, registry=self.registry)
            elif spec.kind is Kind.GAUGE:
                metric = Gauge(name, spec.help, labels, registry=self.registry)
            else:
                metric = Histogram(
                    name, spec.help, labels, buckets=spec.buckets, registry=self.registry
                )
            self.metrics[spec.name] = metric

    def _child(self, spec, **labels):
        return self.metrics[spec.name].labels(**labels, **self.extra)

    def requests(self, variant, device, seconds, code="ok", arm="", protocol="rest"):
        for value in seconds:
            labels = {"model": MODEL, "variant": variant, "device_class": device, "arm": arm}
            self._child(REQUESTS, **labels, protocol=protocol, code=code).inc()
            self._child(REQUEST_LATENCY, **labels).observe(value)

    def budget(self, variant, met, missed):
        for outcome, count in (("met", met), ("missed", missed)):
            self._child(BUDGET, model=MODEL, variant=variant, outcome=outcome, arm="").inc(count)

    def gauges(self, variant, quality, agreement):
        self._child(VARIANT_QUALITY, model=MODEL, variant=variant).set(quality)
        self._child(VARIANT_AGREEMENT, model=MODEL, variant=variant).set(agreement)

    def inflight(self, device, value):
        self._child(INFLIGHT, model=MODEL, device_class=device).set(value)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def snapshot(self, taken_at: float) -> Snapshot:
        return Snapshot.parse(self.text(), taken_at)


def _latencies(seed: int, count: int, low_s: float, high_s: float) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low_s, high_s, count)


def _bucket_of(value_s: float) -> tuple[float, float]:
    bounds = (0.0, *LATENCY_BUCKETS_S)
    index = int(np.searchsorted(LATENCY_BUCKETS_S, value_s))
    return bounds[index], bounds[index + 1]


def _assert_quantile(estimate_ms: float | None, observations_s: np.ndarray, q: float) -> None:
    # histogram_quantile only knows buckets: it must land in the bucket the true value is in.
    truth = float(np.quantile(observations_s, q))
    low, high = _bucket_of(truth)
    assert estimate_ms is not None
    assert low * 1000 <= estimate_ms <= high * 1000, (estimate_ms, truth * 1000, q)


@dataclasses.dataclass
class Scenario:
    before: Snapshot
    after: Snapshot
    int8_cpu: np.ndarray
    fp32_cpu: np.ndarray
    int8_gpu: np.ndarray


def _scenario(prefix: str = "", extra: dict[str, str] | None = None) -> Scenario:
    exporter = Exporter(prefix, extra)
    # Traffic before the window must not count in it.
    exporter.requests("int8", "cpu", _latencies(0, 50, 0.02, 0.05))
    exporter.requests("fp32", "cpu", _latencies(1, 20, 0.2, 0.4), code="internal")
    exporter.requests("distilled", "cpu", [0.001])  # served once, long ago; no gauges now
    exporter.budget("fp32", met=5, missed=5)
    exporter.gauges("pruned", quality=0.9, agreement=0.5)
    before = exporter.snapshot(100.0)

    int8_cpu = _latencies(2, 300, 0.001, 0.004)
    fp32_cpu = _latencies(3, 90, 0.005, 0.02)
    int8_gpu = _latencies(4, 60, 0.0005, 0.002)
    exporter.requests("int8", "cpu", int8_cpu)
    exporter.requests("fp32", "cpu", fp32_cpu[:80])
    exporter.requests("fp32", "cpu", fp32_cpu[80:], code="resource_exhausted")
    exporter.requests("int8", "gpu", int8_gpu)
    exporter.budget("fp32", met=30, missed=10)
    exporter.gauges("fp32", quality=0.95, agreement=1.0)
    exporter.gauges("int8", quality=0.94, agreement=0.97)
    exporter.gauges("pruned", quality=0.91, agreement=0.96)
    exporter.inflight("cpu", 3)
    exporter.inflight("gpu", 1)
    return Scenario(before, exporter.snapshot(100.0 + WINDOW_S), int8_cpu, fp32_cpu, int8_gpu)


def _rows(rows: list[TopRow]) -> dict[tuple[str, str], TopRow]:
    assert all(row.model == MODEL for row in rows)
    keys = [(row.variant, row.device_class) for row in rows]
    assert len(keys) == len(set(keys)), keys
    return dict(zip(keys, rows, strict=True))


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return _scenario()


def test_rates_and_shares(scenario):
    rows = _rows(window(scenario.before, scenario.after))
    # distilled answered only before the window and reports no gauges: not a served variant.
    assert set(rows) == {("int8", "cpu"), ("fp32", "cpu"), ("int8", "gpu"), ("pruned", "")}
    total = 300 + 90 + 60
    assert rows["int8", "cpu"].rate_rps == pytest.approx(300 / WINDOW_S)
    assert rows["fp32", "cpu"].rate_rps == pytest.approx(90 / WINDOW_S)
    assert rows["int8", "gpu"].rate_rps == pytest.approx(60 / WINDOW_S)
    assert rows["int8", "cpu"].traffic_share == pytest.approx(300 / total)
    assert rows["int8", "gpu"].traffic_share == pytest.approx(60 / total)
    assert rows["fp32", "cpu"].error_share == pytest.approx(10 / 90)  # the earlier 20 are old
    assert rows["int8", "cpu"].error_share == 0.0


def test_an_idle_variant_with_gauges_shows_at_zero(scenario):
    pruned = _rows(window(scenario.before, scenario.after))["pruned", ""]
    assert pruned.rate_rps == 0.0 and pruned.traffic_share == 0.0
    assert pruned.error_share is None and pruned.p50_ms is None and pruned.inflight is None
    assert (pruned.quality, pruned.agreement) == (0.91, 0.96)


def test_latency_quantiles_follow_the_observations(scenario):
    rows = _rows(window(scenario.before, scenario.after))
    for key, observations in (
        (("int8", "cpu"), scenario.int8_cpu),
        (("fp32", "cpu"), scenario.fp32_cpu),
        (("int8", "gpu"), scenario.int8_gpu),
    ):
        _assert_quantile(rows[key].p50_ms, observations, 0.5)
        _assert_quantile(rows[key].p95_ms, observations, 0.95)


def test_quantile_interpolates_inside_the_bucket_as_prometheus_does():
    exporter = Exporter()
    before = exporter.snapshot(0.0)
    # 10 in (1, 1.5] ms and 10 in (2, 3] ms: p50 is the top of the first bucket holding rank 10,
    # p95 (rank 19) sits 9/10 of the way through (2, 3] ms.
    exporter.requests("fp32", "cpu", [0.0012] * 10 + [0.0025] * 10)
    row = window(before, exporter.snapshot(1.0))[0]
    assert row.p50_ms == pytest.approx(1.5)
    assert row.p95_ms == pytest.approx(2.0 + 1.0 * 9 / 10)


def test_histogram_quantile_edges():
    inf = float("inf")
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0.0, inf: 0.0}) is None
    assert histogram_quantile(0.5, {1.0: 4.0, inf: 4.0}) == pytest.approx(0.5)  # from 0
    assert histogram_quantile(0.99, {1.0: 1.0, 2.0: 1.0, inf: 10.0}) == 2.0  # +Inf: top bound


def test_budget_agreement_quality_and_queue(scenario):
    rows = _rows(window(scenario.before, scenario.after))
    assert rows["fp32", "cpu"].budget_met_share == pytest.approx(30 / 40)
    assert rows["int8", "cpu"].budget_met_share is None  # shown as a dash
    assert rows["int8", "cpu"].agreement == 0.97 and rows["int8", "gpu"].agreement == 0.97
    assert rows["fp32", "cpu"].quality == 0.95
    # The queue belongs to model x device class: every variant's row there shows it.
    assert rows["int8", "cpu"].inflight == 3 and rows["fp32", "cpu"].inflight == 3
    assert rows["int8", "gpu"].inflight == 1


def test_a_restarted_gateway_counts_from_zero_not_negative():
    old = Exporter()
    old.requests("int8", "cpu", _latencies(5, 500, 0.02, 0.05))
    old.budget("int8", met=400, missed=100)
    old.gauges("int8", quality=0.94, agreement=0.9)
    restarted = Exporter()
    fresh = _latencies(6, 40, 0.001, 0.002)
    restarted.requests("int8", "cpu", fresh)
    restarted.budget("int8", met=3, missed=1)
    restarted.gauges("int8", quality=0.94, agreement=0.95)
    (row,) = window(old.snapshot(0.0), restarted.snapshot(WINDOW_S))
    assert row.rate_rps == pytest.approx(40 / WINDOW_S)
    assert row.budget_met_share == pytest.approx(0.75)
    _assert_quantile(row.p50_ms, fresh, 0.5)  # the old, slower requests are gone
    _assert_quantile(row.p95_ms, fresh, 0.95)


def test_ray_prefixed_names_and_extra_labels_are_summed():
    replicas = [Exporter("ray_", {"ReplicaId": name}) for name in ("a", "b")]
    for index, replica in enumerate(replicas):
        replica.requests("int8", "cpu", _latencies(7 + index, 100, 0.001, 0.002))
        replica.inflight("cpu", 2)
        replica.gauges("int8", quality=0.94, agreement=0.97)
    text = "".join(replica.text() for replica in replicas)
    assert "ray_gearbox_requests_total" in text
    (row,) = window(Snapshot.parse("", 0.0), Snapshot.parse(text, WINDOW_S))
    assert row.rate_rps == pytest.approx(200 / WINDOW_S)
    assert row.inflight == 4
    assert row.agreement == 0.97


def test_snapshot_is_frozen_and_ignores_other_series(scenario):
    text = "# TYPE other_total counter\nother_total 3\n" + Exporter().text()
    snapshot = Snapshot.parse(text, 0.0)
    assert not any(name.startswith("other") for name, _ in snapshot.values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.taken_at = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.values["x"] = 1.0  # type: ignore[index]


def test_window_needs_time_to_pass(scenario):
    with pytest.raises(ValueError):
        window(scenario.after, scenario.before)


def _text(renderable, width: int = 160) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


def test_render_shows_every_row_sorted_by_traffic(scenario):
    rows = window(scenario.before, scenario.after)
    text = _text(render(rows, "http://gw:8080/metrics", WINDOW_S))
    assert "http://gw:8080/metrics" in text and "10.0 s" in text
    lines = text.splitlines()
    found = []
    for row in rows:
        cells = [row.variant, row.device_class or top.MISSING, top._rate(row.rate_rps)]
        (line,) = [i for i, line in enumerate(lines) if all(c in line.split() for c in cells)]
        found.append((line, row))
    by_line = [row for _, row in sorted(found, key=lambda item: item[0])]
    assert [row.rate_rps for row in by_line] == sorted((r.rate_rps for r in rows), reverse=True)
    assert "75.0" in text  # fp32's budget met %
    assert "11.1" in text  # fp32's error %


def test_render_without_rows_says_so():
    assert "no Gearbox series yet" in _text(render([], "http://gw/metrics", 2.0))


@contextmanager
def _server(body: Callable[[], bytes]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            payload = body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _live_gateway() -> Callable[[], bytes]:
    """Each scrape finds 20 more requests, as a gateway under load would show."""
    exporter = Exporter()
    exporter.gauges("int8", quality=0.94, agreement=0.97)
    exporter.gauges("fp32", quality=0.95, agreement=1.0)
    exporter.inflight("cpu", 2)
    lock = threading.Lock()
    seeds = iter(range(100, 10_000))

    def body() -> bytes:
        with lock:
            exporter.requests("int8", "cpu", _latencies(next(seeds), 15, 0.001, 0.003))
            exporter.requests("fp32", "cpu", _latencies(next(seeds), 5, 0.004, 0.012))
            exporter.budget("fp32", met=4, missed=1)
            return exporter.text().encode()

    return body


def test_run_top_once_against_a_real_http_endpoint():
    console = Console(record=True, width=160)
    with _server(_live_gateway()) as url:
        assert top.run_top(url, 0.2, once=True, console=console) == 0
    text = console.export_text()
    assert url in text
    lines = text.splitlines()
    for variant in ("int8", "fp32"):
        assert any(variant in line and "cpu" in line for line in lines), text
    assert "80.0" in text  # fp32's budget met %


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_gateway_is_one_line_naming_the_url():
    url = f"http://127.0.0.1:{_unused_port()}/metrics"
    with pytest.raises(UnavailableError, match=url):
        top.scrape(url, timeout=2.0)
    err = Console(record=True, width=80)
    args = argparse.Namespace(url=url, interval=0.1, once=True)
    assert top.run_top_command(args, Console(record=True), err) == 1
    (line,) = err.export_text().strip().splitlines()
    assert line.startswith("gearbox: error: ") and url in line


def test_something_that_is_not_an_exposition_is_unavailable():
    with (
        _server(lambda: b"<html><body>hello</body></html>") as url,
        pytest.raises(UnavailableError, match=url),
    ):
        top.scrape(url)


def test_live_mode_refreshes_until_ctrl_c(monkeypatch, scenario):
    answers = iter(
        [scenario.before, UnavailableError("cannot read metrics from X"), scenario.after]
    )

    def fake_scrape(url, timeout=5.0):
        answer = next(answers, None)
        if answer is None:
            raise KeyboardInterrupt
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(top, "scrape", fake_scrape)
    console = Console(record=True, width=160)
    assert top.run_top("http://gw/metrics", 0.01, once=False, console=console) == 0
    text = console.export_text()
    assert "int8" in text and "pruned" in text


def test_the_top_parser_shows_its_defaults():
    parser = argparse.ArgumentParser(prog="gearbox")
    top.add_top_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["top"])
    assert (args.url, args.interval, args.once) == (top.DEFAULT_URL, 2.0, False)
    args = parser.parse_args(["top", "--url", "http://h:1/metrics", "--interval", "0.5", "--once"])
    assert (args.url, args.interval, args.once) == ("http://h:1/metrics", 0.5, True)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    help_text = " ".join(subparsers.choices["top"].format_help().split())
    assert "default http://127.0.0.1:8080/metrics" in help_text
    assert "default 2.0" in help_text and "default: off" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["top", "--interval", "0"])
