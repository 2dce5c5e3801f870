"""`gearbox demo --exit` end to end: its own local Ray, the gateway, the workload, the report."""

from __future__ import annotations

import pytest

from tests.integration.conftest import _free_port, run_gearbox


@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_demo_serves_the_example_and_reports_which_variant_met_each_budget(
    digits_repository, ingress
):
    """Both ingresses, HTTP and gRPC alternating: HAProxy by default, the classic proxy when
    asked for."""
    repository, compressed = digits_repository
    assert compressed.returncode == 0, compressed.stderr
    result = run_gearbox(
        "demo", "--exit", "--reuse", "--repo", str(repository.root), "--requests", "20",
        "--http-port", str(_free_port()), "--grpc-port", str(_free_port()),
        "--metrics-port", str(_free_port()), "--ingress", ingress,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert f"ingress  {ingress}" in report
    assert "Routing by latency budget" in report
    rows = [line for line in report.splitlines() if line.startswith("│") and " ms │" in line]
    budgets = [row.split("│")[1].strip() for row in rows if "x" in row.split("│")[2]]
    assert budgets[:2] == ["none", "50 ms"]
    none_row = next(row for row in rows if row.split("│")[1].strip() == "none")
    assert "fp32 x20" in none_row  # no budget: the reference variant
    assert "20/20" in none_row  # no budget is always met
    assert "/metrics" in report and "draining and stopping" in report
