import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from gearbox.compression import InvalidArgumentError, apply_technique
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques import config_from_params, config_to_params
from gearbox.compression.techniques.lowrank import LowRankConfig, energy_rank, factorise_layers


def weight_of_rank(shape, rank, seed=0):
    """A weight of ``shape`` whose (out, in*k*k) matrix has ``rank`` equal singular values, so
    that any energy above (rank - 1) / rank needs exactly ``rank`` of them."""
    generator = torch.Generator().manual_seed(seed)
    outputs, inputs = shape[0], int(np.prod(shape[1:]))
    left, _ = torch.linalg.qr(torch.randn(outputs, rank, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(inputs, rank, generator=generator))
    return (left @ right.T).reshape(shape)


def orthogonal_weight(outputs, inputs, seed=0):
    """Full rank with equal singular values: no truncation keeps much less than all of it."""
    return weight_of_rank((outputs, inputs), min(outputs, inputs), seed)


def matrix_shapes(artifact):
    model = onnx.load_from_string(artifact)
    return {
        tuple(numpy_helper.to_array(tensor).shape)
        for tensor in model.graph.initializer
        if len(tensor.dims) >= 2
    }


def run_signature(case, artifact):
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    signature = case.spec.signature
    assert [i.name for i in session.get_inputs()] == signature.input_names
    assert [o.name for o in session.get_outputs()] == signature.output_names
    (logits,) = session.run(None, case.data.heldout.inputs)
    assert signature.outputs[0].accepts(logits.shape)
    assert logits.dtype == signature.outputs[0].numpy_dtype
    assert np.isfinite(logits).all()
    return logits


@pytest.mark.parametrize(
    "fields",
    [
        {"energy": 0.0},
        {"energy": 1.5},
        {"max_params_ratio": 1.0},
        {"max_params_ratio": 0.0},
        {"min_layer_params": -1},
        {"finetune_epochs": -1},
        {"finetune_learning_rate_scale": 0.0},
        {"temperature": 0.0},
        {"soft_weight": 1.5},
    ],
    ids=lambda fields: next(iter(fields)),
)
def test_config_rejects_values_out_of_range(fields):
    with pytest.raises(InvalidArgumentError, match="lowrank"):
        LowRankConfig(**fields)


def test_config_round_trips_through_params():
    config = LowRankConfig(energy=0.8, finetune_epochs=2, distill_from_reference=False)
    params = config_to_params(config)
    assert params["technique"] == "lowrank" and params["name"] == "lowrank"
    assert config_from_params(params) == config


def test_energy_rank_is_the_smallest_rank_keeping_the_energy():
    singular_values = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squares 9, 4, 1, 1 of 15
    assert energy_rank(singular_values, 0.6) == (1, pytest.approx(9 / 15))
    assert energy_rank(singular_values, 0.61) == (2, pytest.approx(13 / 15))
    assert energy_rank(singular_values, 0.9) == (3, pytest.approx(14 / 15))
    assert energy_rank(singular_values, 1.0) == (4, pytest.approx(1.0))


def test_a_linear_of_known_rank_becomes_two_exact_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        model[0].weight.copy_(weight_of_rank((48, 64), rank=5))
    original = copy.deepcopy(model)

    decisions = factorise_layers(model, energy=0.9, min_layer_params=0)

    first, second = model[0]
    assert (first.in_features, first.out_features, first.bias) == (64, 5, None)
    assert (second.in_features, second.out_features) == (5, 48)
    rows = torch.randn(7, 64)
    torch.testing.assert_close(model(rows), original(rows), rtol=1e-4, atol=1e-5)
    decision = decisions[0]
    assert (decision.name, decision.full_rank, decision.rank) == ("0", 48, 5)
    assert decision.factorised
    assert decision.params_after == 5 * (64 + 48) + 48
    assert count_parameters(model) < count_parameters(original)


def test_a_conv_of_known_rank_becomes_a_kxk_conv_to_rank_channels_and_a_1x1_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight_of_rank(conv.weight.shape, rank=3))
    model = nn.Sequential(conv)
    original = copy.deepcopy(model)

    (decision,) = factorise_layers(model, energy=0.95, min_layer_params=0)

    spatial, pointwise = model[0]
    assert spatial.weight.shape == (3, 6, 3, 3) and spatial.bias is None
    assert (spatial.stride, spatial.padding) == ((2, 2), (1, 1))
    assert pointwise.weight.shape == (16, 3, 1, 1) and pointwise.bias is not None
    images = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(model(images), original(images), rtol=1e-4, atol=1e-5)
    assert (decision.full_rank, decision.rank, decision.factorised) == (16, 3, True)


def test_a_1x1_conv_factorises_like_a_linear():
    conv = nn.Conv2d(32, 32, 1)
    with torch.no_grad():
        conv.weight.copy_(weight_of_rank(conv.weight.shape, rank=4))
    model = nn.Sequential(conv)
    original = copy.deepcopy(model)

    factorise_layers(model, energy=0.9, min_layer_params=0)

    assert [layer.weight.shape for layer in model[0]] == [(4, 32, 1, 1), (32, 4, 1, 1)]
    images = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(model(images), original(images), rtol=1e-4, atol=1e-5)


def test_layers_whose_factors_would_not_save_enough_are_left_alone():
    square = nn.Linear(16, 16)
    with torch.no_grad():
        square.weight.copy_(orthogonal_weight(16, 16))
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    small = nn.Linear(32, 2)  # 64 weights, under min_layer_params
    model = nn.Sequential(square, grouped, small)
    original_layers = list(model)

    decisions = factorise_layers(model, energy=0.9, min_layer_params=100)

    assert list(model) == original_layers  # the very same modules, untouched
    # Equal singular values: 0.9 of the energy needs 15 of 16, 15 * 32 weights > 16 * 16.
    assert [(d.name, d.rank, d.factorised) for d in decisions] == [("0", 15, False)]
    assert decisions[0].params_after == decisions[0].params_before


def test_mlp_handler_exports_the_smaller_factors(mlp_case):
    reference = copy.deepcopy(mlp_case.model)
    with torch.no_grad():
        reference.layers[0].weight.copy_(weight_of_rank((32, 64), rank=3))
        reference.layers[2].weight.copy_(orthogonal_weight(10, 32))
    config = LowRankConfig(
        energy=0.9, min_layer_params=0, finetune_epochs=1, distill_from_reference=False
    )

    result = apply_technique(config, mlp_case.inputs(reference=reference))

    run_signature(mlp_case, result.onnx)
    shapes = {tuple(sorted(shape)) for shape in matrix_shapes(result.onnx)}
    assert (3, 64) in shapes and (3, 32) in shapes
    assert (32, 64) not in shapes  # the full first layer is gone
    assert (10, 32) in shapes  # the full-rank head was kept whole
    layers = result.details["layers"]
    assert layers["layers.0"]["rank"] == 3 and layers["layers.0"]["factorised"]
    assert not layers["layers.2"]["factorised"]
    assert result.param_count == result.details["params_after"]
    assert result.param_count < count_parameters(reference) == result.details["params_before"]
    assert result.details["finetune"] == "labels" and result.details["finetune_epochs"] == 1


def test_conv_handler_distils_and_exports_the_factored_conv(conv_case):
    reference = copy.deepcopy(conv_case.model)
    with torch.no_grad():
        second_conv = reference.features[3]
        second_conv.weight.copy_(weight_of_rank(second_conv.weight.shape, rank=2))
    before = {name: p.clone() for name, p in reference.state_dict().items()}
    config = LowRankConfig(energy=0.9, min_layer_params=100, finetune_epochs=1)

    result = apply_technique(config, conv_case.inputs(reference=reference))

    run_signature(conv_case, result.onnx)
    shapes = matrix_shapes(result.onnx)
    assert (2, 4, 3, 3) in shapes and (8, 2, 1, 1) in shapes
    assert (8, 4, 3, 3) not in shapes
    assert (4, 1, 3, 3) in shapes  # the first conv has 36 weights, under min_layer_params
    layers = result.details["layers"]
    assert "features.0" not in layers
    assert layers["features.3"] == {
        "full_rank": 8,
        "rank": 2,
        "retained_energy": pytest.approx(1.0),
        "params_before": 8 * 36 + 8,
        "params_after": 2 * (36 + 8) + 8,
        "factorised": True,
    }
    assert result.param_count < count_parameters(reference)
    assert result.details["finetune"] == "distilled from the reference"
    # The teacher is read, never changed.
    for name, value in reference.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_layers_inside_torch_attention_blocks_are_left_alone():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, batch_first=True)
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(4 * 32, 32)).eval()
    original = copy.deepcopy(model)

    decisions = factorise_layers(model, energy=0.1, min_layer_params=0)

    assert [d.name for d in decisions] == ["2"]  # only the head outside the block
    assert (
        model[0].linear1 is block.linear1
        and model[0].self_attn.out_proj is block.self_attn.out_proj
    )
    tokens = torch.randn(3, 4, 32)
    with torch.no_grad():  # the encoder layer's fast path reads its layers' weights
        assert model(tokens).shape == original(tokens).shape == (3, 32)
