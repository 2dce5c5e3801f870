"""``pruned``: structured pruning that physically removes channels, attention heads and
feed-forward neurons, then fine-tuning.

Masking weights leaves every multiply-add in place, so on CPU it buys no speed; removing whole
channels leaves a smaller dense network that runs faster everywhere. What makes this hard is
coupling: a residual add ties the channels of every layer that feeds it, a BatchNorm follows
its convolution, an attention head spans the query, key and value projections and the rows of
the output projection. Torch-Pruning's DepGraph (Fang et al., CVPR 2023) traces the model
through autograd and groups every parameter slice that must go together, so each group is
ranked by one importance score (the norm of all its slices) and removed as a whole.

Groups that reach the model's output (a classifier's logits, a transformer's hidden size that
its embedding returns) are left whole, so the signature is unchanged; the model's inputs are
never pruned. Hugging Face BERT-style attention loses whole heads (its head size is fixed by
the ``view`` in its forward). Where Torch-Pruning cannot trace the whole model (its forward
leaves autograd, the trace fails, or the pruned model no longer runs), the hand-written
:func:`gearbox.compression.surgery.shrink_channels` prunes it instead and ``details`` says why.

The pruned network is then fine-tuned: a classifier on its labels, an encoder on its
reference's embeddings and layer outputs (it has no labels).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from torch import nn

from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.spec import ModelSpec, TrainingConfig
from gearbox.compression.surgery import count_parameters, shrink_channels
from gearbox.compression.techniques.base import (
    ProgressFn,
    TechniqueConfig,
    TechniqueInput,
    TransformedModel,
    check_fine_tuning,
)
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import (
    default_finetune_epochs,
    fine_tune,
    first_output,
    model_inputs,
)

Criterion = Literal["l1-norm", "l2-norm"]

TORCH_PRUNING = f"torch-pruning {version('torch-pruning')} BasePruner (DepGraph)"
SURGERY = "gearbox shrink_channels (torch.fx surgery)"
ENCODER_LAYER_LOSS_WEIGHT = 1.0
"""A pruned encoder keeps every layer and its hidden size, so each of its layers can be matched
to the reference's own: the layer loss gives a target per token and per layer, not one per
sentence (see :func:`gearbox.compression.training.layer_loss`)."""
_PROJECTIONS = ("query", "key", "value")
_WEIGHTED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class PrunedConfig(TechniqueConfig):
    technique: ClassVar[str] = "prune"
    name: str = "pruned"
    amount: float = 0.5
    """Fraction of each prunable group's channels (and of each attention's heads) removed."""
    criterion: Criterion = "l1-norm"
    """Importance of a channel: the L1 or L2 norm of every weight slice in its group."""
    prune_heads: bool = True
    """Remove whole attention heads; False leaves attention as it is."""
    iterative_steps: int = 1
    """Reach ``amount`` in this many equal steps, fine-tuning after each."""
    finetune_epochs: int | None = None
    """Default: a third of the model's training epochs, at least one; split over the steps."""
    finetune_learning_rate_scale: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.amount < 1.0:
            raise InvalidArgumentError(f"pruning amount must be in (0, 1), got {self.amount}")
        if self.criterion not in ("l1-norm", "l2-norm"):
            raise InvalidArgumentError(
                f"pruning criterion must be 'l1-norm' or 'l2-norm', got {self.criterion!r}"
            )
        if self.iterative_steps < 1:
            raise InvalidArgumentError(
                f"pruning needs iterative_steps >= 1, got {self.iterative_steps}"
            )
        check_fine_tuning("pruned", self.finetune_epochs, self.finetune_learning_rate_scale)


class _CannotTrace(Exception):
    """Torch-Pruning cannot prune this model; the message says why."""


@dataclass(frozen=True)
class _Widths:
    """Output width of every Conv/Linear layer and head count of every attention module."""

    channels: dict[str, int]
    heads: dict[str, int]

    @staticmethod
    def of(model: nn.Module) -> _Widths:
        channels = {
            name: module.weight.shape[0]
            for name, module in model.named_modules()
            if isinstance(module, _WEIGHTED_LAYERS)
        }
        heads = {name: module.num_attention_heads for name, module in _attentions(model)}
        return _Widths(channels, heads)


def _attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Hugging Face BERT-style self-attention: query/key/value Linears and a head count."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "num_attention_heads", None), int)
        and all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJECTIONS)
    ]


def _executed_layers(model: nn.Module, example: Sequence[torch.Tensor]) -> list[nn.Module]:
    ran: list[nn.Module] = []
    hooks = [
        module.register_forward_hook(lambda module, args, output: ran.append(module))
        for module in model.modules()
        if isinstance(module, _WEIGHTED_LAYERS)
    ]
    try:
        with torch.no_grad():
            model.eval()(*example)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(ran))


def _importance(criterion: Criterion) -> tp.importance.Importance:
    return tp.importance.MagnitudeImportance(p=1 if criterion == "l1-norm" else 2)


def _build_pruner(
    model: nn.Module, example: Sequence[torch.Tensor], config: PrunedConfig
) -> tp.pruner.BasePruner:
    attentions = [module for _, module in _attentions(model)]
    projections = [getattr(module, p) for module in attentions for p in _PROJECTIONS]
    try:
        # Torch-Pruning warns about every op it treats as element-wise; a missed layer is
        # caught below by name instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                model,
                tuple(example),
                importance=_importance(config.criterion),
                pruning_ratio=config.amount,
                iterative_steps=config.iterative_steps,
                # A head's query, key and value rows go together; its size stays what the
                # attention's forward reshapes to.
                num_heads={
                    getattr(module, p): module.num_attention_heads
                    for module in attentions
                    for p in _PROJECTIONS
                },
                prune_num_heads=config.prune_heads,
                prune_head_dims=False,
                head_pruning_ratio=config.amount if config.prune_heads else 0.0,
                # Without head pruning the projections keep their width: narrower heads would
                # no longer match the head size the attention's forward reshapes to.
                ignored_layers=[] if config.prune_heads else projections,
            )
    except Exception as exc:
        raise _CannotTrace(
            f"Torch-Pruning could not trace the model: {type(exc).__name__}: {exc}"
        ) from exc
    traced = set(pruner.DG.module2node)
    names = {module: name for name, module in model.named_modules()}
    missed = [names[m] for m in _executed_layers(model, example) if m not in traced]
    if missed:
        raise _CannotTrace(
            "Torch-Pruning's autograd trace misses layers that run in forward "
            f"({', '.join(missed)}): the forward leaves autograd (detach, no_grad, numpy) "
            "between them and the output"
        )
    return pruner


def _reaches_output(group: tp.dependency.Group, graph: tp.DependencyGraph) -> bool:
    """Whether pruning ``group`` would narrow one of the model's outputs: some node it prunes
    along its output channels feeds nothing else (the final layer, or the output itself)."""
    return any(
        not dep.target.outputs and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group
    )


def _prune_step(pruner: tp.pruner.BasePruner, model: nn.Module) -> None:
    for group in pruner.step(interactive=True):
        if not _reaches_output(group, pruner.DG):
            group.prune()
    for _, attention in _attentions(model):
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features
    # Every layer loses the same number of heads; the shared config says how many are left,
    # as the exporter's attention fusion reads it there.
    counts = {module.num_attention_heads for _, module in _attentions(model)}
    for _, attention in _attentions(model):
        config = getattr(attention, "config", None)
        if len(counts) == 1 and hasattr(config, "num_attention_heads"):
            config.num_attention_heads = attention.num_attention_heads


def _output_shapes(model: nn.Module, example: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    with torch.no_grad():
        return tuple(first_output(model.eval()(*example)).shape)


def _monotonic(report: ProgressFn) -> ProgressFn:
    """Progress never goes back, not even when a failed Torch-Pruning step hands over to the
    fallback surgery."""
    reached = 0.0

    def monotonic_report(stage: str, fraction: float) -> None:
        nonlocal reached
        reached = max(reached, fraction)
        report(stage, reached)

    return monotonic_report


def _finetune_training(spec: ModelSpec) -> TrainingConfig:
    if spec.task == "classification":
        return spec.training or TrainingConfig()
    return spec.training or spec.student_training or TrainingConfig()


def _finetune(
    model: nn.Module,
    inputs: TechniqueInput,
    config: PrunedConfig,
    epochs: int,
    progress: tuple[float, float],
    what: str,
    report: ProgressFn,
) -> None:
    spec = inputs.spec
    training = _finetune_training(spec)
    learning_rate = training.learning_rate * config.finetune_learning_rate_scale
    start, end = progress

    def on_epoch(done: int, total: int) -> None:
        report(f"{what}: fine-tuning epoch {done}/{total}", start + (end - start) * done / total)

    # A classifier trains on its labels; an encoder, which has none, on the reference.
    fine_tune(
        model,
        inputs.reference_model,
        spec,
        inputs.data.train,
        training,
        epochs,
        learning_rate,
        on_epoch,
        hidden_weight=ENCODER_LAYER_LOSS_WEIGHT,
    )


def _what_was_removed(before: _Widths, after: _Widths, model: nn.Module) -> dict[str, int]:
    projections = {f"{name}.{p}" for name, _ in _attentions(model) for p in _PROJECTIONS}
    narrowed = [n for n, width in after.channels.items() if width < before.channels[n]]
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    removed = {
        "pruned_layers": len(narrowed),
        "removed_channels": sum(
            before.channels[n] - after.channels[n] for n in narrowed if n in convs
        ),
        "removed_neurons": sum(
            before.channels[n] - after.channels[n]
            for n in narrowed
            if n not in convs and n not in projections
        ),
    }
    if before.heads:
        removed["heads_before"] = sum(before.heads.values())
        removed["removed_heads"] = sum(before.heads[n] - after.heads[n] for n in after.heads)
    return removed


@register_technique(PrunedConfig)
def prune_structured(
    config: PrunedConfig, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    """Torch-Pruning where its trace covers the whole model, else the fallback surgery on an
    untouched copy; fine-tuning after each pruning step."""
    spec = inputs.spec
    example = model_inputs(spec, inputs.data.train.take(2))
    params_before = count_parameters(model)
    before = _Widths.of(model)
    expected_shape = _output_shapes(model, example)
    training = _finetune_training(spec)
    epochs = default_finetune_epochs(training, config.finetune_epochs, 3)

    report = _monotonic(inputs.report)
    report("tracing channel dependencies", 0.02)
    untouched = copy.deepcopy(model)
    fallback_reason: str | None = None
    try:
        pruner = _build_pruner(model, example, config)
        steps = config.iterative_steps
        step_epochs = max(1, math.ceil(epochs / steps))
        for step in range(steps):
            start, end = 0.05 + 0.75 * step / steps, 0.05 + 0.75 * (step + 1) / steps
            what = f"pruning step {step + 1}/{steps}"
            report(what, start)
            _prune_step(pruner, model)
            try:
                shape = _output_shapes(model, example)
            except Exception as exc:
                raise _CannotTrace(
                    f"the model no longer ran after Torch-Pruning: {type(exc).__name__}: {exc}"
                ) from exc
            if shape != expected_shape:
                raise _CannotTrace(
                    f"Torch-Pruning changed the output shape from {expected_shape} to {shape}"
                )
            _finetune(model, inputs, config, step_epochs, (start + 0.05 / steps, end), what, report)
        pruned, pruner_name, epochs = model, TORCH_PRUNING, step_epochs * steps
    except _CannotTrace as reason:
        fallback_reason = str(reason)
        try:
            pruned, _ = shrink_channels(untouched, keep_ratio=1.0 - config.amount)
        except CompressionError as exc:
            raise CompressionError(
                f"{fallback_reason}; the fallback surgery failed too: {exc}"
            ) from exc
        pruner_name, steps = SURGERY, 1
        report("removing channels (fallback surgery)", 0.05)
        _finetune(pruned, inputs, config, epochs, (0.1, 0.8), "surgery", report)

    details: dict[str, Any] = {
        "pruner": pruner_name,
        **({"fallback_reason": fallback_reason} if fallback_reason else {}),
        "criterion": config.criterion if fallback_reason is None else "l1-norm",
        "amount": config.amount,
        "iterative_steps": steps,
        **_what_was_removed(before, _Widths.of(pruned), pruned),
        "params_before": params_before,
        "params_after": count_parameters(pruned),
        "finetune_epochs": epochs,
    }
    return TransformedModel(model=pruned, details=details)
