import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from gearbox.compression import InvalidArgumentError, apply_technique
from gearbox.compression.techniques import TechniqueInput, config_from_params, config_to_params
from gearbox.compression.techniques.clustered import (
    ClusteredConfig,
    SharedCodebook,
    fold_batch_norms,
    pack_storage,
    unpack_storage,
)
from gearbox.compression.training import fit
from tests.unit.tiny_model import TinyConvNet, conv_spec

# TinyConvNet's weights: features.0 has 36, features.3 has 288, classifier.1 has 1,280.
CONFIG = ClusteredConfig(clusters=4, min_weights=64)


class ClusteredCase:
    """The tiny conv net trained once, and CONFIG applied to it once."""

    def __init__(self) -> None:
        self.spec = conv_spec()
        self.data = self.spec.load_data()
        torch.manual_seed(0)
        self.model = self.spec.build_model()
        fit(self.model, self.spec, self.data.train, self.spec.training)
        self.reference_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.progress: list[tuple[str, float]] = []
        inputs = TechniqueInput(
            spec=self.spec,
            data=self.data,
            reference_model=self.model,
            report=lambda stage, fraction: self.progress.append((stage, fraction)),
        )
        self.result = apply_technique(CONFIG, inputs)
        self.graph = onnx.load_from_string(self.result.onnx)
        self.initializers = {
            tensor.name: numpy_helper.to_array(tensor) for tensor in self.graph.graph.initializer
        }


@pytest.fixture(scope="module")
def case():
    return ClusteredCase()


def test_config_rejects_bad_values():
    with pytest.raises(InvalidArgumentError, match="clusters must be between 2 and 256"):
        ClusteredConfig(clusters=1)
    with pytest.raises(InvalidArgumentError, match="clusters must be between 2 and 256"):
        ClusteredConfig(clusters=257)
    with pytest.raises(InvalidArgumentError, match="min_weights must be at least clusters"):
        ClusteredConfig(clusters=32, min_weights=16)
    with pytest.raises(InvalidArgumentError, match="finetune_epochs must be at least 0"):
        ClusteredConfig(finetune_epochs=-1)
    with pytest.raises(InvalidArgumentError, match="finetune_learning_rate_scale must be positive"):
        ClusteredConfig(finetune_learning_rate_scale=0.0)


def test_config_defaults_and_params_round_trip():
    config = ClusteredConfig()
    assert (config.technique, config.name, config.clusters) == ("cluster", "clustered", 16)
    assert config.bits_per_index == 4
    assert ClusteredConfig(clusters=5).bits_per_index == 3
    assert ClusteredConfig(clusters=2).bits_per_index == 1
    assert config_from_params(config_to_params(CONFIG)) == CONFIG


def test_shared_codebook_keeps_weights_tied_and_sums_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    indices = torch.randint(0, 3, layer.weight.shape)
    parametrize.register_parametrization(layer, "weight", SharedCodebook(indices, 3))
    codebook = layer.parametrizations.weight.original
    assert codebook.shape == (3,)
    rows = torch.randn(4, 6)
    layer(rows).square().sum().backward()
    dense_weight = layer.weight.detach().clone().requires_grad_()
    nn.functional.linear(rows, dense_weight, layer.bias.detach()).square().sum().backward()
    for cluster in range(3):
        expected = dense_weight.grad[indices == cluster].sum()
        torch.testing.assert_close(codebook.grad[cluster], expected)
    with torch.no_grad():
        codebook -= 0.1 * codebook.grad
    assert len(torch.unique(layer.weight.detach())) <= 3


def test_folding_batch_norms_keeps_the_function():
    torch.manual_seed(0)
    model = TinyConvNet()
    model.train()
    model(torch.randn(16, 1, 8, 8))  # running statistics other than the initial 0 and 1
    model.eval()
    images = torch.randn(5, 1, 8, 8)
    expected = model(images)
    assert fold_batch_norms(model) == ["features.1", "features.4"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_exported_graph_runs_and_clustered_weights_share_few_values(case):
    session = ort.InferenceSession(case.result.onnx, providers=["CPUExecutionProvider"])
    [logits] = session.run(None, case.data.heldout.take(3))
    assert logits.shape == (3, 10)
    assert np.all(np.isfinite(logits))
    assert "BatchNormalization" not in {node.op_type for node in case.graph.graph.node}

    details = case.result.details
    assert details["clustered_layers"] == ["features.3", "classifier.1"]
    assert details["dense_layers"] == ["features.0"]
    assert details["folded_batch_norms"] == 2
    for layer in details["clustered_layers"]:
        distinct = len(np.unique(case.initializers[f"{layer}.weight"]))
        assert distinct <= CONFIG.clusters
        assert details["unique_values_in_graph"][layer] == distinct
    # The layer under min_weights stays dense: sharing is the technique's doing.
    assert len(np.unique(case.initializers["features.0.weight"])) > CONFIG.clusters
    assert case.result.param_count == sum(p.numel() for p in case.model.parameters()) - 24

    fractions = [fraction for _, fraction in case.progress]
    assert fractions == sorted(fractions)
    assert all(0.0 <= fraction <= 1.0 for fraction in fractions)


def test_reference_model_is_left_unchanged(case):
    state = case.model.state_dict()
    assert state.keys() == case.reference_state.keys()
    for name, value in case.reference_state.items():
        assert torch.equal(state[name], value), name


def test_storage_is_smaller_and_unpacks_to_exactly_the_served_weights(case):
    result = case.result
    assert result.storage_bytes < len(result.onnx)
    shared = {f"{layer}.weight": CONFIG.clusters for layer in result.details["clustered_layers"]}
    storage = pack_storage(case.graph, shared)
    assert len(storage) == result.storage_bytes == result.details["storage_bytes"]

    unpacked = unpack_storage(storage)
    assert unpacked.keys() == case.initializers.keys()
    for name, served in case.initializers.items():
        assert unpacked[name].dtype == served.dtype, name
        assert np.array_equal(unpacked[name], served), name
    # 2 bits a weight for the 1,568 shared weights instead of 32.
    dense_bytes = sum(case.initializers[name].nbytes for name in shared)
    assert len(storage) < sum(a.nbytes for a in case.initializers.values()) - dense_bytes * 0.8


def _graph_with(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph)


def test_pack_round_trips_odd_bit_widths_and_refuses_too_many_values():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal(5).astype(np.float32)
    weight = codebook[rng.integers(0, 5, (13, 3))]  # 39 indices of 3 bits: not whole bytes
    storage = pack_storage(_graph_with(weight), {"w": 5})
    assert np.array_equal(unpack_storage(storage)["w"], weight)

    with pytest.raises(Exception, match="more than its 4 clusters"):
        pack_storage(_graph_with(weight), {"w": 4})
