"""``pruned``: structured pruning that physically removes channels, then fine-tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.spec import TrainingConfig
from gearbox.compression.surgery import shrink_channels
from gearbox.compression.techniques.base import TechniqueConfig, TechniqueInput, TransformedModel
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import fit


@dataclass(frozen=True)
class PrunedConfig(TechniqueConfig):
    technique: ClassVar[str] = "prune"
    name: str = "pruned"
    amount: float = 0.5
    """Fraction of each prunable layer's channels removed."""
    finetune_epochs: int | None = None
    """Default: a third of the model's training epochs, at least one."""
    finetune_learning_rate_scale: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.amount < 1.0:
            raise InvalidArgumentError(f"pruning amount must be in (0, 1), got {self.amount}")


@register_technique(PrunedConfig)
def prune_structured(
    config: PrunedConfig, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    inputs.report("removing channels", 0.05)
    pruned, surgery = shrink_channels(model, keep_ratio=1.0 - config.amount)
    training = inputs.spec.training or TrainingConfig()
    epochs = config.finetune_epochs or max(1, math.ceil(training.epochs / 3))
    fit(
        pruned,
        inputs.spec,
        inputs.data.train,
        training,
        epochs=epochs,
        learning_rate=training.learning_rate * config.finetune_learning_rate_scale,
        on_epoch=lambda done, total: inputs.report(
            f"fine-tuning epoch {done}/{total}", 0.1 + 0.7 * done / total
        ),
    )
    return TransformedModel(
        model=pruned,
        details={
            "amount": config.amount,
            "criterion": "l1-norm",
            "pruned_layers": len(surgery.layers),
            "params_before": surgery.params_before,
            "finetune_epochs": epochs,
        },
    )
