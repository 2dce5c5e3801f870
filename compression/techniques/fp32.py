"""``fp32``: the trained model exported to ONNX, optimised and verified against torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from gearbox.compression.techniques.base import TechniqueConfig, TechniqueInput, TransformedModel
from gearbox.compression.techniques.registry import register_technique


@dataclass(frozen=True)
class Fp32Config(TechniqueConfig):
    technique: ClassVar[str] = "export"
    name: str = "fp32"


@register_technique(Fp32Config)
def keep_reference(
    config: Fp32Config, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    """The reference as it is: Gearbox's standard export is the whole technique."""
    return TransformedModel(model=model, details={})
