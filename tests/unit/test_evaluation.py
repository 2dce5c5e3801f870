import numpy as np

from gearbox.compression import CPU, DeviceClass
from gearbox.compression.evaluation import (
    LatencyBudget,
    evaluate_quality,
    measure_latency,
    profile_latency,
)
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.quality import get_metric
from tests.unit.tiny_model import conv_spec, linear_onnx, tiny_splits

QUICK = LatencyBudget(warmup=1, min_iterations=5, max_iterations=20, min_seconds=0.0)


def test_measure_latency_reports_p50_and_p95_per_batch_size():
    profile = measure_latency(linear_onnx(), CPU, tiny_splits().heldout, budget=QUICK)
    assert set(profile) == {"1", "8"}
    for figures in profile.values():
        assert set(figures) == {"p50", "p95"}
        assert figures["p95"] >= figures["p50"] > 0


def test_measure_latency_honours_batch_sizes():
    profile = measure_latency(
        linear_onnx(), CPU, tiny_splits().heldout, batch_sizes=(3,), budget=QUICK
    )
    assert list(profile) == ["3"]


def test_evaluate_quality_scores_the_held_out_split():
    spec = conv_spec()
    data = tiny_splits()
    artifact = linear_onnx()
    evaluation = evaluate_quality(artifact, spec, data)

    expected = run_onnx(artifact, spec, data.heldout)
    np.testing.assert_array_equal(evaluation.outputs, expected)
    assert evaluation.outputs.shape == (len(data.heldout), 10)
    assert evaluation.quality == get_metric("accuracy").score(expected, data.heldout.labels)


def test_profile_latency_skips_unavailable_device_classes():
    missing = DeviceClass("imaginary", execution_provider="NoSuchExecutionProvider")
    profile = profile_latency(linear_onnx(), tiny_splits().heldout, [CPU, missing], budget=QUICK)
    assert list(profile) == ["cpu"]
    assert set(profile["cpu"]) == {"1", "8"}
