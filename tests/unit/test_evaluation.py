import numpy as np

from gearbox.compression import CPU, DeviceClass
from gearbox.compression.evaluation import LatencyBudget, evaluate, measure_latency
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


def test_evaluate_scores_quality_and_skips_unavailable_device_classes():
    spec = conv_spec()
    data = tiny_splits()
    artifact = linear_onnx()
    missing = DeviceClass("imaginary", execution_provider="NoSuchExecutionProvider")
    evaluation = evaluate(artifact, spec, data, [CPU, missing], budget=QUICK)

    expected = run_onnx(artifact, spec, data.heldout)
    np.testing.assert_array_equal(evaluation.outputs, expected)
    assert evaluation.outputs.shape == (len(data.heldout), 10)
    assert evaluation.quality == get_metric("accuracy").score(expected, data.heldout.labels)
    assert list(evaluation.latency_ms) == ["cpu"]
    assert set(evaluation.latency_ms["cpu"]) == {"1", "8"}
