"""Structured channel surgery: physically remove output channels/neurons from a torch model.

Unstructured masks leave every multiply-add in place, so on CPU they buy no speed. This module
instead finds, with ``torch.fx``, each Conv/Linear layer whose output flows into exactly one
next Conv/Linear through channel-wise operations only (BatchNorm, activations, pooling, dropout,
flatten), keeps its most important channels by L1 norm, and rebuilds the layers smaller: the
producer loses output channels, the BatchNorms in between lose features, and the consumer loses
the matching input channels. Layers feeding a model output, a residual add or a concatenation
keep their width, so the model's behaviour at its boundaries is unchanged.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gearbox.compression.errors import CompressionError

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASSTHROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_PASSTHROUGH_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
}
_PASSTHROUGH_METHODS = {"relu", "sigmoid", "tanh"}


@dataclass(frozen=True)
class _Link:
    """``producer`` feeds ``consumer`` through ``batch_norms`` and shape-preserving ops."""

    producer: str
    consumer: str
    batch_norms: tuple[str, ...]
    flattened: bool


@dataclass(frozen=True)
class SurgeryReport:
    layers: tuple[str, ...]
    params_before: int
    params_after: int


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.Flatten) and module.start_dim == 1
    start_dim = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    if node.op == "call_function" and node.target is torch.flatten:
        return start_dim == 1
    return node.op == "call_method" and node.target == "flatten" and start_dim == 1


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def _follow(start: fx.Node, modules: dict[str, nn.Module]) -> _Link | None:
    node, batch_norms, flattened = start, [], False
    while True:
        users = list(node.users)
        if len(users) != 1 or users[0].args[:1] != (node,):
            return None
        node = users[0]
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _PRODUCERS):
            features_in = flattened or isinstance(modules[start.target], nn.Linear)
            if isinstance(module, nn.Linear) != features_in:
                return None
            if getattr(module, "groups", 1) != 1:
                return None
            return _Link(start.target, node.target, tuple(batch_norms), flattened)
        if isinstance(module, _BATCH_NORMS):
            batch_norms.append(node.target)
        elif _is_flatten(node, modules) and not flattened:
            flattened = True
        elif not _is_passthrough(node, modules):
            return None


def _find_links(model: nn.Module) -> list[_Link]:
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:
        raise CompressionError(
            f"structured pruning needs a torch.fx-traceable model: {type(exc).__name__}: {exc}"
        ) from exc
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    links = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        if not isinstance(modules[node.target], _PRODUCERS):
            continue
        if getattr(modules[node.target], "groups", 1) != 1:
            continue
        link = _follow(node, modules)
        if link is None:
            continue
        if all(calls[name] == 1 for name in (link.consumer, *link.batch_norms)):
            links.append(link)
    return links


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _keep_indices(module: nn.Module, keep_ratio: float) -> torch.Tensor:
    importance = module.weight.detach().abs().flatten(1).sum(dim=1)
    keep = max(1, math.ceil(_out_channels(module) * keep_ratio))
    return torch.sort(torch.topk(importance, keep).indices).values


def _rebuild_layer(
    module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None
) -> nn.Module:
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if out_keep is not None:
        weight = weight[out_keep]
        bias = None if bias is None else bias[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    if isinstance(module, nn.Linear):
        rebuilt: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        rebuilt = type(module)(
            weight.shape[1],
            weight.shape[0],
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=bias is not None,
            padding_mode=module.padding_mode,
        )
    rebuilt = rebuilt.to(dtype=weight.dtype)
    with torch.no_grad():
        rebuilt.weight.copy_(weight)
        if bias is not None:
            rebuilt.bias.copy_(bias)
    return rebuilt


def _rebuild_batch_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    rebuilt = type(module)(
        len(keep),
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    with torch.no_grad():
        if module.affine:
            rebuilt.weight.copy_(module.weight[keep])
            rebuilt.bias.copy_(module.bias[keep])
        if module.track_running_stats:
            rebuilt.running_mean.copy_(module.running_mean[keep])
            rebuilt.running_var.copy_(module.running_var[keep])
            rebuilt.num_batches_tracked.copy_(module.num_batches_tracked)
    return rebuilt


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def shrink_channels(model: nn.Module, keep_ratio: float) -> tuple[nn.Module, SurgeryReport]:
    """Return a physically narrower copy of ``model`` keeping ``keep_ratio`` of each prunable
    layer's channels (the most important by L1 norm), and a report of what changed."""
    if not 0.0 < keep_ratio < 1.0:
        raise CompressionError(f"keep ratio must be between 0 and 1, got {keep_ratio}")
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    links = []
    for link in _find_links(pruned):
        consumer = modules[link.consumer]
        channels = _out_channels(modules[link.producer])
        if link.flattened and consumer.in_features % channels != 0:
            continue  # the flatten mixes channels with something other than whole feature maps
        links.append(link)
    if not links:
        raise CompressionError(
            "no prunable layers: structured pruning needs Conv/Linear layers that feed one "
            "another through channel-wise operations only"
        )

    out_keep = {link.producer: _keep_indices(modules[link.producer], keep_ratio) for link in links}
    in_keep: dict[str, torch.Tensor] = {}
    for link in links:
        channels = out_keep[link.producer]
        keep = channels
        if link.flattened:
            per_channel = modules[link.consumer].in_features // _out_channels(
                modules[link.producer]
            )
            keep = (channels[:, None] * per_channel + torch.arange(per_channel)[None, :]).flatten()
        in_keep[link.consumer] = keep
        for bn_name in link.batch_norms:
            _replace(pruned, bn_name, _rebuild_batch_norm(modules[bn_name], channels))

    for name in sorted(set(out_keep) | set(in_keep)):
        _replace(pruned, name, _rebuild_layer(modules[name], out_keep.get(name), in_keep.get(name)))

    report = SurgeryReport(
        layers=tuple(sorted(out_keep)),
        params_before=count_parameters(model),
        params_after=count_parameters(pruned),
    )
    return pruned, report
