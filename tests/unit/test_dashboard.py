"""The Grafana dashboard and its provisioning: queries name only declared series and labels,
the required panels exist, and every query parses as PromQL (promtool, when installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gearbox.serving.dashboard import (
    DEFAULT_VARIABLES,
    PanelQuery,
    panel_queries,
    substitute_variables,
)
from gearbox.serving.metric_names import ALL_METRICS, Kind, MetricSpec

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "gearbox-dashboard.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "gearbox.yaml"
GUIDE = ROOT / "docs" / "OBSERVABILITY.md"
DASHBOARDS_ENV = "GEARBOX_GRAFANA_DASHBOARDS"

# Every series a Prometheus scrape attaches, on top of each metric's own labels.
TARGET_LABELS = {"job", "instance"}
METRIC = re.compile(r"\b(?:ray_)?gearbox_\w+")
SELECTOR = re.compile(r"\b(gearbox_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
AGGREGATION = re.compile(r"\b(?:sum|max|min|avg|count)\s+by\s*\(([^)]*)\)\s*\(")
ON = re.compile(r"\b(?:on|ignoring)\s*\(([^)]*)\)")
RANGE = re.compile(r"\[([^\]]+)\]")

# Required panels by stable id (their titles are checked too, so a renumbering shows up).
REQUIRED = {
    11: "Latency p50 / p95 / p99 by variant and device class",
    3: "Traffic share by variant",
    12: "Budget-miss ratio by variant",
    21: "Quality vs latency by variant",
    22: "Live agreement by variant",
    31: "Mean batch size by variant and device class",
    32: "Batch size p95 by variant and device class",
    33: "In-flight requests by model and device class",
    41: "Experiment arms: request rate",
    42: "Experiment arms: p95 latency",
    4: "Request rate by code",
}


def _sample_names() -> dict[str, MetricSpec]:
    names = {}
    for spec in ALL_METRICS:
        if spec.kind is Kind.HISTOGRAM:
            names.update({f"{spec.name}_{suffix}": spec for suffix in ("bucket", "sum", "count")})
        else:
            names[spec.sample_name] = spec
    return names


SAMPLES = _sample_names()


def _allowed_labels(sample: str) -> set[str]:
    extra = {"le"} if sample.endswith("_bucket") else set()
    return set(SAMPLES[sample].labels) | TARGET_LABELS | extra


def _balanced(text: str, open_at: int) -> str:
    """The text inside the parenthesis opening at ``open_at``."""
    depth = 0
    for index in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_at + 1 : index]
    raise AssertionError(f"unbalanced parentheses in: {text}")


def _labels(text: str) -> set[str]:
    return {label.strip() for label in text.split(",") if label.strip()}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard) -> list[PanelQuery]:
    found = panel_queries(dashboard)
    assert found, "the dashboard has no queries"
    return found


def _panels(dashboard: dict) -> list[dict]:
    return [
        panel for top in dashboard["panels"] for panel in (top, *top.get("panels", []))
    ]  # fmt: skip


def test_every_panel_has_targets_with_ref_id_and_expr(dashboard):
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_variables(dashboard):
    assert 38 <= dashboard["schemaVersion"] <= 41  # Grafana 10 and later
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["current"]["value"] == "gearbox"
    model = variables["model"]
    assert model["multi"] and model["includeAll"]
    assert model["definition"] == "label_values(gearbox_requests_total, model)"
    assert model["query"]["query"] == model["definition"]


def test_queries_name_only_declared_series_and_labels(queries):
    used = set()
    for query in queries:
        where = f"{query.panel_title} {query.ref_id}: {query.expr}"
        names = METRIC.findall(query.expr)
        assert names, f"names no Gearbox series: {where}"
        for name in names:
            assert name in SAMPLES, f"{name} is not a declared sample name: {where}"
            used.add(SAMPLES[name].name)
        for name, matchers in SELECTOR.findall(query.expr):
            unknown = set(MATCHER.findall(matchers)) - _allowed_labels(name)
            assert not unknown, f"{name} has no label(s) {unknown}: {where}"
            assert 'job=~"$job"' in matchers and 'model=~"$model"' in matchers, where
        for match in AGGREGATION.finditer(query.expr):
            inner = _balanced(query.expr, match.end() - 1)
            for name in METRIC.findall(inner):
                missing = _labels(match.group(1)) - _allowed_labels(name)
                assert not missing, f"by ({match.group(1)}) over {name} lacks {missing}: {where}"
        for match in ON.finditer(query.expr):
            for name in METRIC.findall(query.expr):
                assert _labels(match.group(1)) <= _allowed_labels(name), where
        for window in RANGE.findall(query.expr):
            assert window == "$__rate_interval", where
    assert used == {spec.name for spec in ALL_METRICS}, "every declared metric has a panel"


def test_the_required_panels_exist(dashboard):
    panels = {panel["id"]: panel for panel in _panels(dashboard)}
    for panel_id, title in REQUIRED.items():
        assert panels[panel_id]["title"] == title

    def exprs(panel_id: int) -> list[str]:
        return [target["expr"] for target in panels[panel_id]["targets"]]

    latency = exprs(11)
    for q in ("0.5", "0.95", "0.99"):
        (expr,) = [e for e in latency if e.startswith(f"histogram_quantile({q},")]
        assert re.search(r"sum by \([^)]*\bvariant\b[^)]*\bdevice_class\b", expr)
        assert "gearbox_request_latency_seconds_bucket" in expr
    (share,) = exprs(3)
    assert "group_left" in share and share.count("gearbox_requests_total") == 2
    (miss,) = exprs(12)
    assert 'outcome="missed"' in miss
    quality_table = panels[21]
    assert quality_table["type"] == "table"
    table = " ".join(exprs(21))
    for name in ("gearbox_variant_quality", "gearbox_request_latency_seconds_bucket",
                 "gearbox_variant_size_bytes"):  # fmt: skip
        assert name in table
    assert all(t["instant"] for t in quality_table["targets"])
    assert "gearbox_variant_agreement" in exprs(22)[0]
    (mean,) = exprs(31)
    assert "gearbox_batch_size_sum" in mean and "gearbox_batch_size_count" in mean
    assert "histogram_quantile(0.95" in exprs(32)[0] and "gearbox_batch_size_bucket" in exprs(32)[0]
    assert "sum by (model, device_class) (gearbox_inflight_requests" in exprs(33)[0]
    for panel_id in (41, 42):
        assert all('arm!=""' in e and "arm)" in e for e in exprs(panel_id))
    assert "histogram_quantile(0.95" in exprs(42)[0]
    codes, ignored = exprs(4)
    assert codes.startswith("sum by (code) (") and "code!=" not in codes  # ok included
    assert "gearbox_ignored_parameters_total" in ignored


def test_substitution_leaves_no_variable(queries):
    for query in queries:
        expr = substitute_variables(query.expr, DEFAULT_VARIABLES)
        assert "$" not in expr, expr
        assert 'job=~"gearbox"' in expr, expr
        assert set(RANGE.findall(expr)) <= {"1m"}, expr


def test_substitution_forms():
    values = {"model": "digits|minilm", "job": "gearbox", "__rate_interval": "30s"}
    expr = 'rate(x{model=~"$model", job=~"${job}", m=~"${model:regex}"}[$__rate_interval])'
    assert substitute_variables(expr, values) == (
        'rate(x{model=~"digits|minilm", job=~"gearbox", m=~"digits|minilm"}[30s])'
    )
    with pytest.raises(KeyError, match="unknown"):
        substitute_variables('x{a=~"$unknown"}', values)
    assert substitute_variables('x{a=~"b$"}', values) == 'x{a=~"b$"}'  # a regex anchor stays


def test_panel_queries_reads_collapsed_rows():
    dashboard = {
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "inner", "targets": [{"refId": "A", "expr": "up"}]}]},
            {"title": "outer", "targets": [{"refId": "B", "expr": "up"}, {"refId": "C"}]},
        ]
    }  # fmt: skip
    assert panel_queries(dashboard) == [
        PanelQuery("inner", "A", "up"),
        PanelQuery("outer", "B", "up"),
    ]


def test_every_query_parses_as_promql(queries, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not on PATH (Debian: apt-get install prometheus); PromQL unchecked"
        )
    rules = [
        {
            "record": f"gearbox_dashboard:query_{index}_{query.ref_id}",
            "expr": substitute_variables(query.expr, DEFAULT_VARIABLES),
        }
        for index, query in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout + checked.stderr


def test_provisioning_points_at_prometheus_and_the_dashboard(monkeypatch):
    datasources = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    (prometheus,) = datasources
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://127.0.0.1:9090"
    (provider,) = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert provider["type"] == "file"
    # Grafana expands environment variables in provisioning files the way expandvars does.
    monkeypatch.setenv(DASHBOARDS_ENV, str(GRAFANA))
    folder = Path(os.path.expandvars(provider["options"]["path"]))
    assert DASHBOARD in folder.rglob("*.json")
    assert DASHBOARDS_ENV in GUIDE.read_text()


def test_the_guide_lists_every_series_with_its_labels():
    guide = GUIDE.read_text()
    for spec in ALL_METRICS:
        (line,) = [line for line in guide.splitlines() if line.startswith(f"| `{spec.sample_name}")]
        for label in spec.labels:
            assert f"`{label}`" in line, f"{spec.name}: label {label} missing from the guide"
    assert "https://" not in guide  # the guide stands alone: no links outside the repository
