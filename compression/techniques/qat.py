"""``qat``: quantisation-aware fine-tuning, exported as an INT8 QDQ graph.

Post-training quantisation (``int8`` static) rounds a model that never saw rounding; QAT
fine-tunes it with the rounding in the forward pass, so the weights learn to sit where INT8
loses least. Each batch-normalisation is first folded into the convolution (or linear layer)
before it, because ONNX Runtime folds it too: quantising the unfolded weights would train
against numbers the served graph never uses.

Weights are fake-quantised to int8 (seven bits used, see ``WEIGHT_LEVELS``), symmetric, per
output channel (the scale follows the weights as they train); activations to uint8, affine,
per tensor, at the input and output of each convolution and linear layer. Activation ranges
start as the minimum and maximum over the calibration split and are then tracked as moving
averages of each training batch's. Rounding uses ``torch.fake_quantize_per_*_affine``
(straight-through gradients). Biases are rounded to int32 at the input scale times the weight
scale, as ONNX Runtime's integer kernels add them.

An output quantiser is placed after the ReLU that follows a layer, not between the two, and
one range serves a tensor across max-pooling, flattening and dropout: that is the QDQ pattern
ONNX Runtime fuses into ``QLinearConv``/``QGemm`` (the ReLU dropped into the uint8 clamp,
max-pooling run in uint8).

The torch model exports with the TorchScript exporter (which turns each fake-quantise op into
a QuantizeLinear/DequantizeLinear pair carrying the trained scale and zero point); the export
is then rewritten so weights are stored as int8 and biases as int32 initializers behind their
DequantizeLinear, and checked against the fake-quantised torch model on the held-out split.

The variant must beat ``int8-static`` on quality to be worth its training, so the handler also
builds that baseline from the same reference and records both qualities.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from gearbox.compression.devices import CPU, DISABLED_OPTIMIZERS
from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.evaluation import evaluate_quality
from gearbox.compression.onnx_export import export_described, export_torchscript, run_onnx
from gearbox.compression.quality import get_metric
from gearbox.compression.spec import ModelSpec, Split, TrainingConfig
from gearbox.compression.techniques.base import TechniqueConfig, TechniqueInput, TransformedModel
from gearbox.compression.techniques.int8 import Int8Config, quantize_int8
from gearbox.compression.techniques.registry import register_technique
from gearbox.compression.training import (
    default_finetune_epochs,
    fine_tune,
    model_inputs,
    predict,
)

QDQ_OPSET = 17
"""Per-channel QuantizeLinear needs opset 13; 17 is what the other TorchScript exports use."""

WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
"""int8 weights as stored. The exporter maps fake-quantisation to ONNX only for the
(-128, 127) and (0, 255) ranges."""
WEIGHT_LEVELS = 63
"""The symmetric weight scale is max |w| / 63, so trained weights use 7 of int8's 8 bits
(ONNX Runtime's ``reduce_range``). x86 CPUs without VNNI multiply uint8 activations by int8
weights with an instruction that adds pairs of products into int16 and saturates: with full
range weights (255 x 127 x 2 > 32,767) the served graph then differs from the trained one on
such a CPU. Seven bits keep every pair in range, so the artifact gives the same answer on any
x86 CPU it is served on."""
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

MAX_DIFFERENCE_STEPS = 8.0
"""How far, in quantisation steps of the output, ONNX Runtime's integer kernels may land from
the fake-quantised torch model: requantising an intermediate tensor can round one step the
other way, and such a step spreads through the layers after it."""

FUSED_INTEGER_OPERATORS = frozenset(
    {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "QAttention"}
)
"""Operators that show ONNX Runtime runs a layer in integer arithmetic."""

_RANGE_PRESERVING = (
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
)
"""Modules after which a quantised tensor is still on the same grid in inference: the next
layer's input can reuse its range, and ONNX Runtime runs them on the integers."""
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class QatConfig(TechniqueConfig):
    technique: ClassVar[str] = "qat"
    name: str = "qat"
    epochs: int | None = None
    """Default: a third of the model's training epochs, at least one."""
    learning_rate_scale: float = 0.1
    """Fine-tuning learning rate relative to the model's training one."""
    soft_weight: float = 0.5
    """Weight of distillation from the reference's softened outputs (the labels get the
    rest); 0 fine-tunes on the labels alone."""
    temperature: float = 2.0
    range_momentum: float = 0.05
    """How much each training batch moves an activation's tracked range."""

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise InvalidArgumentError(f"qat epochs must be at least 1, got {self.epochs}")
        if not 0.0 < self.learning_rate_scale <= 10.0:
            raise InvalidArgumentError(
                f"qat learning_rate_scale must lie in (0, 10], got {self.learning_rate_scale}"
            )
        if not 0.0 <= self.soft_weight <= 1.0:
            raise InvalidArgumentError(
                f"qat soft_weight must lie in [0, 1], got {self.soft_weight}"
            )
        if self.temperature <= 0:
            raise InvalidArgumentError(f"qat temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.range_momentum <= 1.0:
            raise InvalidArgumentError(
                f"qat range_momentum must lie in (0, 1], got {self.range_momentum}"
            )

    def num_cpus(self, spec: ModelSpec) -> float | None:
        """Fine-tuning trains like the reference, on as many CPUs."""
        return (spec.training or TrainingConfig()).num_cpus


# --- fake quantisation in torch ---------------------------------------------------------------


class ActivationQuantizer(nn.Module):
    """uint8 affine fake quantisation of one tensor, with a tracked range.

    While ``calibrating`` it passes tensors through and widens its range to cover them; in
    training it moves the range towards each batch's; in eval it only rounds, with the scale
    and zero point (buffers, so that the export carries them as constants) it last computed.
    """

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.calibrating = False
        self.observed = False
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(1.0))
        self.register_buffer("scale", torch.tensor(1.0 / ACTIVATION_QMAX))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x, moving=False)
            return x
        if self.training:
            self._observe(x, moving=True)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Rounds ``x`` to this range's grid without observing it."""
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX
        )

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, moving: bool) -> None:
        low, high = x.min().float(), x.max().float()
        if not self.observed:
            self.low.copy_(low)
            self.high.copy_(high)
            self.observed = True
        elif moving:
            self.low.lerp_(low, self.momentum)
            self.high.lerp_(high, self.momentum)
        else:
            self.low.copy_(torch.minimum(self.low, low))
            self.high.copy_(torch.maximum(self.high, high))
        # Zero must be exact (padding, ReLU outputs): the range always includes it.
        low, high = self.low.clamp(max=0.0), self.high.clamp(min=0.0)
        scale = ((high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN)).clamp(min=1e-8)
        self.scale.copy_(scale)
        zero_point = (ACTIVATION_QMIN - low / scale).round().clamp(ACTIVATION_QMIN, ACTIVATION_QMAX)
        self.zero_point.copy_(zero_point.to(torch.int32))


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


class QuantizedLayer(nn.Module):
    """A convolution or linear layer with int8 per-channel weights, its input on the grid of
    an activation quantiser placed before it, and its bias rounded to int32 at input scale x
    weight scale.

    ``rounds_input``: range-preserving modules (max-pooling) lie between that quantiser and
    the layer; the layer rounds its input to the same grid again (a no-op in inference), so
    that the export shows the QuantizeLinear/DequantizeLinear pair ONNX Runtime fuses on.
    """

    def __init__(
        self, layer: nn.Module, input_quantizer: ActivationQuantizer, rounds_input: bool
    ) -> None:
        super().__init__()
        self.layer = layer
        self.input_quantizer = input_quantizer
        self.rounds_input = rounds_input
        channels = layer.weight.shape[0]
        self.register_buffer("weight_scale", torch.ones(channels))
        self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int32))
        self.register_buffer(
            "frozen_bias", None if layer.bias is None else torch.zeros_like(layer.bias)
        )
        self.refresh()

    def _weight_scale(self) -> torch.Tensor:
        weight = self.layer.weight.detach()
        absmax = weight.abs().reshape(len(weight), -1).amax(dim=1)
        return (absmax / WEIGHT_LEVELS).clamp(min=1e-8)

    def _rounded_bias(self, weight_scale: torch.Tensor) -> torch.Tensor | None:
        bias = self.layer.bias
        if bias is None:
            return None
        bias_scale = self.input_quantizer.scale * weight_scale
        steps = _round_straight_through(bias / bias_scale).clamp(INT32_MIN, INT32_MAX)
        return steps * bias_scale

    @torch.no_grad()
    def refresh(self) -> None:
        """Fixes the weight scale and rounded bias that eval mode and the export use."""
        self.weight_scale.copy_(self._weight_scale())
        bias = self._rounded_bias(self.weight_scale)
        if bias is not None:
            self.frozen_bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounds_input:
            x = self.input_quantizer.quantize(x)
        if self.training:
            # The scales follow the weights and ranges as they train.
            weight_scale = self._weight_scale()
            self.weight_scale.copy_(weight_scale)
            bias = self._rounded_bias(weight_scale)
        else:
            weight_scale, bias = self.weight_scale, self.frozen_bias
        weight = torch.fake_quantize_per_channel_affine(
            self.layer.weight, weight_scale, self.weight_zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
        )
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return self.layer._conv_forward(x, weight, bias)


def fold_batch_norms(model: nn.Module) -> int:
    """Folds, in place, every batch normalisation that directly follows a convolution or
    linear layer inside an ``nn.Sequential`` into that layer; returns how many."""
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for before, after in itertools.pairwise(names):
            layer, norm = module._modules[before], module._modules[after]
            if not isinstance(norm, _BATCH_NORMS) or not norm.track_running_stats:
                continue
            if isinstance(layer, _CONVOLUTIONS):
                module._modules[before] = fuse_conv_bn_eval(layer, norm)
            elif isinstance(layer, nn.Linear):
                module._modules[before] = fuse_linear_bn_eval(layer, norm)
            else:
                continue
            module._modules[after] = nn.Identity()
            folded += 1
    return folded


def _is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (*_CONVOLUTIONS, nn.Linear))


def _quantize_sequential(sequential: nn.Sequential, momentum: float) -> int:
    """Rewrites the children of ``sequential`` in place so that each layer's input is on an
    activation quantiser's grid and its output (after its ReLU, if one follows) gets one of
    its own; returns how many layers it quantised.

    A layer whose input comes through range-preserving modules only reuses the quantiser
    before them; without one, a new quantiser goes before those modules, so that it observes
    the tensor as inference sees it (dropout scales it up in training).
    """
    children = list(sequential._modules.items())
    rewritten: list[tuple[str, nn.Module]] = []
    current: ActivationQuantizer | None = None
    """The quantiser whose grid the running tensor is on, if any."""
    preserved_since: int | None = 0
    """Where in ``rewritten`` the range-preserving modules before the running tensor start."""
    quantized = 0
    index = 0
    while index < len(children):
        name, child = children[index]
        index += 1
        if not _is_quantizable(child):
            quantized += _quantize_tree(child, momentum)
            if not isinstance(child, _RANGE_PRESERVING):
                current, preserved_since = None, None
            elif preserved_since is None:
                preserved_since = len(rewritten)
            rewritten.append((name, child))
            continue
        rounds_input = preserved_since != len(rewritten)
        if current is None:
            current = ActivationQuantizer(momentum)
            start = len(rewritten) if preserved_since is None else preserved_since
            rewritten.insert(start, (f"{name}_input_quantizer", current))
        rewritten.append((name, QuantizedLayer(child, current, rounds_input)))
        quantized += 1
        current = ActivationQuantizer(momentum)
        # A folded normalisation leaves an Identity between the layer and its ReLU.
        after = index
        while after < len(children) and isinstance(children[after][1], nn.Identity):
            after += 1
        if after < len(children) and isinstance(children[after][1], (nn.ReLU, nn.ReLU6)):
            rewritten += children[index:after]
            relu_name, relu = children[after]
            index = after + 1
            rewritten.append((relu_name, nn.Sequential(relu, current)))
        else:
            layer_name, layer = rewritten.pop()
            rewritten.append((layer_name, nn.Sequential(layer, current)))
        preserved_since = len(rewritten)
    sequential._modules.clear()
    sequential._modules.update(rewritten)
    return quantized


def _quantize_tree(module: nn.Module, momentum: float) -> int:
    """Quantises every convolution and linear layer below ``module``; returns how many."""
    if isinstance(module, nn.Sequential):
        return _quantize_sequential(module, momentum)
    quantized = 0
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if _is_quantizable(child):
            # No neighbours known: the layer's own input and output ranges.
            input_quantizer = ActivationQuantizer(momentum)
            module._modules[name] = nn.Sequential(
                input_quantizer,
                QuantizedLayer(child, input_quantizer, rounds_input=False),
                ActivationQuantizer(momentum),
            )
            quantized += 1
        else:
            quantized += _quantize_tree(child, momentum)
    return quantized


def _quantizers(model: nn.Module) -> Iterator[ActivationQuantizer]:
    return (module for module in model.modules() if isinstance(module, ActivationQuantizer))


def _quantized_layers(model: nn.Module) -> Iterator[QuantizedLayer]:
    return (module for module in model.modules() if isinstance(module, QuantizedLayer))


@torch.no_grad()
def calibrate(model: nn.Module, spec: ModelSpec, split: Split, batch_size: int = 256) -> None:
    """Sets every activation range to the extremes of the float model's tensors on ``split``."""
    quantizers = list(_quantizers(model))
    for quantizer in quantizers:
        quantizer.calibrating = True
    model.eval()
    try:
        for offset in range(0, len(split), batch_size):
            model(*model_inputs(spec, split.take(batch_size, offset)))
    finally:
        for quantizer in quantizers:
            quantizer.calibrating = False
    for layer in _quantized_layers(model):
        layer.refresh()


def prepare(model: nn.Module, momentum: float) -> tuple[int, int]:
    """Folds batch normalisations and wraps every layer for QAT, in place; returns how many
    normalisations were folded and how many layers quantised."""
    model.eval()
    folded = fold_batch_norms(model)
    quantized = _quantize_tree(model, momentum)
    return folded, quantized


# --- export -----------------------------------------------------------------------------------


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        # The exporter shares equal constants (zero points) through Identity nodes.
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _per_axis(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Per-channel parameters shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if values.ndim == 0:
        return values
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def store_integer_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrites ``model`` in place so that each constant weight is stored as int8 behind its
    DequantizeLinear, instead of as float32 behind a QuantizeLinear, and each convolution or
    Gemm bias as int32 (at input scale x weight scale) behind a DequantizeLinear of its own;
    returns how many weights and biases it rewrote."""
    graph = model.graph
    constants = _constant_values(graph)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in graph.node for output in node.output}

    def axis_of(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    removed: set[int] = set()
    added: list[onnx.TensorProto] = []
    weights = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        if not all(c.op_type == "DequantizeLinear" for c in consumers[node.output[0]]):
            continue
        weight = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
        scale, zero_point = constants[node.input[1]], constants[node.input[2]]
        axis = axis_of(node) % weight.ndim
        # torch's fake-quantisation multiplies by the reciprocal: the same integers as torch.
        inverse = np.float32(1.0) / _per_axis(scale.astype(np.float32), weight.ndim, axis)
        steps = np.rint(weight * inverse) + _per_axis(zero_point, weight.ndim, axis)
        info = np.iinfo(zero_point.dtype)
        stored = np.clip(steps, info.min, info.max).astype(zero_point.dtype)
        name = f"{node.input[0]}_quantized"
        added.append(numpy_helper.from_array(stored, name))
        for consumer in consumers[node.output[0]]:
            consumer.input[0] = name
        removed.add(id(node))
        weights += 1

    def dequantized(name: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    new_nodes: list[onnx.NodeProto] = []
    biases = 0
    for node in graph.node:
        if id(node) in removed:
            continue
        activation = dequantized(node.input[0]) if node.input else None
        weight = dequantized(node.input[1]) if len(node.input) > 1 else None
        if (
            node.op_type in ("Conv", "Gemm")
            and len(node.input) > 2
            and node.input[2] in initializers
            and activation is not None
            and weight is not None
            and activation.input[1] in constants
            and weight.input[1] in constants
            and constants[activation.input[1]].size == 1
        ):
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            scale = (
                constants[activation.input[1]].astype(np.float32).reshape(())
                * constants[weight.input[1]].astype(np.float32)
            ).astype(np.float32)
            scale = np.broadcast_to(scale, bias.shape).copy()
            steps = np.clip(np.rint(bias / scale), INT32_MIN, INT32_MAX).astype(np.int32)
            prefix = node.input[2]
            added += [
                numpy_helper.from_array(steps, f"{prefix}_quantized"),
                numpy_helper.from_array(scale, f"{prefix}_scale"),
                numpy_helper.from_array(np.zeros_like(steps), f"{prefix}_zero_point"),
            ]
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{prefix}_quantized", f"{prefix}_scale", f"{prefix}_zero_point"],
                    [f"{prefix}_dequantized"],
                    name=f"{prefix}_DequantizeLinear",
                    axis=0,
                )
            )
            node.input[2] = f"{prefix}_dequantized"
            biases += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return {"int8_weights": weights, "int32_biases": biases}


def export_qdq(model: nn.Module, spec: ModelSpec, sample: Split) -> tuple[bytes, dict[str, int]]:
    """The fake-quantised ``model`` as a QDQ graph with integer weights and biases."""
    exported = onnx.load_from_string(export_torchscript(model, spec, sample, QDQ_OPSET))
    stored = store_integer_weights(exported)
    onnx.checker.check_model(exported)
    return exported.SerializeToString(), stored


def fused_operators(onnx_bytes: bytes) -> dict[str, int]:
    """How many of each operator the cpu device class's optimised session runs."""
    options = CPU.session_options()
    # Saving warns that the graph is tied to this machine: it is only counted here.
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="gearbox-qat-") as workdir:
        options.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
        ort.InferenceSession(
            onnx_bytes,
            options,
            providers=[CPU.execution_provider],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        optimized = onnx.load(options.optimized_model_filepath)
    return dict(sorted(Counter(node.op_type for node in optimized.graph.node).items()))


def _output_step(onnx_bytes: bytes) -> float | None:
    """The quantisation step of the graph's first output, when a DequantizeLinear with one
    scale produces it."""
    graph = onnx.load_from_string(onnx_bytes).graph
    producer = next((n for n in graph.node if graph.output[0].name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = _constant_values(graph).get(producer.input[1])
    return None if scale is None or scale.size != 1 else float(scale.reshape(()))


def verify_qdq(
    onnx_bytes: bytes, model: nn.Module, spec: ModelSpec, split: Split
) -> dict[str, float]:
    """Compares ONNX Runtime's output with the fake-quantised torch model's on ``split``."""
    expected = predict(model, spec, split)
    actual = run_onnx(onnx_bytes, spec, split)
    if actual.shape != expected.shape:
        raise CompressionError(
            f"model '{spec.name}': QDQ output shape {actual.shape} differs from torch "
            f"{expected.shape}"
        )
    difference = float(np.abs(actual - expected).max())
    step = _output_step(onnx_bytes)
    tolerance = MAX_DIFFERENCE_STEPS * (
        step if step is not None else float(np.abs(expected).max()) / ACTIVATION_QMAX
    )
    if not difference <= tolerance:
        raise CompressionError(
            f"model '{spec.name}': the QDQ graph's output differs from the fake-quantised "
            f"torch model by up to {difference:.3g} (tolerance {tolerance:.3g})"
        )
    figures = {"max_abs_difference": difference, "tolerance": tolerance}
    if spec.task == "classification":
        agreement = np.mean(actual.argmax(axis=1) == expected.argmax(axis=1))
        figures["top1_agreement"] = float(agreement)
    return figures


# --- the handler ------------------------------------------------------------------------------


def _quality(
    onnx_bytes: bytes, inputs: TechniqueInput, reference_outputs: np.ndarray
) -> tuple[float, float]:
    """The spec's metric on the held-out split (a relative one against the reference's
    outputs), and agreement with the reference's outputs."""
    metric = get_metric(inputs.spec.metric)
    evaluation = evaluate_quality(onnx_bytes, inputs.spec, inputs.data)
    quality = evaluation.quality
    if quality is None:
        quality = metric.score_against(evaluation.outputs, reference_outputs)
    return quality, metric.agreement(evaluation.outputs, reference_outputs)


def _int8_static_baseline(inputs: TechniqueInput, fp32: bytes) -> tuple[bytes | None, str | None]:
    """The static INT8 quantisation of the reference's fp32 export, or why there is none
    (ONNX Runtime's static quantiser cannot prepare every graph, fused encoders among them)."""
    quiet = dataclasses.replace(inputs, report=lambda stage, fraction: None)
    try:
        quantized = quantize_int8(Int8Config(name="int8-static", mode="static"), fp32, quiet)
    except CompressionError as exc:
        return None, exc.message
    return quantized.onnx, None


@register_technique(QatConfig)
def quantization_aware_training(
    config: QatConfig, model: nn.Module, inputs: TechniqueInput
) -> TransformedModel:
    spec = inputs.spec
    inputs.report("folding batch normalisation", 0.02)
    folded, quantized = prepare(model, config.range_momentum)
    if quantized == 0:
        raise CompressionError(
            f"model '{spec.name}': qat found no convolution or linear layer to quantise"
        )
    inputs.report("calibrating activation ranges", 0.05)
    calibrate(model, spec, inputs.data.calibration)
    training = spec.training or TrainingConfig()
    epochs = default_finetune_epochs(training, config.epochs, 3)
    learning_rate = training.learning_rate * config.learning_rate_scale

    def on_epoch(done: int, total: int) -> None:
        inputs.report(f"quantisation-aware epoch {done}/{total}", 0.08 + 0.5 * done / total)

    labelled = spec.task == "classification"
    fine_tune(
        model,
        inputs.reference_model,
        spec,
        inputs.data.train,
        training,
        epochs,
        learning_rate,
        on_epoch,
        temperature=config.temperature if config.soft_weight > 0 else None,
        soft_weight=config.soft_weight,
    )
    for layer in _quantized_layers(model):
        layer.refresh()

    inputs.report("exporting the QDQ graph", 0.6)
    qdq, stored = export_qdq(model, spec, inputs.data.heldout)
    verification = verify_qdq(qdq, model, spec, inputs.data.heldout)
    fused = fused_operators(qdq)

    inputs.report("building the int8-static baseline", 0.65)
    fp32 = export_described(inputs.reference_model, spec, inputs.data.heldout).onnx
    int8_static, int8_static_error = _int8_static_baseline(inputs, fp32)
    inputs.report("evaluating against int8-static", 0.8)
    reference_outputs = run_onnx(fp32, spec, inputs.data.heldout)
    qat_quality, qat_agreement = _quality(qdq, inputs, reference_outputs)
    int8_quality, int8_agreement = (
        (None, None) if int8_static is None else _quality(int8_static, inputs, reference_outputs)
    )
    qualities = {
        "metric": spec.metric,
        "qat": qat_quality,
        "int8_static": int8_quality,
        "fp32": _quality(fp32, inputs, reference_outputs)[0],
    }
    details: dict[str, Any] = {
        "weights": f"int8 symmetric per output channel, within +-{WEIGHT_LEVELS}",
        "activations": "uint8 affine per tensor",
        "activation_ranges": (
            f"calibration min/max over {len(inputs.data.calibration)} rows, then a moving "
            f"average of each training batch's (momentum {config.range_momentum})"
        ),
        "folded_batch_norms": folded,
        "quantized_layers": quantized,
        "activation_quantizers": sum(1 for _ in _quantizers(model)),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "loss": (
            f"distillation from the reference (soft_weight {config.soft_weight}, "
            f"temperature {config.temperature})"
            if labelled
            else "1 - cosine to the reference's output"
        )
        if config.soft_weight > 0 or not labelled
        else "cross-entropy on the labels",
        "export": {
            "exporter": "torchscript",
            "opset": QDQ_OPSET,
            "format": "QDQ",
            **stored,
            "verified_against": "fake-quantised torch model, held-out split",
            **verification,
        },
        "ort_integer_operators": {
            op: count for op, count in fused.items() if op in FUSED_INTEGER_OPERATORS
        },
        "quality": qualities,
        "agreement_with_fp32": {"qat": qat_agreement, "int8_static": int8_agreement},
        "int8_static_bytes": None if int8_static is None else len(int8_static),
        # False where no baseline could be built: there is then nothing it was shown to beat.
        "beats_int8_static": int8_quality is not None and qat_quality > int8_quality,
        **({"int8_static_error": int8_static_error} if int8_static_error else {}),
    }
    return TransformedModel(model=model, details=details, onnx=qdq)
