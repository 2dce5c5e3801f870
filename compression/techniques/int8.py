"""``int8``: ONNX Runtime quantisation of a parent variant's artifact.

Static QDQ quantisation, calibrated on the provider's calibration split, suits convolutional
models (activations quantised too, so ORT runs QLinearConv on VNNI). Linear-heavy models with
dynamic activation ranges (transformers) get dynamic quantisation of weights instead.

Dynamic quantisation keeps the nodes most sensitive to it in FP32: a sensitivity pass
quantises each candidate node alone and measures how far the first output moves from the
parent's (cosine per row) on the calibration rows that quantising every node moves most; the
worst are then left out one at a time until the least similar calibration row (all of them
now) reaches ``min_calibration_cosine``.

Before that, dynamic mode rewrites each fused ``Attention`` node as a QKV ``MatMul`` and plain
attention operators (the same function): ONNX Runtime's ``QAttention`` ran slower on this CPU
than a quantised projection followed by FP32 attention, and its input quantisation cost
accuracy that made the sensitivity pass keep a projection in FP32. Each fused ``BiasGelu`` is
split into its bias ``Add`` and a ``Gelu`` too: ONNX Runtime then folds the bias into the
quantised MatMul before it, and a plain Gelu ran in about 60 % of BiasGelu's time. It then
smooths the inputs of the quantised nodes fed by a layer normalisation (SmoothQuant):
per-tensor activation quantisation is what loses accuracy in a transformer (weights quantised
per column alone keep all-MiniLM-L6-v2 at 0.999), and the normalisations' outputs carry a few
outlier channels that set the whole tensor's scale. Each such input channel j is divided by
``s_j = max|x_j| ** a / max|W_j| ** (1 - a)`` (an inserted Mul) and the weight's row j
multiplied by it, which leaves the FP32 function unchanged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from gearbox.compression.devices import CPU
from gearbox.compression.errors import CompressionError, InvalidArgumentError
from gearbox.compression.quality import row_cosines
from gearbox.compression.spec import Split
from gearbox.compression.techniques.base import (
    Stage,
    TechniqueConfig,
    TechniqueInput,
    TransformedArtifact,
)
from gearbox.compression.techniques.registry import register_technique

_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class Int8Config(TechniqueConfig):
    technique: ClassVar[str] = "quantize"
    stage: ClassVar[Stage] = Stage.ARTIFACT
    name: str = "int8"
    parent: str | None = "fp32"
    mode: Literal["auto", "static", "dynamic"] = "auto"
    calibration_method: str = "minmax"
    calibration_batch_size: int = 32
    per_channel: bool = True
    min_calibration_cosine: float | None = 0.99
    """Dynamic mode: the least similar calibration row must reach this cosine to the parent's
    output; None quantises every node."""
    max_excluded_fraction: float = 0.25
    """At most this share of the quantisable nodes is kept in FP32."""
    sensitivity_rows: int = 16
    """Dynamic mode: the sensitivity pass scores each node on this many calibration rows, the
    ones least similar to the parent's output with every node quantised."""
    smoothing_alpha: float | None = 0.8
    """Dynamic mode: the migration strength ``a`` of the smoothing of normalised inputs
    (0 moves nothing onto the weights, 1 all of the activation range); None smooths nothing."""
    unfuse_attention: bool = True
    """Dynamic mode: rewrite fused ``Attention`` nodes as plain operators before quantising."""
    unfuse_bias_gelu: bool = True
    """Dynamic mode: split fused ``BiasGelu`` nodes into their bias ``Add`` and ``Gelu``."""

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
        if self.min_calibration_cosine is not None and not (
            -1.0 <= self.min_calibration_cosine <= 1.0
        ):
            raise InvalidArgumentError("min_calibration_cosine must lie in [-1, 1]")
        if not 0.0 <= self.max_excluded_fraction <= 1.0:
            raise InvalidArgumentError("max_excluded_fraction must lie in [0, 1]")
        if self.sensitivity_rows < 1:
            raise InvalidArgumentError("sensitivity_rows must be at least 1")
        if self.smoothing_alpha is not None and not 0.0 <= self.smoothing_alpha <= 1.0:
            raise InvalidArgumentError("smoothing_alpha must lie in [0, 1]")


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


# Operators dynamic quantisation rewrites (ORT's defaults for dynamic mode).
_DYNAMIC_OP_TYPES = ("MatMul", "Attention", "Gemm", "LSTM", "Gather", "EmbedLayerNormalization")


def _quantize_dynamic(config: Int8Config, source: str, target: str, excluded: list[str]) -> None:
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        nodes_to_exclude=excluded,
        # Fused contrib operators (Attention, ...) have no ONNX type inference.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


# Producers whose outputs have per-channel outliers worth smoothing (layer normalisations).
_NORMALIZATION_OP_TYPES = frozenset(
    {
        "LayerNormalization",
        "SkipLayerNormalization",
        "EmbedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
    }
)


def smooth_normalized_inputs(
    model: onnx.ModelProto, rows: dict[str, np.ndarray], alpha: float
) -> list[str]:
    """Smooths, in place, the activation input of every MatMul or Attention node with a 2-D
    constant weight whose activation comes from a normalisation; returns those nodes."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    targets = [
        node
        for node in graph.node
        if node.op_type in ("MatMul", "Attention")
        and len(node.input) > 1
        and node.input[1] in weights
        and len(weights[node.input[1]].dims) == 2
        and node.input[0] in producers
        and producers[node.input[0]].op_type in _NORMALIZATION_OP_TYPES
        and node.name
    ]
    if not targets:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {output.name for output in probe.graph.output}
    names = list(dict.fromkeys(node.input[0] for node in targets))
    for name in names:
        if name not in known:
            probe.graph.output.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    session = CPU.create_session(probe.SerializeToString())
    activations = dict(zip(names, session.run(names, rows), strict=True))
    smoothed: list[str] = []
    for node in targets:
        # A weight shared with another node would change that node too: leave it alone.
        if sum(node.input[1] in other.input for other in graph.node) > 1:
            continue
        # Every position counts, padding too: the dynamic range at inference covers them.
        x = activations[node.input[0]]
        x_max = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
        weight = numpy_helper.to_array(weights[node.input[1]])
        if weight.shape[0] != x_max.shape[0]:
            continue
        w_max = np.abs(weight).max(axis=1).astype(np.float64)
        scale = np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
        scale = np.clip(scale, 1e-5, 1e5)
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array((weight * scale[:, None]).astype(weight.dtype), node.input[1])
        )
        inverse = f"{node.name}_smoothing_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        smoothed_input = f"{node.input[0]}_smoothed_for_{node.name}"
        mul = helper.make_node(
            "Mul", [node.input[0], inverse], [smoothed_input], name=f"{node.name}_smoothing"
        )
        node.input[0] = smoothed_input
        graph.node.insert(list(graph.node).index(node), mul)
        smoothed.append(node.name)
    return smoothed


_MASK_FILTER_VALUE = -10000.0
"""What ONNX Runtime's ``Attention`` adds to the scores of masked positions by default."""


def _attention_mask(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """The 2-D (batch, sequence) 0/1 mask an ``Attention`` node applies, "" when it applies
    none, or None if it takes another kind (sequence lengths, an additive bias): then it is
    left fused."""
    if len(node.input) < 4 or not node.input[3]:
        return ""
    source = producers.get(node.input[3])
    # The transformer optimizer passes the raw mask through EmbedLayerNormalization.
    if source is not None and source.op_type == "EmbedLayerNormalization":
        return source.input[7] if len(source.input) > 7 and source.input[7] else None
    return None


def _additive_mask(mask: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes and constants turning a 0/1 (batch, sequence) mask into what the scores get added:
    ``(1 - mask) * filter``, shaped (batch, 1, 1, sequence)."""
    constants = [
        numpy_helper.from_array(np.array(1.0, np.float32), f"{mask}/one"),
        numpy_helper.from_array(np.array(_MASK_FILTER_VALUE, np.float32), f"{mask}/filter"),
        numpy_helper.from_array(np.array([1, 2], np.int64), f"{mask}/axes"),
    ]
    steps = [
        ("Cast", [mask], f"{mask}/as_float", {"to": onnx.TensorProto.FLOAT}),
        ("Sub", [f"{mask}/one", f"{mask}/as_float"], f"{mask}/masked", {}),
        ("Mul", [f"{mask}/masked", f"{mask}/filter"], f"{mask}/additive_2d", {}),
        ("Unsqueeze", [f"{mask}/additive_2d", f"{mask}/axes"], f"{mask}/additive", {}),
    ]
    nodes = [helper.make_node(op, ins, [out], name=out, **attrs) for op, ins, out, attrs in steps]
    return nodes, constants, f"{mask}/additive"


def _plain_attention(
    node: onnx.NodeProto, heads: int, hidden: int, additive_mask: str | None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The operators one fused ``Attention`` node stands for, named under the node's name."""
    prefix = node.name
    head_size = hidden // heads
    nodes: list[onnx.NodeProto] = []
    constants = [
        numpy_helper.from_array(np.array([0, 0, heads, head_size], np.int64), f"{prefix}/heads"),
        numpy_helper.from_array(np.array([hidden] * 3, np.int64), f"{prefix}/split"),
        numpy_helper.from_array(np.array(1 / np.sqrt(head_size), np.float32), f"{prefix}/scale"),
        numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{prefix}/merged"),
    ]

    def step(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        name = f"{prefix}/{output}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    qkv = step("MatMul", [node.input[0], node.input[1]], "qkv_projection")
    if len(node.input) > 2 and node.input[2]:
        qkv = step("Add", [qkv, node.input[2]], "qkv")
    parts = [f"{prefix}/{part}" for part in ("q", "k", "v")]
    nodes.append(helper.make_node(
        "Split", [qkv, f"{prefix}/split"], parts, name=f"{prefix}/split_qkv", axis=-1
    ))  # fmt: skip
    query, key, value = (
        step("Transpose", [step("Reshape", [part, f"{prefix}/heads"], f"{part[-1]}_heads")],
             f"{part[-1]}_transposed", perm=perm)
        for part, perm in zip(parts, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]), strict=True)
    )  # fmt: skip
    scores = step("Mul", [step("MatMul", [query, key], "scores_raw"), f"{prefix}/scale"], "scores")
    if additive_mask is not None:
        scores = step("Add", [scores, additive_mask], "scores_masked")
    probabilities = step("Softmax", [scores], "probabilities", axis=-1)
    context = step("MatMul", [probabilities, value], "context_heads")
    context = step("Transpose", [context], "context_transposed", perm=[0, 2, 1, 3])
    nodes.append(helper.make_node(
        "Reshape", [context, f"{prefix}/merged"], [node.output[0]], name=f"{prefix}/context"
    ))  # fmt: skip
    return nodes, constants


def unfuse_attention(model: onnx.ModelProto) -> int:
    """Rewrites, in place, each fused ``Attention`` node that has only ``num_heads`` and a 2-D
    mask (or none) as its QKV projection and plain attention operators; returns how many."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    nodes: list[onnx.NodeProto] = []
    additive_masks: dict[str, str] = {}
    rewritten = 0
    for node in graph.node:
        mask = _attention_mask(node, producers) if node.op_type == "Attention" else None
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            mask is None
            or set(attributes) != {"num_heads"}
            or len(node.input) > 4
            or len(node.output) != 1
            or node.input[1] not in weights
            or not node.name
        ):
            nodes.append(node)
            continue
        if mask and mask not in additive_masks:
            mask_nodes, mask_constants, additive_masks[mask] = _additive_mask(mask)
            nodes += mask_nodes
            graph.initializer.extend(mask_constants)
        hidden = weights[node.input[1]].dims[1] // 3
        plain, constants = _plain_attention(
            node, int(attributes["num_heads"]), hidden, additive_masks.get(mask)
        )
        nodes += plain
        graph.initializer.extend(constants)
        rewritten += 1
    _replace_nodes(graph, nodes)
    return rewritten


def unfuse_bias_gelu(model: onnx.ModelProto) -> int:
    """Rewrites, in place, each ``BiasGelu`` node as its bias ``Add`` and a ``Gelu``; returns
    how many."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "BiasGelu" or node.domain != "com.microsoft" or not node.name:
            nodes.append(node)
            continue
        biased = f"{node.name}/biased"
        nodes += [
            helper.make_node("Add", list(node.input), [biased], name=f"{node.name}/bias"),
            helper.make_node(
                "Gelu",
                [biased],
                list(node.output),
                name=f"{node.name}/gelu",
                domain="com.microsoft",
            ),
        ]
    rewritten = len(nodes) - len(graph.node)
    _replace_nodes(graph, nodes)
    return rewritten


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Makes ``nodes`` the graph's, declaring every tensor they newly write FP32 (the rewrites
    here write nothing else; saying so spares the quantiser a warning for each)."""
    produced = {output for node in graph.node for output in node.output}
    typed = {info.name for info in (*graph.value_info, *graph.output)}
    created = {output for node in nodes for output in node.output} - produced - typed
    float_tensor = onnx.TensorProto.FLOAT
    graph.value_info.extend(
        helper.make_tensor_value_info(name, float_tensor, None) for name in sorted(created)
    )
    del graph.node[:]
    graph.node.extend(nodes)


def _first_output(path: str, rows: dict[str, np.ndarray]) -> np.ndarray:
    return CPU.create_session(Path(path).read_bytes()).run(None, rows)[0]


def _quantize_dynamic_keeping_sensitive(
    config: Int8Config, source: str, target: str, calibration: Split, inputs: TechniqueInput
) -> tuple[list[str], float]:
    """Quantises ``source`` into ``target``, leaving out the most sensitive nodes; returns
    them and the least cosine of a calibration row to the parent's output."""
    rows = calibration.take(len(calibration))
    expected = _first_output(source, rows)

    def cosines(path: str, feed: dict[str, np.ndarray], reference: np.ndarray) -> np.ndarray:
        return row_cosines(_first_output(path, feed), reference)

    inputs.report("quantizing weights", 0.3)
    _quantize_dynamic(config, source, target, [])
    every_node = cosines(target, rows, expected)
    worst = float(every_node.min())
    if config.min_calibration_cosine is None or worst >= config.min_calibration_cosine:
        return [], worst
    model = onnx.load(source)
    candidates = [n.name for n in model.graph.node if n.op_type in _DYNAMIC_OP_TYPES and n.name]
    limit = int(len(candidates) * config.max_excluded_fraction)
    # Scoring every node on every row took most of a MiniLM build (27 nodes x 128 rows of 64
    # tokens); the rows full quantisation moves most are the ones the target is judged on.
    probed = np.argsort(every_node)[: config.sensitivity_rows]
    probe_rows = {name: values[probed] for name, values in rows.items()}
    sensitivity: dict[str, float] = {}
    probe = f"{target}.probe.onnx"
    for index, node in enumerate(candidates):
        inputs.report(
            f"sensitivity of node {index + 1}/{len(candidates)}",
            0.3 + 0.4 * index / len(candidates),
        )
        others = [name for name in candidates if name != node]
        _quantize_dynamic(config, source, probe, others)
        sensitivity[node] = float(cosines(probe, probe_rows, expected[probed]).min())
    excluded: list[str] = []
    for node in sorted(candidates, key=sensitivity.__getitem__)[:limit]:
        excluded.append(node)
        inputs.report(f"keeping {len(excluded)} sensitive node(s) in FP32", 0.75)
        _quantize_dynamic(config, source, target, excluded)
        worst = float(cosines(target, rows, expected).min())
        if worst >= config.min_calibration_cosine:
            break
    return excluded, worst


def _prepare_for_static(source: str, prepared: str, workdir: str) -> None:
    """ONNX Runtime's pre-processing, with its symbolic shape inference where it completes.

    When that inference is incomplete ONNX Runtime writes a debugging copy of the model into
    the current directory before it raises, hence the change of directory; ONNX's own shape
    inference is then enough for static quantisation."""
    with contextlib.chdir(workdir):
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=False)
        except Exception:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)


@register_technique(Int8Config)
def quantize_int8(
    config: Int8Config, parent_artifact: bytes, inputs: TechniqueInput
) -> TransformedArtifact:
    parent = onnx.load_from_string(parent_artifact)
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
            f.write(parent_artifact)
        try:
            if mode == "static":
                inputs.report("preparing graph for quantization", 0.2)
                _prepare_for_static(source, prepared, workdir)
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
                # Dynamic mode rewrites weights only and needs no shape pre-processing, which
                # cannot infer the shapes of fused transformer operators anyway.
                rewritten = onnx.load(source)
                if config.unfuse_attention:
                    params.update(unfused_attention_nodes=unfuse_attention(rewritten))
                if config.unfuse_bias_gelu:
                    params.update(unfused_bias_gelu_nodes=unfuse_bias_gelu(rewritten))
                if config.smoothing_alpha is not None:
                    inputs.report("smoothing normalised activations", 0.2)
                    smoothed = smooth_normalized_inputs(
                        rewritten, calibration.take(len(calibration)), config.smoothing_alpha
                    )
                    params.update(smoothing_alpha=config.smoothing_alpha, smoothed_nodes=smoothed)
                source = os.path.join(workdir, "rewritten.onnx")
                onnx.save(rewritten, source)
                excluded, min_cosine = _quantize_dynamic_keeping_sensitive(
                    config, source, target, calibration, inputs
                )
                params.update(
                    excluded_nodes=excluded,
                    calibration_min_cosine=round(min_cosine, 6),
                    calibration_samples=len(calibration),
                )
        except CompressionError:
            raise
        except Exception as exc:
            raise CompressionError(
                f"model '{inputs.spec.name}': int8 quantization ({mode}) failed: {exc}"
            ) from exc
        with open(target, "rb") as f:
            artifact = f.read()
    return TransformedArtifact(onnx=artifact, details=params)
