"""Torch -> ONNX export, offline graph optimisation, and verification against torch.

Transformer encoders ONNX Runtime's transformer optimizer knows (BERT and its kin) are
exported with torch's TorchScript exporter, whose graph the optimizer's fusion patterns
match, and then fused (attention, embedding and skip LayerNorm, bias+GELU) ahead of time;
every other model goes through the dynamo exporter and ONNX Runtime's basic optimisations.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from gearbox.compression.devices import CPU
from gearbox.compression.errors import CompressionError
from gearbox.compression.signature import oip_datatype
from gearbox.compression.spec import ModelSpec, Split
from gearbox.compression.training import model_inputs, predict

# Differences seen from operator fusion (Conv+BatchNorm folding) are around 1e-5.
VERIFY_RTOL = 1e-3
VERIFY_ATOL = 1e-4


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON_CHARS = 300


def _root_cause(error: BaseException) -> str:
    """The innermost exception's first line: the exporter wraps the real reason in advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(error)).splitlines()]
    reason = next((line for line in lines if line), type(error).__name__)
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 1] + "…"
    return f"{type(error).__name__}: {reason}"


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` while the block runs."""
    logger = logging.getLogger(logger_name)
    previous_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous_level)


@contextlib.contextmanager
def _exporting(spec: ModelSpec) -> Iterator[None]:
    """Quiets the exporter's logs and warnings; any failure becomes one clear error."""
    try:
        with _quiet("torch.onnx"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        raise CompressionError(
            f"model '{spec.name}': ONNX export failed: {_root_cause(exc)}"
        ) from exc


def export_onnx(model: nn.Module, spec: ModelSpec, sample: Split) -> bytes:
    """Export ``model`` with the signature's names and every -1 dimension left dynamic."""
    model.eval()
    # Two rows, so the exporter cannot specialise the batch dimension to 1.
    args = tuple(model_inputs(spec, sample.take(2)))
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis, size in enumerate(t.shape) if size == -1}
        for t in spec.signature.inputs
    )
    with _exporting(spec):
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=spec.signature.input_names,
            output_names=spec.signature.output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise CompressionError(f"model '{spec.name}': ONNX export produced no program")
    return program.model_proto.SerializeToString()


FUSABLE_MODEL_TYPES = ("bert",)
"""Hugging Face model types whose fusion into ONNX Runtime's transformer operators is checked
by the tests (the optimizer knows more; each would need its own check)."""
TRANSFORMER_OPSET = 17


@dataclass(frozen=True)
class TransformerShape:
    """What ONNX Runtime's transformer optimizer needs to know of an encoder."""

    model_type: str
    num_heads: int
    hidden_size: int
    """The attention's width: the model's hidden size, or less after heads were pruned."""


def transformer_shape(model: nn.Module) -> TransformerShape | None:
    """The shape of the first Hugging Face encoder of a fusable type inside ``model``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in FUSABLE_MODEL_TYPES:
            # The optimizer matches attention by its width, which is the hidden size unless
            # pruning removed heads (then the heads left times the head size).
            width = next(
                (int(m.all_head_size) for m in module.modules() if hasattr(m, "all_head_size")),
                int(config.hidden_size),
            )
            return TransformerShape(config.model_type, int(config.num_attention_heads), width)
    return None


def export_transformer(model: nn.Module, spec: ModelSpec, sample: Split) -> bytes:
    """TorchScript export (the graph ONNX Runtime's fusions match), every -1 left dynamic."""
    return export_torchscript(model, spec, sample, TRANSFORMER_OPSET)


def export_torchscript(model: nn.Module, spec: ModelSpec, sample: Split, opset: int) -> bytes:
    """The TorchScript exporter at ``opset``, with the signature's names and every -1
    dimension left dynamic: what fused transformers and fake-quantised models need."""
    model.eval()
    args = tuple(model_inputs(spec, sample.take(2)))
    dynamic_axes = {
        tensor.name: {axis: f"{tensor.name}_{axis}" for axis, size in enumerate(tensor.shape)
                      if size == -1}
        for tensor in (*spec.signature.inputs, *spec.signature.outputs)
    }  # fmt: skip
    buffer = io.BytesIO()
    with _exporting(spec):
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            input_names=spec.signature.input_names,
            output_names=spec.signature.output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def fuse_transformer(model_bytes: bytes, shape: TransformerShape) -> tuple[bytes, dict[str, int]]:
    """ONNX Runtime's transformer optimizer, provider-independent fusions only (opt_level 0);
    the fused graph and how many of each fused operator it holds."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(shape.model_type)
    # Left as Add + LayerNormalization: ONNX Runtime 1.32's CPU SkipLayerNormalization took
    # 167 us for 64 x 384 against 26 us for LayerNormalization (and 11 us for an elementwise
    # op); the fused MiniLM ran 17.3-17.8 ms, the unfused one 14.9-16.5 ms.
    options.enable_skip_layer_norm = False
    with _quiet("onnxruntime.transformers"):
        fused = optimizer.optimize_model(
            onnx.load_from_string(model_bytes),
            model_type=shape.model_type,
            num_heads=shape.num_heads,
            hidden_size=shape.hidden_size,
            opt_level=0,
            optimization_options=options,
        )
    counts = {name: n for name, n in fused.get_fused_operator_statistics().items() if n}
    # Saving sorts the graph and declares the com.microsoft domain of the fused operators.
    with tempfile.TemporaryDirectory(prefix="gearbox-fuse-") as workdir:
        target = os.path.join(workdir, "fused.onnx")
        fused.save_model_to_file(target)
        with open(target, "rb") as f:
            return f.read(), counts


def optimize_offline(model_bytes: bytes) -> bytes:
    """Apply ONNX Runtime's provider-independent (basic) graph optimisations ahead of time.

    Extended and layout optimisations are left to session creation because they emit
    provider-specific fused operators that would tie the artifact to one execution provider.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="gearbox-opt-") as workdir:
        target = os.path.join(workdir, "optimized.onnx")
        options.optimized_model_filepath = target
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        with open(target, "rb") as f:
            return f.read()


def run_onnx(
    model_bytes: bytes, spec: ModelSpec, split: Split, batch_size: int = 256
) -> np.ndarray:
    """First output of the ONNX model on every row of ``split`` (cpu device class)."""
    session = CPU.create_session(model_bytes)
    output_name = spec.signature.output_names[0]
    chunks = [
        session.run([output_name], split.take(batch_size, offset))[0]
        for offset in range(0, len(split), batch_size)
    ]
    return np.concatenate(chunks)


def verify_against_torch(
    model_bytes: bytes, model: nn.Module, spec: ModelSpec, split: Split
) -> float:
    """Check that ONNX Runtime reproduces torch on ``split``; return the largest difference."""
    expected = predict(model, spec, split)
    actual = run_onnx(model_bytes, spec, split)
    if actual.shape != expected.shape:
        raise CompressionError(
            f"model '{spec.name}': ONNX output shape {actual.shape} differs from torch "
            f"{expected.shape}"
        )
    difference = np.abs(actual - expected)
    if not np.all(difference <= VERIFY_ATOL + VERIFY_RTOL * np.abs(expected)):
        raise CompressionError(
            f"model '{spec.name}': ONNX Runtime output differs from torch by up to "
            f"{float(difference.max()):.3g} on the held-out split"
        )
    return float(difference.max())


def _graph_tensor_type(value: onnx.ValueInfoProto) -> tuple[str, list[int] | None]:
    """A graph input's or output's OIP datatype and shape (-1 for a symbolic dimension; None
    when the graph records no shape)."""
    tensor_type = value.type.tensor_type
    try:
        datatype = oip_datatype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):  # no numpy twin (e.g. UNDEFINED)
        datatype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return datatype, None
    return datatype, [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]


def _graph_shape_fits(declared: tuple[int, ...], graph: list[int], kind: str) -> bool:
    """Declared fixed sizes must be the graph's (a symbolic one is checked at run time). A
    dynamic input must be dynamic in the graph too, or requests of other sizes would fail; a
    dynamic output may be fixed (the declaration is looser than the model, not wrong)."""
    if len(graph) != len(declared):
        return False
    return all(
        got == want or (got == -1 and want != -1) or (want == -1 and kind == "output")
        for want, got in zip(declared, graph, strict=True)
    )


def check_graph_signature(model_bytes: bytes, spec: ModelSpec, variant: str) -> None:
    """Raise unless the graph's inputs and outputs are the declared ones: the same names in the
    same order, the same datatypes and ranks, and sizes as :func:`_graph_shape_fits` allows.

    Serving asks ONNX Runtime for the declared names and model metadata advertises the declared
    shapes, so a graph that differs must not be published. The graph is parsed, not run.
    """
    graph = onnx.load_from_string(model_bytes).graph
    initializers = {tensor.name for tensor in graph.initializer}
    # Older IR versions list initializers among the inputs; they are weights, not inputs.
    graph_inputs = [value for value in graph.input if value.name not in initializers]
    where = f"model '{spec.name}', variant '{variant}'"
    for kind, declared, actual in (
        ("input", spec.signature.inputs, graph_inputs),
        ("output", spec.signature.outputs, list(graph.output)),
    ):
        declared_names = [t.name for t in declared]
        actual_names = [value.name for value in actual]
        if actual_names != declared_names:
            raise CompressionError(
                f"{where}: the ONNX graph's {kind}s are ({', '.join(actual_names)}), "
                f"declared ({', '.join(declared_names)})"
            )
        for tensor, value in zip(declared, actual, strict=True):
            datatype, shape = _graph_tensor_type(value)
            if datatype != tensor.datatype:
                raise CompressionError(
                    f"{where}: ONNX graph {kind} '{tensor.name}' has datatype {datatype}, "
                    f"declared {tensor.datatype}"
                )
            if shape is not None and not _graph_shape_fits(tensor.shape, shape, kind):
                raise CompressionError(
                    f"{where}: ONNX graph {kind} '{tensor.name}' has shape {shape}, "
                    f"declared {list(tensor.shape)} (-1: any size)"
                )


@dataclass(frozen=True)
class ExportedGraph:
    onnx: bytes
    description: Mapping[str, Any]
    """How the graph was made, for the manifest's ``params``."""


def export_described(model: nn.Module, spec: ModelSpec, heldout: Split) -> ExportedGraph:
    """Export, optimise offline (fusing transformers), and verify the result against torch."""
    shape = transformer_shape(model)
    if shape is None:
        optimized = optimize_offline(export_onnx(model, spec, heldout))
        description: dict[str, Any] = {"exporter": "dynamo", "graph_optimization": "ort-basic"}
    else:
        optimized, fused = fuse_transformer(export_transformer(model, spec, heldout), shape)
        description = {
            "exporter": "torchscript",
            "opset": TRANSFORMER_OPSET,
            "graph_optimization": f"onnxruntime transformer optimizer ({shape.model_type})",
            "fused_operators": fused,
        }
    verify_against_torch(optimized, model, spec, heldout)
    return ExportedGraph(optimized, {**description, "verified": True})


def export_verified(model: nn.Module, spec: ModelSpec, heldout: Split) -> bytes:
    """Export, optimise offline, and verify the optimised graph against torch."""
    return export_described(model, spec, heldout).onnx
