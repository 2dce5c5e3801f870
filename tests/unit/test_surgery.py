import pytest
import torch
from torch import nn

from gearbox.compression import CompressionError
from gearbox.compression.surgery import count_parameters, shrink_channels
from tests.unit.tiny_model import TinyConvNet


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).eval()


def test_conv_net_gets_narrower_with_the_same_output_shape():
    model = conv_net()
    images = torch.randn(3, 1, 8, 8)
    pruned, report = shrink_channels(model, keep_ratio=0.5)

    assert pruned(images).shape == model(images).shape == (3, 10)
    assert pruned[0].out_channels == 4
    assert pruned[1].num_features == 4
    assert pruned[5].in_features == 4 * 4 * 4
    assert pruned[5].out_features == 10  # the model's output keeps its width
    assert report.layers == ("0",)
    assert report.params_before == count_parameters(model)
    assert report.params_after == count_parameters(pruned) < count_parameters(model)


def test_the_original_model_is_left_untouched():
    model = conv_net()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    shrink_channels(model, keep_ratio=0.5)
    assert model[0].out_channels == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_conv_chain_keeps_batch_norm_statistics_of_the_kept_channels():
    model = TinyConvNet().eval()
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.copy_(torch.arange(4.0))
        bn.running_var.copy_(torch.arange(1.0, 5.0))
        # make channels 1 and 3 of the first conv the most important (largest L1 norm)
        model.features[0].weight[[1, 3]] *= 100
    pruned, report = shrink_channels(model, keep_ratio=0.5)

    assert report.layers == ("features.0", "features.3")
    assert pruned.features[0].out_channels == 2
    assert pruned.features[3].in_channels == 2
    assert pruned.features[3].out_channels == 4
    assert pruned.classifier[1].in_features == 4 * 4 * 4
    assert pruned.features[1].running_mean.tolist() == [1.0, 3.0]
    assert pruned.features[1].running_var.tolist() == [2.0, 4.0]
    assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def mlp_with_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    dead = [1, 3, 5, 7]
    with torch.no_grad():
        model[0].weight[dead] = 0.0
        model[0].bias[dead] = 0.0
        model[0].weight[[0, 2, 4, 6]] += 0.1  # no live unit may have an all-zero row by chance
    return model, dead


def test_shrinking_removes_exactly_the_dead_hidden_units_and_keeps_outputs():
    model, dead = mlp_with_dead_units()
    live = [unit for unit in range(8) if unit not in dead]
    pruned, report = shrink_channels(model, keep_ratio=0.5)

    assert pruned[0].out_features == 4
    assert pruned[2].in_features == 4
    assert torch.equal(pruned[0].weight, model[0].weight[live])
    assert torch.equal(pruned[0].bias, model[0].bias[live])
    assert torch.equal(pruned[2].weight, model[2].weight[:, live])
    assert torch.equal(pruned[2].bias, model[2].bias)
    assert report.params_after == report.params_before - 4 * 6 - 4 - 4 * 3

    inputs = torch.randn(16, 6)
    with torch.no_grad():
        assert torch.allclose(pruned(inputs), model(inputs), atol=1e-6)


class Residual(nn.Module):
    """Every conv feeds a residual add or the output: nothing may lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.relu(self.conv(x)))


def test_residual_net_without_prunable_chain_raises():
    with pytest.raises(CompressionError, match="no prunable layers"):
        shrink_channels(Residual(), keep_ratio=0.5)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.a(x)
        if hidden.sum() > 0:
            hidden = torch.relu(hidden)
        return self.b(hidden)


def test_untraceable_model_raises_compression_error():
    with pytest.raises(CompressionError, match=r"needs a torch\.fx-traceable model"):
        shrink_channels(DataDependent(), keep_ratio=0.5)


@pytest.mark.parametrize("keep_ratio", [0.0, 1.0, -0.5, 1.5])
def test_keep_ratio_must_be_strictly_between_zero_and_one(keep_ratio):
    with pytest.raises(CompressionError, match="keep ratio must be between 0 and 1"):
        shrink_channels(conv_net(), keep_ratio=keep_ratio)


def test_tiny_keep_ratio_keeps_at_least_one_channel():
    pruned, _ = shrink_channels(conv_net(), keep_ratio=0.01)
    assert pruned[0].out_channels == 1
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)
