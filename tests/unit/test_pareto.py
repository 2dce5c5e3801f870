"""The Pareto front over (quality up, latency down, size down) and the plot of a model's
variants."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.pareto import ParetoPoint, pareto_front, plot_front, point_of
from gearbox.compression.repository import Quality, VariantManifest
from tests.unit.tiny_model import linear_onnx, make_manifest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _names(points: list[ParetoPoint]) -> list[str]:
    return [p.name for p in points]


def test_a_point_better_on_every_objective_removes_the_other():
    best = ParetoPoint("best", quality=0.99, latency_ms=1.0, size_bytes=100)
    worse = ParetoPoint("worse", quality=0.98, latency_ms=2.0, size_bytes=200)
    assert _names(pareto_front([worse, best])) == ["best"]


def test_a_point_equal_on_two_objectives_and_worse_on_one_is_dominated():
    fast = ParetoPoint("fast", quality=0.98, latency_ms=1.0, size_bytes=100)
    slower = ParetoPoint("slower", quality=0.98, latency_ms=1.5, size_bytes=100)
    bigger = ParetoPoint("bigger", quality=0.98, latency_ms=1.0, size_bytes=101)
    assert _names(pareto_front([slower, bigger, fast])) == ["fast"]


def test_trade_offs_all_stay_on_the_front_fastest_first():
    accurate = ParetoPoint("accurate", quality=0.99, latency_ms=3.0, size_bytes=900)
    fast = ParetoPoint("fast", quality=0.95, latency_ms=0.5, size_bytes=900)
    small = ParetoPoint("small", quality=0.95, latency_ms=2.0, size_bytes=10)
    dominated = ParetoPoint("dominated", quality=0.94, latency_ms=2.5, size_bytes=900)
    assert _names(pareto_front([small, dominated, accurate, fast])) == [
        "fast",
        "small",
        "accurate",
    ]


def test_identical_points_do_not_dominate_each_other():
    a = ParetoPoint("a", quality=0.97, latency_ms=1.0, size_bytes=50)
    twin = dataclasses.replace(a, name="twin")
    loser = ParetoPoint("loser", quality=0.96, latency_ms=1.0, size_bytes=50)
    assert _names(pareto_front([twin, loser, a])) == ["a", "twin"]


def test_an_empty_set_has_an_empty_front():
    assert pareto_front([]) == []


def _variant(
    name: str,
    quality: float,
    p50: float,
    size: int,
    status: str = "ready",
    parent: str | None = "fp32",
) -> VariantManifest:
    artifact = linear_onnx()
    manifest = make_manifest(
        artifact,
        variant=name,
        status=status,
        reason=None if status == "ready" else "below the gate",
        parent=parent,
        storage_bytes=size,
    )
    return dataclasses.replace(
        manifest,
        quality=Quality(metric="accuracy", value=quality, reference=0.99, agreement=0.98),
        latency_ms={"cpu": {"1": {"p50": p50, "p95": p50 * 1.2}}},
    )


def _repository_variants() -> list[VariantManifest]:
    return [
        _variant("fp32", 0.99, 2.0, 10_000_000, parent=None),
        _variant("int8", 0.985, 0.9, 2_600_000),
        _variant("search-pruned70-int8", 0.98, 0.12, 120_000),
        _variant("search-pruned50", 0.97, 0.5, 2_000_000),
        _variant("distilled", 0.90, 0.3, 400_000, status="rejected"),
    ]


def test_point_of_reads_batch_one_p50_and_stored_size():
    manifest = _variant("int8", 0.985, 0.9, 2_600_000)
    assert point_of(manifest, "cpu") == ParetoPoint("int8", 0.985, 0.9, 2_600_000)
    assert point_of(manifest, "cpu", batch=8) is None
    assert point_of(manifest, "gpu") is None


def test_plot_writes_a_png_labelling_every_variant(tmp_path: Path):
    path = tmp_path / "front.png"
    figure = plot_front(_repository_variants(), path, max_accuracy_drop=0.02)

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    axes = figure.axes[0]
    texts = [text.get_text() for text in axes.texts]
    for name in ("fp32 (reference)", "int8", "search-pruned70-int8", "search-pruned50"):
        assert any(text.startswith(f"{name},") for text in texts), (name, texts)
    assert any(text.startswith("distilled,") for text in texts)
    assert "latency p50" in axes.get_xlabel() and "batch 1" in axes.get_xlabel()


def test_plot_greys_rejected_variants_and_joins_the_front(tmp_path: Path):
    figure = plot_front(_repository_variants(), tmp_path / "front.png")
    axes = figure.axes[0]
    rejected = next(text for text in axes.texts if text.get_text().startswith("distilled,"))
    assert rejected.get_color() == "grey"
    ready = next(text for text in axes.texts if text.get_text().startswith("int8,"))
    assert ready.get_color() == "black"
    # The front of the ready variants: fp32 (best quality), int8 and the pruned-int8 candidate;
    # search-pruned50 is slower, larger and worse than search-pruned70-int8.
    (line,) = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
    assert list(line.get_xdata()) == [0.12, 0.9, 2.0]
    assert list(line.get_ydata()) == [0.98, 0.985, 0.99]


def test_plot_names_variants_without_figures_for_the_device(tmp_path: Path):
    unprofiled = dataclasses.replace(
        _variant("gpu-only", 0.99, 0.1, 1000), latency_ms={"gpu": {"1": {"p50": 0.1, "p95": 0.2}}}
    )
    figure = plot_front([*_repository_variants(), unprofiled], tmp_path / "front.png")
    assert any("gpu-only" in text.get_text() for text in figure.texts)
    assert not any(text.get_text().startswith("gpu-only") for text in figure.axes[0].texts)


def test_plot_refuses_an_empty_list_and_mixed_models(tmp_path: Path):
    with pytest.raises(InvalidArgumentError, match="no variants"):
        plot_front([], tmp_path / "x.png")
    other = dataclasses.replace(_variant("fp32", 0.9, 1.0, 10), model="other")
    with pytest.raises(InvalidArgumentError, match="one model at a time"):
        plot_front([*_repository_variants(), other], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
