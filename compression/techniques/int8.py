"""``int8``: ONNX Runtime quantisation of a parent variant's artifact.

Static QDQ quantisation, calibrated on the provider's calibration split, suits convolutional
models (activations quantised too, so ORT runs QLinearConv on VNNI). Linear-heavy models with
dynamic activation ranges (transformers) get dynamic quantisation of weights instead.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.spec import Split
from gearbox.compression.techniques.base import CompressedModel, TechniqueConfig, TechniqueInput
from gearbox.compression.techniques.registry import register_technique

_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class Int8Config(TechniqueConfig):
    technique: ClassVar[str] = "quantize"
    name: str = "int8"
    parent: str | None = "fp32"
    mode: Literal["auto", "static", "dynamic"] = "auto"
    calibration_method: str = "minmax"
    calibration_batch_size: int = 32
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "static", "dynamic"):
            raise InvalidArgumentError(
                f"int8 mode must be auto, static or dynamic, not {self.mode}"
            )
        if self.calibration_method not in _CALIBRATION_METHODS:
            known = ", ".join(_CALIBRATION_METHODS)
            raise InvalidArgumentError(
                f"unknown calibration method '{self.calibration_method}' (known: {known})"
            )


class _SplitReader(CalibrationDataReader):
    def __init__(self, split: Split, batch_size: int) -> None:
        self._batches = iter(
            [split.take(batch_size, offset) for offset in range(0, len(split), batch_size)]
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def choose_mode(model: onnx.ModelProto) -> Literal["static", "dynamic"]:
    """Static for convolutional graphs, dynamic for Linear-heavy ones."""
    op_types = {node.op_type for node in model.graph.node}
    return "static" if op_types & {"Conv", "ConvTranspose"} else "dynamic"


@register_technique(Int8Config)
def quantize_int8(config: Int8Config, inputs: TechniqueInput) -> CompressedModel:
    assert inputs.parent_artifact is not None  # apply_technique checks this
    parent = onnx.load_from_string(inputs.parent_artifact)
    mode = choose_mode(parent) if config.mode == "auto" else config.mode
    calibration = inputs.data.calibration
    params: dict[str, object] = {
        "mode": mode,
        "weight_type": "int8",
        "per_channel": config.per_channel,
    }
    with tempfile.TemporaryDirectory(prefix="gearbox-int8-") as workdir:
        source = os.path.join(workdir, "parent.onnx")
        prepared = os.path.join(workdir, "prepared.onnx")
        target = os.path.join(workdir, "int8.onnx")
        with open(source, "wb") as f:
            f.write(inputs.parent_artifact)
        try:
            inputs.report("preparing graph for quantization", 0.2)
            quant_pre_process(source, prepared, skip_symbolic_shape=False)
            if mode == "static":
                inputs.report(f"calibrating on {len(calibration)} samples", 0.4)
                quantize_static(
                    prepared,
                    target,
                    _SplitReader(calibration, config.calibration_batch_size),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=config.per_channel,
                    calibrate_method=_CALIBRATION_METHODS[config.calibration_method],
                )
                params.update(
                    format="QDQ",
                    activation_type="uint8",
                    calibration_method=config.calibration_method,
                    calibration_samples=len(calibration),
                )
            else:
                inputs.report("quantizing weights", 0.4)
                quantize_dynamic(
                    prepared, target, weight_type=QuantType.QInt8, per_channel=config.per_channel
                )
        except CompressionError:
            raise
        except Exception as exc:
            raise CompressionError(
                f"model '{inputs.spec.name}': int8 quantization ({mode}) failed: {exc}"
            ) from exc
        with open(target, "rb") as f:
            artifact = f.read()
    return CompressedModel(
        onnx=artifact,
        param_count=inputs.parent_param_count or 0,
        params=params,
    )
