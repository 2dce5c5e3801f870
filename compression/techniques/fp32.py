"""``fp32``: the trained model exported to ONNX, optimised and verified against torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gearbox.compression.onnx_export import export_described
from gearbox.compression.surgery import count_parameters
from gearbox.compression.techniques.base import CompressedModel, TechniqueConfig, TechniqueInput
from gearbox.compression.techniques.registry import register_technique


@dataclass(frozen=True)
class Fp32Config(TechniqueConfig):
    technique: ClassVar[str] = "export"
    name: str = "fp32"


@register_technique(Fp32Config)
def export_fp32(config: Fp32Config, inputs: TechniqueInput) -> CompressedModel:
    inputs.report("exporting to ONNX", 0.1)
    exported = export_described(inputs.reference_model, inputs.spec, inputs.data.heldout)
    return CompressedModel(
        onnx=exported.onnx,
        param_count=count_parameters(inputs.reference_model),
        params=dict(exported.description),
    )
