"""Quantisation-aware training: config checks, the QDQ graph, and its match with torch."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from gearbox.compression import InvalidArgumentError
from gearbox.compression.errors import CompressionError
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.techniques import TechniqueInput, config_from_params, config_to_params
from gearbox.compression.techniques.qat import (
    MAX_DIFFERENCE_STEPS,
    WEIGHT_LEVELS,
    ActivationQuantizer,
    QatConfig,
    QuantizedLayer,
    fold_batch_norms,
    quantization_aware_training,
    verify_qdq,
)
from gearbox.compression.techniques.registry import config_type_for
from gearbox.compression.training import fit, predict
from tests.unit.tiny_model import TinyConvNet, conv_spec


class QatCase:
    """A tiny trained conv reference and one QAT run of it, the torch model kept."""

    def __init__(self) -> None:
        self.spec = conv_spec()
        self.data = self.spec.load_data()
        torch.manual_seed(0)
        self.reference = self.spec.build_model()
        fit(self.reference, self.spec, self.data.train, self.spec.training)
        self.reference_state = copy.deepcopy(self.reference.state_dict())
        self.progress: list[tuple[str, float]] = []
        inputs = TechniqueInput(
            spec=self.spec,
            data=self.data,
            reference_model=self.reference,
            report=lambda stage, fraction: self.progress.append((stage, fraction)),
        )
        self.result = quantization_aware_training(
            QatConfig(epochs=1), copy.deepcopy(self.reference), inputs
        )


@pytest.fixture(scope="module")
def case() -> QatCase:
    return QatCase()


def test_config_rejects_bad_values():
    for bad in (
        {"epochs": 0},
        {"learning_rate_scale": 0.0},
        {"soft_weight": 1.5},
        {"temperature": 0.0},
        {"range_momentum": 0.0},
    ):
        with pytest.raises(InvalidArgumentError):
            QatConfig(**bad)


def test_config_round_trips_through_params():
    config = QatConfig(epochs=2, soft_weight=0.0)
    assert config_type_for("qat") is QatConfig
    assert QatConfig().name == "qat" and QatConfig().parent is None
    assert config_from_params(config_to_params(config)) == config


def test_batch_norms_fold_into_the_convolutions_without_changing_outputs():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    images = torch.rand(5, 1, 8, 8)
    before = model(images)

    assert fold_batch_norms(model) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-5)


def test_relu_outputs_get_an_exact_zero_and_a_grid_rounding_is_stable():
    quantizer = ActivationQuantizer(momentum=0.1)
    quantizer.calibrating = True
    quantizer(torch.linspace(0.0, 2.0, 100))
    quantizer.calibrating = False
    quantizer.eval()

    assert int(quantizer.zero_point) == 0
    assert float(quantizer.scale) == pytest.approx(2.0 / 255)
    rounded = quantizer(torch.linspace(-1.0, 3.0, 50))
    assert float(rounded.min()) == 0.0 and float(rounded.max()) == pytest.approx(2.0)
    torch.testing.assert_close(quantizer(rounded), rounded)


def test_the_artifact_is_a_qdq_graph_with_integer_weights(case):
    graph = onnx.load_from_string(case.result.onnx).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "BatchNormalization" not in ops
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        producers = {o: n for n in graph.node for o in n.output}
        weight_dq, bias_dq = producers[node.input[1]], producers[node.input[2]]
        assert weight_dq.op_type == bias_dq.op_type == "DequantizeLinear"
        assert weights[weight_dq.input[0]].dtype == np.int8
        assert weights[bias_dq.input[0]].dtype == np.int32
        # Seven bits: no uint8 x int8 pair sum saturates int16 on a CPU without VNNI.
        steps = np.abs(weights[weight_dq.input[0]].astype(np.int32))
        assert steps.max() == WEIGHT_LEVELS
    float_bytes = sum(w.nbytes for w in weights.values() if w.dtype == np.float32)
    integer_bytes = sum(w.nbytes for w in weights.values() if w.dtype == np.int8)
    assert integer_bytes > float_bytes


def test_onnx_runtime_runs_the_graph_with_integer_kernels(case, tmp_path):
    signature = case.spec.signature
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(case.result.onnx, options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == signature.input_names
    assert [o.name for o in session.get_outputs()] == signature.output_names
    [logits] = session.run(None, case.data.heldout.take(3))
    assert logits.shape == (3, 10) and logits.dtype == np.float32

    optimized = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "QLinearConv" in optimized
    assert "Conv" not in optimized
    assert case.result.details["ort_integer_operators"]["QLinearConv"] == 2


def test_onnx_outputs_match_the_fake_quantized_torch_model(case):
    heldout = case.data.heldout
    expected = predict(case.result.model, case.spec, heldout)
    actual = run_onnx(case.result.onnx, case.spec, heldout)
    export = case.result.details["export"]
    assert np.abs(actual - expected).max() == pytest.approx(export["max_abs_difference"])
    # Within a few quantisation steps of the output: its DequantizeLinear's scale.
    graph = onnx.load_from_string(case.result.onnx).graph
    [output_dq] = [n for n in graph.node if n.output[0] == graph.output[0].name]
    assert output_dq.op_type == "DequantizeLinear"
    step = float(next(numpy_helper.to_array(t) for t in graph.initializer
                      if t.name == output_dq.input[1]))  # fmt: skip
    assert export["tolerance"] == pytest.approx(MAX_DIFFERENCE_STEPS * step)
    assert export["max_abs_difference"] <= export["tolerance"]
    assert np.mean(actual.argmax(1) == expected.argmax(1)) >= 0.95
    float_model = copy.deepcopy(case.reference)
    assert not np.allclose(predict(float_model, case.spec, heldout), expected, atol=1e-4), (
        "the torch model should round, so differ from the float reference"
    )


def test_verification_fails_for_a_graph_of_other_weights(case):
    model = copy.deepcopy(case.result.model)
    layer = next(m for m in model.modules() if isinstance(m, QuantizedLayer))
    with torch.no_grad():
        layer.layer.weight.mul_(-1.0)
    layer.refresh()
    with pytest.raises(CompressionError, match="differs"):
        verify_qdq(case.result.onnx, model, case.spec, case.data.heldout)


def test_details_compare_with_int8_static(case):
    details = case.result.details
    quality = details["quality"]
    assert quality["metric"] == "accuracy"
    for variant in ("qat", "int8_static", "fp32"):
        assert 0.0 <= quality[variant] <= 1.0
    assert details["beats_int8_static"] is (quality["qat"] > quality["int8_static"])
    assert set(details["agreement_with_fp32"]) == {"qat", "int8_static"}
    assert details["folded_batch_norms"] == 2 and details["quantized_layers"] == 3
    assert details["int8_static_bytes"] > 0


def test_the_reference_is_left_untouched_and_progress_only_rises(case):
    state = case.reference.state_dict()
    assert all(torch.equal(state[k], v) for k, v in case.reference_state.items())
    fractions = [fraction for _, fraction in case.progress]
    assert fractions == sorted(fractions) and all(0.0 <= f < 0.85 for f in fractions)
