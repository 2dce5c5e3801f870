"""Structured pruning through Torch-Pruning (DepGraph), and its fallback to channel surgery."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gearbox.compression import InvalidArgumentError, PrunedConfig
from gearbox.compression.onnx_export import export_described
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques import TechniqueInput
from gearbox.compression.techniques.params import config_from_params, config_to_params
from gearbox.compression.techniques.pruned import SURGERY, TORCH_PRUNING, prune_structured
from gearbox.compression.training import fit
from tests.unit.tiny_encoder import HEADS, HIDDEN, LAYERS, encoder_spec
from tests.unit.tiny_model import TinyConvNet, conv_spec


class TinyResidualNet(nn.Module):
    """A stem and one residual block whose add ties the stem's channels to the block's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        return self.head(torch.relu(features + self.block(features)))


class FrozenFeaturesNet(nn.Module):
    """Its features leave autograd (a frozen extractor): Torch-Pruning's trace cannot see them,
    torch.fx can."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(images), 1).detach())


def trained(model, spec, data):
    torch.manual_seed(0)
    fit(model, spec, data.train, spec.training)
    return model


@pytest.fixture(scope="module")
def conv_data():
    spec = conv_spec()
    return spec, spec.load_data()


def prune(config, reference, spec, data):
    """The handler on its own copy of the reference, as apply_technique runs it."""
    stages = []
    inputs = TechniqueInput(
        spec=spec,
        data=data,
        reference_model=reference,
        report=lambda stage, fraction: stages.append(fraction),
    )
    result = prune_structured(config, copy.deepcopy(reference), inputs)
    assert stages == sorted(stages)
    return result


def run_exported(model, spec, data, rows=3):
    """Export as Gearbox does (verified against torch) and run the graph in ONNX Runtime."""
    exported = export_described(model, spec, data.heldout)
    assert exported.description["verified"] is True
    session = ort.InferenceSession(exported.onnx, providers=["CPUExecutionProvider"])
    [output] = session.run(None, data.heldout.take(rows))
    assert np.all(np.isfinite(output))
    return output


def test_residual_network_prunes_the_channels_its_skip_connection_couples(conv_data):
    spec, data = conv_data
    torch.manual_seed(0)
    reference = trained(TinyResidualNet(), spec, data)

    result = prune(PrunedConfig(), reference, spec, data)
    pruned = result.model

    assert result.details["pruner"] == TORCH_PRUNING
    # The stem and the block's last conv meet at the add: they lose the same channels.
    assert pruned.stem[0].out_channels == pruned.block[3].out_channels == 4
    assert pruned.block[0].in_channels == 4
    assert pruned.block[0].out_channels == 4
    assert pruned.head[2].in_features == 4 * 4 * 4
    assert pruned.head[2].out_features == 10
    assert result.details["pruned_layers"] == 3
    assert result.details["params_after"] == count_parameters(pruned) < count_parameters(reference)
    assert result.details["params_before"] == count_parameters(reference)
    assert run_exported(pruned, spec, data).shape == (3, 10)


def test_plain_conv_net_prunes_every_hidden_layer_but_not_the_logits(conv_data):
    spec, data = conv_data
    torch.manual_seed(0)
    reference = trained(TinyConvNet(), spec, data)

    result = prune(PrunedConfig(amount=0.5, criterion="l2-norm"), reference, spec, data)
    pruned = result.model

    assert result.details["pruner"] == TORCH_PRUNING
    assert result.details["criterion"] == "l2-norm"
    assert pruned.features[0].out_channels == 2
    assert pruned.features[1].num_features == 2
    assert pruned.features[3].in_channels == 2
    assert pruned.features[3].out_channels == 4
    assert pruned.classifier[1].in_features == 4 * 4 * 4
    assert pruned.classifier[1].out_features == 10
    assert result.details["removed_channels"] == 2 + 4
    assert run_exported(pruned, spec, data).shape == (3, 10)


def test_iterative_steps_reach_the_amount_and_fine_tune_after_each(conv_data):
    spec, data = conv_data
    torch.manual_seed(0)
    reference = trained(TinyConvNet(), spec, data)

    result = prune(PrunedConfig(amount=0.5, iterative_steps=2), reference, spec, data)

    assert result.model.features[3].out_channels == 4
    assert result.details["iterative_steps"] == 2
    assert result.details["finetune_epochs"] == 2


def test_encoder_loses_whole_heads_and_ffn_neurons_and_still_exports():
    spec = encoder_spec()
    data = spec.load_data()
    reference = spec.build_model()

    result = prune(PrunedConfig(amount=0.5, finetune_epochs=1), reference, spec, data)
    pruned = result.model

    assert result.details["pruner"] == TORCH_PRUNING
    for layer in pruned.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == HEADS // 2
        assert attention.query.out_features == attention.value.out_features == HIDDEN // 2
        assert layer.attention.output.dense.in_features == HIDDEN // 2
        assert layer.intermediate.dense.out_features == 4 * HIDDEN // 2
        assert layer.output.dense.out_features == HIDDEN  # the hidden size is the output
    assert result.details["heads_before"] == LAYERS * HEADS
    assert result.details["removed_heads"] == LAYERS * HEADS // 2
    assert result.details["removed_neurons"] == LAYERS * 4 * HIDDEN // 2
    assert result.details["params_after"] < result.details["params_before"]
    embeddings = run_exported(pruned, spec, data, rows=5)
    assert embeddings.shape == (5, HIDDEN)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)


def test_encoder_keeps_its_heads_when_told_to():
    spec = encoder_spec()
    data = spec.load_data()
    reference = spec.build_model()

    result = prune(PrunedConfig(prune_heads=False, finetune_epochs=1), reference, spec, data)

    for layer in result.model.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == HEADS
        assert layer.attention.self.query.out_features == HIDDEN
        assert layer.intermediate.dense.out_features == 4 * HIDDEN // 2
    assert result.details["removed_heads"] == 0


def test_a_model_torch_pruning_cannot_trace_falls_back_to_surgery(conv_data):
    spec, data = conv_data
    torch.manual_seed(0)
    reference = trained(FrozenFeaturesNet(), spec, data)

    result = prune(PrunedConfig(), reference, spec, data)
    pruned = result.model

    assert result.details["pruner"] == SURGERY
    reason = result.details["fallback_reason"]
    assert "features.0" in reason
    assert "features.3" in reason
    assert pruned.features[0].out_channels == 2
    assert pruned.features[3].in_channels == 2
    assert result.details["params_after"] == count_parameters(pruned) < count_parameters(reference)
    assert run_exported(pruned, spec, data).shape == (3, 10)


@pytest.mark.parametrize(
    "fields",
    [
        {"criterion": "l3-norm"},
        {"iterative_steps": 0},
        {"finetune_epochs": 0},
        {"finetune_learning_rate_scale": 0.0},
    ],
)
def test_config_refuses_bad_values(fields):
    with pytest.raises(InvalidArgumentError):
        PrunedConfig(**fields)


def test_config_round_trips_through_params():
    config = PrunedConfig(amount=0.3, criterion="l2-norm", prune_heads=False, iterative_steps=3)
    assert config_from_params(config_to_params(config)) == config
